"""The Triton backend (kernels/ppm_triton.py) run in Triton's CPU interpreter, checked against plain PyTorch.

TRITON_INTERPRET=1 must be set before triton is imported, and it stays in force for the whole process: Triton's own
@triton.jit helpers are built at import time. Run this file in its own pytest process on a machine that also runs
compiled Triton kernels; if triton was already imported in compiled mode, the module skips itself.
"""

import importlib.util
import pathlib

import pytest

from . import require_interpreted, triton_interpreter

triton = triton_interpreter()

import importlib  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.language as tl  # noqa: E402


def _load_ppm_triton():
    try:
        from pspnet_fast.kernels import ppm_triton
        return ppm_triton
    except ImportError:
        path = pathlib.Path(__file__).resolve().parents[2] / "kernels" / "ppm_triton.py"
        spec = importlib.util.spec_from_file_location("_pspnet_fast_kernels_ppm_triton", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


ppm = _load_ppm_triton()
require_interpreted(ppm._pyramid_pool_kernel, "ppm_triton")
tc = importlib.import_module(ppm.__package__ + ".triton_common") if ppm.__package__ else ppm


# ---------------------------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------------------------


def _offsets(bins):
    offs, o = [], 0
    for b in bins:
        offs.append(o)
        o += b * b
    return offs


def ref_pool(x, bins, dtype):
    """(N, C, S) by F.adaptive_avg_pool2d per level, computed in dtype."""
    return torch.cat([F.adaptive_avg_pool2d(x.to(dtype), b).flatten(2) for b in bins], 2)


def ref_reduce(pooled, weight, scale, shift, bins, relu):
    outs = []
    for l, (b, o) in enumerate(zip(bins, _offsets(bins))):
        v = torch.einsum("rc,ncs->nrs", weight[l], pooled[:, :, o:o + b * b])
        if scale is not None:
            v = v * scale[l][None, :, None] + shift[l][None, :, None]
        if relu:
            v = torch.relu(v)
        outs.append(v)
    return torch.cat(outs, 2)


def _maps(levels, bins):
    N, R, _ = levels.shape
    return [levels[:, :, o:o + b * b].reshape(N, R, b, b) for b, o in zip(bins, _offsets(bins))]


def ref_upsample(x, levels, bins, align_corners):
    H, W = x.shape[2:]
    ups = [F.interpolate(m, size=(H, W), mode="bilinear", align_corners=align_corners).to(x.dtype)
           for m in _maps(levels, bins)]
    return torch.cat([x] + ups, 1)


def _tap(out, inp, align_corners, dt):
    # csrc/ppm_math.h linear_scale / linear_source / linear_tap, elementwise in dt.
    d = torch.arange(out)
    if align_corners:
        scale = (torch.tensor(inp - 1, dtype=dt) / torch.tensor(out - 1, dtype=dt)) if out > 1 else torch.tensor(0, dtype=dt)
        src = scale * d.to(dt)
    else:
        scale = torch.tensor(inp, dtype=dt) / torch.tensor(out, dtype=dt)
        src = scale * (d.to(dt) + 0.5) - 0.5
        src = torch.where(src < 0, torch.zeros_like(src), src)
    if inp == out:
        return d, d, torch.ones(out, dtype=dt), torch.zeros(out, dtype=dt)
    i0 = torch.clamp(torch.floor(src).long(), max=inp - 1)
    l1 = (src - i0.to(dt)).clamp(0, 1)
    return i0, i0 + (i0 < inp - 1).long(), 1 - l1, l1


def emulate_upsample(x, levels, bins, align_corners):
    """ppm_math.h's bilinear in its exact order of operations: the kernel must match it bit for bit."""
    H, W = x.shape[2:]
    dt = levels.dtype
    ups = []
    for m in _maps(levels, bins):
        b = m.shape[-1]
        h0, h1, lh0, lh1 = _tap(H, b, align_corners, dt)
        w0, w1, lw0, lw1 = _tap(W, b, align_corners, dt)
        g = lambda hi, wi: m[:, :, hi][:, :, :, wi]  # noqa: E731
        lh0, lh1 = lh0[:, None], lh1[:, None]
        v = lh0 * (lw0 * g(h0, w0) + lw1 * g(h0, w1)) + lh1 * (lw0 * g(h1, w0) + lw1 * g(h1, w1))
        ups.append(v.to(x.dtype))
    return torch.cat([x] + ups, 1)


# Tolerances travel with the dtype: max|d| <= rtol * max|ref| + atol.
TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-300)}


