"""Triton backend of the fused Pyramid Pooling Module.

Six ops with exactly the semantics of the C++ ops of the same base name (csrc/ops.cpp), registered with
``torch.library.triton_op`` so that torch.compile / Inductor see the kernels (``wrap_triton``):

    pspnet_fast::triton_pyramid_pool(x (N, C, H, W), bins)                         -> pooled (N, C, S)
    pspnet_fast::triton_ppm_reduce(pooled (N, C, S), weight (L, R, C), scale?, shift?, bins, relu)
                                                                                   -> levels (N, R, S)
    pspnet_fast::triton_upsample_concat(x (N, C, H, W), levels (N, R, S), bins, align_corners, x_last=False)
                                                                                   -> out (N, C + L*R, H, W)
                                                         ([x, levels...]; x_last: [levels..., x])
    pspnet_fast::triton_upsample_concat_backward(grad_out (N, C + L*R, H, W), C, bins, align_corners)
                                                                                   -> grad_levels (N, R, S)
    pspnet_fast::triton_pyramid_pool_backward(grad_pooled (N, C, S), grad_out (N, C' >= C, H, W), bins)
                                                                                   -> grad_x (N, C, H, W)
    pspnet_fast::triton_ppm_forward(x, weight (L, R, C), scale?, shift?, bins, relu, align_corners, x_last=False)
                                                                                   -> out (N, C + L*R, H, W)
                           (the eval forward, x read once: the pooling pass also writes x into its channels of out,
                            then ppm_reduce, then a pass writing only the level channels; the composition's values)

The backward ops are deterministic: every output element is reduced by the one program that owns it, in a fixed
order, without atomics.

S = sum_l b_l^2; level l's bin (i, j) sits at column off_l + i*b_l + j (off_l = sum_{k<l} b_k^2).

Bins travel to the kernels as compile-time constants: NUM_LEVELS, B0..B7 (unused levels are 1) and the column
offsets O1..O7 (O0 = 0). One compilation per distinct bins tuple; at most MAX_LEVELS = 8 levels.

The index and weight arithmetic follows csrc/ppm_math.h (ATen AdaptivePooling.h / UpSample.h) in the same order of
operations; float32 divisions use tl.math.div_rn (round to nearest, like the C++ '/'), because Triton's plain '/'
on float32 lowers to an approximate division on NVIDIA GPUs.
"""

import math
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from pspnet_fast import _checks  # the ops' argument checks, shared with the C++ kernels and the fake kernels
from torch.library import triton_op
from torch.library import wrap_triton as _torch_wrap_triton
from triton.runtime.jit import JITFunction

__all__ = [
    "MAX_LEVELS",
    "pyramid_pool",
    "pyramid_pool_backward",
    "ppm_forward",
    "ppm_reduce",
    "upsample_concat",
    "upsample_concat_backward",
]

MAX_LEVELS = 8

_POOL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_LEVEL_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _div(a, b, IS_F64: tl.constexpr):
    # IEEE division in the op-math type: div_rn for float32 (plain '/' is div.full.f32 on NVIDIA), '/' for float64.
    a, b = tl.broadcast(a, b)
    if IS_F64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _level_by_id(l, NUM_LEVELS: tl.constexpr,
                 B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,
                 B4: tl.constexpr, B5: tl.constexpr, B6: tl.constexpr, B7: tl.constexpr,
                 O1: tl.constexpr, O2: tl.constexpr, O3: tl.constexpr, O4: tl.constexpr,
                 O5: tl.constexpr, O6: tl.constexpr, O7: tl.constexpr):
    # (bin count, first column) of the runtime level index l (a scalar), selected from the constexpr tables.
    off = l * 0
    b = off + B0
    if NUM_LEVELS > 1:
        b = tl.where(l >= 1, B1, b)
        off = tl.where(l >= 1, O1, off)
    if NUM_LEVELS > 2:
        b = tl.where(l >= 2, B2, b)
        off = tl.where(l >= 2, O2, off)
    if NUM_LEVELS > 3:
        b = tl.where(l >= 3, B3, b)
        off = tl.where(l >= 3, O3, off)
    if NUM_LEVELS > 4:
        b = tl.where(l >= 4, B4, b)
        off = tl.where(l >= 4, O4, off)
    if NUM_LEVELS > 5:
        b = tl.where(l >= 5, B5, b)
        off = tl.where(l >= 5, O5, off)
    if NUM_LEVELS > 6:
        b = tl.where(l >= 6, B6, b)
        off = tl.where(l >= 6, O6, off)
    if NUM_LEVELS > 7:
        b = tl.where(l >= 7, B7, b)
        off = tl.where(l >= 7, O7, off)
    return b, off


