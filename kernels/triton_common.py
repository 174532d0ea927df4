"""Shared helpers of the Triton kernels: @triton.jit division, level lookup and bilinear taps; host-side registration.

Used by triton_pool, triton_reduce, triton_upsample, triton_backward, ppm_triton and head_triton: the device helpers
(_div, _div_count, _level_by_id, _linear_scale, _linear_tap_scaled, _linear_tap), the constants (MAX_LEVELS, the dtypes accepted) and the host helpers (wrap_triton,
_register, _check_bins, _bins_meta, _pool_blocks, _suggest_memory_format).

Bins travel to the kernels as compile-time constants: NUM_LEVELS, B0..B7 (unused levels are 1) and the column
offsets O1..O7 (O0 = 0) of the pooled columns (S = sum_l b_l^2; level l's bin (i, j) at column off_l + i*b_l + j).
One compilation per distinct bins tuple; at most MAX_LEVELS = 8 levels.

The index and weight arithmetic follows csrc/ppm_math.h (ATen AdaptivePooling.h / UpSample.h) in the same order of
operations; float32 divisions use tl.math.div_rn (round to nearest, like the C++ '/'), because Triton's plain '/'
on float32 lowers to an approximate division on NVIDIA GPUs.
"""

from typing import List, Sequence

import torch
import triton
import triton.language as tl

from torch.library import triton_op
from torch.library import wrap_triton as _torch_wrap_triton
from triton.runtime.jit import JITFunction

MAX_LEVELS = 8

_POOL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # x / grad_out
_LEVEL_DTYPES = (torch.float32, torch.float64)  # pooled, weight, levels: the accumulation types


# ----------------------------------------------------------------------------------------------------------------
# Device helpers
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
def _div_count(a, k):
    # a / k rounded to nearest (what div.rn.f32 gives) for float32 a and float32 divisors k > 0 (pooling window
    # counts), broadcast together, without div.rn: its slow-path subroutine CALLs make ptxas spill the values live
    # across them. q0 = float32(a * r), r ~ 1/k (approximate division, then one float64 Newton step: relative error
    # < 2^-40), is within one ulp of a / k, so RN(a / k) is q0 or a float32 neighbour of it; the one of the three
    # with the smallest |a - q k| is chosen (ties: the even one). The residuals are exact in float64 (q k has at most
    # 48 significant bits and a - q k is small against both), so the choice is exact, subnormal quotients included.
    # a = +-inf or NaN: q0 is +-inf or NaN and stays (its residuals are NaN).
    a, k = tl.broadcast(a, k)
    k64 = k.to(tl.float64)
    r = (1.0 / k).to(tl.float64)
    r = r * (2.0 - k64 * r)
    a64 = a.to(tl.float64)
    q = (a64 * r).to(tl.float32)
    bits = q.to(tl.int32, bitcast=True)
    up = (bits + 1).to(tl.float32, bitcast=True)  # the neighbour of larger magnitude (same sign)
    down = tl.where((bits & 0x7FFFFFFF) == 0, q, (bits - 1).to(tl.float32, bitcast=True))  # smaller magnitude
    e = tl.abs(a64 - q.to(tl.float64) * k64)
    e_up = tl.abs(a64 - up.to(tl.float64) * k64)
    e_down = tl.abs(a64 - down.to(tl.float64) * k64)
    odd = (bits & 1) != 0
    take_down = (e_down < e) | ((e_down == e) & odd)
    q = tl.where(take_down, down, q)
    e = tl.where(take_down, e_down, e)
    take_up = (e_up < e) | ((e_up == e) & ((q.to(tl.int32, bitcast=True) & 1) != 0))
    return tl.where(take_up, up, q)


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


@triton.jit
def _linear_scale(IN, OUT, ALIGN: tl.constexpr, IS_F64: tl.constexpr, dt: tl.constexpr):
    # ppm_math.h linear_scale: the source step per destination index, for source extent IN (a runtime scalar, or a
    # tensor of extents, e.g. the levels' bin counts) and destination extent OUT, in op-math type dt. One IEEE
    # division: callers that need taps for many destinations of one extent compute it once and use _linear_tap_scaled.
    if ALIGN:
        num = tl.cast(IN - 1, dt)
        den = tl.cast(tl.maximum(OUT - 1, 1), dt)
        return tl.where(OUT > 1, _div(num, den, IS_F64), 0.0)
    else:
        return _div(tl.cast(IN, dt), tl.cast(OUT, dt), IS_F64)


@triton.jit
def _linear_tap_scaled(dst, scale, IN, OUT, ALIGN: tl.constexpr, dt: tl.constexpr):
    # ppm_math.h linear_source / linear_tap for destination indices dst (int32) with the scale given
    # (_linear_scale(IN, OUT)); dst, scale and IN broadcast together. src >= 0 always, so truncation is floor.
    if ALIGN:
        src = scale * dst.to(dt)
    else:
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
def _linear_tap(dst, IN, OUT, ALIGN: tl.constexpr, IS_F64: tl.constexpr, dt: tl.constexpr):
    # ppm_math.h linear_scale / linear_source / linear_tap for destination indices dst ([BLOCK], int32), with IN the
    # source extent and OUT the destination extent, in op-math type dt (float32 / float64): (i0, i1, l0, l1).
    return _linear_tap_scaled(dst, _linear_scale(IN, OUT, ALIGN, IS_F64, dt), IN, OUT, ALIGN, dt)


# ----------------------------------------------------------------------------------------------------------------
# Host helpers
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
