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
__device__ int64_t tap_bound(acc_t scale, int64_t i, int64_t in, int64_t out, bool align, bool upper) {
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

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const AlignedVec<T, V>& r) {
  if constexpr (sizeof(AlignedVec<T, V>) == 16) {
    uint4 u;
    memcpy(&u, &r, 16);
    *reinterpret_cast<uint4*>(p) = u;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = r.v[k];
  }
}

// Copies n contiguous elements global -> shared (dst 16-byte aligned) with 16-byte loads after peeling src to
// alignment, several loads in flight per thread.
template <typename T>
__device__ __forceinline__ void stage_contiguous(const T* __restrict__ src, T* __restrict__ dst, int n, int tid,
                                                 int nt) {
  constexpr int V = 16 / sizeof(T);
  const uintptr_t a = reinterpret_cast<uintptr_t>(src);
  int head = static_cast<int>(((16 - (a & 15)) & 15) / sizeof(T));
  head = head < n ? head : n;
  for (int i = tid; i < head; i += nt) dst[i] = src[i];
  const int nv = (n - head) / V;
  const uint4* vs = reinterpret_cast<const uint4*>(src + head);
  if (head == 0) {
    // dst is 16-byte aligned: whole-vector shared stores.
    uint4* vd = reinterpret_cast<uint4*>(dst);
#pragma unroll 4
    for (int i = tid; i < nv; i += nt) vd[i] = __ldg(vs + i);
  } else {
#pragma unroll 4
    for (int i = tid; i < nv; i += nt) {
      const uint4 v = __ldg(vs + i);
      T e[V];
      memcpy(e, &v, 16);
#pragma unroll
      for (int k = 0; k < V; ++k) dst[head + i * V + k] = e[k];
    }
  }
  for (int i = head + nv * V + tid; i < n; i += nt) dst[i] = src[i];
}

}  // namespace pspnet_fast