# ----------------------------------------------------------------------------------------------------------------
# pyramid_pool: one read of x, every level reduced from the same tile
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
    v = _div(_div(acc, kh[None, :, None], IS_F64), kw[None, None, :], IS_F64)
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
    k = tl.arange(0, BP)
    valid = k < B
    c_lo = (k * W) // B
    c_hi = tl.where(valid, ((k + 1) * W + B - 1) // B, 0)
    w = tl.arange(0, BLOCK_W)
    in_col = (w[:, None] >= c_lo[None, :]) & (w[:, None] < c_hi[None, :])  # [BLOCK_W, BP]
    part = tl.sum(tl.where(in_col[None, :, :], rs[:, :, None], 0.0), axis=1)  # [BLOCK_C, BP]
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

    # Lane shifts of the row classes (DENSE), S_k = (r * sxc + k * W) mod VEC.
    cls0 = (r.to(tl.int64) * sxc) % VEC
    S0 = cls0 % VEC
    S1 = (cls0 + 1 * W) % VEC
    S2 = (cls0 + 2 * W) % VEC
    S3 = (cls0 + 3 * W) % VEC
    S4 = (cls0 + 4 * W) % VEC
    S5 = (cls0 + 5 * W) % VEC
    S6 = (cls0 + 6 * W) % VEC
    S7 = (cls0 + 7 * W) % VEC

    acc0 = tl.zeros([BLOCK_C, BP0, BP0], acc_ty)
    acc1 = tl.zeros([BLOCK_C, BP1, BP1], acc_ty)
    acc2 = tl.zeros([BLOCK_C, BP2, BP2], acc_ty)
    acc3 = tl.zeros([BLOCK_C, BP3, BP3], acc_ty)
    acc4 = tl.zeros([BLOCK_C, BP4, BP4], acc_ty)
    acc5 = tl.zeros([BLOCK_C, BP5, BP5], acc_ty)
    acc6 = tl.zeros([BLOCK_C, BP6, BP6], acc_ty)
    acc7 = tl.zeros([BLOCK_C, BP7, BP7], acc_ty)
    RS0 = tl.zeros([BLOCK_C, BLOCK_W], acc_ty)
    RS1 = tl.zeros([BLOCK_C, BLOCK_W], acc_ty)
    RS2 = tl.zeros([BLOCK_C, BLOCK_W], acc_ty)
    RS3 = tl.zeros([BLOCK_C, BLOCK_W], acc_ty)
    RS4 = tl.zeros([BLOCK_C, BLOCK_W], acc_ty)
    RS5 = tl.zeros([BLOCK_C, BLOCK_W], acc_ty)
    RS6 = tl.zeros([BLOCK_C, BLOCK_W], acc_ty)
    RS7 = tl.zeros([BLOCK_C, BLOCK_W], acc_ty)
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
        # Rows class by class (h = k mod P), each class into its own row sum: no per-row branch or selection.
        RS0 = _pool_rows(RS0, 0, S0, seg_lo, seg_hi, x_img, y_img, c64, cmask, j, sxc, sxh, sxw, syc, syh, syw,
                         x_end, W, DENSE, VEC, P, POOL, COPY, COPY_FLAT)
        if P > 1:
            RS1 = _pool_rows(RS1, 1, S1, seg_lo, seg_hi, x_img, y_img, c64, cmask, j, sxc, sxh, sxw, syc, syh, syw,
                             x_end, W, DENSE, VEC, P, POOL, COPY, COPY_FLAT)
        if P > 2:
            RS2 = _pool_rows(RS2, 2, S2, seg_lo, seg_hi, x_img, y_img, c64, cmask, j, sxc, sxh, sxw, syc, syh, syw,
                             x_end, W, DENSE, VEC, P, POOL, COPY, COPY_FLAT)
        if P > 3:
            RS3 = _pool_rows(RS3, 3, S3, seg_lo, seg_hi, x_img, y_img, c64, cmask, j, sxc, sxh, sxw, syc, syh, syw,
                             x_end, W, DENSE, VEC, P, POOL, COPY, COPY_FLAT)
        if P > 4:
            RS4 = _pool_rows(RS4, 4, S4, seg_lo, seg_hi, x_img, y_img, c64, cmask, j, sxc, sxh, sxw, syc, syh, syw,
                             x_end, W, DENSE, VEC, P, POOL, COPY, COPY_FLAT)
        if P > 5:
            RS5 = _pool_rows(RS5, 5, S5, seg_lo, seg_hi, x_img, y_img, c64, cmask, j, sxc, sxh, sxw, syc, syh, syw,
                             x_end, W, DENSE, VEC, P, POOL, COPY, COPY_FLAT)
        if P > 6:
            RS6 = _pool_rows(RS6, 6, S6, seg_lo, seg_hi, x_img, y_img, c64, cmask, j, sxc, sxh, sxw, syc, syh, syw,
                             x_end, W, DENSE, VEC, P, POOL, COPY, COPY_FLAT)
        if P > 7:
            RS7 = _pool_rows(RS7, 7, S7, seg_lo, seg_hi, x_img, y_img, c64, cmask, j, sxc, sxh, sxw, syc, syh, syw,
                             x_end, W, DENSE, VEC, P, POOL, COPY, COPY_FLAT)
        if POOL:
            rs = _realign(RS0, S0, VEC, BLOCK_C, BLOCK_W)
            RS0 = tl.zeros([BLOCK_C, BLOCK_W], acc_ty)
            if P > 1:
                rs += _realign(RS1, S1, VEC, BLOCK_C, BLOCK_W)
                RS1 = tl.zeros([BLOCK_C, BLOCK_W], acc_ty)
            if P > 2:
                rs += _realign(RS2, S2, VEC, BLOCK_C, BLOCK_W)
                RS2 = tl.zeros([BLOCK_C, BLOCK_W], acc_ty)
            if P > 3:
                rs += _realign(RS3, S3, VEC, BLOCK_C, BLOCK_W)
                RS3 = tl.zeros([BLOCK_C, BLOCK_W], acc_ty)
            if P > 4:
                rs += _realign(RS4, S4, VEC, BLOCK_C, BLOCK_W)
                RS4 = tl.zeros([BLOCK_C, BLOCK_W], acc_ty)
            if P > 5:
                rs += _realign(RS5, S5, VEC, BLOCK_C, BLOCK_W)
                RS5 = tl.zeros([BLOCK_C, BLOCK_W], acc_ty)
            if P > 6:
                rs += _realign(RS6, S6, VEC, BLOCK_C, BLOCK_W)
                RS6 = tl.zeros([BLOCK_C, BLOCK_W], acc_ty)
            if P > 7:
                rs += _realign(RS7, S7, VEC, BLOCK_C, BLOCK_W)
                RS7 = tl.zeros([BLOCK_C, BLOCK_W], acc_ty)
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
# ppm_reduce: one grouped product for all levels
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
# upsample_concat: one launch writes x's copy and every upsampled level
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _linear_tap(dst, IN, OUT, ALIGN: tl.constexpr, IS_F64: tl.constexpr, dt: tl.constexpr):
    # ppm_math.h linear_scale / linear_source / linear_tap for destination indices dst ([BLOCK], int32), with IN the
    # source extent (runtime scalar) and OUT the destination extent, in op-math type dt (float32 / float64).
    # src >= 0 always, so truncation is floor.
    if ALIGN:
        num = tl.cast(IN - 1, dt)
        den = tl.cast(tl.maximum(OUT - 1, 1), dt)
        scale = tl.where(OUT > 1, _div(num, den, IS_F64), 0.0)
        src = scale * dst.to(dt)
    else:
        scale = _div(tl.cast(IN, dt), tl.cast(OUT, dt), IS_F64)
        src = scale * (dst.to(dt) + 0.5) - 0.5
        src = tl.where(src < 0.0, 0.0, src)
    i0 = tl.minimum(src.to(tl.int32), IN - 1)
    l1 = src - i0.to(dt)
    l1 = tl.where(l1 < 0.0, 0.0, l1)
    l1 = tl.where(l1 > 1.0, 1.0, l1)
    l0 = 1.0 - l1
    i1 = i0 + (i0 < IN - 1).to(tl.int32)
    same = IN == OUT  # a dimension that keeps its size is copied (ATen), no neighbour tap
    i0 = tl.where(same, dst, i0)
    i1 = tl.where(same, dst, i1)
    l0 = tl.where(same, 1.0, l0)
    l1 = tl.where(same, 0.0, l1)
    return i0, i1, l0, l1


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


def wrap_triton(kernel):
    """torch.library.wrap_triton(kernel); under TRITON_INTERPRET=1 @triton.jit gives an InterpretedFunction, which
    wrap_triton of older torch releases rejects (newer ones return it unchanged), so it is launched as is. Named
    wrap_triton so that triton_op's source scan (get_inner_triton_kernels) still finds the kernels of each op."""
    if isinstance(kernel, JITFunction):
        return _torch_wrap_triton(kernel)
    return kernel


def _register(name: str):
    """triton_op(name), or the op already registered under that name by another copy of this file (the same source
    loaded under a second module name, e.g. by path from a test and as pspnet_fast.kernels)."""

    def deco(fn):
        try:
            return triton_op(name, mutates_args=())(fn)
        except RuntimeError:
            ns, op = name.split("::")
            if hasattr(getattr(torch.ops, ns), op):
                return getattr(getattr(torch.ops, ns), op)
            raise

    return deco


def _next_pow2(v: int) -> int:
    return 1 if v <= 1 else 1 << (int(v) - 1).bit_length()


def _check_bins(bins: Sequence[int], op: str) -> List[int]:
    bins = [int(b) for b in bins]
    if len(bins) > MAX_LEVELS:
        raise ValueError(f"{op}: the Triton backend takes at most {MAX_LEVELS} pyramid levels, got {len(bins)}")
    if any(b < 1 for b in bins):
        raise ValueError(f"{op}: bins must be positive, got {bins}")
    return bins


def _bins_meta(bins: List[int]) -> dict:
    """Constexpr kwargs NUM_LEVELS, B0..B7, O1..O7 (offsets of the levels' first columns)."""
    padded = bins + [1] * (MAX_LEVELS - len(bins))
    meta = {"NUM_LEVELS": max(len(bins), 1)}
    off = 0
    for i, b in enumerate(padded):
        meta[f"B{i}"] = b
        if i > 0:
            meta[f"O{i}"] = off
        off += b * b
    return meta


def _pool_blocks(W: int, bins: List[int], is_f64: bool):
    """(BLOCK_C, BLOCK_W) of the pooling kernel within a register budget (4 warps): the per-level accumulators hold
    BLOCK_C * sum_l BP_l^2 values, the column-bin selection of a tile BLOCK_C * BLOCK_W * max_l BP_l."""
    bps = [_next_pow2(b) for b in bins]
    budget = 1024 if is_f64 else 2048
    block_c = 16
    while block_c > 1 and block_c * sum(bp * bp for bp in bps) > budget:
        block_c //= 2
    block_w = min(_next_pow2(W), 32)
    while block_w > 1 and block_c * block_w * max(bps) > 2 * budget:
        block_w //= 2
    return block_c, block_w


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


def _suggest_memory_format(x: torch.Tensor) -> torch.memory_format:
    # Tensor.suggest_memory_format(): ATen's is_channels_last_strides_2d_s4 test (ambiguous cases -> contiguous).
    sizes, strides = x.shape, x.stride()
    if strides[1] == 0:
        return torch.contiguous_format
    smin = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0:
            return torch.contiguous_format
        if strides[d] < smin:
            return torch.contiguous_format
        if d == 0 and smin == strides[1]:
            return torch.contiguous_format
        smin = strides[d]
        if sizes[d] > 1:
            smin *= sizes[d]
    return torch.channels_last


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


@_register("pspnet_fast::triton_ppm_forward")
def _triton_ppm_forward(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor],
                        shift: Optional[torch.Tensor], bins: List[int], relu: bool, align_corners: bool,
                        x_last: bool = False) -> torch.Tensor:
    _checks.check_ppm_forward(x, weight, scale, shift, bins, relu, align_corners, x_last)
    bins = _check_bins(bins, "ppm_forward")
    if x.dim() != 4:
        raise ValueError(f"ppm_forward: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _POOL_DTYPES:
        raise TypeError(f"ppm_forward: unsupported x dtype {x.dtype}")
    N, C, H, W = x.shape
    if H == 0 or W == 0:
        raise ValueError(f"ppm_forward: H and W must be non-zero, got {tuple(x.shape)}")
    L = len(bins)
    S = sum(b * b for b in bins)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    pooled = torch.empty((N, C, S), dtype=acc, device=x.device)
    _check_reduce(pooled, weight, scale, shift, bins, "ppm_forward")
    R = weight.shape[1]
    out = torch.empty((N, C + L * R, H, W), dtype=x.dtype, device=x.device,
                      memory_format=_suggest_memory_format(x))
    if out.numel() == 0:
        return out
    plan = _pool_plan(x, bins)
    if plan is None or L == 0:
        # Rows wider than one tile (or no levels): the composition, x read twice; the same values.
        if pooled.numel() > 0:
            _launch_wide_pool(x, bins, pooled)
        levels = _launch_reduce(pooled, weight, scale, shift, bins, relu)
        _launch_upsample(x, levels, bins, align_corners, x_last, out, copy_x=True)
        return out
    # x read once: the pooling pass also writes x into its channels of out; then only the level channels.
    _launch_pool(x, bins, plan, pooled if pooled.numel() > 0 else None, out, L * R if x_last else 0)
    levels = _launch_reduce(pooled, weight, scale, shift, bins, relu)
    _launch_upsample(x, levels, bins, align_corners, x_last, out, copy_x=False)
    return out


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


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def pyramid_pool(x: torch.Tensor, bins: Sequence[int]) -> torch.Tensor:
    """Adaptive average pooling of x to every b x b grid in one pass over x.

    x: (N, C, H, W) float32/float64/float16/bfloat16, any strides (contiguous and channels_last are coalesced),
    on a device Triton runs on (CUDA; CPU under TRITON_INTERPRET=1). Returns (N, C, S) contiguous float32
    (float64 for float64 x), S = sum b^2, level l's bin (i, j) at column off_l + i*b_l + j.
    """
    return torch.ops.pspnet_fast.triton_pyramid_pool(x, list(bins))


def ppm_reduce(pooled: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor],
               shift: Optional[torch.Tensor], bins: Sequence[int], relu: bool) -> torch.Tensor:
    """Per-level 1x1 convolution of the pooled maps, optional affine (folded BatchNorm) and ReLU.

    pooled: (N, C, S) float32/float64; weight: (L, R, C) same dtype; scale, shift: (L, R) same dtype or both None.
    Returns (N, R, S) in pooled's dtype: v = sum_c weight[l, r, c] * pooled[n, c, off_l + k] (k < b_l^2),
    v = v * scale[l, r] + shift[l, r], then where(v < 0, 0, v) if relu (NaN passes through).
    """
    return torch.ops.pspnet_fast.triton_ppm_reduce(pooled, weight, scale, shift, list(bins), bool(relu))


