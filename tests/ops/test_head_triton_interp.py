"""The fused head's Triton ops (kernels/head_triton.py) in Triton's CPU interpreter, checked against the pure-PyTorch
truth (pspnet_fast.reference: head_epilogue, head_context_backward).

Same conventions as tests/ops/test_triton_interp.py: TRITON_INTERPRET=1 is process-wide and must precede the import of
triton, so run this file in its own pytest process; it skips itself where a CUDA device is present (the GPU runs the
compiled kernels there) or where triton was already imported in compiled mode. Shapes stay tiny: the interpreter
runs every block operation in numpy.
"""

import pytest

from . import require_interpreted, triton_interpreter

triton = triton_interpreter()

import torch  # noqa: E402

from pspnet_fast import reference  # noqa: E402
from pspnet_fast.kernels import head_triton as ht  # noqa: E402

require_interpreted(ht._head_epilogue_kernel, "head_triton")


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------

def _S(bins):
    return sum(b * b for b in bins)


def _inputs(N, O, H, W, bins, dtype, affine, seed, channels_last=False):
    """z in dtype (optionally channels_last); q, scale, shift in the op-math type (float64 for float64 z)."""
    gen = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    z = torch.randn(N, O, H, W, dtype=acc, generator=gen).to(dtype)
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    q = torch.randn(N, O, 9, _S(bins), dtype=acc, generator=gen)
    if not affine:
        return z, q, None, None
    return z, q, torch.rand(O, dtype=acc, generator=gen) + 0.5, torch.randn(O, dtype=acc, generator=gen)


def _d(t):
    return None if t is None else t.double()


def ref64_epilogue(z, q, bins, ac, scale, shift, relu):
    return reference.head_epilogue(z.double(), q.double(), bins, ac, _d(scale), _d(shift), relu)