def assert_close(out, ref, tol_dtype):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert out.dtype == ref.dtype, (out.dtype, ref.dtype)
    nan_out, nan_ref = torch.isnan(out), torch.isnan(ref)
    assert torch.equal(nan_out, nan_ref), "NaN positions differ"
    if out.numel() == 0 or bool(nan_ref.all()):
        return
    keep = ~nan_ref
    o, r = out[keep].double(), ref[keep].double()
    rtol, atol = TOL[tol_dtype]
    err = (o - r).abs().max().item()
    bound = rtol * r.abs().max().item() + atol
    assert err <= bound, f"max |d| = {err:.3e} > {bound:.3e}"


def _params(L, R, C, dtype, affine, gen):
    weight = torch.randn(L, R, C, dtype=dtype, generator=gen) / C ** 0.5
    if not affine:
        return weight, None, None
    return weight, torch.rand(L, R, dtype=dtype, generator=gen) + 0.5, torch.randn(L, R, dtype=dtype, generator=gen)


def check_all_ops(x, bins, align_corners, R=3, relu=True, affine=True, seed=0):
    """pyramid_pool, ppm_reduce and upsample_concat on x, each fed the reference output of the stage before."""
    gen = torch.Generator().manual_seed(seed)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    N, C, H, W = x.shape

    pooled = ppm.pyramid_pool(x, bins)
    pooled_ref = ref_pool(x, bins, acc)
    assert pooled.is_contiguous()
    assert_close(pooled, pooled_ref, acc)

    weight, scale, shift = _params(len(bins), R, C, acc, affine, gen)
    levels = ppm.ppm_reduce(pooled_ref, weight, scale, shift, bins, relu)
    levels_ref = ref_reduce(pooled_ref, weight, scale, shift, bins, relu)
    assert_close(levels, levels_ref, acc)

    out = ppm.upsample_concat(x, levels_ref, bins, align_corners)
    assert_close(out, ref_upsample(x, levels_ref, bins, align_corners), acc)
    assert torch.equal(out, emulate_upsample(x, levels_ref, bins, align_corners)) or torch.isnan(out).any()
    return pooled, levels, out


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _tap_probe_kernel(out_ptr, IN, OUT, ALIGN: tl.constexpr, IS_F64: tl.constexpr, BLOCK: tl.constexpr):
    # Rows 0-3 of out [8, BLOCK]: _linear_tap(d, IN, OUT) with IN a scalar (the upsample's and backward's call);
    # rows 4-7: _linear_tap_scaled(d, _linear_scale(IN, OUT)) with IN a tensor of extents (the head's call).
    dt = out_ptr.dtype.element_ty
    d = tl.arange(0, BLOCK)
    m = d < OUT
    i0, i1, l0, l1 = ppm._linear_tap(d, IN, OUT, ALIGN, IS_F64, dt)
    ins = tl.full([BLOCK], 0, tl.int32) + IN
    j0, j1, k0, k1 = tc._linear_tap_scaled(d, tc._linear_scale(ins, OUT, ALIGN, IS_F64, dt), ins, OUT, ALIGN, dt)
    tl.store(out_ptr + 0 * BLOCK + d, i0.to(dt), mask=m)
    tl.store(out_ptr + 1 * BLOCK + d, i1.to(dt), mask=m)
    tl.store(out_ptr + 2 * BLOCK + d, l0, mask=m)
    tl.store(out_ptr + 3 * BLOCK + d, l1, mask=m)
    tl.store(out_ptr + 4 * BLOCK + d, j0.to(dt), mask=m)
    tl.store(out_ptr + 5 * BLOCK + d, j1.to(dt), mask=m)
    tl.store(out_ptr + 6 * BLOCK + d, k0, mask=m)
    tl.store(out_ptr + 7 * BLOCK + d, k1, mask=m)


