// Helpers shared by the CUDA sources of csrc/cuda (ppm_*.cu, head_cuda.cu), defined once: the host helpers of
// cuda_host.h (argument checks, device queries, shared-memory opt-in, the per-level table) and the device helpers:
// 16-byte vector access, global <-> shared staging, division, level lookup, bilinear tap weights and ranges.
// Everything is inline (or a template) in namespace pspnet_fast, so each translation unit may include it.
//
// tools/cuda_emu inlines this file (and cuda_host.h) into each generated unit (emu_common.inline_common): it drops
// `#pragma once` and the c10/cuda includes (the prelude stands in for them) and applies the same rewrites as to the
// .cu files, so keep device queries and device checks written as there (`.is_cuda()`, `C10_CUDA_CHECK(...)`).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cuda_host.h"  // LevelTable, checks, device queries, allow_smem, ceil_div, align16
#include "ppm_math.h"

namespace pspnet_fast {

// ------------------------------------------------------------------------------------------------------------------
// Device helpers
// ------------------------------------------------------------------------------------------------------------------

// Non-negative 64-bit division; takes the much cheaper 32-bit path when both operands fit (the common case).
__device__ __forceinline__ int64_t div_nn(int64_t a, int64_t b) {
  if (((a | b) >> 32) == 0) {
    return static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b));
  }
  return a / b;
}

// floor(a / n) for 0 <= a < 2^53 and n >= 1, with no division instruction (no 64-bit division subroutine call,
// whose register saves spill): an estimate from rn ~= 1 / n (host-computed in F), within 1 of the quotient while
// quotient * 3 eps(F) < 1 (float: quotients below 2^20; double: below 2^50), corrected once either way.
template <typename F>
__device__ __forceinline__ int64_t div_est(int64_t a, int64_t n, F rn) {
  int64_t q = static_cast<int64_t>(static_cast<F>(a) * rn);
  if (q * n > a) {
    --q;
  } else if ((q + 1) * n <= a) {
    ++q;
  }
  return q;
}

// pool_start / pool_end (ppm_math.h) for 0 <= i < k <= 2^16 and n < 2^31, in 32-bit arithmetic (no 64-bit division):
// with n = qn k + rn, floor(i n / k) = i qn + floor(i rn / k) and ceil((i + 1) n / k) = (i + 1) qn +
// ceil((i + 1) rn / k); every product stays below 2^32 (i < k, rn < k).
__device__ __forceinline__ int pool_start32(int i, int k, int n) {
  const uint32_t k32 = static_cast<uint32_t>(k), i32 = static_cast<uint32_t>(i);
  const uint32_t qn = static_cast<uint32_t>(n) / k32;
  const uint32_t rn = static_cast<uint32_t>(n) - qn * k32;
  return static_cast<int>(i32 * qn + (i32 * rn) / k32);
}
__device__ __forceinline__ int pool_end32(int i, int k, int n) {
  const uint32_t k32 = static_cast<uint32_t>(k), i1 = static_cast<uint32_t>(i) + 1;
  const uint32_t qn = static_cast<uint32_t>(n) / k32;
  const uint32_t rn = static_cast<uint32_t>(n) - qn * k32;
  return static_cast<int>(i1 * qn + (i1 * rn + k32 - 1) / k32);
}

// Level holding index v of a prefix-sum table tab (tab[0] = 0 <= v < tab[num]): a flat column of S with tab = offs,
// a bin row/column index of sum(bins) with tab = boff.
__device__ __forceinline__ int level_of(const int64_t* tab, int num, int64_t v) {
  int l = 0;
  while (l + 1 < num && v >= tab[l + 1]) ++l;
  return l;
}

// Entry [dst, i] of the resampling matrix: the weights of dst's taps that land on source sample i (both taps count,
// also when they coincide or a weight is 0, as ATen's upsample backward adds both).
template <typename acc_t>
__device__ __forceinline__ acc_t tap_weight(acc_t scale, int64_t dst, int64_t i, int64_t in, int64_t out,
                                            bool align) {
  const LinearTap<acc_t> t = linear_tap<acc_t>(scale, dst, in, out, align);
  const acc_t w = t.i0 == i ? t.l0 : static_cast<acc_t>(0);
  return t.i1 == i ? w + t.l1 : w;
}

