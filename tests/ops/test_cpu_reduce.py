"""The CPU ppm_reduce (its hand-written AVX2 GEMM for 1..36 columns, packed in channel blocks of 512, and at::mm for
more) against a float64 einsum: channel counts below, at and above the vector width and the block (C % 8 tails,
several blocks), row counts that leave a tail of the 4-row blocks, 1..108 columns; and the same bits whatever the
thread count."""
import pytest
import torch

from pspnet_fast import ops  # noqa: F401  (registers the ops)

P = torch.ops.pspnet_fast


def _expected(pooled, weight, scale, shift, bins, relu):
    """float64 truth: per level l, y[n, r, j] = sum_c W[l, r, c] pooled[n, c, off + j], then scale/shift, ReLU."""
    out, off = [], 0
    for l, b in enumerate(bins):
        y = torch.einsum("rc,ncj->nrj", weight[l].double(), pooled[:, :, off:off + b * b].double())
        if scale is not None:
            y = y * scale[l].double()[None, :, None] + shift[l].double()[None, :, None]
        out.append(y.clamp_min(0) if relu else y)
        off += b * b
    return torch.cat(out, 2)


@pytest.mark.parametrize("c", [1, 7, 8, 20, 513, 1029, 2048])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("r", [5, 16])
def test_reduce_matches_float64(c, n, r):
    gen = torch.Generator().manual_seed(c * 100 + n * 10 + r)
    bins = (1, 2, 3, 6)  # columns per level: n, 4n, 9n, 36n (1..108: both GEMM paths)
    pooled = torch.randn((n, c, 50), generator=gen)
    weight = torch.randn((4, r, c), generator=gen) / c ** 0.5
    scale = torch.rand((4, r), generator=gen) + 0.5
    shift = torch.randn((4, r), generator=gen)
    for sc, sf, relu in ((scale, shift, True), (None, None, False)):
        got = P.ppm_reduce(pooled, weight, sc, sf, bins, relu)
        want = _expected(pooled, weight, sc, sf, bins, relu)
        # float32 sums of c products of O(1/sqrt(c)) terms: error ~ sqrt(c) * eps * |terms|
        tol = 1e-5 * want.abs().max().item() + 1e-6
        assert (got.double() - want).abs().max().item() <= tol
    # A non-contiguous pooled view gives the same values as its contiguous copy.
    pt = torch.randn((n, 50, c), generator=gen).transpose(1, 2)
    torch.testing.assert_close(P.ppm_reduce(pt, weight, scale, shift, bins, True),
                               P.ppm_reduce(pt.contiguous(), weight, scale, shift, bins, True), rtol=0, atol=0)


def test_reduce_same_bits_any_thread_count():
    gen = torch.Generator().manual_seed(1)
    pooled = torch.randn((2, 1029, 50), generator=gen)
    weight = torch.randn((4, 37, 1029), generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = P.ppm_reduce(pooled, weight, None, None, (1, 2, 3, 6), True)
        torch.set_num_threads(2)
        two = P.ppm_reduce(pooled, weight, None, None, (1, 2, 3, 6), True)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, two, rtol=0, atol=0)