@pytest.mark.parametrize("dt", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("align_corners", [True, False])
def test_linear_tap_scalar_and_scaled_forms(dt, align_corners):
    # triton_common's _linear_tap (scale computed inside) and _linear_scale + _linear_tap_scaled (the head's form,
    # the scale once per tap-space entry) give ppm_math.h's taps and weights bit for bit, for scalar and tensor
    # extents: growing, shrinking, equal (the identity tap), 1-bin and 1-pixel sizes, 90 (the 713-crop map).
    for inp, out in [(1, 1), (1, 5), (2, 1), (5, 1), (2, 2), (3, 7), (6, 5), (8, 3), (3, 90), (6, 90), (90, 90)]:
        block = ppm._next_pow2(out)
        res = torch.full((8, block), float("nan"), dtype=dt)
        _tap_probe_kernel[(1,)](res, inp, out, ALIGN=align_corners, IS_F64=dt == torch.float64, BLOCK=block)
        i0, i1, l0, l1 = _tap(out, inp, align_corners, dt)
        want = torch.stack([i0.to(dt), i1.to(dt), l0, l1])
        assert torch.equal(res[:4, :out], want), (inp, out)
        assert torch.equal(res[4:, :out], want), (inp, out)


@triton.jit
def _div_count_probe_kernel(a_ptr, k_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    a = tl.load(a_ptr + i, mask=m, other=0.0)
    k = tl.load(k_ptr + i, mask=m, other=1.0)
    tl.store(out_ptr + i, tc._div_count(a, k), mask=m)


def test_div_count_is_ieee_division():
    # triton_common._div_count (the pooling means without div.rn's slow path) gives float32 a / k bit for bit, k the
    # window counts: normal, huge and subnormal sums, exact halfway subnormal quotients (9 * 2^-149 / 6 = 1.5 * 2^-149:
    # ties to even), zeros of both signs, +-inf, NaN, float32's largest value.
    gen = torch.Generator().manual_seed(40)
    tiny = 2.0 ** -149
    a = torch.cat([
        torch.randn(4000, generator=gen) * 10.0 ** torch.randint(-30, 30, (4000,), generator=gen).float(),
        torch.randint(-2 ** 24, 2 ** 24, (2000,), generator=gen).float(),  # integer sums (exact quotients)
        torch.randint(-64, 64, (2000,), generator=gen).float() * tiny,  # subnormal sums
        torch.tensor([9 * tiny, -9 * tiny, 3 * tiny, 5 * tiny, 0.0, -0.0, float("inf"), float("-inf"), float("nan"),
                      torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max, torch.finfo(torch.float32).tiny]),
    ])
    k = torch.randint(1, 200, (a.numel(),), generator=gen).float()
    k[4000:4500] = torch.randint(1, 2 ** 24, (500,), generator=gen).float()
    k[-12:] = torch.tensor([6.0, 6.0, 2.0, 2.0, 3.0, 7.0, 5.0, 3.0, 7.0, 1.0, 3.0, 3.0])
    out = torch.empty_like(a)
    _div_count_probe_kernel[(triton.cdiv(a.numel(), 1024),)](a, k, out, a.numel(), BLOCK=1024)
    want = a / k
    same = (out.view(torch.int32) == want.view(torch.int32)) | (torch.isnan(out) & torch.isnan(want))
    assert bool(same.all()), (a[~same][:5], k[~same][:5], out[~same][:5], want[~same][:5])


# (N, C, H, W), bins, align_corners: sizes below / not divisible by the bin counts, 1x1 maps, non-square, batch 0.
F32_CASES = [
    ((2, 8, 5, 7), (1, 2, 3, 6), True),
    ((1, 8, 1, 1), (1, 2, 3, 6), False),
    ((1, 8, 2, 5), (1, 2, 3, 6), True),
    ((1, 8, 6, 6), (1, 2, 3, 6), False),  # b == H == W: the identity tap
    ((2, 8, 7, 7), (2,), False),
    ((1, 8, 5, 2), (6,), True),
    ((1, 8, 7, 5), (1, 3, 6, 8), False),
    ((1, 5, 2, 1), (1, 3, 6, 8), True),
    ((2, 8, 7, 7), (1, 2, 3, 6), True),
    ((1, 4, 1, 7), (6,), False),
    ((1, 4, 2, 37), (1, 2, 3, 6), True),  # W > BLOCK_W of the pooling, H*W > BLOCK_P of the concat
    ((0, 8, 5, 5), (1, 2, 3, 6), True),
]


@pytest.mark.parametrize("shape,bins,align_corners", F32_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_float32(shape, bins, align_corners):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    check_all_ops(x, bins, align_corners)


@pytest.mark.parametrize("shape,bins,align_corners", [
    ((2, 8, 5, 7), (1, 2, 3, 6), True),
    ((2, 8, 5, 7), (1, 2, 3, 6), False),
    ((1, 8, 2, 5), (1, 3, 6, 8), False),
    ((1, 4, 1, 1), (6,), True),
], ids=lambda v: str(v).replace(" ", ""))
def test_float64(shape, bins, align_corners):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    check_all_ops(x, bins, align_corners, affine=shape[0] != 1)


def test_multiple_channel_and_row_blocks():
    # C > BLOCK_C of the pooling (16) and BLOCK_CH of the concat (32), R > BLOCK_R (32), relu off, no affine.
    x = torch.randn(2, 40, 2, 3, generator=torch.Generator().manual_seed(3))
    check_all_ops(x, (1, 2), True, R=34, relu=False, affine=False)


def test_eight_levels_pool():
    bins = (1, 2, 3, 4, 5, 6, 7, 8)
    x = torch.randn(1, 3, 5, 7, generator=torch.Generator().manual_seed(4))
    assert_close(ppm.pyramid_pool(x, bins), ref_pool(x, bins, torch.float32), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_pipeline_against_float64(dtype):
    # Habit 7: the kernel's error against float64 at most ~2x PyTorch's own half-precision error, plus a small atol.
    bins, ac = (1, 2, 3, 6), dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 5, 7, generator=gen).to(dtype)
    w64, s64, b64 = _params(len(bins), 3, 8, torch.float64, True, gen)

    out = ppm.upsample_concat(
        x, ppm.ppm_reduce(ppm.pyramid_pool(x, bins), w64.float(), s64.float(), b64.float(), bins, True), bins, ac)
    assert out.dtype == dtype

    x64 = x.double()
    ref64 = ref_upsample(x64, ref_reduce(ref_pool(x64, bins, torch.float64), w64, s64, b64, bins, True), bins, ac)
    torch_half = ref_upsample(
        x, ref_reduce(ref_pool(x, bins, dtype), w64.to(dtype), s64.to(dtype), b64.to(dtype), bins, True), bins, ac)

    err = (out.double() - ref64).abs().max().item()
    err_torch = (torch_half.double() - ref64).abs().max().item()
    assert err <= 2 * err_torch + 1e-3 * ref64.abs().max().item(), (err, err_torch)


def test_channels_last():
    x = torch.randn(2, 8, 5, 7, generator=torch.Generator().manual_seed(6)).to(memory_format=torch.channels_last)
    _, _, out = check_all_ops(x, (1, 2, 3, 6), False)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


def test_non_contiguous_views():
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(2, 7, 9, 16, generator=gen)
    x = base.permute(0, 3, 1, 2)[:, ::2, 1:, ::2]  # (2, 8, 6, 5), neither contiguous nor channels_last
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    bins = (1, 2, 3)
    pooled = ppm.pyramid_pool(x, bins)
    pooled_ref = ref_pool(x, bins, torch.float32)
    assert_close(pooled, pooled_ref, torch.float32)

    weight = torch.randn(3, 8, 4, generator=gen).transpose(1, 2)  # (L, R=4, C=8) view
    pooled_view = torch.randn(2, 14, 8, generator=gen).transpose(1, 2)  # (N, C, S) view
    assert_close(ppm.ppm_reduce(pooled_view, weight, None, None, bins, False),
                 ref_reduce(pooled_view, weight, None, None, bins, False), torch.float32)

    levels = torch.randn(2, 14, 4, generator=gen).transpose(1, 2)  # (N, R, S) view
    out = ppm.upsample_concat(x, levels, bins, True)
    assert out.is_contiguous()
    assert_close(out, ref_upsample(x, levels, bins, True), torch.float32)


def test_nan_reaches_what_it_reaches_in_pytorch():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1, 4, 7, 5, generator=gen)
    x[0, 1, 6, 4] = float("nan")  # one corner: reaches only some bins of each level
    x[0, 2, 3, 0] = float("nan")
    bins = (1, 2, 3, 6)
    weight, scale, shift = _params(len(bins), 3, 4, torch.float32, True, gen)
    weight[:, 1] = 0.0  # NaN * 0 is still NaN in the reduce

    pooled = ppm.pyramid_pool(x, bins)
    pooled_ref = ref_pool(x, bins, torch.float32)
    assert_close(pooled, pooled_ref, torch.float32)
    assert torch.isnan(pooled).any() and not torch.isnan(pooled).all()

    levels = ppm.ppm_reduce(pooled, weight, scale, shift, bins, True)  # relu lets NaN through
    levels_ref = ref_reduce(pooled_ref, weight, scale, shift, bins, True)
    assert_close(levels, levels_ref, torch.float32)

    for ac in (True, False):
        out = ppm.upsample_concat(x, levels, bins, ac)
        assert_close(out, ref_upsample(x, levels_ref, bins, ac), torch.float32)


def test_nan_behind_zero_weight_tap():
    # A NaN bin is read by its neighbours' taps even where their weight is 0 (PyTorch does the same).
    levels = torch.zeros(1, 1, 4)
    levels[0, 0, 3] = float("nan")  # bin (1, 1) of a 2x2 map
    x = torch.zeros(1, 1, 3, 3)
    for ac in (True, False):
        out = ppm.upsample_concat(x, levels, (2,), ac)
        assert_close(out, ref_upsample(x, levels, (2,), ac), torch.float32)


@pytest.mark.parametrize("H,W", [(6, 6), (6, 4)])
def test_nan_identity_tap(H, W):
    # A dimension that keeps its size (b == H) is copied, without a neighbour tap: the NaN stays in its row.
    levels = torch.randn(1, 2, 36, generator=torch.Generator().manual_seed(9))
    levels[0, 1, 2 * 6 + 3] = float("nan")
    x = torch.zeros(1, 1, H, W)
    for ac in (True, False):
        out = ppm.upsample_concat(x, levels, (6,), ac)
        assert_close(out, ref_upsample(x, levels, (6,), ac), torch.float32)
        assert_close(out, emulate_upsample(x, levels, (6,), ac), torch.float32)


def test_no_levels_and_no_channels_are_refused_as_on_cpu():
    # Issue 14: the Triton ops take the CPU kernels' rules (pspnet_fast/_checks.py, tests/ops/test_checks.py).
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(10))
    with pytest.raises(ValueError, match="bins must hold at least one level"):
        ppm.pyramid_pool(x, ())
    with pytest.raises(ValueError, match="bins must hold at least one level"):
        ppm.upsample_concat(x, torch.empty(2, 4, 0), (), True)
    with pytest.raises(ValueError, match="x must have C, H, W >= 1"):
        ppm.pyramid_pool(x[:, :0], (1, 2))


def test_argument_checks():
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="at most 8"):
        ppm.pyramid_pool(x, tuple(range(1, 10)))
    with pytest.raises(ValueError, match="positive"):
        ppm.pyramid_pool(x, (0, 2))
    pooled = torch.randn(1, 2, 5)
    with pytest.raises(ValueError, match="together"):
        ppm.ppm_reduce(pooled, torch.randn(2, 3, 2), torch.ones(2, 3), None, (1, 2), False)
    with pytest.raises(ValueError, match="levels must be"):
        ppm.upsample_concat(x, torch.randn(1, 3, 4), (1, 2), True)