// First dst in [0, out) whose taps satisfy i1 >= i (upper = false) or i0 > i (upper = true); out if none. Both taps
// are non-decreasing in dst, so the destinations reaching source sample i are [bound(false), bound(true)).
template <typename acc_t>
__device__ __forceinline__ int64_t tap_bound(acc_t scale, int64_t i, int64_t in, int64_t out, bool align, bool upper) {
  int64_t lo = 0, hi = out;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    const LinearTap<acc_t> t = linear_tap<acc_t>(scale, mid, in, out, align);
    if (upper ? t.i0 > i : t.i1 >= i) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// Element i of a float32 or float64 tensor (levels, grad_pooled) in opmath_t.
template <typename opmath_t>
__device__ __forceinline__ opmath_t load_level(const void* lv, bool dbl, int64_t i) {
  return dbl ? static_cast<opmath_t>(__ldg(static_cast<const double*>(lv) + i))
             : static_cast<opmath_t>(__ldg(static_cast<const float*>(lv) + i));
}

template <typename T, int V>
struct alignas(sizeof(T) * V) AlignedVec {
  T v[V];
};

// 16-byte accesses go through uint4 so the compiler emits one 128-bit load/store for every dtype; the register
// value changes type through memcpy (not a pointer cast, which type-based alias analysis may break).
template <typename T, int V>
__device__ __forceinline__ AlignedVec<T, V> load_vec(const T* p) {
  AlignedVec<T, V> r;
  if constexpr (sizeof(AlignedVec<T, V>) == 16) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    memcpy(&r, &u, 16);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) r.v[k] = p[k];
  }
  return r;
}

// The store goes through __stcg (st.global.cg.v4.u32): a plain uint4 store was split into four 32-bit stores by
// the compiler in pool_bwd_nchw_kernel (SASS), the intrinsic is always one 128-bit store (cached in L2, as stores are).
template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const AlignedVec<T, V>& r) {
  if constexpr (sizeof(AlignedVec<T, V>) == 16) {
    uint4 u;
    memcpy(&u, &r, 16);
#ifdef __CUDA_ARCH__
    __stcg(reinterpret_cast<uint4*>(p), u);
#else
    *reinterpret_cast<uint4*>(p) = u;
#endif
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = r.v[k];
  }
}

// (hi:lo >> s) & 0xFFFFFFFF for s in [0, 32): the emulator has no __funnelshift_r.
__device__ __forceinline__ uint32_t funnel_r(uint32_t lo, uint32_t hi, uint32_t s) {
#ifdef __CUDA_ARCH__
  return __funnelshift_r(lo, hi, s);
#else
  return static_cast<uint32_t>(((static_cast<uint64_t>(hi) << 32) | lo) >> s);
#endif
}

// Bytes [r, r + 16) of the 32 bytes lo:hi (r in [0, 16), little endian): the 16-byte vector that starts r bytes into
// an aligned one. r is uniform across a warp in every caller, so the switch does not diverge; four funnel shifts.
__device__ __forceinline__ uint4 shift16(const uint4& lo, const uint4& hi, int r) {
  const uint32_t s = 8u * static_cast<uint32_t>(r & 3);
  uint32_t w0, w1, w2, w3, w4;
  switch (r >> 2) {
    case 0: w0 = lo.x; w1 = lo.y; w2 = lo.z; w3 = lo.w; w4 = hi.x; break;
    case 1: w0 = lo.y; w1 = lo.z; w2 = lo.w; w3 = hi.x; w4 = hi.y; break;
    case 2: w0 = lo.z; w1 = lo.w; w2 = hi.x; w3 = hi.y; w4 = hi.z; break;
    default: w0 = lo.w; w1 = hi.x; w2 = hi.y; w3 = hi.z; w4 = hi.w; break;
  }
  uint4 o;
  o.x = funnel_r(w0, w1, s);
  o.y = funnel_r(w1, w2, s);
  o.z = funnel_r(w2, w3, s);
  o.w = funnel_r(w3, w4, s);
  return o;
}

// Copies n contiguous elements global -> shared (dst 16-byte aligned): every shared store is one aligned 16-byte
// vector. When src is not 16-byte aligned, vector i is cut from the two aligned 16-byte chunks of src it straddles
// (the second load of a chunk hits L1: the neighbour thread loaded it), never from element-wise shared stores (which
// cost 8 stores and 4-way bank conflicts per vector for 2-byte types). Reading a whole aligned chunk that holds a
// valid element never leaves the allocation's pages.
template <typename T>
__device__ __forceinline__ void stage_contiguous(const T* __restrict__ src, T* __restrict__ dst, int n, int tid,
                                                 int nt) {
  constexpr int V = 16 / sizeof(T);
  const int r = static_cast<int>(reinterpret_cast<uintptr_t>(src) & 15);
  const int nv = n / V;
  uint4* vd = reinterpret_cast<uint4*>(dst);
  if (r == 0) {
    const uint4* vs = reinterpret_cast<const uint4*>(src);
#pragma unroll 4
    for (int i = tid; i < nv; i += nt) vd[i] = __ldg(vs + i);
  } else {
    const uint4* vs = reinterpret_cast<const uint4*>(reinterpret_cast<const unsigned char*>(src) - r);
#pragma unroll 4
    for (int i = tid; i < nv; i += nt) vd[i] = shift16(__ldg(vs + i), __ldg(vs + i + 1), r);
  }
  for (int i = nv * V + tid; i < n; i += nt) dst[i] = src[i];
}

