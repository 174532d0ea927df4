"""Triton backward of the PPM: the upsample_concat and pyramid_pool backward kernels and their ops.

pspnet_fast::triton_upsample_concat_backward(grad_out, C, bins, align_corners) -> grad_levels (N, R, S) and
pspnet_fast::triton_pyramid_pool_backward(grad_pooled, grad_out, bins) -> grad_x (N, C, H, W).

Deterministic: every output element is reduced by the one program that owns it, in a fixed order, without atomics.
"""

from typing import List

import torch
import triton
import triton.language as tl

from pspnet_fast import _checks  # the ops' argument checks, shared with the C++ kernels and the fake kernels

from .triton_common import (MAX_LEVELS, _LEVEL_DTYPES, _POOL_DTYPES, _bins_meta, _check_bins, _div, _level_by_id,
                            _linear_tap, _next_pow2, _pool_blocks, _register, _suggest_memory_format, wrap_triton)


# ----------------------------------------------------------------------------------------------------------------
# upsample_concat_backward: the adjoint of the level part, A_h^T G_l A_w, one owner per output bin
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _upsample_concat_backward_kernel(
    g_ptr, out_ptr,
    C, R, H, W,
    sgn, sgc, sgh, sgw,
    son, sor, sos,
    n_rblocks,
    NUM_LEVELS: tl.constexpr,
    B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,
    B4: tl.constexpr, B5: tl.constexpr, B6: tl.constexpr, B7: tl.constexpr,
    O1: tl.constexpr, O2: tl.constexpr, O3: tl.constexpr, O4: tl.constexpr,
    O5: tl.constexpr, O6: tl.constexpr, O7: tl.constexpr,
    ALIGN: tl.constexpr, IS_F64: tl.constexpr,
    BPM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # Grid: (N * cdiv(R, BLOCK_R), L). A program owns grad_levels[n, r-block, level l's b x b bins] (padded to
    # BPM x BPM, BPM = next_pow2(max_l b_l)) and reduces them alone, in a fixed order: for each column block of
    # BLOCK_W, for each row h, T[r, j] = sum_w Aw[w, j] * g[r, h, w] (the column taps of the forward), then
    # acc[r, i, j] += Ah[h, i] * T[r, j]. Selections, not 0/1 products: a NaN reaches only the bins whose taps read
    # it, both taps of a position even where a weight is 0 (as PyTorch's backward).
    pid = tl.program_id(0)
    l = tl.program_id(1)
    n = pid // n_rblocks
    rb = pid % n_rblocks
    b, off = _level_by_id(l, NUM_LEVELS, B0, B1, B2, B3, B4, B5, B6, B7, O1, O2, O3, O4, O5, O6, O7)
    zero = pid * 0  # loop indices become tensors (the interpreter hands out Python ints)
    acc_ty = out_ptr.dtype.element_ty
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    k = tl.arange(0, BPM)
    g_rows = g_ptr + n.to(tl.int64) * sgn + (C + l * R + r).to(tl.int64) * sgc  # [BLOCK_R] -> grad_out[n, ch, 0, 0]

    acc = tl.zeros([BLOCK_R, BPM, BPM], acc_ty)
    for w0 in range(0, W, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        wmask = w < W
        iw0, iw1, lw0, lw1 = _linear_tap(w, b, W, ALIGN, IS_F64, acc_ty)
        sel0 = (k[None, :] == iw0[:, None]) & wmask[:, None]  # [BLOCK_W, BPM]
        sel1 = (k[None, :] == iw1[:, None]) & wmask[:, None]
        lw0 = lw0[None, :, None]
        lw1 = lw1[None, :, None]
        m = rmask[:, None] & wmask[None, :]
        ptrs = g_rows[:, None] + w.to(tl.int64)[None, :] * sgw  # [BLOCK_R, BLOCK_W] at row 0
        for hi in range(0, H):
            h = zero + hi
            g = tl.load(ptrs + h.to(tl.int64) * sgh, mask=m, other=0.0).to(acc_ty)[:, :, None]
            t = tl.sum(tl.where(sel0[None, :, :], lw0 * g, 0.0) + tl.where(sel1[None, :, :], lw1 * g, 0.0),
                       axis=1)  # [BLOCK_R, BPM]: column bin j
            ih0, ih1, lh0, lh1 = _linear_tap(h, b, H, ALIGN, IS_F64, acc_ty)
            acc += tl.where((k == ih0)[None, :, None], (lh0 * t)[:, None, :], 0.0)
            acc += tl.where((k == ih1)[None, :, None], (lh1 * t)[:, None, :], 0.0)

    valid = k < b
    col = off + k[:, None] * b + k[None, :]  # [BPM, BPM]
    o = out_ptr + n.to(tl.int64) * son + r.to(tl.int64)[:, None, None] * sor + col.to(tl.int64)[None, :, :] * sos
    tl.store(o, acc, mask=rmask[:, None, None] & valid[None, :, None] & valid[None, None, :])


# ----------------------------------------------------------------------------------------------------------------
# pyramid_pool_backward: grad_x = grad_out[:, :C] + pool^T(grad_pooled), a gather (one owner per output element)
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _pool_bwd_level_load(gp_rows, sgs, cmask, H, W, OFF: tl.constexpr, B: tl.constexpr, BP: tl.constexpr,
                         IS_F64: tl.constexpr, acc_ty: tl.constexpr):
    # [BLOCK_C, BP, BP]: grad_pooled[n, c, OFF + i*B + j] / kh_i / kw_j (the forward's mean, transposed).
    k = tl.arange(0, BP)
    valid = k < B
    kh = ((k + 1) * H + B - 1) // B - (k * H) // B
    kw = ((k + 1) * W + B - 1) // B - (k * W) // B
    kh = tl.where(valid, kh, 1).to(acc_ty)
    kw = tl.where(valid, kw, 1).to(acc_ty)
    col = (OFF + k[:, None] * B + k[None, :]).to(tl.int64) * sgs  # [BP, BP]
    mask = cmask[:, None, None] & valid[None, :, None] & valid[None, None, :]
    v = tl.load(gp_rows[:, None, None] + col[None, :, :], mask=mask, other=0.0).to(acc_ty)
    return _div(_div(v, kh[None, :, None], IS_F64), kw[None, None, :], IS_F64)


@triton.jit
def _pool_bwd_level_row(acc, sc, h, w, H, W, B: tl.constexpr, BP: tl.constexpr):
    # acc: [BLOCK_C, BLOCK_W] gradient of row h at columns w; sc: [BLOCK_C, BP, BP] the scaled bin gradients of one
    # level. First the row bins that contain h (1 or 2, more when B > H), then the column bins that contain each w.
    k = tl.arange(0, BP)
    valid = k < B
    r_lo = (k * H) // B
    r_hi = tl.where(valid, ((k + 1) * H + B - 1) // B, 0)
    c_lo = (k * W) // B
    c_hi = tl.where(valid, ((k + 1) * W + B - 1) // B, 0)
    in_row = (h >= r_lo) & (h < r_hi)  # [BP]
    u = tl.sum(tl.where(in_row[None, :, None], sc, 0.0), axis=1)  # [BLOCK_C, BP]: column bin j
    in_col = (w[:, None] >= c_lo[None, :]) & (w[:, None] < c_hi[None, :])  # [BLOCK_W, BP]
    acc += tl.sum(tl.where(in_col[None, :, :], u[:, None, :], 0.0), axis=2)
    return acc


@triton.jit
def _pyramid_pool_backward_kernel(
    gp_ptr, g_ptr, out_ptr,
    C, H, W,
    sgpn, sgpc, sgps,
    sgn, sgc, sgh, sgw,
    son, soc, soh, sow,
    n_cblocks, n_hblocks, n_wblocks, ROWS,
    NUM_LEVELS: tl.constexpr,
    B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,
    B4: tl.constexpr, B5: tl.constexpr, B6: tl.constexpr, B7: tl.constexpr,
    O1: tl.constexpr, O2: tl.constexpr, O3: tl.constexpr, O4: tl.constexpr,
    O5: tl.constexpr, O6: tl.constexpr, O7: tl.constexpr,
    BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr, BP3: tl.constexpr,
    BP4: tl.constexpr, BP5: tl.constexpr, BP6: tl.constexpr, BP7: tl.constexpr,
    IS_F64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # Grid: (N * cdiv(C, BLOCK_C) * cdiv(H, ROWS) * cdiv(W, BLOCK_W),). A program owns grad_x[n, c-block, ROWS rows,
    # w-block]: it loads every level's scaled bin gradients of its channels once ([BLOCK_C, BP_l, BP_l] each), then per
    # row writes grad_out + sum over levels (in level order) of the bins containing (h, w).
    pid = tl.program_id(0)
    wb = pid % n_wblocks
    t = pid // n_wblocks
    hb = t % n_hblocks
    t = t // n_hblocks
    cb = t % n_cblocks
    n = (t // n_cblocks).to(tl.int64)
    zero = pid * 0  # loop indices become tensors (the interpreter hands out Python ints)
    acc_ty = tl.float32
    if IS_F64:
        acc_ty = tl.float64
    out_ty = out_ptr.dtype.element_ty
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    c64 = c.to(tl.int64)
    w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    wmask = w < W
    w64 = w.to(tl.int64)

    gp_rows = gp_ptr + n * sgpn + c64 * sgpc  # [BLOCK_C]
    sc0 = _pool_bwd_level_load(gp_rows, sgps, cmask, H, W, 0, B0, BP0, IS_F64, acc_ty)
    if NUM_LEVELS > 1:
        sc1 = _pool_bwd_level_load(gp_rows, sgps, cmask, H, W, O1, B1, BP1, IS_F64, acc_ty)
    if NUM_LEVELS > 2:
        sc2 = _pool_bwd_level_load(gp_rows, sgps, cmask, H, W, O2, B2, BP2, IS_F64, acc_ty)
    if NUM_LEVELS > 3:
        sc3 = _pool_bwd_level_load(gp_rows, sgps, cmask, H, W, O3, B3, BP3, IS_F64, acc_ty)
    if NUM_LEVELS > 4:
        sc4 = _pool_bwd_level_load(gp_rows, sgps, cmask, H, W, O4, B4, BP4, IS_F64, acc_ty)
    if NUM_LEVELS > 5:
        sc5 = _pool_bwd_level_load(gp_rows, sgps, cmask, H, W, O5, B5, BP5, IS_F64, acc_ty)
    if NUM_LEVELS > 6:
        sc6 = _pool_bwd_level_load(gp_rows, sgps, cmask, H, W, O6, B6, BP6, IS_F64, acc_ty)
    if NUM_LEVELS > 7:
        sc7 = _pool_bwd_level_load(gp_rows, sgps, cmask, H, W, O7, B7, BP7, IS_F64, acc_ty)

    m = cmask[:, None] & wmask[None, :]
    g_tile = g_ptr + n * sgn + c64[:, None] * sgc + w64[None, :] * sgw  # [BLOCK_C, BLOCK_W] at row 0
    o_tile = out_ptr + n * son + c64[:, None] * soc + w64[None, :] * sow
    h_start = hb * ROWS
    h_end = tl.minimum(h_start + ROWS, H)
    for hi in range(h_start, h_end):
        h = zero + hi
        h64 = h.to(tl.int64)
        acc = tl.load(g_tile + h64 * sgh, mask=m, other=0.0).to(acc_ty)
        acc = _pool_bwd_level_row(acc, sc0, h, w, H, W, B0, BP0)
        if NUM_LEVELS > 1:
            acc = _pool_bwd_level_row(acc, sc1, h, w, H, W, B1, BP1)
        if NUM_LEVELS > 2:
            acc = _pool_bwd_level_row(acc, sc2, h, w, H, W, B2, BP2)
        if NUM_LEVELS > 3:
            acc = _pool_bwd_level_row(acc, sc3, h, w, H, W, B3, BP3)
        if NUM_LEVELS > 4:
            acc = _pool_bwd_level_row(acc, sc4, h, w, H, W, B4, BP4)
        if NUM_LEVELS > 5:
            acc = _pool_bwd_level_row(acc, sc5, h, w, H, W, B5, BP5)
        if NUM_LEVELS > 6:
            acc = _pool_bwd_level_row(acc, sc6, h, w, H, W, B6, BP6)
        if NUM_LEVELS > 7:
            acc = _pool_bwd_level_row(acc, sc7, h, w, H, W, B7, BP7)
        tl.store(o_tile + h64 * soh, acc.to(out_ty), mask=m)


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------


@_register("pspnet_fast::triton_upsample_concat_backward")
def _triton_upsample_concat_backward(grad_out: torch.Tensor, in_channels: int, bins: List[int],
                                     align_corners: bool) -> torch.Tensor:
    _checks.check_upsample_concat_backward(grad_out, in_channels, bins, align_corners)
    bins = _check_bins(bins, "upsample_concat_backward")
    L = len(bins)
    S = sum(b * b for b in bins)
    if grad_out.dim() != 4:
        raise ValueError(f"upsample_concat_backward: grad_out must be (N, C + L*R, H, W), got {tuple(grad_out.shape)}")
    if grad_out.dtype not in _POOL_DTYPES:
        raise TypeError(f"upsample_concat_backward: unsupported grad_out dtype {grad_out.dtype}")
    N, CT, H, W = grad_out.shape
    C = int(in_channels)
    if L == 0:
        raise ValueError("upsample_concat_backward: needs at least one pyramid level (R is undefined without one)")
    if C < 0 or C > CT or (CT - C) % L != 0 or (CT - C) // L < 1:
        raise ValueError(f"upsample_concat_backward: grad_out has {CT} channels, which is not in_channels={C} plus "
                         f"{L} levels of R >= 1 channels each")
    R = (CT - C) // L
    is_f64 = grad_out.dtype == torch.float64
    out = torch.empty((N, R, S), dtype=torch.float64 if is_f64 else torch.float32, device=grad_out.device)
    if out.numel() == 0:
        return out
    if H == 0 or W == 0:
        return out.zero_()

    bpm = _next_pow2(max(bins))
    block_r, block_w = _pool_blocks(W, [max(bins)], is_f64)
    n_rblocks = triton.cdiv(R, block_r)
    grid = (N * n_rblocks, L)
    wrap_triton(_upsample_concat_backward_kernel)[grid](
        grad_out, out,
        C, R, H, W,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), grad_out.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        n_rblocks,
        ALIGN=bool(align_corners), IS_F64=is_f64,
        BPM=bpm, BLOCK_R=block_r, BLOCK_W=block_w,
        num_warps=4,
        **_bins_meta(bins),
    )
    return out


@_register("pspnet_fast::triton_pyramid_pool_backward")
def _triton_pyramid_pool_backward(grad_pooled: torch.Tensor, grad_out: torch.Tensor, bins: List[int]) -> torch.Tensor:
    _checks.check_pyramid_pool_backward(grad_pooled, grad_out, bins)
    bins = _check_bins(bins, "pyramid_pool_backward")
    S = sum(b * b for b in bins)
    if grad_out.dim() != 4:
        raise ValueError(f"pyramid_pool_backward: grad_out must be (N, C', H, W), got {tuple(grad_out.shape)}")
    if grad_out.dtype not in _POOL_DTYPES:
        raise TypeError(f"pyramid_pool_backward: unsupported grad_out dtype {grad_out.dtype}")
    if grad_pooled.dtype not in _LEVEL_DTYPES:
        raise TypeError(f"pyramid_pool_backward: grad_pooled must be float32 or float64, got {grad_pooled.dtype}")
    N, CT, H, W = grad_out.shape
    if grad_pooled.dim() != 3 or grad_pooled.shape[0] != N or grad_pooled.shape[2] != S or grad_pooled.shape[1] > CT:
        raise ValueError(f"pyramid_pool_backward: grad_pooled must be ({N}, C, {S}) with C <= {CT}, got "
                         f"{tuple(grad_pooled.shape)}")
    if H == 0 or W == 0:
        raise ValueError(f"pyramid_pool_backward: H and W must be non-zero, got {tuple(grad_out.shape)}")
    C = grad_pooled.shape[1]
    out = torch.empty((N, C, H, W), dtype=grad_out.dtype, device=grad_out.device,
                      memory_format=_suggest_memory_format(grad_out))
    if out.numel() == 0:
        return out

    is_f64 = grad_pooled.dtype == torch.float64 or grad_out.dtype == torch.float64
    block_c, block_w = _pool_blocks(W, bins, is_f64)
    rows = min(H, 16)
    bps = [_next_pow2(b) for b in bins]
    meta = _bins_meta(bins)
    for i in range(MAX_LEVELS):
        meta[f"BP{i}"] = bps[i] if i < len(bins) else 1
    n_cblocks = triton.cdiv(C, block_c)
    n_hblocks = triton.cdiv(H, rows)
    n_wblocks = triton.cdiv(W, block_w)
    grid = (N * n_cblocks * n_hblocks * n_wblocks,)
    wrap_triton(_pyramid_pool_backward_kernel)[grid](
        grad_pooled, grad_out, out,
        C, H, W,
        grad_pooled.stride(0), grad_pooled.stride(1), grad_pooled.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), grad_out.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        n_cblocks, n_hblocks, n_wblocks, rows,
        IS_F64=is_f64, BLOCK_C=block_c, BLOCK_W=block_w,
        num_warps=4,
        **meta,
    )
    return out