# ---------------------------------------------------------------------------------------------------------------
# The drop-in module on the Triton backend (interpreter, CPU tensors): forward, training BatchNorm and gradients
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_module_on_triton_backend(train, layout):
    import pspnet_fast

    from ..utils import assert_close_to_ref, make_ref

    ref = make_ref(8, (1, 2, 3, 6), align_corners=False).train(train)
    fused = pspnet_fast.PyramidPooling.from_reference(ref, backend="triton")
    x = torch.randn(2, 8, 5, 7)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    xr = x.detach().clone().requires_grad_()
    xf = x.detach().clone().requires_grad_()
    expect, got = ref(xr), fused(xf)
    assert_close_to_ref(got, expect, torch.float32)
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(expect)
    (expect * g).sum().backward()
    (got * g).sum().backward()
    assert (xr.grad - xf.grad).abs().max().item() <= 1e-4 * xr.grad.abs().max().item()
    for (k, pr), (_, pf) in zip(ref.named_parameters(), fused.named_parameters()):
        assert (pr.grad - pf.grad).abs().max().item() <= 1e-4 * pr.grad.abs().max().item() + 1e-6, k
    for (k, a), (_, b) in zip(ref.state_dict().items(), fused.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


# ---------------------------------------------------------------------------------------------------------------
# Backward ops: upsample_concat_backward (adjoint of the level part) and pyramid_pool_backward (grad_out[:, :C] +
# adjoint of the pooling), against torch.autograd of F.interpolate / F.adaptive_avg_pool2d in float64
# ---------------------------------------------------------------------------------------------------------------


def ref_upsample_backward(grad_out, in_channels, bins, align_corners):
    """(N, R, S) float64: per level, autograd of F.interpolate(bilinear) applied to its channels of grad_out."""
    N, CT, H, W = grad_out.shape
    C, L = in_channels, len(bins)
    R = (CT - C) // L
    parts = []
    for l, b in enumerate(bins):
        m = torch.zeros(N, R, b, b, dtype=torch.float64, requires_grad=True)
        y = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=align_corners)
        g = grad_out[:, C + l * R:C + (l + 1) * R].double()
        parts.append(torch.autograd.grad(y, m, g)[0].flatten(2) if N > 0 else m.detach().flatten(2))
    return torch.cat(parts, 2)


