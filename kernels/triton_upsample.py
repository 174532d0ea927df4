"""Triton upsample_concat: one launch writes x's copy and every bilinearly upsampled level into the output.

The op pspnet_fast::triton_upsample_concat(x (N, C, H, W), levels (N, R, S), bins, align_corners, x_last=False)
-> out (N, C + L*R, H, W).
"""

from typing import List

import torch
import triton
import triton.language as tl

from pspnet_fast import _checks  # the ops' argument checks, shared with the C++ kernels and the fake kernels

from .triton_common import (_LEVEL_DTYPES, _POOL_DTYPES, _bins_meta, _check_bins, _level_by_id, _linear_tap,
                            _register, _suggest_memory_format, wrap_triton)


# ----------------------------------------------------------------------------------------------------------------
# Kernel: one launch writes x's copy and every upsampled level
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _upsample_concat_kernel(
    x_ptr, lv_ptr, out_ptr,
    C, R, H, W, X0, L0,
    sxn, sxc, sxh, sxw,
    sln, slr, sls,
    son, soc, soh, sow,
    n_pblocks, n_xcblocks, n_rblocks,
    NUM_LEVELS: tl.constexpr,
    B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,
    B4: tl.constexpr, B5: tl.constexpr, B6: tl.constexpr, B7: tl.constexpr,
    O1: tl.constexpr, O2: tl.constexpr, O3: tl.constexpr, O4: tl.constexpr,
    O5: tl.constexpr, O6: tl.constexpr, O7: tl.constexpr,
    ALIGN: tl.constexpr, IS_F64: tl.constexpr, X_FLAT: tl.constexpr, O_FLAT: tl.constexpr,
    BLOCK_CH: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # Grid: (N * cdiv(H*W, BLOCK_P), cdiv(C, BLOCK_CH) + L * cdiv(R, BLOCK_CH)). A program writes a
    # [BLOCK_CH channels, BLOCK_P positions] tile of out[n]: channel blocks below cdiv(C, BLOCK_CH) copy x, the others
    # belong to one level each, so the bilinear taps of the BLOCK_P positions are computed once for BLOCK_CH maps.
    # *_FLAT: the (h, w) plane is dense (stride_h == W * stride_w), address p * stride_w keeps loads vectorizable.
    # X0, L0: the first output channel of x and of the levels ([x, levels]: 0, C; x_last [levels, x]: L*R, 0).
    pid0 = tl.program_id(0)
    cb = tl.program_id(1)
    n = (pid0 // n_pblocks).to(tl.int64)
    pb = pid0 % n_pblocks
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < H * W
    h = p // W
    w = p - h * W
    if O_FLAT:
        o_sp = p.to(tl.int64) * sow
    else:
        o_sp = h.to(tl.int64) * soh + w.to(tl.int64) * sow
    out_n = out_ptr + n * son
    out_ty = out_ptr.dtype.element_ty

    if cb < n_xcblocks:
        c = cb * BLOCK_CH + tl.arange(0, BLOCK_CH)
        m = (c < C)[:, None] & pmask[None, :]
        if X_FLAT:
            x_sp = p.to(tl.int64) * sxw
        else:
            x_sp = h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
        v = tl.load(x_ptr + n * sxn + c.to(tl.int64)[:, None] * sxc + x_sp[None, :], mask=m)
        tl.store(out_n + (X0 + c).to(tl.int64)[:, None] * soc + o_sp[None, :], v, mask=m)
    else:
        t = cb - n_xcblocks
        l = t // n_rblocks
        rb = t - l * n_rblocks
        b, off = _level_by_id(l, NUM_LEVELS, B0, B1, B2, B3, B4, B5, B6, B7, O1, O2, O3, O4, O5, O6, O7)
        op_ty = lv_ptr.dtype.element_ty
        ih0, ih1, lh0, lh1 = _linear_tap(h, b, H, ALIGN, IS_F64, op_ty)
        iw0, iw1, lw0, lw1 = _linear_tap(w, b, W, ALIGN, IS_F64, op_ty)
        r = rb * BLOCK_CH + tl.arange(0, BLOCK_CH)
        m = (r < R)[:, None] & pmask[None, :]
        base = lv_ptr + n * sln + r.to(tl.int64)[:, None] * slr + off.to(tl.int64) * sls  # [BLOCK_CH, 1]
        # Both taps are always read: a NaN behind a zero weight reaches the output, as in PyTorch.
        v00 = tl.load(base + (ih0 * b + iw0).to(tl.int64)[None, :] * sls, mask=m, other=0.0)
        v01 = tl.load(base + (ih0 * b + iw1).to(tl.int64)[None, :] * sls, mask=m, other=0.0)
        v10 = tl.load(base + (ih1 * b + iw0).to(tl.int64)[None, :] * sls, mask=m, other=0.0)
        v11 = tl.load(base + (ih1 * b + iw1).to(tl.int64)[None, :] * sls, mask=m, other=0.0)
        lh0 = lh0[None, :]
        lh1 = lh1[None, :]
        lw0 = lw0[None, :]
        lw1 = lw1[None, :]
        val = lh0 * (lw0 * v00 + lw1 * v01) + lh1 * (lw0 * v10 + lw1 * v11)
        ch = (L0 + l * R + r).to(tl.int64)
        tl.store(out_n + ch[:, None] * soc + o_sp[None, :], val.to(out_ty), mask=m)


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------


def _launch_upsample(x: torch.Tensor, levels: torch.Tensor, bins: List[int], align_corners: bool, x_last: bool,
                     out: torch.Tensor, copy_x: bool) -> None:
    """_upsample_concat_kernel into out (N, C + L*R, H, W): the level channels, and x's channels if copy_x (else
    nothing of x is read: ppm_forward's pooling pass wrote them)."""
    N, C, H, W = x.shape
    L = len(bins)
    R = levels.shape[1]
    block_ch, block_p = 32, 64
    n_pblocks = triton.cdiv(H * W, block_p)
    n_xcblocks = triton.cdiv(C, block_ch) if copy_x else 0
    n_rblocks = triton.cdiv(R, block_ch)
    if n_xcblocks + L * n_rblocks == 0:
        return
    grid = (N * n_pblocks, n_xcblocks + L * n_rblocks)
    wrap_triton(_upsample_concat_kernel)[grid](
        x, levels, out,
        C, R, H, W, L * R if x_last else 0, 0 if x_last else C,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        levels.stride(0), levels.stride(1), levels.stride(2),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        n_pblocks, n_xcblocks, n_rblocks,
        ALIGN=bool(align_corners), IS_F64=levels.dtype == torch.float64,
        X_FLAT=x.stride(2) == W * x.stride(3), O_FLAT=out.stride(2) == W * out.stride(3),
        BLOCK_CH=block_ch, BLOCK_P=block_p,
        num_warps=4,
        **_bins_meta(bins),
    )


@_register("pspnet_fast::triton_upsample_concat")
def _triton_upsample_concat(x: torch.Tensor, levels: torch.Tensor, bins: List[int],
                            align_corners: bool, x_last: bool = False) -> torch.Tensor:
    _checks.check_upsample_concat(x, levels, bins, align_corners, x_last)
    bins = _check_bins(bins, "upsample_concat")
    L = len(bins)
    S = sum(b * b for b in bins)
    if x.dim() != 4:
        raise ValueError(f"upsample_concat: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _POOL_DTYPES:
        raise TypeError(f"upsample_concat: unsupported x dtype {x.dtype}")
    N, C, H, W = x.shape
    if levels.dim() != 3 or levels.shape[0] != N or levels.shape[2] != S:
        raise ValueError(f"upsample_concat: levels must be ({N}, R, {S}), got {tuple(levels.shape)}")
    if levels.dtype not in _LEVEL_DTYPES:
        raise TypeError(f"upsample_concat: levels must be float32 or float64, got {levels.dtype}")
    R = levels.shape[1]
    out = torch.empty((N, C + L * R, H, W), dtype=x.dtype, device=x.device,
                      memory_format=_suggest_memory_format(x))
    if out.numel() == 0:
        return out
    _launch_upsample(x, levels, bins, align_corners, x_last, out, copy_x=True)
    return out
