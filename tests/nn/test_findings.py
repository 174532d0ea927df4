"""Issue 14 ("never silently wrong, never a crash"): each finding's snippet, and what it must do now (the reference's
result, or a clear error naming the feature and backend="reference"). One test per finding, named after it; the
argument-checker parity across backends is tests/ops/test_checks.py, the files and command line
tests/training/test_cli_errors.py, patch(verify=True) tests/interop/test_verify.py."""
import copy
import io
import warnings

import pytest
import torch
from torch.autograd import forward_ad as fwAD
from torch.nn.utils import parametrizations, parametrize, prune

import pspnet_fast
from pspnet_fast.reference import PSPHead as RefHead
from pspnet_fast.reference import PyramidPooling as RefPPM
from ..utils import randomize_bn

B = [1, 2, 3, 6]

pytestmark = pytest.mark.filterwarnings("ignore:pspnet_fast.*reference computation:RuntimeWarning")


@pytest.fixture(autouse=True)
def _cpu_extension():
    if not pspnet_fast.available_backends()["cpu"]["available"]:
        pytest.skip("extension not built")


def _pair(c=16, seed=0, head=False):
    """(reference, fused) in eval with the same non-trivial weights."""
    torch.manual_seed(seed)
    ref = RefHead(c, 5, B, bottleneck_channels=8) if head else RefPPM(c, B)
    randomize_bn(ref)
    ref.eval()
    fused = (pspnet_fast.PSPHead if head else pspnet_fast.PyramidPooling).from_reference(ref, backend="cpu")
    return ref, fused


def _x(n=2, c=16, h=7, w=5, seed=1):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def _close(a, b, tol=1e-5):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


# --- Crashes and memory safety -------------------------------------------------------------------------------------
def test_finding_01_bins_of_2_32_or_more_are_refused():
    ops = torch.ops.pspnet_fast
    msg = "bins must be positive ints of at most 4096"
    with pytest.raises(ValueError, match=msg):  # segfaulted (b*b wrapped in int64)
        ops.upsample_concat(torch.randn(1, 2, 3, 3).contiguous(memory_format=torch.channels_last),
                            torch.randn(1, 2, 0), [2 ** 32], True)
    with pytest.raises(ValueError, match=msg):  # std::bad_alloc
        ops.upsample_concat(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 0), [2 ** 32], True)
    with pytest.raises(ValueError, match=msg):  # returned shape (0, C, 1)
        ops.pyramid_pool(torch.randn(1, 2, 3, 3)[:0], [2 ** 63 - 1])
    with pytest.raises(ValueError, match=msg):  # "cannot be represented as a SymInt"
        ops.pyramid_pool(torch.randn(1, 2, 3, 3), [3037000500])
    with pytest.raises(ValueError, match="sum of b\\*b over bins must be at most 16777216"):
        ops.pyramid_pool(torch.randn(1, 2, 3, 3), [4096, 1])


def test_finding_02_x_offset_plus_C_cannot_wrap():
    ops = torch.ops.pspnet_fast
    base = torch.arange(10000.)
    g = base[5000:6400].view(2, 20, 5, 7)
    with pytest.raises(ValueError, match=r"x_offset must be in \[0, 12\].*got 9223372036854775800"):
        ops.pyramid_pool_backward(torch.zeros(2, 8, 50), g, B, 2 ** 63 - 8)
    # The largest valid offset still works and reads grad_out's last C channels.
    out = ops.pyramid_pool_backward(torch.zeros(2, 8, 50), g, B, 12)
    assert torch.equal(out, g[:, 12:])


def test_finding_03_mixed_devices_and_fake_kernels_check():
    ops = torch.ops.pspnet_fast
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="levels must be on x's device cpu, got meta"):
        ops.upsample_concat(x, torch.randn(2, 3, 50, device="meta"), B, True)
    with pytest.raises(ValueError, match="weight must be of shape"):
        ops.ppm_reduce(torch.randn(2, 3, 50), torch.randn(4, 2, 7, device="meta"), None, None, B, True)
    with pytest.raises(ValueError, match="grad_pooled must be on grad_out's device"):
        ops.pyramid_pool_backward(torch.randn(2, 3, 50, device="meta"), torch.randn(2, 3, 4, 4), B)
    with pytest.raises(ValueError, match="q must be on z's device"):
        ops.head_epilogue(x, torch.randn(2, 3, 9, 50, device="meta"), B, True, None, None, False)
    meta = torch.randn(2, 3, 4, 4, device="meta")
    with pytest.raises(ValueError, match="bins must be positive ints"):
        ops.pyramid_pool(meta, [-1])
    with pytest.raises(TypeError, match="x must be float32, float64, float16 or bfloat16, got torch.int32"):
        ops.pyramid_pool(meta.int(), B)
    with pytest.raises(ValueError, match="x must have C, H, W >= 1"):
        ops.pyramid_pool(torch.randn(2, 3, 0, 4, device="meta"), B)
    with pytest.raises(ValueError, match="bins must hold at least one level"):  # was ZeroDivisionError
        ops.upsample_concat_backward(meta, 1, [], True)