def ref_pool_backward(grad_pooled, grad_out, bins):
    """(N, C, H, W) float64: grad_out[:, :C] + per level, autograd of F.adaptive_avg_pool2d."""
    N, C, _ = grad_pooled.shape
    H, W = grad_out.shape[2:]
    ref = grad_out[:, :C].double().clone()
    if N == 0:
        return ref
    for b, o in zip(bins, _offsets(bins)):
        x = torch.zeros(N, C, H, W, dtype=torch.float64, requires_grad=True)
        g = grad_pooled[:, :, o:o + b * b].double().reshape(N, C, b, b)
        ref += torch.autograd.grad(F.adaptive_avg_pool2d(x, b), x, g)[0]
    return ref


def check_backward_ops(N, C, R, H, W, bins, align_corners, dtype=torch.float32, memory_format=None, seed=20):
    """Both backward ops on random gradients; returns (grad_levels, grad_x)."""
    gen = torch.Generator().manual_seed(seed)
    L, S = len(bins), sum(b * b for b in bins)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grad_out = torch.randn(N, C + L * R, H, W, dtype=acc, generator=gen).to(dtype)
    grad_pooled = torch.randn(N, C, S, dtype=acc, generator=gen)
    if memory_format is not None:
        grad_out = grad_out.contiguous(memory_format=memory_format)

    grad_levels = ppm.upsample_concat_backward(grad_out, C, bins, align_corners)
    assert grad_levels.is_contiguous()
    assert_close(grad_levels, ref_upsample_backward(grad_out, C, bins, align_corners).to(acc), acc)

    grad_x = ppm.pyramid_pool_backward(grad_pooled, grad_out, bins)
    assert grad_x.dtype == dtype and grad_x.shape == (N, C, H, W)
    ref = ref_pool_backward(grad_pooled, grad_out, bins)
    if dtype in (torch.float16, torch.bfloat16):
        # float32 accumulation, one rounding to dtype at the end: half an ulp (2^-8 relative for bfloat16), but the
        # interpreter truncates float32 -> bfloat16 (GPUs round to nearest), so one ulp there.
        eps = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -11
        err = (grad_x.double() - ref).abs().max().item()
        assert err <= 1.01 * eps * ref.abs().max().item(), err
    else:
        assert_close(grad_x, ref.to(acc), acc)
    return grad_levels, grad_x


