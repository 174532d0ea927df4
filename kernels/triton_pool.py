"""Triton pyramid_pool: adaptive average pooling of x to every pyramid level in one read of x.

The row-segment kernel (which can also copy x into ppm_forward's output) and the row-block kernel for rows wider than
one tile, the launch plan, and the op pspnet_fast::triton_pyramid_pool(x (N, C, H, W), bins) -> pooled (N, C, S).
"""

import math
from typing import List, Optional

import torch
import triton
import triton.language as tl

from pspnet_fast import _checks  # the ops' argument checks, shared with the C++ kernels and the fake kernels

from .triton_common import (MAX_LEVELS, _POOL_DTYPES, _bins_meta, _check_bins, _div, _div_count, _next_pow2, _pool_blocks,
                            _register, wrap_triton)


# ----------------------------------------------------------------------------------------------------------------
# Kernels: one read of x, every level reduced from the same tile
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _pool_level_tile(acc, xt, w, h, H, W, B: tl.constexpr, BP: tl.constexpr):
    # acc: [BLOCK_C, BP, BP] running bin sums (i, j) of one level; xt: [BLOCK_C, BLOCK_W] the part of row h at
    # columns w (zero outside the tensor). Separable: first the column-bin sums of this row piece, then each is added
    # to every row bin that contains h. Selections (not 0/1 products), so a NaN only reaches the bins holding it.
    k = tl.arange(0, BP)
    valid = k < B
    c_lo = (k * W) // B
    c_hi = tl.where(valid, ((k + 1) * W + B - 1) // B, 0)
    r_lo = (k * H) // B
    r_hi = tl.where(valid, ((k + 1) * H + B - 1) // B, 0)
    in_col = (w[:, None] >= c_lo[None, :]) & (w[:, None] < c_hi[None, :])  # [BLOCK_W, BP]
    part = tl.sum(tl.where(in_col[None, :, :], xt[:, :, None], 0.0), axis=1)  # [BLOCK_C, BP]
    in_row = (h >= r_lo) & (h < r_hi)  # [BP]
    acc += tl.where(in_row[None, :, None], part[:, None, :], 0.0)
    return acc


@triton.jit
def _pool_level_store(out_rows, cmask, acc, H, W, OFF: tl.constexpr, B: tl.constexpr, BP: tl.constexpr,
                      IS_F64: tl.constexpr):
    # out_rows: [BLOCK_C] pointers to pooled[n, c, 0]. Mean as ATen: sum / kh / kw.
    k = tl.arange(0, BP)
    valid = k < B
    kh = ((k + 1) * H + B - 1) // B - (k * H) // B
    kw = ((k + 1) * W + B - 1) // B - (k * W) // B
    kh = tl.where(valid, kh, 1).to(acc.dtype)
    kw = tl.where(valid, kw, 1).to(acc.dtype)
    if IS_F64:
        v = _div(_div(acc, kh[None, :, None], IS_F64), kw[None, None, :], IS_F64)
    else:
        v = _div_count(_div_count(acc, kh[None, :, None]), kw[None, None, :])  # div.rn's values, no slow-path calls
    col = OFF + k[:, None] * B + k[None, :]  # [BP, BP]
    mask = cmask[:, None, None] & valid[None, :, None] & valid[None, None, :]
    tl.store(out_rows[:, None, None] + col[None, :, :], v, mask=mask)


@triton.jit
def _pyramid_pool_wide_kernel(
    x_ptr, out_ptr,
    C, H, W,
    sxn, sxc, sxh, sxw,
    son, soc,
    n_cblocks,
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
    # Grid: (N * cdiv(C, BLOCK_C),). A program owns BLOCK_C channels of one image, walks x row by row in
    # [BLOCK_C, BLOCK_W] tiles (x read exactly once) and keeps one [BLOCK_C, BP_l, BP_l] accumulator per level.
    pid = tl.program_id(0)
    n = pid // n_cblocks
    cb = pid % n_cblocks
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    acc_ty = out_ptr.dtype.element_ty
    x_row = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc  # [BLOCK_C] pointers to x[n, c, 0, 0]

    acc0 = tl.zeros([BLOCK_C, BP0, BP0], acc_ty)
    acc1 = tl.zeros([BLOCK_C, BP1, BP1], acc_ty)
    acc2 = tl.zeros([BLOCK_C, BP2, BP2], acc_ty)
    acc3 = tl.zeros([BLOCK_C, BP3, BP3], acc_ty)
    acc4 = tl.zeros([BLOCK_C, BP4, BP4], acc_ty)
    acc5 = tl.zeros([BLOCK_C, BP5, BP5], acc_ty)
    acc6 = tl.zeros([BLOCK_C, BP6, BP6], acc_ty)
    acc7 = tl.zeros([BLOCK_C, BP7, BP7], acc_ty)

    for h in range(0, H):
        for w0 in range(0, W, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            wmask = w < W
            xt = tl.load(x_row[:, None] + w.to(tl.int64)[None, :] * sxw, mask=cmask[:, None] & wmask[None, :], other=0.0)
            xt = xt.to(acc_ty)
            acc0 = _pool_level_tile(acc0, xt, w, h, H, W, B0, BP0)
            if NUM_LEVELS > 1:
                acc1 = _pool_level_tile(acc1, xt, w, h, H, W, B1, BP1)
            if NUM_LEVELS > 2:
                acc2 = _pool_level_tile(acc2, xt, w, h, H, W, B2, BP2)
            if NUM_LEVELS > 3:
                acc3 = _pool_level_tile(acc3, xt, w, h, H, W, B3, BP3)
            if NUM_LEVELS > 4:
                acc4 = _pool_level_tile(acc4, xt, w, h, H, W, B4, BP4)
            if NUM_LEVELS > 5:
                acc5 = _pool_level_tile(acc5, xt, w, h, H, W, B5, BP5)
            if NUM_LEVELS > 6:
                acc6 = _pool_level_tile(acc6, xt, w, h, H, W, B6, BP6)
            if NUM_LEVELS > 7:
                acc7 = _pool_level_tile(acc7, xt, w, h, H, W, B7, BP7)
        x_row += sxh  # 64-bit pointer arithmetic: no h * sxh product that could overflow int32

    out_rows = out_ptr + n.to(tl.int64) * son + c.to(tl.int64) * soc
    _pool_level_store(out_rows, cmask, acc0, H, W, 0, B0, BP0, IS_F64)
    if NUM_LEVELS > 1:
        _pool_level_store(out_rows, cmask, acc1, H, W, O1, B1, BP1, IS_F64)
    if NUM_LEVELS > 2:
        _pool_level_store(out_rows, cmask, acc2, H, W, O2, B2, BP2, IS_F64)
    if NUM_LEVELS > 3:
        _pool_level_store(out_rows, cmask, acc3, H, W, O3, B3, BP3, IS_F64)
    if NUM_LEVELS > 4:
        _pool_level_store(out_rows, cmask, acc4, H, W, O4, B4, BP4, IS_F64)
    if NUM_LEVELS > 5:
        _pool_level_store(out_rows, cmask, acc5, H, W, O5, B5, BP5, IS_F64)
    if NUM_LEVELS > 6:
        _pool_level_store(out_rows, cmask, acc6, H, W, O6, B6, BP6, IS_F64)
    if NUM_LEVELS > 7:
        _pool_level_store(out_rows, cmask, acc7, H, W, O7, B7, BP7, IS_F64)


@triton.jit
def _realign(rs, s, VEC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    # rs with lane j holding column j - s -> lane w holding column w (lanes w >= W - s hold junk that falls in no
    # column bin). One in-register gather per row class and segment, not per element.
    if VEC == 1:
        return rs
    idx = tl.minimum(tl.arange(0, BLOCK_W) + s.to(tl.int32), BLOCK_W - 1)
    return tl.gather(rs, tl.broadcast_to(idx[None, :], (BLOCK_C, BLOCK_W)), 1)


@triton.jit
def _seg_level(acc, rs, seg_lo, seg_hi, H, W, B: tl.constexpr, BP: tl.constexpr, BLOCK_W: tl.constexpr):
    # Adds the elementary row segment [seg_lo, seg_hi), rs [BLOCK_C, BLOCK_W] its row sum (lane w = column w; lanes
    # w >= W fall in no bin), to the level's [BLOCK_C, BP, BP] bin sums. Segment bounds include every bin bound, so
    # each row bin holds the whole segment or none of it. Selections: a NaN reaches only the bins holding it.
    # The column-bin sums one bin at a time (a loop over the B bins, [BLOCK_C, BLOCK_W] live values), not as one
    # [BLOCK_C, BLOCK_W, BP] selection: the registers of a row tile, no spills at 16-byte channels_last tiles.
    k = tl.arange(0, BP)
    valid = k < B
    w = tl.arange(0, BLOCK_W)
    part = tl.zeros([rs.shape[0], BP], rs.dtype)  # [BLOCK_C, BP]
    for kk in range(0, B):
        c_lo = (kk * W) // B
        c_hi = ((kk + 1) * W + B - 1) // B
        in_col = (w >= c_lo) & (w < c_hi)  # [BLOCK_W]
        col_sum = tl.sum(tl.where(in_col[None, :], rs, 0.0), axis=1)  # [BLOCK_C]
        part = tl.where((k == kk)[None, :], col_sum[:, None], part)
    r_lo = (k * H) // B
    r_hi = tl.where(valid, ((k + 1) * H + B - 1) // B, 0)
    in_row = (r_lo <= seg_lo) & (seg_hi <= r_hi)  # [BP]
    acc += tl.where(in_row[None, :, None], part[:, None, :], 0.0)
    return acc


@triton.jit
def _next_bound(h, H, B: tl.constexpr):
    # The first row-bin bound > h of a level of B bins (bin k spans rows [floor(k H / B), ceil((k + 1) H / B))):
    # starts floor(k H / B) and ends ceil(k H / B); h < H.
    k_lo = ((h + 1) * B + H - 1) // H  # the first bin starting after h (k_lo = B: none but the end, H)
    lo = tl.where(k_lo < B, (k_lo * H) // B, H)
    k_hi = (h * B) // H + 1  # the first bin ending after h
    hi = (k_hi * H + B - 1) // B
    return tl.minimum(lo, hi)


@triton.jit
def _pool_rows(rs, K: tl.constexpr, s, seg_lo, seg_hi, x_img, y_img, c64, cmask, j, sxc, sxh, sxw, syc, syh, syw,
               x_end, W, DENSE: tl.constexpr, VEC: tl.constexpr, P: tl.constexpr, POOL: tl.constexpr,
               COPY: tl.constexpr, COPY_FLAT: tl.constexpr):
    # Rows h = K mod P of [seg_lo, seg_hi) of the program's channels, added to rs [BLOCK_C, BLOCK_W] (lane j holds
    # column j - s in DENSE mode, column j otherwise) and, COPY, written to y's x channels.
    h0 = seg_lo + (K - seg_lo % P + P) % P
    for hi in range(h0, seg_hi, P):
        h64 = (seg_lo * 0 + hi).to(tl.int64)
        if DENSE:
            e = c64 * sxc + h64 * W  # [BLOCK_C] flat offset of the row in the image (elements)
            a = (e // VEC) * VEC  # the aligned start: divisible by VEC by construction (Triton's axis analysis sees it)
            lim = ((s + W + VEC - 1) // VEC) * VEC
            m = cmask[:, None] & (j[None, :] < lim)
            xt = tl.load(x_img + a[:, None] + j[None, :], mask=m, other=0.0)
            if COPY:
                if COPY_FLAT:
                    # y's x channels have x's flat layout: lanes outside the row copy x's neighbouring elements to
                    # their own places (the values the programs owning them write), up to the end of x's channels.
                    flat = a[:, None] + j[None, :]
                    tl.store(y_img + flat, xt, mask=m & (flat < x_end))
                else:
                    w = j[None, :] - s
                    mw = cmask[:, None] & (w >= 0) & (w < W)
                    tl.store(y_img + c64[:, None] * syc + h64 * syh + w.to(tl.int64) * syw, xt, mask=mw)
        else:
            m = cmask[:, None] & (j < W)[None, :]
            xt = tl.load(x_img + c64[:, None] * sxc + h64 * sxh + j.to(tl.int64)[None, :] * sxw, mask=m, other=0.0)
            if COPY:
                tl.store(y_img + c64[:, None] * syc + h64 * syh + j.to(tl.int64)[None, :] * syw, xt, mask=m)
        if POOL:
            rs += xt.to(rs.dtype)
    return rs


@triton.jit
def _pyramid_pool_kernel(
    x_ptr, out_ptr, y_ptr,
    C, H, W,
    sxn, sxc, sxh, sxw,
    son, soc,
    syn, syc, syh, syw, Y0,
    PC, n_tblocks,
    NUM_LEVELS: tl.constexpr,
    B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,
    B4: tl.constexpr, B5: tl.constexpr, B6: tl.constexpr, B7: tl.constexpr,
    O1: tl.constexpr, O2: tl.constexpr, O3: tl.constexpr, O4: tl.constexpr,
    O5: tl.constexpr, O6: tl.constexpr, O7: tl.constexpr,
    BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr, BP3: tl.constexpr,
    BP4: tl.constexpr, BP5: tl.constexpr, BP6: tl.constexpr, BP7: tl.constexpr,
    IS_F64: tl.constexpr, DENSE: tl.constexpr, VEC: tl.constexpr, P: tl.constexpr,
    POOL: tl.constexpr, COPY: tl.constexpr, COPY_FLAT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # Grid: (N * PC * n_tblocks,). A program owns BLOCK_C channels c = r + PC * (t * BLOCK_C + i) of one image (one
    # alignment class r), reads x once, row by row, each row as one [BLOCK_C, BLOCK_W] tile, and
    #   - adds the row to a running row sum (no per-element bin selection): rows are summed per elementary row
    #     segment (the pieces between consecutive row-bin bounds of all levels); at a segment's end its column-bin
    #     sums (one selection pass per segment, not per row) go to every row bin holding the segment;
    #   - COPY: writes the row into y[n, Y0 + c] (ppm_forward: x's channels of the output, x read once).
    # DENSE (stride(3) == 1, stride(2) == W; sxn given in units of VEC): the plane is one flat run and every row is
    # loaded from the VEC-aligned address at or below its start, so that loads are provably 16-byte aligned for any
    # W and stride(1) (90x90 bfloat16: rows start at 4-byte granularity). Lane j then holds column j - s,
    # s = (c * sxc + h * W) mod VEC, the same for the P rows classes h mod P (P * W = 0 mod VEC) of all channels of one
    # class r (PC * sxc = 0 mod VEC): one row sum per row class, realigned (one in-register gather) at the end of each
    # segment. The load mask is
    # VEC-granular (lanes past the row read the next row, inside the tensor or inside the 16-byte chunk holding its
    # last element) and such lanes fall in no column bin.
    pid = tl.program_id(0)
    t = pid % n_tblocks
    rest = pid // n_tblocks
    r = rest % PC
    if r + PC * t * BLOCK_C >= C:  # a class or block without channels (C < PC, or the class's last block)
        return
    n = (rest // PC).to(tl.int64)
    zero = pid * 0  # loop indices become tensors (the interpreter hands out Python ints)
    i = tl.arange(0, BLOCK_C)
    c = r + PC * (t * BLOCK_C + i)
    cmask = c < C
    c64 = c.to(tl.int64)
    j = tl.arange(0, BLOCK_W)
    acc_ty = out_ptr.dtype.element_ty
    if DENSE:
        x_img = x_ptr + n * (sxn * VEC)
    else:
        x_img = x_ptr + n * sxn
    y_img = y_ptr + n * syn + (zero + Y0).to(tl.int64) * syc
    x_end = (zero + C).to(tl.int64) * sxc  # COPY_FLAT: the end of x's channels (flat, in elements)

    # Lane shift of row class k (DENSE): S_k = (r * sxc + k * W) mod VEC.
    cls0 = (r.to(tl.int64) * sxc) % VEC

    acc0 = tl.zeros([BLOCK_C, BP0, BP0], acc_ty)
    acc1 = tl.zeros([BLOCK_C, BP1, BP1], acc_ty)
    acc2 = tl.zeros([BLOCK_C, BP2, BP2], acc_ty)
    acc3 = tl.zeros([BLOCK_C, BP3, BP3], acc_ty)
    acc4 = tl.zeros([BLOCK_C, BP4, BP4], acc_ty)
    acc5 = tl.zeros([BLOCK_C, BP5, BP5], acc_ty)
    acc6 = tl.zeros([BLOCK_C, BP6, BP6], acc_ty)
    acc7 = tl.zeros([BLOCK_C, BP7, BP7], acc_ty)
    seg_lo = zero
    while seg_lo < H:
        # The elementary row segment [seg_lo, seg_hi): up to the next row-bin bound of any level (scalar arithmetic
        # once per segment, nothing per row).
        seg_hi = _next_bound(seg_lo, H, B0)
        if NUM_LEVELS > 1:
            seg_hi = tl.minimum(seg_hi, _next_bound(seg_lo, H, B1))
        if NUM_LEVELS > 2:
            seg_hi = tl.minimum(seg_hi, _next_bound(seg_lo, H, B2))
        if NUM_LEVELS > 3:
            seg_hi = tl.minimum(seg_hi, _next_bound(seg_lo, H, B3))
        if NUM_LEVELS > 4:
            seg_hi = tl.minimum(seg_hi, _next_bound(seg_lo, H, B4))
        if NUM_LEVELS > 5:
            seg_hi = tl.minimum(seg_hi, _next_bound(seg_lo, H, B5))
        if NUM_LEVELS > 6:
            seg_hi = tl.minimum(seg_hi, _next_bound(seg_lo, H, B6))
        if NUM_LEVELS > 7:
            seg_hi = tl.minimum(seg_hi, _next_bound(seg_lo, H, B7))
        if not POOL:
            seg_hi = zero + H
        # Rows class by class (h = k mod P), each class into its own row sum (no per-row branch or selection),
        # realigned at the segment's end (one gather per class and segment) and added up. Only one class's row sum
        # is live at a time besides class 0's and the sum of the others (none is carried across segments).
        rs = _pool_rows(tl.zeros([BLOCK_C, BLOCK_W], acc_ty), 0, cls0, seg_lo, seg_hi, x_img, y_img, c64, cmask, j,
                        sxc, sxh, sxw, syc, syh, syw, x_end, W, DENSE, VEC, P, POOL, COPY, COPY_FLAT)
        others = tl.zeros([BLOCK_C, BLOCK_W], acc_ty)
        for K in tl.static_range(1, P):
            sk = (cls0 + K * W) % VEC
            rk = _pool_rows(tl.zeros([BLOCK_C, BLOCK_W], acc_ty), K, sk, seg_lo, seg_hi, x_img, y_img, c64, cmask, j,
                            sxc, sxh, sxw, syc, syh, syw, x_end, W, DENSE, VEC, P, POOL, COPY, COPY_FLAT)
            if POOL:
                others += _realign(rk, sk, VEC, BLOCK_C, BLOCK_W)
        if POOL:
            rs = _realign(rs, cls0, VEC, BLOCK_C, BLOCK_W)
            if P > 1:
                rs += others  # realigned class 0 plus the (realigned) others
            acc0 = _seg_level(acc0, rs, seg_lo, seg_hi, H, W, B0, BP0, BLOCK_W)
            if NUM_LEVELS > 1:
                acc1 = _seg_level(acc1, rs, seg_lo, seg_hi, H, W, B1, BP1, BLOCK_W)
            if NUM_LEVELS > 2:
                acc2 = _seg_level(acc2, rs, seg_lo, seg_hi, H, W, B2, BP2, BLOCK_W)
            if NUM_LEVELS > 3:
                acc3 = _seg_level(acc3, rs, seg_lo, seg_hi, H, W, B3, BP3, BLOCK_W)
            if NUM_LEVELS > 4:
                acc4 = _seg_level(acc4, rs, seg_lo, seg_hi, H, W, B4, BP4, BLOCK_W)
            if NUM_LEVELS > 5:
                acc5 = _seg_level(acc5, rs, seg_lo, seg_hi, H, W, B5, BP5, BLOCK_W)
            if NUM_LEVELS > 6:
                acc6 = _seg_level(acc6, rs, seg_lo, seg_hi, H, W, B6, BP6, BLOCK_W)
            if NUM_LEVELS > 7:
                acc7 = _seg_level(acc7, rs, seg_lo, seg_hi, H, W, B7, BP7, BLOCK_W)
        seg_lo = seg_hi

    if POOL:
        out_rows = out_ptr + n * son + c64 * soc
        _pool_level_store(out_rows, cmask, acc0, H, W, 0, B0, BP0, IS_F64)
        if NUM_LEVELS > 1:
            _pool_level_store(out_rows, cmask, acc1, H, W, O1, B1, BP1, IS_F64)
        if NUM_LEVELS > 2:
            _pool_level_store(out_rows, cmask, acc2, H, W, O2, B2, BP2, IS_F64)
        if NUM_LEVELS > 3:
            _pool_level_store(out_rows, cmask, acc3, H, W, O3, B3, BP3, IS_F64)
        if NUM_LEVELS > 4:
            _pool_level_store(out_rows, cmask, acc4, H, W, O4, B4, BP4, IS_F64)
        if NUM_LEVELS > 5:
            _pool_level_store(out_rows, cmask, acc5, H, W, O5, B5, BP5, IS_F64)
        if NUM_LEVELS > 6:
            _pool_level_store(out_rows, cmask, acc6, H, W, O6, B6, BP6, IS_F64)
        if NUM_LEVELS > 7:
            _pool_level_store(out_rows, cmask, acc7, H, W, O7, B7, BP7, IS_F64)


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------


_POOL_MAX_BLOCK_W = 512  # wider rows take the row-block kernel (_pyramid_pool_wide_kernel)


def _aligned16(t: torch.Tensor) -> bool:
    """Whether t's first element sits at a 16-byte boundary (under tracing, FakeTensors have no address: the storage
    offset decides, allocations being at least 16-byte aligned)."""
    try:
        return t.data_ptr() % 16 == 0
    except Exception:
        return (t.storage_offset() * t.element_size()) % 16 == 0


def _pool_plan(x: torch.Tensor, bins: List[int]) -> Optional[dict]:
    """Launch geometry of _pyramid_pool_kernel for x, or None where its rows do not fit one tile (the wide kernel).

    DENSE (rows contiguous and back to back in each plane): VEC = 16 bytes of elements when x's images start at
    16-byte boundaries, P = VEC / gcd(W, VEC) row classes, PC = VEC / gcd(stride(1), VEC) channel classes; else
    VEC = P = PC = 1. Register budget (num_warps * 32 threads): the P row sums [BLOCK_C, BLOCK_W] <= 32 values a
    thread, the segment's column selection [BLOCK_C, BLOCK_W, max BP] <= 64, at least 16 bytes of a row a thread."""
    N, C, H, W = x.shape
    es = x.element_size()
    dense = x.stride(3) == 1 and (x.stride(2) == W or H == 1)
    vec = 16 // es if dense else 1
    if vec > 1 and not (_aligned16(x) and (N == 1 or x.stride(0) % vec == 0)):
        vec = 1
    p = vec // math.gcd(W % vec, vec) if vec > 1 else 1
    pc = vec // math.gcd(x.stride(1) % vec, vec) if vec > 1 else 1
    # Lanes for the shift: none when every row starts at a VEC boundary (W and stride(1) multiples of VEC).
    block_w = _next_pow2(W + (0 if W % vec == 0 and x.stride(1) % vec == 0 else vec - 1))
    if block_w > _POOL_MAX_BLOCK_W:
        return None
    bps = [_next_pow2(b) for b in bins] or [1]
    num_warps = 4
    threads = 32 * num_warps
    block_c = 16
    while block_c > 1 and (p * block_c * block_w > 32 * threads or block_c * block_w * max(bps) > 64 * threads
                           or block_c * sum(bp * bp for bp in bps) > 16 * threads):
        block_c //= 2
    while num_warps > 1 and block_c * block_w < 32 * num_warps * max(1, 16 // es):
        num_warps //= 2  # a thread holds at least a 16-byte piece of a row: the loads can be 128-bit
    n_tblocks = triton.cdiv(triton.cdiv(C, pc), block_c)
    return dict(dense=dense, vec=vec, p=p, pc=pc, block_c=block_c, block_w=block_w, num_warps=num_warps,
                n_tblocks=n_tblocks, grid=(N * pc * n_tblocks,))


def _launch_pool(x: torch.Tensor, bins: List[int], plan: dict, pooled: Optional[torch.Tensor],
                 y: Optional[torch.Tensor] = None, y0: int = 0) -> None:
    """_pyramid_pool_kernel: pooled (N, C, S) <- the bin means of x (if pooled is given); y[:, y0:y0 + C] <- x (if
    y is given; y is a fresh tensor of x's memory format)."""
    N, C, H, W = x.shape
    if plan["grid"][0] == 0:
        return
    bps = [_next_pow2(b) for b in bins]
    meta = _bins_meta(bins)
    for i in range(MAX_LEVELS):
        meta[f"BP{i}"] = bps[i] if i < len(bins) else 1
    vec = plan["vec"]
    out = pooled if pooled is not None else torch.empty(0, dtype=torch.float64 if x.dtype == torch.float64
                                                        else torch.float32, device=x.device)
    yy = y if y is not None else x
    copy_flat = (y is not None and plan["dense"] and vec > 1 and x.stride(1) == H * W
                 and tuple(y.stride()[1:]) == (H * W, W, 1))
    sxn = x.stride(0) // vec if plan["dense"] else x.stride(0)
    wrap_triton(_pyramid_pool_kernel)[plan["grid"]](
        x, out, yy, C, H, W,
        sxn, x.stride(1), x.stride(2), x.stride(3),
        out.stride(0) if pooled is not None else 0, out.stride(1) if pooled is not None else 0,
        yy.stride(0), yy.stride(1), yy.stride(2), yy.stride(3), y0,
        plan["pc"], plan["n_tblocks"],
        IS_F64=x.dtype == torch.float64, DENSE=plan["dense"], VEC=vec, P=plan["p"],
        POOL=pooled is not None, COPY=y is not None, COPY_FLAT=copy_flat,
        BLOCK_C=plan["block_c"], BLOCK_W=plan["block_w"],
        num_warps=plan["num_warps"],
        **meta,
    )


def _launch_wide_pool(x: torch.Tensor, bins: List[int], out: torch.Tensor) -> None:
    """_pyramid_pool_wide_kernel (rows in blocks of BLOCK_W, per-element bin selection): rows wider than
    _POOL_MAX_BLOCK_W."""
    N, C, H, W = x.shape
    block_c, block_w = _pool_blocks(W, bins, x.dtype == torch.float64)
    bps = [_next_pow2(b) for b in bins]
    meta = _bins_meta(bins)
    for i in range(MAX_LEVELS):
        meta[f"BP{i}"] = bps[i] if i < len(bins) else 1
    n_cblocks = triton.cdiv(C, block_c)
    wrap_triton(_pyramid_pool_wide_kernel)[(N * n_cblocks,)](
        x, out, C, H, W,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        out.stride(0), out.stride(1),
        n_cblocks,
        IS_F64=x.dtype == torch.float64, BLOCK_C=block_c, BLOCK_W=block_w,
        num_warps=4,
        **meta,
    )


@_register("pspnet_fast::triton_pyramid_pool")
def _triton_pyramid_pool(x: torch.Tensor, bins: List[int]) -> torch.Tensor:
    _checks.check_pyramid_pool(x, bins)
    bins = _check_bins(bins, "pyramid_pool")
    if x.dim() != 4:
        raise ValueError(f"pyramid_pool: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _POOL_DTYPES:
        raise TypeError(f"pyramid_pool: unsupported dtype {x.dtype}")
    N, C, H, W = x.shape
    if H == 0 or W == 0:
        raise ValueError(f"pyramid_pool: H and W must be non-zero, got {tuple(x.shape)}")
    is_f64 = x.dtype == torch.float64
    S = sum(b * b for b in bins)
    out = torch.empty((N, C, S), dtype=torch.float64 if is_f64 else torch.float32, device=x.device)
    if out.numel() == 0:
        return out

    plan = _pool_plan(x, bins)
    if plan is not None:
        _launch_pool(x, bins, plan, out)
        return out
    _launch_wide_pool(x, bins, out)
    return out