def assert_close(out, ref, rtol, atol=0.0):
    """max |out - ref| <= rtol * max|ref| + atol outside NaN, and NaN exactly where ref has NaN."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    nan_out, nan_ref = torch.isnan(out), torch.isnan(ref)
    assert torch.equal(nan_out, nan_ref), "NaN positions differ"
    keep = ~nan_ref
    if not bool(keep.any()):
        return
    o, r = out[keep].double(), ref[keep].double()
    err = (o - r).abs().max().item()
    bound = rtol * r.abs().max().item() + atol
    assert err <= bound, f"max |d| = {err:.3e} > {bound:.3e}"


# Tolerances travel with the dtype (float32 / float64; half types compare against PyTorch's own half error).
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def check_epilogue(N, O, H, W, bins, ac, affine, relu, dtype=torch.float32, channels_last=False, seed=0):
    z, q, scale, shift = _inputs(N, O, H, W, bins, dtype, affine, seed, channels_last)
    out = ht.head_epilogue(z, q, bins, ac, scale, shift, relu)
    assert out.dtype == dtype and out.shape == z.shape
    if channels_last and not z.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    else:
        assert out.is_contiguous()
    ref = ref64_epilogue(z, q, bins, ac, scale, shift, relu)
    assert_close(out, ref, RTOL[dtype], 1e-300)
    return out


def check_backward(N, O, H, W, bins, ac, dtype=torch.float32, channels_last=False, seed=1):
    gen = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.randn(N, O, H, W, dtype=acc, generator=gen).to(dtype)
    if channels_last:
        g = g.contiguous(memory_format=torch.channels_last)
    gq = ht.head_context_backward(g, bins, ac)
    assert gq.dtype == acc and gq.shape == (N, O, 9, _S(bins)) and gq.is_contiguous()
    assert_close(gq, reference.head_context_backward(g.double(), bins, ac), RTOL[dtype], 1e-300)
    return g, gq


# ---------------------------------------------------------------------------------------------------------------
# Epilogue
# ---------------------------------------------------------------------------------------------------------------

# (N, O, H, W), bins, align_corners, affine, relu, channels_last: 1x1 maps, sizes below / not divisible by the bin
# counts, non-square both ways, odd O, batch 0 and 1.
FWD_CASES = [
    ((2, 3, 5, 9), (1, 2, 3, 6), True, True, True, False),
    ((1, 5, 9, 5), (1, 3, 6, 8), False, False, False, True),
    ((1, 3, 1, 1), (1, 2, 3, 6), True, True, False, False),
    ((1, 5, 2, 3), (2,), False, True, True, True),
    ((1, 3, 13, 13), (1, 2, 3, 6), False, False, True, False),
    ((1, 3, 3, 13), (1, 3, 6, 8), True, True, True, True),
    ((2, 3, 2, 1), (2,), True, False, False, False),
    ((0, 3, 5, 5), (1, 2, 3, 6), True, True, True, False),
]


@pytest.mark.parametrize("shape,bins,ac,affine,relu,cl", FWD_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_epilogue_float32(shape, bins, ac, affine, relu, cl):
    check_epilogue(*shape, bins, ac, affine, relu, channels_last=cl)


@pytest.mark.parametrize("shape,bins,ac,cl", [
    ((2, 3, 5, 9), (1, 2, 3, 6), False, True),
    ((1, 5, 3, 2), (1, 3, 6, 8), True, False),
], ids=lambda v: str(v).replace(" ", ""))
def test_epilogue_float64(shape, bins, ac, cl):
    check_epilogue(*shape, bins, ac, True, True, dtype=torch.float64, channels_last=cl)


@pytest.mark.parametrize("dtype,cl", [(torch.bfloat16, True), (torch.float16, False)], ids=str)
def test_epilogue_half_against_float64(dtype, cl):
    # Habit 7: the kernel's error against float64 at most 2x PyTorch's own computation in dtype, plus 1e-3 * max.
    bins, ac = (1, 2, 3, 6), dtype == torch.bfloat16
    z, q, scale, shift = _inputs(2, 3, 5, 9, bins, dtype, True, seed=3, channels_last=cl)
    out = ht.head_epilogue(z, q, bins, ac, scale, shift, True)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    ref64 = ref64_epilogue(z, q, bins, ac, scale, shift, True)
    v = z + reference.head_context(q.to(dtype), bins, z.shape[-2:], ac)
    torch_half = torch.relu(v * scale.to(dtype).view(1, -1, 1, 1) + shift.to(dtype).view(1, -1, 1, 1))
    err = (out.double() - ref64).abs().max().item()
    err_torch = (torch_half.double() - ref64).abs().max().item()
    assert err <= 2 * err_torch + 1e-3 * ref64.abs().max().item(), (err, err_torch)


def test_epilogue_other_strides_come_back_contiguous():
    gen = torch.Generator().manual_seed(4)
    bins = (1, 2)
    z = torch.randn(2, 6, 7, 9, generator=gen).permute(0, 3, 1, 2)[:, ::2, 1:, ::2]  # (2, 5, 6, 3) view
    assert not z.is_contiguous() and not z.is_contiguous(memory_format=torch.channels_last)
    q = torch.randn(2, 5, 9, 30, generator=gen).transpose(2, 3).contiguous().transpose(2, 3)[..., :_S(bins)]
    out = ht.head_epilogue(z, q, bins, True, None, None, False)
    assert out.is_contiguous()
    assert_close(out, ref64_epilogue(z, q, bins, True, None, None, False), 1e-5)


def test_epilogue_nan_in_z_propagates_where_reference_does():
    bins = (1, 2, 3, 6)
    z, q, scale, shift = _inputs(1, 3, 5, 9, bins, torch.float32, True, seed=5)
    z[0, 1, 2, 3] = float("nan")
    z[0, 2, 4, 8] = float("nan")
    for relu in (False, True):  # relu lets NaN through, as torch.relu
        out = ht.head_epilogue(z, q, bins, False, scale, shift, relu)
        assert int(torch.isnan(out).sum()) == 2
        assert_close(out, ref64_epilogue(z, q, bins, False, scale, shift, relu), 1e-5)


def test_epilogue_nan_in_q_reaches_only_its_taps():
    # A NaN bin of q reaches the outputs whose bilinear taps read it, also behind a zero weight (as PyTorch).
    bins = (2, 3)
    z, q, _, _ = _inputs(1, 2, 5, 4, bins, torch.float32, False, seed=6)
    q[0, 0, 4, 3] = float("nan")  # centre tap, level 0 bin (1, 1)
    q[0, 1, 0, 4 + 2] = float("nan")  # tap (0, 0), level 1 bin (0, 2)
    for ac in (True, False):
        out = ht.head_epilogue(z, q, bins, ac, None, None, False)
        assert torch.isnan(out).any() and not torch.isnan(out).all()
        assert_close(out, ref64_epilogue(z, q, bins, ac, None, None, False), 1e-5)


def test_epilogue_several_blocks(monkeypatch):
    # Smaller column blocks: several channel and column blocks per image on tiny shapes, and more rows than one
    # product tile (ROWS = 16).
    monkeypatch.setattr(ht, "_FWD_BLOCK_F", {False: 16, True: 16})
    monkeypatch.setattr(ht, "_FWD_ROWS", 16)
    check_epilogue(1, 3, 3, 5, (1, 2), True, True, True, seed=7)  # 2 channel blocks of 2 x 8 columns
    check_epilogue(1, 5, 3, 2, (1, 2), False, True, False, channels_last=True, seed=8)  # channel blocks of 8
    check_epilogue(1, 2, 18, 3, (1, 2, 3), True, True, True, seed=9)  # 2 row tiles


@pytest.mark.parametrize("shape,bins,ac,cl", [
    ((2, 3, 5, 9), (1, 2, 3, 6), True, False),
    ((1, 5, 9, 5), (1, 3, 6, 8), False, True),
    ((1, 3, 1, 1), (1, 2, 3, 6), True, False),
], ids=lambda v: str(v).replace(" ", ""))
def test_epilogue_selection_path(monkeypatch, shape, bins, ac, cl):
    # The row stage's selection path (taken for non-finite M, and for float64) on finite data too.
    monkeypatch.setattr(ht, "_FWD_USE_DOT", False)
    check_epilogue(*shape, bins, ac, True, True, channels_last=cl, seed=10)


def test_epilogue_block_shapes():
    # W = 90 without windows: 32-column blocks (96 columns computed, not 128), 2 channels a program. Windowed rows
    # (WIN, W = 90 bfloat16): 64-lane programs 56 columns apart (2 a row, LEAD = 8). Aligned rows (W = 128) and
    # channels_last: the column / channel blocks without windows.
    assert ht._epilogue_blocks(512, 90, (1, 2, 3, 6), False, False) == (2, 32, 64, 0, 3)
    assert ht._epilogue_blocks(512, 90, (1, 2, 3, 6), False, False, 8) == (1, 64, 64, 8, 2)
    assert ht._epilogue_blocks(512, 90, (1, 2, 3, 6), False, True) == (32, 2, 64, 0, 45)
    assert ht._epilogue_blocks(512, 128, (1, 2, 3, 6), False, False) == (1, 64, 64, 0, 2)
    assert ht._epilogue_blocks(3, 9, (1, 2, 3, 6), False, False, 4) == (4, 16, 64, 0, 1)  # one program a row
    z = torch.empty(8, 512, 90, 90, dtype=torch.bfloat16)
    assert ht._window_vec(z, torch.empty_like(z), False) == 8
    z = torch.empty(8, 512, 64, 128, dtype=torch.bfloat16)
    assert ht._window_vec(z, torch.empty_like(z), False) == 1  # every row 16-byte aligned
    z = torch.empty(8, 512, 90, 90, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    assert ht._window_vec(z, torch.empty_like(z), True) == 1


# Windowed rows (WIN): odd W, W = 90 with 3 channels (the 713-crop map), planes whose starts shift by every residue
# (H * W odd), float32 (VEC = 4), bfloat16 / float16 (VEC = 8), float64 (VEC = 2, the selection path).
WIN_CASES = [
    ((2, 3, 4, 90), torch.float32),
    ((1, 3, 90, 90), torch.bfloat16),
    ((2, 3, 3, 7), torch.float16),
    ((3, 2, 5, 37), torch.float32),
    ((2, 3, 3, 11), torch.float64),
    ((1, 2, 1, 13), torch.bfloat16),
]


def _check_half(out, z, q, bins, ac, scale, shift, relu):
    # Half types: at most 2x PyTorch's own error in the dtype against float64, plus 1e-3 * max (habit 7).
    dtype = z.dtype
    ref64 = ref64_epilogue(z, q, bins, ac, scale, shift, relu)
    v = z + reference.head_context(q.to(dtype), bins, z.shape[-2:], ac)
    if scale is not None:
        v = v * scale.to(dtype).view(1, -1, 1, 1) + shift.to(dtype).view(1, -1, 1, 1)
    torch_half = torch.relu(v) if relu else v
    err = (out.double() - ref64).abs().max().item()
    err_torch = (torch_half.double() - ref64).abs().max().item()
    assert err <= 2 * err_torch + 1e-3 * ref64.abs().max().item(), (err, err_torch)


def _check_win(N, O, H, W, dtype, bins, ac, seed):
    z, q, scale, shift = _inputs(N, O, H, W, bins, dtype, True, seed)
    assert ht._window_vec(z, torch.empty_like(z), False) == 16 // z.element_size()
    out = ht.head_epilogue(z, q, bins, ac, scale, shift, True)
    assert out.dtype == dtype and out.is_contiguous()
    if dtype in (torch.float32, torch.float64):
        assert_close(out, ref64_epilogue(z, q, bins, ac, scale, shift, True), RTOL[dtype], 1e-300)
    else:
        _check_half(out, z, q, bins, ac, scale, shift, True)


@pytest.mark.parametrize("shape,dtype", WIN_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_epilogue_windowed_rows(shape, dtype):
    _check_win(*shape, dtype, (1, 2, 3, 6), dtype != torch.float16, seed=11)


def test_epilogue_windowed_rows_several_programs_a_row(monkeypatch):
    # 16-lane programs: bfloat16 W = 90 takes 13 programs a row 8 columns apart (LEAD = 8), float32 W = 37 four 12
    # apart; with the selection path too.
    monkeypatch.setattr(ht, "_FWD_BLOCK_F", {False: 16, True: 16})
    assert ht._epilogue_blocks(3, 90, (1, 2, 3, 6), False, False, 8)[3:] == (8, 13)
    assert ht._epilogue_blocks(3, 37, (1, 2, 3, 6), False, False, 4)[3:] == (4, 4)
    _check_win(1, 3, 3, 90, torch.bfloat16, (1, 2, 3, 6), True, seed=12)
    _check_win(2, 3, 4, 37, torch.float32, (1, 2, 3, 6), False, seed=13)
    monkeypatch.setattr(ht, "_FWD_USE_DOT", False)
    _check_win(2, 3, 4, 37, torch.float32, (1, 3), True, seed=14)


def test_epilogue_windowed_rows_nan():
    # NaN of z reaches its own output only; NaN of q the outputs whose taps read it (the selection path), through
    # the windows' gather and peel.
    bins = (1, 2, 3, 6)
    z, q, scale, shift = _inputs(2, 3, 4, 90, bins, torch.float32, True, seed=15)
    z[0, 1, 2, 0] = float("nan")  # a row's first column (a peel lane where the row starts mid-chunk)
    z[1, 2, 3, 89] = float("nan")  # the last column of the last plane
    q[1, 0, 4, 5] = float("nan")
    out = ht.head_epilogue(z, q, bins, True, scale, shift, False)
    assert torch.isnan(out[0, 1, 2, 0]) and torch.isnan(out[1, 2, 3, 89]) and torch.isnan(out[1, 0]).any()
    assert_close(out, ref64_epilogue(z, q, bins, True, scale, shift, False), 1e-5)


def test_epilogue_int64_offsets(tmp_path):
    # q (N, O, 9, S) with stride(3) = 2^27: (off + a * b) * stride(3) reaches 13 * 2^27 > 2^31 - 1.
    from .test_triton_interp import huge_strided

    bins = (1, 2, 3)
    q = huge_strided(tmp_path, (1, 2, 9, 14), (0, 1, 2, 2 ** 27))
    z = torch.randn(1, 2, 4, 5)
    out = ht.head_epilogue(z, q, bins, True, None, None, False)
    assert_close(out, ref64_epilogue(z, q, bins, True, None, None, False), 1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------------

BWD_CASES = [
    ((2, 3, 5, 9), (1, 2, 3, 6), True, False),
    ((1, 5, 9, 5), (1, 3, 6, 8), False, True),
    ((1, 3, 1, 1), (1, 2, 3, 6), False, False),
    ((1, 5, 2, 3), (2,), True, True),
    ((1, 3, 13, 13), (1, 2, 3, 6), True, False),
    ((1, 3, 13, 2), (2,), False, False),
    ((0, 3, 5, 5), (1, 2, 3, 6), True, False),
]


@pytest.mark.parametrize("shape,bins,ac,cl", BWD_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_backward_float32(shape, bins, ac, cl):
    check_backward(*shape, bins, ac, channels_last=cl)


@pytest.mark.parametrize("shape,bins,ac,cl", [
    ((2, 3, 5, 9), (1, 2, 3, 6), False, True),
    ((1, 5, 3, 2), (1, 3, 6, 8), True, False),
], ids=lambda v: str(v).replace(" ", ""))
def test_backward_float64(shape, bins, ac, cl):
    check_backward(*shape, bins, ac, dtype=torch.float64, channels_last=cl)


@pytest.mark.parametrize("dtype,cl", [(torch.bfloat16, False), (torch.float16, True)], ids=str)
def test_backward_half_against_float64(dtype, cl):
    bins, ac = (1, 2, 3, 6), dtype == torch.float16
    g = torch.randn(2, 3, 5, 9, generator=torch.Generator().manual_seed(9)).to(dtype)
    if cl:
        g = g.contiguous(memory_format=torch.channels_last)
    gq = ht.head_context_backward(g, bins, ac)
    assert gq.dtype == torch.float32
    ref64 = reference.head_context_backward(g.double(), bins, ac)
    err = (gq.double() - ref64).abs().max().item()
    err_torch = (reference.head_context_backward(g, bins, ac).double() - ref64).abs().max().item()
    assert err <= 2 * err_torch + 1e-3 * ref64.abs().max().item(), (err, err_torch)


def test_backward_is_the_adjoint():
    # <context(q), g> == <q, context^T(g)> in float64, the epilogue's context read off with z = 0.
    bins, ac = (1, 3), False
    gen = torch.Generator().manual_seed(10)
    q = torch.randn(1, 2, 9, _S(bins), dtype=torch.float64, generator=gen)
    g = torch.randn(1, 2, 4, 7, dtype=torch.float64, generator=gen)
    ctx = ht.head_epilogue(torch.zeros_like(g), q, bins, ac, None, None, False)
    gq = ht.head_context_backward(g, bins, ac)
    lhs, rhs = (ctx * g).sum().item(), (q * gq).sum().item()
    assert abs(lhs - rhs) <= 1e-12 * (abs(lhs) + 1.0)


def test_backward_deterministic_and_several_blocks(monkeypatch):
    bins = (1, 2, 3, 6)
    g, gq = check_backward(1, 5, 5, 9, bins, False, channels_last=True, seed=11)
    assert torch.equal(ht.head_context_backward(g, bins, False), gq)  # bitwise, run to run
    # Tap-space blocks of 8 (bins (1, 2, 3): KT = 18, 3 x 3 block pairs, those without a common level return at
    # once), two column blocks per row, channel blocks of several channels.
    monkeypatch.setattr(ht, "_BWD_KB_MAX", 8)
    monkeypatch.setattr(ht, "_BWD_BLOCK_X_MAX", 4)
    bins = (1, 2, 3)
    g = g[:, :3, :3, :5]
    gq_blocks = ht.head_context_backward(g, bins, True)
    assert_close(gq_blocks, reference.head_context_backward(g.double(), bins, True), 1e-5)
    assert torch.equal(ht.head_context_backward(g, bins, True), gq_blocks)


def test_backward_nan_reaches_only_its_taps():
    bins = (2, 3)
    g = torch.randn(1, 2, 5, 4, generator=torch.Generator().manual_seed(12))
    g[0, 1, 3, 1] = float("nan")
    gq = ht.head_context_backward(g, bins, True)
    assert torch.isnan(gq).any() and not torch.isnan(gq[0, 1]).all() and not torch.isnan(gq[0, 0]).any()
    assert_close(gq, reference.head_context_backward(g.double(), bins, True), 1e-5)


def test_backward_empty_plane_is_refused_as_on_cpu():
    # Issue 14: the Triton ops take the CPU kernels' rules (pspnet_fast/_checks.py, tests/ops/test_checks.py).
    with pytest.raises(ValueError, match="grad must have O, H, W >= 1"):
        ht.head_context_backward(torch.randn(1, 3, 0, 4), (1, 2), True)


# ---------------------------------------------------------------------------------------------------------------
# Registration and argument checks
# ---------------------------------------------------------------------------------------------------------------

def test_ops_are_registered():
    z, q, scale, shift = _inputs(1, 3, 2, 3, (1, 2), torch.float32, True, seed=13)
    out = torch.ops.pspnet_fast.triton_head_epilogue(z, q, [1, 2], True, scale, shift, True)
    assert torch.equal(out, ht.head_epilogue(z, q, (1, 2), True, scale, shift, True))
    gq = torch.ops.pspnet_fast.triton_head_context_backward(z, [1, 2], True)
    assert torch.equal(gq, ht.head_context_backward(z, (1, 2), True))


def test_argument_checks():
    bins = (1, 2)
    z, q, scale, shift = _inputs(1, 3, 3, 3, bins, torch.float32, True, seed=14)
    with pytest.raises(ValueError, match="at most 8"):
        ht.head_epilogue(z, torch.randn(1, 3, 9, 285), tuple(range(1, 10)), True)
    with pytest.raises(ValueError, match="at least one"):
        ht.head_context_backward(z, (), True)
    with pytest.raises(ValueError, match="positive"):
        ht.head_context_backward(z, (0, 2), True)
    with pytest.raises(ValueError, match="q must be"):
        ht.head_epilogue(z, q[..., :4], bins, True)
    with pytest.raises(TypeError, match="q must be torch.float32"):
        ht.head_epilogue(z, q.double(), bins, True)
    with pytest.raises(TypeError, match="q must be torch.float64"):
        ht.head_epilogue(z.double(), q, bins, True)
    with pytest.raises(ValueError, match="together"):
        ht.head_epilogue(z, q, bins, True, scale, None)
    with pytest.raises(ValueError, match="scale must be"):
        ht.head_epilogue(z, q, bins, True, scale[:2], shift)
    with pytest.raises(TypeError, match="shift must be"):
        ht.head_epilogue(z, q, bins, True, scale, shift.double())
    with pytest.raises(ValueError, match=r"\(N, O, H, W\)"):
        ht.head_context_backward(z[0], bins, True)
    with pytest.raises(TypeError, match="float32, float64"):
        ht.head_context_backward(z.to(torch.int32), bins, True)


# ---------------------------------------------------------------------------------------------------------------
# The fused head module on the Triton backend (all its ops in the interpreter) against the reference head
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_head_module_on_triton(train):
    from pspnet_fast.nn.head import PSPHead
    from pspnet_fast.reference import PSPHead as RefHead

    torch.manual_seed(0)
    ref = RefHead(8, 3, (1, 2, 3), 2, 4, 0.0, False)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    ref.train(train)
    fused = PSPHead.from_reference(ref, backend="triton")
    x = torch.randn(2, 8, 5, 4)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_f = ref(xr), fused(xf)
    assert (out_f - out_r).abs().max().item() <= 1e-4 * out_r.abs().max().item()
    out_r.sum().backward()
    out_f.sum().backward()
    assert (xf.grad - xr.grad).abs().max().item() <= 1e-4 * xr.grad.abs().max().item()
    w_r, w_f = ref.cls[0].weight.grad, fused.cls[0].weight.grad
    assert (w_f - w_r).abs().max().item() <= 1e-4 * w_r.abs().max().item()
