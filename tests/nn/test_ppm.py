"""Fused PyramidPooling against the reference, on every backend that runs here, on shapes that break naive kernels."""
import pytest
import torch

import pspnet_fast
from pspnet_fast import ops
from pspnet_fast.reference import PyramidPooling as RefPPM

from ..utils import _backends, _device, _layout, _skip_unavailable, assert_close_to_ref, make_ref


BINS = [(1, 2, 3, 6), (1, 3, 6, 8), (2,), (6,)]
SIZES = [(1, 1), (2, 5), (5, 2), (13, 13), (60, 64), (97, 13), (1, 97)]
LAYOUTS = ["contiguous", "channels_last", "view"]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("bins", BINS, ids=lambda b: "b" + "-".join(map(str, b)))
@pytest.mark.parametrize("hw", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("align_corners", [True, False], ids=["ac", "noac"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_matches_reference_float32(backend, bins, hw, align_corners, layout, train):
    _skip_unavailable(backend)
    dev = _device(backend)
    c = 8 if len(bins) < 4 else 16
    ref = make_ref(c, bins, align_corners, device=dev).train(train)
    fused = pspnet_fast.PyramidPooling.from_reference(ref, backend=backend)
    assert fused.training == train
    x = _layout(torch.randn(3, c, *hw, device=dev) * 3 + 1, layout)
    expect = ref(x)
    got = fused(x)
    assert_close_to_ref(got, expect, torch.float32)
    if layout == "channels_last" and hw != (1, 1):
        assert got.is_contiguous(memory_format=torch.channels_last)
    elif layout != "channels_last":
        assert got.is_contiguous()
    if train:  # running statistics updated identically
        for a, b in zip(ref.state_dict().items(), fused.state_dict().items()):
            assert a[0] == b[0]
            torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("n", [0, 1, 3])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_batch_sizes(backend, n, train):
    _skip_unavailable(backend)
    dev = _device(backend)
    bins = (1, 2, 3, 6) if not (train and n == 1) else (2, 3)  # BN on a 1x1 map of one image cannot train
    ref = make_ref(8, bins, device=dev).train(train)
    fused = pspnet_fast.PyramidPooling.from_reference(ref, backend=backend)
    x = torch.randn(n, 8, 7, 9, device=dev)
    assert_close_to_ref(fused(x), ref(x), torch.float32)
    for (k, a), (_, b) in zip(ref.state_dict().items(), fused.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("backend", _backends())
def test_train_batch_one_bin_one_raises_like_reference(backend):
    _skip_unavailable(backend)
    dev = _device(backend)
    ref = make_ref(8, (1, 2), device=dev).train()
    fused = pspnet_fast.PyramidPooling.from_reference(ref, backend=backend)
    x = torch.randn(1, 8, 5, 5, device=dev)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ref(x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(x)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("bins", [(1, 2, 3, 6), (1, 3, 6, 8)], ids=lambda b: "b" + "-".join(map(str, b)))
@pytest.mark.parametrize("hw", [(2, 5), (13, 13), (64, 97)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("align_corners", [True, False], ids=["ac", "noac"])
def test_matches_reference_float64(backend, bins, hw, align_corners):
    _skip_unavailable(backend)
    dev = _device(backend)
    ref = make_ref(16, bins, align_corners, dtype=torch.float64, device=dev).eval()
    fused = pspnet_fast.PyramidPooling.from_reference(ref, backend=backend)
    x = torch.randn(2, 16, *hw, device=dev, dtype=torch.float64)
    got = fused(x)
    assert got.dtype == torch.float64
    assert_close_to_ref(got, ref(x), torch.float64)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("hw", [(5, 2), (13, 13), (60, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_types(backend, dtype, hw, layout):
    _skip_unavailable(backend)
    dev = _device(backend)
    ref64 = make_ref(16, (1, 2, 3, 6), dtype=torch.float64, device=dev).eval()
    ref_h = make_ref(16, (1, 2, 3, 6), dtype=dtype, device=dev).eval()
    fused = pspnet_fast.PyramidPooling.from_reference(ref_h, backend=backend)
    x = _layout(torch.randn(2, 16, *hw, device=dev).to(dtype), layout)
    expect64 = ref64(x.double())
    got = fused(x)
    assert got.dtype == dtype
    assert_close_to_ref(got, ref_h(x), dtype, ref64=expect64, ref_dtype_out=ref_h(x))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (6, 6), (13, 11), (64, 60)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("align_corners", [True, False], ids=["ac", "noac"])
@pytest.mark.parametrize("special", ["nan", "inf", "-inf"])
def test_nonfinite_reach_the_same_outputs(backend, hw, align_corners, special):
    _skip_unavailable(backend)
    dev = _device(backend)
    bins = (1, 2, 3, 6)
    ref = make_ref(8, bins, align_corners, device=dev).eval()
    fused = pspnet_fast.PyramidPooling.from_reference(ref, backend=backend)
    x = torch.randn(2, 8, *hw, device=dev)
    x[0, 3, hw[0] // 2, hw[1] - 1] = float(special)
    x[1, 5, 0, 0] = float(special)
    expect, got = ref(x), fused(x)
    assert torch.equal(torch.isnan(expect), torch.isnan(got))
    assert torch.equal(torch.isposinf(expect), torch.isposinf(got))
    assert torch.equal(torch.isneginf(expect), torch.isneginf(got))
    finite = torch.isfinite(expect)
    assert_close_to_ref(got[finite], expect[finite], torch.float32)


def test_state_dict_loads_both_ways():
    ref = make_ref(16, (1, 2, 3, 6))
    fused = pspnet_fast.PyramidPooling(16)
    assert list(ref.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(ref.state_dict(), strict=True)
    ref2 = RefPPM(16)
    ref2.load_state_dict(fused.state_dict(), strict=True)
    for (k, a), (_, b) in zip(ref.state_dict().items(), ref2.state_dict().items()):
        assert torch.equal(a, b), k


def test_from_reference_rejects_other_modules():
    with pytest.raises(TypeError, match="PyramidPooling"):
        pspnet_fast.PyramidPooling.from_reference(torch.nn.Conv2d(2, 2, 1))


def test_backend_choice_and_override(monkeypatch):
    x = torch.randn(1, 8, 5, 5)
    assert ops.choose_backend(x) in ("cpu", "reference")
    monkeypatch.setenv("PSPNET_FAST_BACKEND", "reference")
    assert ops.choose_backend(x, "cpu") == "reference"
    monkeypatch.setenv("PSPNET_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PSPNET_FAST_BACKEND"):
        ops.choose_backend(x)
    monkeypatch.delenv("PSPNET_FAST_BACKEND")
    with pytest.raises(ValueError, match="cuda"):
        ops.choose_backend(x, "cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        pspnet_fast.PyramidPooling(8, backend="fast")


def test_available_backends_reports_reasons():
    av = pspnet_fast.available_backends()
    assert set(av) == {"cpu", "cuda", "triton", "reference"}
    assert av["reference"]["available"]
    for name, st in av.items():
        assert st["available"] or st["reason"], name


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradients_match_reference(backend, train, layout):
    _skip_unavailable(backend)
    dev = _device(backend)
    ref = make_ref(8, (1, 2, 3, 6), align_corners=False, device=dev).train(train)
    fused = pspnet_fast.PyramidPooling.from_reference(ref, backend=backend)
    x = _layout(torch.randn(3, 8, 13, 11, device=dev), layout)
    g = torch.randn(3, 16, 13, 11, device=dev)
    xr = x.detach().clone().requires_grad_()
    xf = x.detach().clone().requires_grad_()
    (ref(xr) * g).sum().backward()
    (fused(xf) * g).sum().backward()
    scale = xr.grad.abs().max().item()
    assert (xr.grad - xf.grad).abs().max().item() <= 1e-4 * scale
    for (k, pr), (_, pf) in zip(ref.named_parameters(), fused.named_parameters()):
        assert pf.grad is not None, k
        assert (pr.grad - pf.grad).abs().max().item() <= 1e-4 * pr.grad.abs().max().item() + 1e-6, k


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("align_corners", [True, False], ids=["ac", "noac"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64_cpu(seed, align_corners, train, layout):
    """Gradients for x, every 1x1 weight and the BatchNorm affine parameters, overlapping bins (5x4 map, bins 2, 3)."""
    _skip_unavailable("cpu")
    ref = make_ref(4, (1, 2, 3), align_corners, dtype=torch.float64, seed=seed).train(train)
    fused = pspnet_fast.PyramidPooling.from_reference(ref, backend="cpu")
    x = _layout(torch.randn(2, 4, 5, 4, dtype=torch.float64), layout).requires_grad_()
    names = [n for n, _ in fused.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in fused.named_parameters()]

    def f(x, *ps):
        # In training BatchNorm updates running statistics on each call but never reads them: repeated calls agree.
        return torch.func.functional_call(fused, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


def _opcheck_cases():
    d = dict(dtype=torch.float64)
    return [
        ("pyramid_pool", lambda: (torch.randn(2, 3, 7, 5, **d, requires_grad=True), [1, 2, 3])),
        ("pyramid_pool", lambda: (torch.randn(2, 3, 7, 5).to(memory_format=torch.channels_last), [4])),
        ("ppm_reduce", lambda: (torch.randn(2, 3, 14, **d, requires_grad=True), torch.randn(3, 2, 3, **d),
                                torch.rand(3, 2, **d), torch.randn(3, 2, **d), [1, 2, 3], True)),
        ("ppm_reduce", lambda: (torch.randn(2, 3, 14), torch.randn(3, 2, 3, requires_grad=True), None, None,
                                [1, 2, 3], False)),
        ("upsample_concat", lambda: (torch.randn(2, 3, 7, 5, **d), torch.randn(2, 2, 14, **d, requires_grad=True),
                                     [1, 2, 3], True)),
        ("upsample_concat", lambda: (torch.randn(2, 3, 7, 5).to(memory_format=torch.channels_last),
                                     torch.randn(2, 2, 14), [1, 2, 3], False)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_opcheck(case):
    _skip_unavailable("cpu")
    ops.ensure_registered("cpu")
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.pspnet_fast, op).default, args())


def test_torch_compile_fullgraph():
    _skip_unavailable("cpu")
    ref = make_ref(8, (1, 2, 3, 6)).eval()
    fused = pspnet_fast.PyramidPooling.from_reference(ref, backend="cpu")
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 8, 13, 11)
    assert_close_to_ref(compiled(x), ref(x), torch.float32)



@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_outputs_reuse_cached_buffers(layout):
    """Outputs past the CPU kernels' thresholds (streaming stores >= 16 MB, buffer cache >= 4 MB): repeated calls of
    one size reuse freed buffers, which must be fully rewritten each time."""
    _skip_unavailable("cpu")
    ref = make_ref(256, (1, 2, 3, 6)).eval()
    fused = pspnet_fast.PyramidPooling.from_reference(ref, backend="cpu")
    with torch.no_grad():
        for seed in range(3):
            torch.manual_seed(seed)
            x = _layout(torch.randn(2, 256, 64, 97) * (seed + 1), layout)
            got = fused(x)
            assert got.nbytes >= 16 << 20
            assert_close_to_ref(got, ref(x), torch.float32)
            del got