def upsample_concat(x: torch.Tensor, levels: torch.Tensor, bins: Sequence[int], align_corners: bool,
                    x_last: bool = False) -> torch.Tensor:
    """cat([x] + [bilinear upsampling of each level to (H, W)], dim=1) in one pass; x_last: cat([levels..., x]).

    x: (N, C, H, W) float32/float64/float16/bfloat16, any strides; levels: (N, R, S) float32/float64 (the
    interpolation is computed in levels' dtype). Returns (N, C + L*R, H, W) in x's dtype and x's memory format
    (channels_last stays channels_last).
    """
    return torch.ops.pspnet_fast.triton_upsample_concat(x, levels, list(bins), bool(align_corners), bool(x_last))


def upsample_concat_backward(grad_out: torch.Tensor, in_channels: int, bins: Sequence[int],
                             align_corners: bool) -> torch.Tensor:
    """The adjoint of upsample_concat's level part: grad_levels[n, r, off_l + i*b + j] =
    sum_{h, w} A_h[h, i] * A_w[w, j] * grad_out[n, in_channels + l*R + r, h, w], with the forward's bilinear taps.

    grad_out: (N, in_channels + L*R, H, W) float32/float64/float16/bfloat16, any strides. Returns (N, R, S)
    contiguous float32 (float64 for float64 grad_out), accumulated in that type. Deterministic: each output bin is
    reduced by one program in a fixed order (no atomics).
    """
    return torch.ops.pspnet_fast.triton_upsample_concat_backward(grad_out, int(in_channels), list(bins),
                                                                 bool(align_corners))