# (N, C, R, H, W), bins, align_corners: H, W below / not divisible by the bin counts, 1x1 maps, non-square, batch 0,
# b == H (identity tap), several channel / row / column blocks.
BWD_CASES = [
    ((2, 3, 2, 5, 7), (1, 2, 3, 6), True),
    ((1, 2, 2, 1, 1), (1, 2, 3, 6), False),
    ((1, 2, 2, 2, 5), (1, 2, 3, 6), True),
    ((1, 2, 2, 7, 2), (1, 2, 3, 6), False),
    ((2, 2, 3, 7, 7), (2,), False),
    ((1, 2, 2, 5, 2), (6,), True),
    ((1, 1, 2, 1, 7), (6,), False),
    ((1, 2, 1, 2, 1), (2,), True),
    ((1, 2, 2, 6, 6), (1, 2, 3, 6), False),
    ((0, 2, 2, 5, 5), (1, 2, 3, 6), True),
    ((1, 18, 17, 17, 3), (1, 2), False),
    ((1, 2, 2, 2, 37), (1, 2, 3, 6), True),
]


@pytest.mark.parametrize("shape,bins,align_corners", BWD_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_backward_float32(shape, bins, align_corners):
    check_backward_ops(*shape, bins, align_corners)


@pytest.mark.parametrize("shape,bins,align_corners", [
    ((2, 3, 2, 5, 7), (1, 2, 3, 6), False),
    ((1, 2, 2, 2, 1), (1, 2, 3, 6), True),
], ids=lambda v: str(v).replace(" ", ""))
def test_backward_float64(shape, bins, align_corners):
    check_backward_ops(*shape, bins, align_corners, dtype=torch.float64)


def test_backward_bfloat16():
    check_backward_ops(2, 3, 2, 5, 7, (1, 2, 3, 6), True, dtype=torch.bfloat16)


def test_backward_channels_last_and_deterministic():
    bins = (1, 2, 3, 6)
    grad_levels, grad_x = check_backward_ops(2, 3, 2, 5, 7, bins, False, memory_format=torch.channels_last)
    assert grad_x.is_contiguous(memory_format=torch.channels_last) and not grad_x.is_contiguous()
    gen = torch.Generator().manual_seed(20)
    grad_out = torch.randn(2, 3 + 4 * 2, 5, 7, generator=gen).contiguous(memory_format=torch.channels_last)
    grad_pooled = torch.randn(2, 3, 50, generator=gen)
    assert torch.equal(ppm.upsample_concat_backward(grad_out, 3, bins, False), grad_levels)
    assert torch.equal(ppm.pyramid_pool_backward(grad_pooled, grad_out, bins), grad_x)


def test_backward_pool_divides_twice():
    # One level, one bin: grad_x = grad_out + grad_pooled / kh / kw, two float32 divisions as the forward's mean.
    gen = torch.Generator().manual_seed(23)
    grad_out = torch.randn(1, 6, 5, 7, generator=gen)
    grad_pooled = torch.randn(1, 6, 1, generator=gen) * 3
    grad_x = ppm.pyramid_pool_backward(grad_pooled, grad_out, (1,))
    assert torch.equal(grad_x, grad_out + (grad_pooled[..., None] / 5) / 7)


def test_backward_non_contiguous_views():
    gen = torch.Generator().manual_seed(21)
    bins = (1, 2, 3)
    grad_out = torch.randn(2, 7, 9, 20, generator=gen).permute(0, 3, 1, 2)[:, ::2, 1:, ::2]  # (2, 10, 6, 5)
    assert not grad_out.is_contiguous() and not grad_out.is_contiguous(memory_format=torch.channels_last)
    grad_levels = ppm.upsample_concat_backward(grad_out, 4, bins, True)
    assert_close(grad_levels, ref_upsample_backward(grad_out, 4, bins, True).float(), torch.float32)
    grad_pooled = torch.randn(2, 14, 4, generator=gen).transpose(1, 2)  # (N, C=4, S) view
    grad_x = ppm.pyramid_pool_backward(grad_pooled, grad_out, bins)
    assert grad_x.is_contiguous()
    assert_close(grad_x, ref_pool_backward(grad_pooled, grad_out, bins).float(), torch.float32)


def test_backward_nan_reaches_only_its_taps_and_windows():
    gen = torch.Generator().manual_seed(22)
    bins = (1, 2, 3)
    grad_out = torch.randn(1, 2 + 3, 5, 7, generator=gen)
    grad_out[0, 3, 4, 1] = float("nan")  # level 1 (b = 2), H, W != b: PyTorch's taps and ours agree
    grad_levels = ppm.upsample_concat_backward(grad_out, 2, bins, False)
    assert torch.isnan(grad_levels).any() and not torch.isnan(grad_levels).all()
    assert_close(grad_levels, ref_upsample_backward(grad_out, 2, bins, False).float(), torch.float32)
    grad_pooled = torch.randn(1, 2, 14, generator=gen)
    grad_pooled[0, 1, 1 + 4 + 5] = float("nan")  # level 2, bin (1, 2)
    grad_x = ppm.pyramid_pool_backward(grad_pooled, grad_out, bins)
    assert torch.isnan(grad_x).any() and not torch.isnan(grad_x[0, 1]).all()
    assert_close(grad_x, ref_pool_backward(grad_pooled, grad_out, bins).float(), torch.float32)


def test_backward_argument_checks():
    g = torch.randn(1, 7, 3, 3)
    with pytest.raises(ValueError, match="not in_channels"):
        ppm.upsample_concat_backward(g, 2, (1, 2), True)  # 5 channels for 2 levels
    with pytest.raises(ValueError, match="not in_channels"):
        ppm.upsample_concat_backward(g, 7, (1, 2), True)  # R = 0
    with pytest.raises(ValueError, match="grad_pooled must be"):
        ppm.pyramid_pool_backward(torch.randn(1, 8, 5), g, (1, 2))  # C > C'
    with pytest.raises(TypeError, match="float32 or float64"):
        ppm.pyramid_pool_backward(torch.randn(1, 2, 5).half(), g, (1, 2))


# ---------------------------------------------------------------------------------------------------------------
# x-last layout ([levels..., x], segmentation_models_pytorch): the kernel's x_last argument, and a patched
# look-alike of smp's PSPModule on the triton backend (adjoints through the levels-only and x views of grad_out)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_upsample_concat_x_last(layout):
    bins, c = [1, 2, 3], 5
    x = torch.randn(2, c, 6, 7)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    levels = torch.randn(2, 3, 14)
    first = ppm.upsample_concat(x, levels, bins, True)
    last = ppm.upsample_concat(x, levels, bins, True, x_last=True)
    assert torch.equal(last, torch.cat([first[:, c:], first[:, :c]], 1))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_patched_smp_on_triton_backend(train, layout):
    import copy

    import pspnet_fast

    from ..interop import lookalikes as la

    model = la.randomize_bn(la.SmpNet()).double().train(train)
    patched = copy.deepcopy(model)
    assert pspnet_fast.patch(patched, backend="triton") == ["decoder.psp"]
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    outs, grads = [], []
    for m in (model, patched):
        xi = x.clone().requires_grad_()
        torch.manual_seed(0)
        out = m(xi)
        out.backward(torch.ones_like(out))
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for (k, a), (_, b) in zip(model.state_dict().items(), patched.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10, msg=k)


# ---------------------------------------------------------------------------------------------------------------
# 64-bit offsets: views whose index * stride products exceed 2^31 elements. Such a view needs > 8 GiB of address
# space; a sparse file mapped with torch.from_file gives it without the memory (only the touched pages exist).
# With 32-bit products the kernels would read outside the mapping (a crash) or wrong elements.
# ---------------------------------------------------------------------------------------------------------------


def huge_strided(tmp_path, shape, strides, dtype=torch.float32, seed=30):
    """A tensor of `shape` and element `strides` (max offset >= 2^31) over a sparse file, filled with randn."""
    elem = torch.empty((), dtype=dtype).element_size()
    span = 1 + sum((s - 1) * st for s, st in zip(shape, strides))
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(span * elem)
    storage = torch.from_file(str(path), shared=True, size=span * elem, dtype=torch.uint8).view(dtype)
    t = torch.as_strided(storage, shape, strides)
    t.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype))
    return t


