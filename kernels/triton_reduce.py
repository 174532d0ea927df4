"""Triton ppm_reduce: the per-level 1x1 convolution of the pooled maps, optional affine and ReLU, as one product.

The op pspnet_fast::triton_ppm_reduce(pooled (N, C, S), weight (L, R, C), scale?, shift?, bins, relu)
-> levels (N, R, S), one grouped product for all levels.
"""

from typing import List, Optional

import torch
import triton
import triton.language as tl

from pspnet_fast import _checks  # the ops' argument checks, shared with the C++ kernels and the fake kernels

from .triton_common import _LEVEL_DTYPES, _bins_meta, _check_bins, _level_by_id, _register, wrap_triton


# ----------------------------------------------------------------------------------------------------------------
# Kernel: one grouped product for all levels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _ppm_reduce_kernel(
    p_ptr, w_ptr, scale_ptr, shift_ptr, out_ptr,
    N, C, R,
    spn, spc, sps,
    swl, swr, swc,
    ssl, ssr,
    shl, shr,
    son, sor, sos,
    NUM_LEVELS: tl.constexpr,
    B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,
    B4: tl.constexpr, B5: tl.constexpr, B6: tl.constexpr, B7: tl.constexpr,
    O1: tl.constexpr, O2: tl.constexpr, O3: tl.constexpr, O4: tl.constexpr,
    O5: tl.constexpr, O6: tl.constexpr, O7: tl.constexpr,
    HAS_AFFINE: tl.constexpr, RELU: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    # Grid: (cdiv(R, BLOCK_R), cdiv(N * max_l b_l^2, BLOCK_Q), L). Per level l the product is
    # weight[l] (R, C) @ P_l (C, N*b_l^2), whose columns q = n*b_l^2 + k are pooled[n, :, off_l + k]: the batch is
    # folded into the columns so that each weight tile is read once per column block, not once per image.
    rb = tl.program_id(0)
    qb = tl.program_id(1)
    l = tl.program_id(2)
    b, off = _level_by_id(l, NUM_LEVELS, B0, B1, B2, B3, B4, B5, B6, B7, O1, O2, O3, O4, O5, O6, O7)
    b2 = b * b
    ncols = N * b2
    if qb * BLOCK_Q >= ncols:  # column blocks past this level's N*b_l^2 columns (smaller levels)
        return
    acc_ty = out_ptr.dtype.element_ty

    q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = q < ncols
    n = q // b2
    k = q - n * b2
    col = off + k
    p_cols = p_ptr + n.to(tl.int64) * spn + col.to(tl.int64) * sps  # [BLOCK_Q]
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    w_rows = w_ptr + l.to(tl.int64) * swl + r.to(tl.int64) * swr  # [BLOCK_R]

    acc = tl.zeros([BLOCK_R, BLOCK_Q], acc_ty)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        c64 = c.to(tl.int64)
        wt = tl.load(w_rows[:, None] + c64[None, :] * swc, mask=rmask[:, None] & cm[None, :], other=0.0)
        pt = tl.load(p_cols[None, :] + c64[:, None] * spc, mask=cm[:, None] & qmask[None, :], other=0.0)
        if USE_DOT:
            # float32 only: exact fp32 products and accumulation (no TF32).
            acc = tl.dot(wt, pt, acc, input_precision="ieee")
        else:
            acc += tl.sum(wt[:, :, None] * pt[None, :, :], axis=1)

    v = acc
    if HAS_AFFINE:
        sc = tl.load(scale_ptr + l.to(tl.int64) * ssl + r.to(tl.int64) * ssr, mask=rmask, other=0.0)
        sh = tl.load(shift_ptr + l.to(tl.int64) * shl + r.to(tl.int64) * shr, mask=rmask, other=0.0)
        v = v * sc[:, None]
        v = v + sh[:, None]
    if RELU:
        v = tl.where(v < 0.0, 0.0, v)  # NaN passes, as torch.relu
    o = out_ptr + n.to(tl.int64)[None, :] * son + r.to(tl.int64)[:, None] * sor + col.to(tl.int64)[None, :] * sos
    tl.store(o, v.to(acc_ty), mask=rmask[:, None] & qmask[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------


def _check_reduce(pooled: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor],
                  shift: Optional[torch.Tensor], bins: List[int], op: str = "ppm_reduce") -> None:
    L = len(bins)
    S = sum(b * b for b in bins)
    if pooled.dim() != 3 or pooled.shape[2] != S:
        raise ValueError(f"{op}: pooled must be (N, C, {S}), got {tuple(pooled.shape)}")
    if pooled.dtype not in _LEVEL_DTYPES:
        raise TypeError(f"{op}: pooled must be float32 or float64, got {pooled.dtype}")
    C = pooled.shape[1]
    if weight.dim() != 3 or weight.shape[0] != L or weight.shape[2] != C:
        raise ValueError(f"{op}: weight must be ({L}, R, {C}), got {tuple(weight.shape)}")
    if weight.dtype != pooled.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} != pooled dtype {pooled.dtype}")
    R = weight.shape[1]
    if (scale is None) != (shift is None):
        raise ValueError(f"{op}: scale and shift must be given together")
    if scale is not None:
        for name, t in (("scale", scale), ("shift", shift)):
            if tuple(t.shape) != (L, R):
                raise ValueError(f"{op}: {name} must be ({L}, {R}), got {tuple(t.shape)}")
            if t.dtype != pooled.dtype:
                raise TypeError(f"{op}: {name} dtype {t.dtype} != pooled dtype {pooled.dtype}")


