"""The CPU read-once eval forward `ppm_forward` against the composition pyramid_pool -> ppm_reduce -> upsample_concat
(the same values, bit for bit) and against the reference module, on shapes that break naive kernels."""
import pytest
import torch

from pspnet_fast import ops  # noqa: F401  (registers the fake kernels)

from ..utils import assert_close_to_ref, make_ref

P = torch.ops.pspnet_fast

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (N, C, H, W): 1x1 maps, H and W below the bin counts, sizes the bins do not divide, non-square, N = 0 and 1.
SHAPES = [(1, 3, 1, 1), (2, 5, 7, 9), (1, 4, 2, 3), (2, 6, 13, 6), (1, 2, 1, 17), (0, 4, 5, 5)]
LAYOUTS = ["contiguous", "channels_last", "transposed", "strided"]
BINS = (1, 2, 3, 6)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _make_x(shape, dtype, layout, gen):
    n, c, h, w = shape
    if layout == "transposed":  # H and W swapped in storage: rows have stride H
        return torch.randn((n, c, w, h), generator=gen).to(dtype).transpose(2, 3)
    if layout == "strided":  # every other channel, a window of the columns: no dense plane
        return torch.randn((n, 2 * c, h, w + 3), generator=gen).to(dtype)[:, ::2, :, 1:w + 1]
    x = torch.randn(shape, generator=gen).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _params(c, r, bins, dtype, gen, affine):
    acc = _acc(dtype)
    weight = torch.randn((len(bins), r, c), generator=gen, dtype=acc) / c ** 0.5
    if not affine:
        return weight, None, None
    scale = torch.rand((len(bins), r), generator=gen, dtype=acc) + 0.5
    shift = torch.randn((len(bins), r), generator=gen, dtype=acc)
    return weight, scale, shift


def _composition(x, weight, scale, shift, bins, relu, align_corners, x_last):
    levels = P.ppm_reduce(P.pyramid_pool(x, bins), weight, scale, shift, bins, relu)
    return P.upsample_concat(x, levels, bins, align_corners, x_last)