def test_int64_offsets_pool_and_concat(tmp_path):
    # stride(3) = 2^29 + 3: w * stride(3) reaches 4 * 2^29 > 2^31 - 1 at W = 5 (the permuted-view overflow).
    x = huge_strided(tmp_path, (1, 2, 3, 5), (0, 1, 2, 2 ** 29 + 3))
    bins = (1, 2, 3)
    assert_close(ppm.pyramid_pool(x, bins), ref_pool(x, bins, torch.float32), torch.float32)
    levels = torch.randn(1, 2, 14)
    assert_close(ppm.upsample_concat(x, levels, bins, True), ref_upsample(x, levels, bins, True), torch.float32)
    grad_pooled = torch.randn(1, 2, 14)
    assert_close(ppm.pyramid_pool_backward(grad_pooled, x, bins),
                 ref_pool_backward(grad_pooled, x, bins).float(), torch.float32)


def test_int64_offsets_reduce(tmp_path):
    # scale and shift (L, R) with stride(1) = 2^30 + 1: r * stride(1) > 2^31 at R = 3.
    bins = (1, 2)
    st = huge_strided(tmp_path, (2, 2, 3), (1, 2, 2 ** 30 + 1))
    scale, shift = st[0] + 2.0, st[1]
    pooled = torch.randn(2, 4, 5)
    weight = torch.randn(2, 3, 4)
    assert_close(ppm.ppm_reduce(pooled, weight, scale, shift, bins, True),
                 ref_reduce(pooled, weight, scale, shift, bins, True), torch.float32)