def pyramid_pool_backward(grad_pooled: torch.Tensor, grad_out: torch.Tensor, bins: Sequence[int]) -> torch.Tensor:
    """grad_x = grad_out[:, :C] + the adjoint of pyramid_pool applied to grad_pooled.

    grad_pooled: (N, C, S) float32/float64; grad_out: (N, C', H, W) with C' >= C, any of the four dtypes and any
    strides. grad_x[n, c, h, w] = grad_out[n, c, h, w] + sum over levels and the bins (i, j) containing (h, w) of
    grad_pooled[n, c, off_l + i*b + j] / kh_i / kw_j, accumulated in float32 (float64 when either input is float64).
    Returns (N, C, H, W) in grad_out's dtype and memory format. A gather: one program per output element.
    """
    return torch.ops.pspnet_fast.triton_pyramid_pool_backward(grad_pooled, grad_out, list(bins))


def ppm_forward(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                bins: Sequence[int], relu: bool, align_corners: bool, x_last: bool = False) -> torch.Tensor:
    """The eval forward upsample_concat(x, ppm_reduce(pyramid_pool(x)), ...) with x read once (csrc/ops.cpp's
    ppm_forward contract): the pooling pass also copies x into its channels of the output, a second pass writes only
    the level channels. x: (N, C, H, W) float32/float64/float16/bfloat16, any strides, H, W >= 1; weight (L, R, C),
    scale, shift (L, R) or None, in float32 (float64 for float64 x). Returns (N, C + L*R, H, W) in x's dtype and
    memory format: [x, levels...], or [levels..., x] with x_last; the same values as the composition of the three
    ops. Rows wider than 505 elements (BLOCK_W > 512) take the composition (x read twice)."""
    return torch.ops.pspnet_fast.triton_ppm_forward(x, weight, scale, shift, list(bins), bool(relu),
                                                    bool(align_corners), bool(x_last))
