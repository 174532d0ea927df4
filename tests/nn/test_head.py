"""The fused PSP head against the reference head, and its two ops against their pure-PyTorch truth, on every backend
that runs here, on sizes where the 3x3 padding touches every tap and every bin."""
import pytest
import torch

import pspnet_fast
from pspnet_fast import ops
from pspnet_fast import reference as R
from pspnet_fast.nn.head import PSPHead
from pspnet_fast.reference import PSPHead as RefHead

from ..utils import _backends, _device, _layout, _skip_unavailable
from ..utils import randomize_bn

BINS = [(1, 2, 3, 6), (1, 3, 6, 8), (2,)]
SIZES = [(1, 1), (2, 2), (3, 3), (13, 13), (40, 40), (2, 5), (5, 9), (13, 3)]


def _kernels(backend):
    _skip_unavailable(backend)
    ops.ensure_registered(backend)
    kernels = ops.op_set(backend)
    if kernels.head_epilogue is None:
        pytest.skip(f"backend {backend} has no fused-head kernels")
    return kernels


def make_head(c=16, bins=(1, 2, 3, 6), align_corners=True, classes=5, red=4, mid=8, dropout=0.0, seed=0,
              dtype=torch.float32, device="cpu"):
    """A reference head with non-trivial BatchNorm statistics everywhere."""
    torch.manual_seed(seed)
    ref = RefHead(c, classes, bins, red, mid, dropout, align_corners)
    randomize_bn(ref)
    return ref.to(device=device, dtype=dtype)


def _close(got, want, rel, name="", floor=1e-9):
    """max|got - want| <= rel * max|want| + floor (a floor for gradients that are zero in exact arithmetic and
    rounding noise in both implementations, e.g. a 1x1 conv under BatchNorm over a batch of two values)."""
    assert got.shape == want.shape, (name, got.shape, want.shape)
    d = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    scale = want.double().abs().max().item() if want.numel() else 0.0
    assert d <= rel * scale + floor, (name, d, scale)