# --- Silently different from the reference -------------------------------------------------------------------------
def test_finding_04_forward_mode_ad_and_torch_func():
    ref, fused = _pair()
    x, v = _x(), _x(seed=2)
    for m in (ref, fused):
        m.requires_grad_(False)
    _, t_ref = torch.func.jvp(ref, (x,), (v,))
    with pytest.warns(RuntimeWarning, match="torch.func transform"):
        warnings.simplefilter("always")
        _, t_fused = torch.func.jvp(fused, (x,), (v,))
    assert t_ref.abs().max() > 0
    _close(t_fused, t_ref)
    with fwAD.dual_level():
        t_ref = fwAD.unpack_dual(ref(fwAD.make_dual(x, v))).tangent
        t_fused = fwAD.unpack_dual(fused(fwAD.make_dual(x, v))).tangent
    assert t_fused is not None
    _close(t_fused, t_ref)
    for m in (ref, fused):
        m.requires_grad_(True)
    _close(torch.func.vmap(fused)(x[:, None]), torch.func.vmap(ref)(x[:, None]))
    _, t_ref = torch.func.jvp(ref, (x,), (v,))
    _, t_fused = torch.func.jvp(fused, (x,), (v,))
    _close(t_fused, t_ref)
    g_ref = torch.func.grad(lambda p: torch.func.functional_call(ref, p, (x,)).square().sum())(
        dict(ref.named_parameters()))
    g_fused = torch.func.grad(lambda p: torch.func.functional_call(fused, p, (x,)).square().sum())(
        dict(fused.named_parameters()))
    for k in g_ref:
        _close(g_fused[k], g_ref[k], 1e-4)


def test_finding_05_cache_sees_batchnorm_eps_and_other_edits():
    ref, fused = _pair()
    x = _x()
    with torch.no_grad():
        fused(x)  # fills the inference cache
        for m in (ref, fused):
            for f in m.features:
                f[2].eps = 0.5
        _close(fused(x), ref(x))
        for m in (ref, fused):
            m.features[1][2].running_var.mul_(3)  # in place: a version bump
        _close(fused(x), ref(x))
        for m in (ref, fused):  # a new Parameter object (no version history)
            m.features[2][1].weight = torch.nn.Parameter(m.features[2][1].weight * 0 + 0.1)
        _close(fused(x), ref(x))
    with torch.no_grad():
        _close(fused.double()(x.double()), ref.double()(x.double()), 1e-10)  # dtype is part of the key


def test_finding_06_hooks_pruning_parametrizations():
    ref, fused = _pair()
    x = _x()

    def hook(mod, inp, out):
        return out * 2 + 1

    for m in (ref, fused):
        m.features[1][3].register_forward_hook(hook)
    with torch.no_grad():
        _close(fused(x), ref(x))
    # PSPHead: hooks on cls[0..2] in eval.
    href, hfused = _pair(head=True)
    for m in (href, hfused):
        for i in range(3):
            m.cls[i].register_forward_hook(hook)
    with torch.no_grad():
        _close(hfused(x), href(x), 1e-4)
    # Pruning, then two SGD steps (the pruned weight is recomputed from weight_orig by a pre-hook).
    ref, fused = _pair()
    for m in (ref, fused):
        m.train()
        prune.l1_unstructured(m.features[1][1], "weight", amount=0.5)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        for _ in range(2):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
        m.eval()
    with torch.no_grad():
        _close(fused(x), ref(x))
    # Parametrizations (weight norm; an arbitrary one).
    ref, fused = _pair()
    for m in (ref, fused):
        parametrizations.weight_norm(m.features[0][1])
        parametrize.register_parametrization(m.features[3][1], "weight", _Double())
    with torch.no_grad():
        _close(fused(x), ref(x))


class _Double(torch.nn.Module):
    def forward(self, w):
        return 2 * w