// Copies n contiguous elements shared -> global, any alignment of either: every store but those of dst's head (up to
// its first 16-byte boundary) and tail is an aligned 16-byte vector, cut from the two aligned shared chunks it
// straddles (conflict-free 16-byte shared loads) when src and dst differ in alignment. Reads up to 16 bytes of shared
// memory past src + n (the plan reserves them) and before src back to a 16-byte boundary.
template <typename T>
__device__ __forceinline__ void store_contiguous(const T* src, T* __restrict__ dst, int n, int tid, int nt) {
  constexpr int V = 16 / sizeof(T);
  const int a = static_cast<int>(reinterpret_cast<uintptr_t>(dst) & 15);
  int head = ((16 - a) & 15) / static_cast<int>(sizeof(T));
  head = head < n ? head : n;
  if (tid < head) dst[tid] = src[tid];
  const int nv = (n - head) / V;
  uint4* vd = reinterpret_cast<uint4*>(dst + head);
  const int r = static_cast<int>(reinterpret_cast<uintptr_t>(src + head) & 15);
  const uint4* vs = reinterpret_cast<const uint4*>(reinterpret_cast<const unsigned char*>(src + head) - r);
  if (r == 0) {
#pragma unroll 4
    for (int i = tid; i < nv; i += nt) vd[i] = vs[i];
  } else {
#pragma unroll 4
    for (int i = tid; i < nv; i += nt) vd[i] = shift16(vs[i], vs[i + 1], r);
  }
  for (int i = head + nv * V + tid; i < n; i += nt) dst[i] = src[i];
}

// Copies n contiguous elements global -> global (both runs of one tensor's elements, any alignment): aligned 16-byte
// stores after an element-wise head, each cut from the one or two aligned source chunks it needs; one thread per
// vector, grid-stride by (tid, nt) over the caller's threads.
template <typename T>
__device__ __forceinline__ void copy_contiguous(const T* __restrict__ src, T* __restrict__ dst, int64_t n, int64_t tid,
                                                int64_t nt) {
  constexpr int V = 16 / sizeof(T);
  const int a = static_cast<int>(reinterpret_cast<uintptr_t>(dst) & 15);
  int64_t head = ((16 - a) & 15) / static_cast<int>(sizeof(T));
  head = head < n ? head : n;
  if (tid < head) dst[tid] = src[tid];
  const int64_t nv = (n - head) / V;
  uint4* vd = reinterpret_cast<uint4*>(dst + head);
  const int r = static_cast<int>(reinterpret_cast<uintptr_t>(src + head) & 15);
  const uint4* vs = reinterpret_cast<const uint4*>(reinterpret_cast<const unsigned char*>(src + head) - r);
  if (r == 0) {
#pragma unroll 4
    for (int64_t i = tid; i < nv; i += nt) vd[i] = __ldg(vs + i);
  } else {
#pragma unroll 4
    for (int64_t i = tid; i < nv; i += nt) vd[i] = shift16(__ldg(vs + i), __ldg(vs + i + 1), r);
  }
  for (int64_t i = head + nv * V + tid; i < n; i += nt) dst[i] = src[i];
}

// Unsigned 32-bit division by a divisor fixed per launch, as a multiply-high and a shift (the host computes the magic
// number; ATen's IntDivider). Valid for n < 2^31 and 1 <= d < 2^31.
struct FastDiv {
  uint32_t d, m;
  uint32_t s;
};

inline FastDiv make_fastdiv(uint32_t d) {
  FastDiv f{d, 0, 0};
  while (f.s < 32 && (uint32_t{1} << f.s) < d) ++f.s;
  f.m = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << f.s) - d)) / d + 1);
  return f;
}

__device__ __forceinline__ uint32_t fast_div(const FastDiv& f, uint32_t n) {
#ifdef __CUDA_ARCH__
  const uint32_t t = __umulhi(n, f.m);
#else
  const uint32_t t = static_cast<uint32_t>((static_cast<uint64_t>(n) * f.m) >> 32);
#endif
  return (t + n) >> f.s;
}

}  // namespace pspnet_fast