# ----------------------------------------------------------------------------------------------------------------
# The ops against reference.head_epilogue / head_context_backward.
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("bins", BINS, ids=lambda b: "b" + "-".join(map(str, b)))
@pytest.mark.parametrize("hw", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("align_corners", [True, False], ids=["ac", "noac"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "view"])
def test_ops_match_truth_float32(backend, bins, hw, align_corners, layout):
    k = _kernels(backend)
    dev = _device(backend)
    torch.manual_seed(0)
    n, o, s = 2, 5, sum(b * b for b in bins)
    z = _layout(torch.randn(n, o, *hw, device=dev), layout)
    q = torch.randn(n, o, 9, s, device=dev)
    scale, shift = torch.rand(o, device=dev) + 0.5, torch.randn(o, device=dev)
    for args in [(None, None, False), (scale, shift, True), (None, None, True), (scale, shift, False)]:
        got = k.head_epilogue(z, q, bins, align_corners, *args)
        want = R.head_epilogue(z, q, bins, align_corners, *args)
        assert got.dtype == want.dtype
        if layout == "channels_last" and min(hw) > 1:
            assert got.is_contiguous(memory_format=torch.channels_last)
        elif layout != "channels_last":
            assert got.is_contiguous()
        _close(got, want, 1e-5, str(args[2]))
    g = _layout(torch.randn(n, o, *hw, device=dev), layout)
    _close(k.head_context_backward(g, bins, align_corners), R.head_context_backward(g, bins, align_corners), 1e-5)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_ops_dtypes(backend, dtype):
    k = _kernels(backend)
    dev = _device(backend)
    torch.manual_seed(0)
    bins, hw = (1, 2, 3, 6), (13, 9)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    z = torch.randn(2, 3, *hw, device=dev)
    q = torch.randn(2, 3, 9, 50, device=dev, dtype=acc)
    scale, shift = torch.rand(3, device=dev, dtype=acc) + 0.5, torch.randn(3, device=dev, dtype=acc)
    got = k.head_epilogue(z.to(dtype), q, bins, False, scale, shift, True)
    assert got.dtype == dtype
    exact = R.head_epilogue(z.to(dtype).double(), q.double(), bins, False, scale.double(), shift.double(), True)
    if dtype == torch.float64:
        _close(got, exact, 1e-12)
    else:
        # the only rounding beyond float32's is the final store in the half type
        _close(got, exact, 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10)
    gq = k.head_context_backward(z.to(dtype), bins, True)
    assert gq.dtype == acc
    _close(gq, R.head_context_backward(z.to(dtype).double(), bins, True), 1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("backend", _backends())
def test_ops_empty_batch_and_nan(backend):
    k = _kernels(backend)
    dev = _device(backend)
    bins = (1, 2, 3, 6)
    z = torch.randn(0, 4, 5, 5, device=dev)
    assert k.head_epilogue(z, torch.randn(0, 4, 9, 50, device=dev), bins, True, None, None, True).shape == z.shape
    assert k.head_context_backward(z, bins, True).shape == (0, 4, 9, 50)
    z = torch.randn(1, 4, 5, 7, device=dev)
    z[0, 1, 2, 3] = float("nan")
    got = k.head_epilogue(z, torch.randn(1, 4, 9, 50, device=dev), bins, True, None, None, True)
    assert torch.equal(torch.isnan(got), torch.isnan(z))  # NaN passes the ReLU and stays where it was


@pytest.mark.parametrize("backend", _backends())
def test_ops_bad_input(backend):
    k = _kernels(backend)
    dev = _device(backend)
    bins = (1, 2)
    z = torch.randn(1, 4, 5, 5, device=dev)
    q = torch.randn(1, 4, 9, 5, device=dev)
    # The shared checker's exceptions and text (pspnet_fast/_checks.py, csrc/op_checks.h; tests/ops/test_checks.py).
    with pytest.raises(ValueError, match="q must be of shape"):
        k.head_epilogue(z, q[..., :4], bins, True, None, None, False)
    with pytest.raises(TypeError, match="q must be torch.float32 for torch.float32 z, got torch.float64"):
        k.head_epilogue(z, q.double(), bins, True, None, None, False)
    with pytest.raises(ValueError, match="together"):
        k.head_epilogue(z, q, bins, True, torch.ones(4, device=dev), None, False)
    with pytest.raises(ValueError, match=r"\(N, O, H, W\)"):
        k.head_context_backward(z[0], bins, True)


def test_op_autograd_gradcheck_float64():
    """The ops' registered autograd formula (used by torch.compile), in float64."""
    k = _kernels("cpu")
    torch.manual_seed(0)
    bins = (1, 2, 3)
    z = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, 3, 9, 14, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    shift = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for ac in (True, False):
        assert torch.autograd.gradcheck(lambda *a: k.head_epilogue(a[0], a[1], bins, ac, a[2], a[3], True),
                                        (z, q, scale, shift))
        assert torch.autograd.gradcheck(lambda *a: k.head_epilogue(a[0], a[1], bins, ac, None, None, False), (z, q))


# ----------------------------------------------------------------------------------------------------------------
# The module against the reference head.
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("hw", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("align_corners", [True, False], ids=["ac", "noac"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_head_matches_reference(backend, hw, align_corners, train):
    _kernels(backend)
    dev = _device(backend)
    ref = make_head(align_corners=align_corners, device=dev).train(train)
    fused = PSPHead.from_reference(ref, backend=backend)
    assert fused.training == train
    torch.manual_seed(1)
    x = torch.randn(2, 16, *hw, device=dev) * 2 + 0.5
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_f = ref(xr), fused(xf)
    _close(out_f, out_r, 1e-4, "out")
    g = torch.randn_like(out_r)
    out_r.backward(g)
    out_f.backward(g)
    _close(xf.grad, xr.grad, 1e-4, "x")
    floor = 1e-6 * max(p.grad.abs().max().item() for p in ref.parameters())
    for (name, pr), pf in zip(ref.named_parameters(), fused.parameters()):
        _close(pf.grad, pr.grad, 1e-4, name, floor)
    for (name, br), bf in zip(ref.named_buffers(), fused.buffers()):
        _close(bf, br, 1e-5, name)  # same running statistics after the step
    with torch.no_grad():
        _close(fused(x), ref(x), 1e-4, "no-grad")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("align_corners", [True, False], ids=["ac", "noac"])
def test_head_gradcheck_float64(train, align_corners):
    _kernels("cpu")
    ref = make_head(c=6, bins=(1, 2, 3), red=2, mid=3, classes=2, align_corners=align_corners,
                    dtype=torch.float64).train(train)
    fused = PSPHead.from_reference(ref, backend="cpu")
    params = list(fused.parameters())
    for seed, hw in [(0, (3, 2)), (1, (1, 2))]:
        torch.manual_seed(seed)
        x = torch.randn(2, 6, *hw, dtype=torch.float64, requires_grad=True)
        # The parameters themselves are gradcheck's inputs: it perturbs them in place, the module reads them. Fast
        # mode: the full Jacobian of ~500 inputs takes minutes; a few random directions check the same formula.
        assert torch.autograd.gradcheck(lambda x, *ps: fused(x), (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)
        assert torch.autograd.gradcheck(lambda x: fused(x), (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("layout", ["channels_last", "view"])
def test_head_layouts(layout):
    _kernels("cpu")
    ref = make_head().train()
    fused = PSPHead.from_reference(ref, backend="cpu")
    x = _layout(torch.randn(2, 16, 11, 7), layout)
    xr, xf = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    out_r, out_f = ref(xr), fused(xf)
    _close(out_f, out_r, 1e-4)
    if layout == "channels_last":  # channels_last in, channels_last out (the reference's cat loses the layout)
        assert out_f.is_contiguous(memory_format=torch.channels_last)
    out_r.sum().backward()
    out_f.sum().backward()
    _close(xf.grad, xr.grad, 1e-4)


def test_head_dropout_uses_the_same_random_numbers():
    _kernels("cpu")
    ref = make_head(dropout=0.5).train()
    fused = PSPHead.from_reference(ref, backend="cpu")
    x = torch.randn(2, 16, 9, 9)
    torch.manual_seed(3)
    out_r = ref(x)
    torch.manual_seed(3)
    out_f = fused(x)
    _close(out_f, out_r, 1e-4)


def test_head_construction_is_a_drop_in():
    torch.manual_seed(0)
    ref = RefHead(32, 7)
    after_ref = torch.rand(1)
    torch.manual_seed(0)
    fused = PSPHead(32, 7)
    after_fused = torch.rand(1)
    assert list(fused.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(fused.state_dict()[k], v), k  # the same seed gives the same initial weights
    assert torch.equal(after_ref, after_fused)  # and leaves the generator where the reference leaves it
    assert isinstance(fused.ppm, pspnet_fast.PyramidPooling)
    ref.load_state_dict(fused.state_dict(), strict=True)
    with pytest.raises(TypeError, match="PSPHead"):
        PSPHead.from_reference(torch.nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="channels"):
        fused(torch.randn(1, 31, 4, 4))


def test_head_backward_is_deterministic():
    _kernels("cpu")
    ref = make_head().train()
    x = torch.randn(2, 16, 13, 11)
    grads = []
    for _ in range(2):
        fused = PSPHead.from_reference(ref, backend="cpu")
        xf = x.clone().requires_grad_()
        fused(xf).sum().backward()
        grads.append([xf.grad] + [p.grad for p in fused.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_head_saves_nothing_of_the_concatenation_size():
    _kernels("cpu")
    ref = make_head(c=64, red=16, mid=32).train()
    fused = PSPHead.from_reference(ref, backend="cpu")
    x = torch.randn(2, 64, 30, 30, requires_grad=True)

    def saved_bytes(module):
        seen, total = set(), [0]

        def pack(t):
            key = (t.untyped_storage().data_ptr(), t.dtype)
            if key not in seen and t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
                seen.add(key)
                total[0] += t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x).sum().backward()
        return total[0]

    concat = 2 * (64 + 4 * 16) * 30 * 30 * 4
    bottleneck = 2 * 32 * 30 * 30 * 4
    fused_saved, ref_saved = saved_bytes(fused), saved_bytes(ref)
    # The reference keeps the concatenation for its 3x3 conv; the fused head keeps only bottleneck-sized maps (the
    # sum for BatchNorm, BatchNorm's output for ReLU and the classifier, dropout's) and small tensors.
    assert ref_saved - fused_saved >= concat, (fused_saved, ref_saved)
    assert fused_saved <= 3.3 * bottleneck, (fused_saved, ref_saved)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_head_under_torch_compile(train):
    _kernels("cpu")
    ref = make_head().train(train)
    fused = PSPHead.from_reference(ref, backend="cpu")
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 16, 9, 7)
    xr, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_c = ref(xr), compiled(xc)
    _close(out_c, out_r, 1e-4)
    out_r.sum().backward()
    out_c.sum().backward()
    _close(xc.grad, xr.grad, 1e-4)
    for (name, pr), pf in zip(ref.named_parameters(), fused.parameters()):
        _close(pf.grad, pr.grad, 1e-4, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_half_precision_modules(dtype):
    _kernels("cpu")
    ref64 = make_head(dtype=torch.float64).eval()
    ref = make_head(dtype=dtype).eval()
    fused = PSPHead.from_reference(ref, backend="cpu")
    x = torch.randn(2, 16, 9, 7)
    with torch.no_grad():
        exact, ref_out, got = ref64(x.double()), ref(x.to(dtype)), fused(x.to(dtype))
    assert got.dtype == dtype
    ref_err = (ref_out.double() - exact).abs().max().item()
    err = (got.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + 1e-3 * exact.abs().max().item(), (err, ref_err)
    fused.train()
    xf = x.to(dtype).requires_grad_()
    fused(xf).float().sum().backward()
    assert xf.grad.dtype == dtype and torch.isfinite(xf.grad).all()


def test_head_autocast_cpu_bfloat16():
    """Under autocast both heads are far from exact (bfloat16 convolutions, BatchNorm's backward over them): the fused
    head's error against the float64 head must stay within twice the reference's own."""
    _kernels("cpu")
    ref = make_head().train()
    fused = PSPHead.from_reference(ref, backend="cpu")
    x = torch.randn(2, 16, 13, 11)
    xr, xf, x64 = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_r, out_f = ref(xr), fused(xf)
    assert out_f.dtype == out_r.dtype
    out64 = make_head(dtype=torch.float64).train()(x64)
    out_r.float().sum().backward()
    out_f.float().sum().backward()
    out64.sum().backward()
    for got, want, exact in ((out_f, out_r, out64), (xf.grad, xr.grad, x64.grad)):
        ref_err = (want.double() - exact).abs().max().item()
        err = (got.double() - exact).abs().max().item()
        assert err <= 2 * ref_err + 1e-3 * exact.abs().max().item(), (err, ref_err)


def test_pspnet_uses_the_fused_head():
    _kernels("cpu")
    from pspnet_fast.models import PSPNet

    torch.manual_seed(0)
    model = PSPNet(50, num_classes=3, fused=True, backend="cpu").eval()
    ref = PSPNet(50, num_classes=3, fused=False).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 33, 41)
    with torch.no_grad():
        _close(model(x), ref(x), 1e-4)


def test_head_edge_cases_from_review():
    """Empty batch; an in-place weight change before backward raises as in the reference; float64 under autocast;
    a frozen PPM trained after a torch.inference_mode forward; weight edits through .data are seen."""
    _kernels("cpu")
    ref = make_head(c=8, bins=(1, 2, 3), red=2, mid=4, classes=3, dtype=torch.float64).train()
    fused = PSPHead.from_reference(ref, backend="cpu")
    for m in (ref, fused):
        assert m(torch.randn(0, 8, 5, 4, dtype=torch.float64)).shape == (0, 3, 5, 4)
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64)
    out = fused(x.clone().requires_grad_())
    with torch.no_grad():
        fused.cls[0].weight.mul_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    ref.eval()
    fused = PSPHead.from_reference(ref, backend="cpu")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _close(fused(x), ref(x), 1e-10)  # autocast leaves float64 alone, in both
    with torch.no_grad():
        fused(x)
        for m in (ref, fused):
            m.cls[0].weight.data.mul_(0.5)  # no version bump: nothing may be cached across it
        _close(fused(x), ref(x), 1e-10)
    for p in fused.ppm.parameters():
        p.requires_grad_(False)
    with torch.inference_mode():
        fused(x)
    fused.train()
    xf = x.clone().requires_grad_()
    fused(xf).sum().backward()
    assert xf.grad is not None
    out = fused(xf)  # what needs a gradient is fixed at forward: toggling requires_grad before backward is harmless
    fused.cls[0].weight.requires_grad_(False)
    out.sum().backward()
    fused.cls[0].weight.requires_grad_(True)


def test_head_non_standard_cls_falls_back():
    """A conv subclass with its own forward (here: weight standardization) is not the reference's conv: the fused
    head must run the module as written."""
    _kernels("cpu")

    class WSConv(torch.nn.Conv2d):
        def forward(self, x):
            w = self.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
            return torch.nn.functional.conv2d(x, w, None, 1, 1)

    ref = make_head().eval()
    fused = PSPHead.from_reference(ref, backend="cpu")
    for m in (ref, fused):
        old = m.cls[0]
        m.cls[0] = WSConv(old.in_channels, old.out_channels, 3, padding=1, bias=False)
        m.cls[0].weight.data.copy_(old.weight)
    x = torch.randn(2, 16, 7, 5)
    with torch.no_grad():
        _close(fused(x), ref(x), 1e-4)