def _launch_reduce(pooled: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor],
                   shift: Optional[torch.Tensor], bins: List[int], relu: bool) -> torch.Tensor:
    """_ppm_reduce_kernel on checked arguments: levels (N, R, S) in pooled's dtype."""
    L = len(bins)
    S = sum(b * b for b in bins)
    N = pooled.shape[0]
    C = pooled.shape[1]
    R = weight.shape[1]
    has_affine = scale is not None
    out = torch.empty((N, R, S), dtype=pooled.dtype, device=pooled.device)
    if out.numel() == 0:
        return out

    is_f64 = pooled.dtype == torch.float64
    if is_f64:  # no tl.dot: broadcast-multiply-sum over [BLOCK_R, BLOCK_C, BLOCK_Q]
        block_r, block_c, block_q = 16, 8, 32
    else:
        block_r, block_c, block_q = 32, 32, 32
    max_cols = N * max(b * b for b in bins)
    sc = scale if has_affine else pooled
    sh = shift if has_affine else pooled
    grid = (triton.cdiv(R, block_r), triton.cdiv(max_cols, block_q), L)
    wrap_triton(_ppm_reduce_kernel)[grid](
        pooled, weight, sc, sh, out,
        N, C, R,
        pooled.stride(0), pooled.stride(1), pooled.stride(2),
        weight.stride(0), weight.stride(1), weight.stride(2),
        sc.stride(0), sc.stride(1) if sc.dim() > 1 else 1,
        sh.stride(0), sh.stride(1) if sh.dim() > 1 else 1,
        out.stride(0), out.stride(1), out.stride(2),
        HAS_AFFINE=has_affine, RELU=bool(relu), USE_DOT=not is_f64,
        BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_Q=block_q,
        num_warps=4,
        **_bins_meta(bins),
    )
    return out


@_register("pspnet_fast::triton_ppm_reduce")
def _triton_ppm_reduce(pooled: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor],
                       shift: Optional[torch.Tensor], bins: List[int], relu: bool) -> torch.Tensor:
    _checks.check_ppm_reduce(pooled, weight, scale, shift, bins, relu)
    bins = _check_bins(bins, "ppm_reduce")
    _check_reduce(pooled, weight, scale, shift, bins)
    return _launch_reduce(pooled, weight, scale, shift, bins, relu)