def test_finding_06_fallback_warns_once_naming_the_reason():
    ref, fused = _pair()
    fused.features[0][3].register_forward_pre_hook(lambda m, i: None)
    from pspnet_fast.nn import ppm as ppm_module
    ppm_module._warned.discard(("PyramidPooling", "hooks"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with torch.no_grad():
            fused(_x())
            fused(_x())
    msgs = [str(m.message) for m in w if "reference computation" in str(m.message)]
    assert len(msgs) == 1 and "hooks on submodule 'features.0.3'" in msgs[0] and 'backend="reference"' in msgs[0]


def test_finding_07_jit_trace():
    ref, fused = _pair()
    x = _x()
    with torch.no_grad():
        traced = torch.jit.trace(fused, (x,))  # its own sanity check (check_trace) passes
    _close(traced(x), ref(x))
    traced = torch.jit.trace(fused, (x,), check_trace=False)  # grad enabled: was "unordered_map::at"
    with torch.no_grad():
        for m in (ref, fused):
            m.features[0][1].weight.mul_(3)  # later weight edits reach the trace (parameters, not constants)
        _close(traced(x), ref(x))


def test_finding_08_double_backward_is_a_clear_error():
    ref, fused = _pair()
    fused.train()
    x = _x().requires_grad_()
    y = fused(x).square().sum()
    with pytest.raises(RuntimeError, match=r'double backward.*backend="reference"'):
        torch.autograd.grad(y, x, create_graph=True)
    href, hfused = _pair(head=True)
    hfused.train()
    y = hfused(x).square().sum()
    with pytest.raises(RuntimeError, match=r'PSPHead: double backward.*backend="reference"'):
        torch.autograd.grad(y, x, create_graph=True)
    # The way out named in the message works.
    ref.train()
    y = pspnet_fast.PyramidPooling.from_reference(ref, backend="reference")(x).square().sum()
    (gx,) = torch.autograd.grad(y, x, create_graph=True)
    assert torch.autograd.grad(gx.sum(), x)[0] is not None


# --- Errors and edges ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", [False, True], ids=["ppm", "head"])
def test_finding_09_empty_batch_trains(head):
    ref, fused = _pair(head=head)
    for m in (ref, fused):
        m.train()
    grads = []
    for m in (ref, fused):
        x = torch.randn(0, 16, 5, 5, requires_grad=True)
        m(x).sum().backward()
        grads.append((x.grad, {k: p.grad for k, p in m.named_parameters()}))
    (gx_ref, gp_ref), (gx, gp) = grads
    assert gx.shape == (0, 16, 5, 5) and gx_ref.shape == gx.shape
    for k, g in gp_ref.items():
        assert gp[k] is not None and gp[k].shape == g.shape and torch.equal(gp[k], g), k


def test_finding_10_load_checkpoint_names_the_file(tmp_path):
    from pspnet_fast.interop.convert import convert_state_dict, describe
    from pspnet_fast.models import load_checkpoint
    model = torch.nn.Linear(2, 2)
    text, empty, rnd, ints, tensor = (tmp_path / n for n in ("a.txt", "b.pth", "c.pth", "d.pth", "e.pth"))
    text.write_text("hello, not a checkpoint\n")
    empty.write_bytes(b"")
    rnd.write_bytes(bytes(range(246, 256)) * 50)
    torch.save({"weight": 1, "bias": 2}, ints)
    torch.save(torch.zeros(2), tensor)
    with pytest.raises(ValueError, match=f"{text}.* is not a torch checkpoint"):  # was KeyError: 101
        load_checkpoint(model, text)
    with pytest.raises(ValueError, match=f"{empty} is empty"):  # was a bare EOFError
        load_checkpoint(model, empty)
    with pytest.raises(ValueError, match=f"{rnd}.* is not a torch checkpoint"):  # "Unsupported operand 246"
        load_checkpoint(model, rnd)
    with pytest.raises(ValueError, match=f"{ints} is not a state_dict of tensors: key 'weight' holds a int"):
        load_checkpoint(model, ints)
    with pytest.raises(ValueError, match=f"{tensor} holds a Tensor"):
        load_checkpoint(model, tensor)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_checkpoint(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(model, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="key 'cls.4.weight' holds a int"):  # convert's describe
        describe({"cls.4.weight": 3}, "authors")
    with pytest.raises(ValueError, match="holds a int"):
        convert_state_dict({"decode_head.conv_seg.weight": 3}, "mmseg")


def test_finding_11_backward_ops_name_grad_out():
    ops = torch.ops.pspnet_fast
    with pytest.raises(ValueError, match="upsample_concat_backward: grad_out must be of shape"):
        ops.upsample_concat_backward(torch.randn(2, 7, 3), 1, [1, 2], True)
    with pytest.raises(TypeError, match="pyramid_pool_backward: grad_out must be float32"):
        ops.pyramid_pool_backward(torch.randn(1, 2, 5), torch.ones(1, 7, 3, 3, dtype=torch.int64), [1, 2])


def test_finding_11_cache_is_not_pickled_or_copied():
    ref, fused = _pair()
    with torch.no_grad():
        fused(_x())
    assert "_reduce_cache" in fused.__dict__
    buf = io.BytesIO()
    torch.save(fused, buf)
    assert b"_reduce_cache" not in buf.getvalue()
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert "_reduce_cache" not in loaded.__dict__
    assert "_reduce_cache" not in copy.deepcopy(fused).__dict__
    assert all("cache" not in k for k in fused.state_dict())
    with torch.no_grad():
        _close(loaded(_x()), ref(_x()))


def test_finding_11_triton_rejects_what_cpu_rejects():
    """bins [] and C = 0 on the CPU op, the fake kernel and (tests/ops/test_checks.py) the Triton op."""
    ops = torch.ops.pspnet_fast
    for dev in ("cpu", "meta"):
        with pytest.raises(ValueError, match="bins must hold at least one level"):
            ops.pyramid_pool(torch.randn(2, 3, 4, 5, device=dev), [])
        with pytest.raises(ValueError, match="x must have C, H, W >= 1"):
            ops.pyramid_pool(torch.randn(2, 0, 4, 5, device=dev), B)
