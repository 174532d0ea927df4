"""The Triton read-once eval forward (kernels/ppm_triton.py: triton_ppm_forward) and the row-segment pooling kernel it
shares with triton_pyramid_pool, in Triton's CPU interpreter.

ppm_forward must give the composition pyramid_pool -> ppm_reduce -> upsample_concat bit for bit (it runs the same
arithmetic; only where x's copy is written changes), and the reference module's eval output within the dtype's
tolerance. The pooling kernel's aligned-window path (DENSE, VEC > 1: rows loaded from the 16-byte boundary at or below
their start, lanes outside the row ignored or, for the copy, written with their own x values) is checked on the
shapes that give every row and channel class: odd W, W % VEC != 0, channel strides that are not multiples of VEC,
90x90 bfloat16 at small C.

Same conventions as tests/ops/test_triton_interp.py: TRITON_INTERPRET=1 is process-wide, so run this file in its own
pytest process (or with the other interpreter files).
"""

import pytest

from . import require_interpreted, triton_interpreter

triton = triton_interpreter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pspnet_fast.kernels import ppm_triton as ppm  # noqa: E402

require_interpreted(ppm._pyramid_pool_kernel, "ppm_triton")

from ..utils import assert_close_to_ref, make_ref  # noqa: E402


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _params(L, R, C, dtype, affine, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(L, R, C, dtype=dtype, generator=gen) / C ** 0.5
    if not affine:
        return weight, None, None
    return weight, torch.rand(L, R, dtype=dtype, generator=gen) + 0.5, torch.randn(L, R, dtype=dtype, generator=gen)


def composition(x, weight, scale, shift, bins, relu, ac, x_last):
    levels = ppm.ppm_reduce(ppm.pyramid_pool(x, bins), weight, scale, shift, bins, relu)
    return ppm.upsample_concat(x, levels, bins, ac, x_last)


def ref_pool(x, bins):
    return torch.cat([F.adaptive_avg_pool2d(x.double(), b).flatten(2) for b in bins], 2)


def check_forward(x, bins, ac=True, x_last=False, R=3, affine=True, relu=True, seed=0):
    weight, scale, shift = _params(len(bins), R, x.shape[1], _acc(x.dtype), affine, seed)
    out = ppm.ppm_forward(x, weight, scale, shift, bins, relu, ac, x_last)
    comp = composition(x, weight, scale, shift, bins, relu, ac, x_last)
    assert out.shape == comp.shape and out.dtype == x.dtype
    assert out.stride() == comp.stride()  # x's memory format (channels_last stays channels_last)
    assert torch.equal(out, comp) or (torch.isnan(comp).any() and torch.equal(out.isnan(), comp.isnan()))
    # x's channels are x itself (the copy written by the pooling pass, including its junk-lane writes).
    C = x.shape[1]
    xs = out[:, -C:] if x_last else out[:, :C]
    assert torch.equal(xs, x)
    return out


def _dense_plan(x, bins):
    return ppm._pool_plan(x, list(bins))


# (shape, bins, dtype, channels_last, x_last, align_corners): 1x1, H and W below the bin counts, sizes the bins do
# not divide, non-square both ways, batch 0 and 1, C below the channel classes, odd W (8 row classes for 2-byte types)
CASES = [
    ((1, 3, 1, 1), (1, 2, 3, 6), torch.float32, False, False, True),
    ((1, 4, 2, 5), (1, 2, 3, 6), torch.bfloat16, False, True, False),
    ((1, 5, 7, 9), (1, 2, 3, 6), torch.float16, False, False, True),
    ((2, 4, 5, 7), (1, 2, 3, 6), torch.float32, False, True, False),
    ((2, 8, 6, 6), (1, 2, 3, 6), torch.float32, True, False, True),
    ((1, 3, 9, 4), (1, 3, 6, 8), torch.float64, False, False, False),
    ((2, 3, 5, 11), (2, 3), torch.bfloat16, True, True, True),
    ((0, 3, 5, 5), (1, 2, 3, 6), torch.float32, False, False, True),
]


@pytest.mark.parametrize("shape,bins,dtype,cl,x_last,ac", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_forward_matches_composition(shape, bins, dtype, cl, x_last, ac):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    out = check_forward(x, bins, ac, x_last)
    if cl:
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


def test_forward_views_and_no_affine():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(2, 7, 9, 16, generator=gen)
    x = base.permute(0, 3, 1, 2)[:, ::2, 1:, ::2]  # (2, 8, 8, 4): neither contiguous nor channels_last
    check_forward(x, (1, 2, 3), affine=False, relu=False)
    # Dense planes, channel stride 7*9 + 3 (not a multiple of VEC: several channel classes, copy with exact masks).
    planes = torch.randn(1, 5, 66, generator=gen)[:, :, :63].reshape(1, 5, 7, 9)
    assert planes.stride() == (330, 66, 9, 1)
    assert _dense_plan(planes, (1, 2, 3, 6))["dense"]
    check_forward(planes, (1, 2, 3, 6), x_last=True)


def test_forward_90x90_bfloat16():
    # The 713-crop feature map: rows of 180 bytes (4-byte granularity), planes of 16200 bytes: 4 row classes,
    # 2 channel classes, the copy through the flat path (junk lanes written with their own values).
    x = torch.randn(1, 3, 90, 90, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    plan = _dense_plan(x, (1, 2, 3, 6))
    assert (plan["dense"], plan["vec"], plan["p"], plan["pc"]) == (True, 8, 4, 2)
    check_forward(x, (1, 2, 3, 6), R=2)
    assert (ppm.pyramid_pool(x, (1, 2, 3, 6)).double() - ref_pool(x, (1, 2, 3, 6))).abs().max().item() < 1e-6


@pytest.mark.parametrize("shape,dtype", [((1, 3, 4, 13), torch.bfloat16), ((2, 4, 3, 6), torch.float32),
                                         ((1, 2, 5, 3), torch.float64), ((1, 9, 2, 2), torch.float16)],
                         ids=str)
def test_pool_aligned_windows(shape, dtype):
    # Every row class and channel class of the aligned-window path against adaptive_avg_pool2d in float64.
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    bins = (1, 2, 3, 6)
    plan = _dense_plan(x, bins)
    assert plan["dense"] and plan["vec"] == 16 // x.element_size()
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert (ppm.pyramid_pool(x, bins).double() - ref_pool(x, bins)).abs().max().item() <= tol


def test_pool_nan_reaches_only_its_bins_aligned():
    x = torch.randn(1, 3, 7, 9, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    x[0, 1, 6, 8] = float("nan")  # the last element of a row whose aligned window reads into the next plane
    x[0, 2, 0, 0] = float("nan")
    bins = (1, 2, 3, 6)
    pooled = ppm.pyramid_pool(x, bins)
    ref = ref_pool(x, bins).float()
    assert torch.equal(pooled.isnan(), ref.isnan()) and not pooled[0, 0].isnan().any()
    keep = ~ref.isnan()
    assert (pooled[keep] - ref[keep]).abs().max().item() < 1e-6


def test_forward_wide_rows_take_the_composition():
    x = torch.randn(1, 2, 2, 600, generator=torch.Generator().manual_seed(6))
    assert _dense_plan(x, (1, 2)) is None
    check_forward(x, (1, 2))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_forward_against_reference_module(layout):
    # The eval module with BatchNorm folded (scale = gamma / sqrt(var + eps), shift = beta - mean * scale).
    ref = make_ref(8, (1, 2, 3, 6), align_corners=False).eval()
    x = torch.randn(2, 8, 5, 7, generator=torch.Generator().manual_seed(7))
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    weight = torch.stack([f[1].weight[:, :, 0, 0] for f in ref.features]).detach()
    scale = torch.stack([f[2].weight / torch.sqrt(f[2].running_var + f[2].eps) for f in ref.features]).detach()
    shift = torch.stack([f[2].bias - f[2].running_mean * s for f, s in zip(ref.features, scale)]).detach()
    with torch.no_grad():
        expect = ref(x)
    got = ppm.ppm_forward(x, weight, scale, shift, (1, 2, 3, 6), True, False)
    assert_close_to_ref(got, expect, torch.float32)


def test_op_is_registered_and_chosen_by_ops():
    from pspnet_fast import ops

    kernels = ops.op_set("triton")
    assert kernels.ppm_forward is torch.ops.pspnet_fast.triton_ppm_forward
    schema = str(torch.ops.pspnet_fast.triton_ppm_forward.default._schema)
    assert "bool x_last=False" in schema and "Tensor? scale" in schema
    x = torch.randn(1, 4, 3, 5)
    w, sc, sh = _params(2, 2, 4, torch.float32, True, 8)
    assert torch.equal(ops.ppm_forward(kernels, x, w, sc, sh, (1, 2), True, True, True),
                       composition(x, w, sc, sh, (1, 2), True, True, True))


def test_opcheck_schema():
    # The schema check runs the op (mutation and aliasing of its arguments: none). The fake kernel that triton_op
    # derives traces the launches through wrap_triton, which the interpreter bypasses (it runs InterpretedFunctions
    # on the fake tensors): FakeTensor and torch.compile checks need the compiled kernels, on a GPU.
    x = torch.randn(1, 3, 4, 5).to(memory_format=torch.channels_last)
    w, sc, sh = _params(2, 2, 3, torch.float32, True, 9)
    torch.library.opcheck(torch.ops.pspnet_fast.triton_ppm_forward, (x, w, sc, sh, [1, 2], True, True, False),
                          test_utils=("test_schema",))


def test_argument_checks():
    x = torch.randn(1, 3, 4, 4)
    w, sc, sh = _params(2, 2, 3, torch.float32, True, 10)
    with pytest.raises(ValueError, match="weight must be"):
        ppm.ppm_forward(x, w[:, :, :2], sc, sh, (1, 2), True, True)
    with pytest.raises(TypeError, match="weight must be torch.float32"):
        ppm.ppm_forward(x, w.double(), sc, sh, (1, 2), True, True)
    with pytest.raises(ValueError, match="together"):
        ppm.ppm_forward(x, w, sc, None, (1, 2), True, True)
    with pytest.raises(ValueError, match="H, W >= 1"):
        ppm.ppm_forward(x[:, :, :0], w, sc, sh, (1, 2), True, True)


def test_forward_unaligned_start_and_aligned_rows():
    # A view starting 4 bytes past a 16-byte boundary: no aligned windows (VEC = 1), exact masks.
    base = torch.randn(1 + 3 * 5 * 7, generator=torch.Generator().manual_seed(11))
    x = base[1:].view(1, 3, 5, 7)
    assert _dense_plan(x, (1, 2, 3))["vec"] == 1
    check_forward(x, (1, 2, 3))
    # Rows of 16 bfloat16 (32 bytes): every row starts aligned, one row class, no lane shift.
    x = torch.randn(1, 2, 4, 16, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16)
    plan = _dense_plan(x, (1, 2, 3, 6))
    assert (plan["vec"], plan["p"], plan["pc"]) == (8, 1, 1)
    check_forward(x, (1, 2, 3, 6), x_last=True)