def _assert_identical(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    assert a.stride() == b.stride(), (a.stride(), b.stride())
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("x_last", [False, True], ids=["x_first", "x_last"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_equals_composition(dtype, layout, x_last):
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        x = _make_x(shape, dtype, layout, gen)
        if layout != "contiguous" and shape[0] > 0 and min(shape[2:]) > 1:
            assert not x.is_contiguous()
        for affine, relu in ((True, True), (False, False), (False, True)):
            weight, scale, shift = _params(shape[1], 3, BINS, dtype, gen, affine)
            for align_corners in (True, False):
                args = (x, weight, scale, shift, BINS, relu, align_corners, x_last)
                _assert_identical(P.ppm_forward(*args), _composition(*args))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_equals_composition_many_rows(dtype, threads):
    """R = 37 rows (several row blocks of the reduce's parallel region, whose threads write the NCHW level planes of
    their rows; odd threads take the levels in reverse), C = 21 (a C % 8 tail), N = 3, levels of 3..108 columns (the
    hand-written GEMM and at::mm): bit for bit the composition, at any thread count."""
    gen = torch.Generator().manual_seed(2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for layout in ("contiguous", "channels_last"):
            x = _make_x((3, 21, 11, 13), dtype, layout, gen)
            weight, scale, shift = _params(21, 37, BINS, dtype, gen, True)
            for x_last in (False, True):
                args = (x, weight, scale, shift, BINS, True, False, x_last)
                _assert_identical(P.ppm_forward(*args), _composition(*args))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bins", [(1,), (6,), (2, 4), (1, 3, 6, 8)], ids=str)
def test_equals_composition_other_bins(bins):
    gen = torch.Generator().manual_seed(1)
    for shape in [(1, 3, 1, 1), (2, 4, 5, 11), (1, 5, 9, 8)]:
        for layout in ("contiguous", "channels_last", "strided"):
            x = _make_x(shape, torch.float32, layout, gen)
            weight, scale, shift = _params(shape[1], 2, bins, torch.float32, gen, True)
            for x_last in (False, True):
                args = (x, weight, scale, shift, bins, True, False, x_last)
                _assert_identical(P.ppm_forward(*args), _composition(*args))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype,shape", [(torch.float32, (1, 600, 61, 59)), (torch.float16, (1, 640, 90, 90)),
                                         (torch.bfloat16, (2, 600, 60, 60))], ids=str)
def test_large_output_streaming(dtype, shape, layout):
    """Outputs of 16 MB or more go through the streaming stores and the output buffer cache: unaligned planes (90x90
    half planes are 16200 bytes), every element written (a reused buffer is filled with NaN first)."""
    gen = torch.Generator().manual_seed(2)
    x = _make_x(shape, dtype, layout, gen)
    weight, scale, shift = _params(shape[1], shape[1] // 4, BINS, dtype, gen, True)
    for x_last in (False, True):
        args = (x, weight, scale, shift, BINS, True, True, x_last)
        first = P.ppm_forward(*args)
        assert first.nbytes >= 16 << 20
        first.fill_(float("nan"))
        del first  # back to the buffer cache, NaN-filled; the next call of this size reuses it
        _assert_identical(P.ppm_forward(*args), _composition(*args))


def test_nan_and_inf_propagate_as_composition():
    gen = torch.Generator().manual_seed(3)
    for layout in ("contiguous", "channels_last", "strided"):
        x = _make_x((2, 4, 7, 5), torch.float32, layout, gen)
        x[0, 1, 2, 3] = float("nan")
        x[1, 2, 0, 0] = float("inf")
        weight, scale, shift = _params(4, 3, BINS, torch.float32, gen, True)
        args = (x, weight, scale, shift, BINS, True, False, False)
        _assert_identical(P.ppm_forward(*args), _composition(*args))


def _folded(ref, dtype):
    """weight (L, R, C), scale, shift (L, R) of an eval-mode reference PPM in dtype, folded as the fused module folds
    them (pspnet_fast/modules.py _folded_bn: alpha = weight / sqrt(var + eps), beta = bias - mean * alpha)."""
    ws, scales, shifts = [], [], []
    for f in ref.features:
        conv, bn = f[1], f[2]
        ws.append(conv.weight.reshape(conv.weight.shape[0], -1).to(dtype))
        scale = 1.0 / torch.sqrt(bn.running_var.to(dtype) + bn.eps) * bn.weight.to(dtype)
        scales.append(scale)
        shifts.append(-bn.running_mean.to(dtype) * scale + bn.bias.to(dtype))
    return torch.stack(ws), torch.stack(scales), torch.stack(shifts)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, layout, align_corners):
    """ppm_forward with the reference's folded BatchNorm (eval, randomized statistics) against the reference module;
    half types against the float64 reference, within 2x the reference's own error in that dtype."""
    c = 8
    ref = make_ref(c, BINS, align_corners, dtype=dtype).eval()
    ref64 = make_ref(c, BINS, align_corners, dtype=torch.float64).eval()
    weight, scale, shift = _folded(ref64, _acc(dtype))
    gen = torch.Generator().manual_seed(4)
    for shape in [(1, c, 1, 1), (2, c, 7, 9), (1, c, 2, 3), (1, c, 13, 6), (0, c, 4, 4)]:
        x = _make_x(shape, dtype, layout, gen)
        with torch.no_grad():
            ref_out = ref(x)
            out64 = ref64(x.double())
        for x_last in (False, True):
            out = P.ppm_forward(x, weight, scale, shift, BINS, True, align_corners, x_last)
            expect, expect64 = ref_out, out64
            if x_last:  # segmentation_models_pytorch's order [levels..., x]
                expect = torch.cat([ref_out[:, c:], ref_out[:, :c]], 1)
                expect64 = torch.cat([out64[:, c:], out64[:, :c]], 1)
            if shape[0] == 0:
                assert out.shape == expect.shape and out.dtype == dtype
                continue
            assert_close_to_ref(out, expect, dtype, ref64=expect64, ref_dtype_out=expect)
            # x's channels are x itself
            xs = out[:, -c:] if x_last else out[:, :c]
            assert torch.equal(xs, x)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [True, False])
def test_opcheck(layout, affine):
    gen = torch.Generator().manual_seed(5)
    x = _make_x((2, 4, 5, 7), torch.float32, layout, gen)
    weight, scale, shift = _params(4, 2, (1, 2, 3), torch.float32, gen, affine)
    for x_last in (False, True):
        torch.library.opcheck(P.ppm_forward.default, (x, weight, scale, shift, [1, 2, 3], affine, True, x_last))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fake_shape_and_layout(layout):
    """The fake kernel's shape, dtype and strides are the CPU kernel's (torch.compile traces with it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    gen = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.bfloat16):
        x = _make_x((2, 6, 5, 7), dtype, layout, gen)
        weight, scale, shift = _params(6, 3, BINS, dtype, gen, True)
        real = P.ppm_forward(x, weight, scale, shift, BINS, True, True, True)
        with FakeTensorMode() as mode:
            args = [mode.from_tensor(t) for t in (x, weight, scale, shift)]
            fake = P.ppm_forward(args[0], args[1], args[2], args[3], BINS, True, True, True)
        assert fake.shape == real.shape == (2, 6 + 4 * 3, 5, 7)
        assert fake.dtype == real.dtype == dtype
        assert fake.stride() == real.stride()
        meta = P.ppm_forward(x.to("meta"), weight.to("meta"), scale.to("meta"), shift.to("meta"), BINS, True, True)
        assert meta.shape == real.shape and meta.stride() == real.stride()


def _error(fn):
    """(exception type, first line of the message without the op's name): the shared argument checker
    (csrc/op_checks.h) names the op it checks, so ppm_forward and ppm_reduce differ only there."""
    with pytest.raises((ValueError, TypeError)) as info:
        fn()
    text = str(info.value).splitlines()[0]
    for op in ("ppm_forward", "ppm_reduce", "pyramid_pool"):
        text = text.replace(f"pspnet_fast.{op}: ", "pspnet_fast.OP: ")
    return type(info.value).__name__, text


def test_argument_errors_as_ppm_reduce():
    """Each bad weight / scale / shift raises the message ppm_reduce raises for the same arguments."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn((1, 4, 5, 5), generator=gen)
    pooled = P.pyramid_pool(x, BINS)
    w, sc, sf = _params(4, 2, BINS, torch.float32, gen, True)
    bad = {
        "weight dims": (w[0], sc, sf),
        "weight levels": (w[:3], sc, sf),
        "weight channels": (w[:, :, :3], sc, sf),
        "weight dtype": (w.double(), sc, sf),
        "scale without shift": (w, sc, None),
        "shift without scale": (w, None, sf),
        "scale shape": (w, sc[:, :1], sf),
        "shift dtype": (w, sc, sf.double()),
    }
    for name, (w_, sc_, sf_) in bad.items():
        want = _error(lambda: P.ppm_reduce(pooled, w_, sc_, sf_, BINS, True))
        got = _error(lambda: P.ppm_forward(x, w_, sc_, sf_, BINS, True, True))
        assert got == want, name
    # float64 x pools to float64: float32 weights are refused, float64 ones run
    got = _error(lambda: P.ppm_forward(x.double(), w, sc, sf, BINS, True, True))
    assert got == _error(lambda: P.ppm_reduce(pooled.double(), w, sc, sf, BINS, True))
    P.ppm_forward(x.double(), w.double(), sc.double(), sf.double(), BINS, True, True)
    # half x pools to float32: half weights are refused
    assert "weight must be torch.float32" in _error(
        lambda: P.ppm_forward(x.half(), w.half(), None, None, BINS, True, True))[1]


def test_x_and_bins_errors_as_pyramid_pool():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn((1, 4, 5, 5), generator=gen)
    w, sc, sf = _params(4, 2, BINS, torch.float32, gen, True)
    cases = [
        (x[0], BINS), (x.to(torch.int32), BINS), (x[:, :, :0], BINS),  # x: 3 dims, integers, H = 0
        (x, ()), (x, (1, 0, 3, 6)), (x, tuple(range(1, 18))),  # bins: none, a zero, more than 16 levels
    ]
    for xx, bins in cases:
        want = _error(lambda: P.pyramid_pool(xx, bins))
        got = _error(lambda: P.ppm_forward(xx, w[:len(bins)] if len(bins) <= 4 else w, sc, sf, bins, True, True))
        assert got == want, (xx.shape, xx.dtype, bins)
