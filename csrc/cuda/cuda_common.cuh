// Helpers shared by the CUDA sources of csrc/cuda (ppm_*.cu, head_cuda.cu), defined once: argument checks, device
// queries, shared-memory opt-in, the per-level table, 16-byte vector access, global -> shared staging and the index
// helpers (division, level lookup, bilinear tap weights and ranges). Everything is inline (or a template) in
// namespace pspnet_fast, so each translation unit may include it.
//
// tools/cuda_emu inlines this file into each generated unit (make_emu.py / emu_common.inline_common): it drops the
// `#pragma once` and the c10/cuda includes below (the prelude stands in for them) and applies the same rewrites as to
// the .cu files, so keep device queries and device checks written as in the .cu files (`.is_cuda()`,
// `C10_CUDA_CHECK(cudaDeviceGetAttribute(...))`).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "ppm_math.h"

namespace pspnet_fast {

// Largest bin count: keeps b^2, i * H and the host's boundary lists (2 * sum(bins) entries) small.
constexpr int64_t kMaxBin = int64_t{1} << 16;
// Shared memory a block may use without opting in; plans aim under it and opt in only when they cannot.
constexpr int64_t kDefaultSmem = 48 * 1024;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// ------------------------------------------------------------------------------------------------------------------
// Host: checks, device queries, launch helpers
// ------------------------------------------------------------------------------------------------------------------

// Per-level tables passed by value in kernel arguments (L <= kMaxLevels).
struct LevelTable {
  int num;
  int64_t bins[kMaxLevels];
  int64_t offs[kMaxLevels + 1];  // column offset of level l in S; offs[num] = S
  int64_t boff[kMaxLevels + 1];  // prefix sums of bins: index of level l's first bin row/column among all levels
};

inline LevelTable make_levels(const char* op, at::IntArrayRef bins) {
  TORCH_CHECK(!bins.empty(), op, ": bins must hold at least one level, got an empty list");
  TORCH_CHECK(static_cast<int64_t>(bins.size()) <= kMaxLevels, op, ": at most ", kMaxLevels,
              " pyramid levels are supported, got ", bins.size());
  LevelTable t{};
  t.num = static_cast<int>(bins.size());
  t.offs[0] = 0;
  t.boff[0] = 0;
  for (int l = 0; l < t.num; ++l) {
    const int64_t b = bins[l];
    TORCH_CHECK(b > 0 && b <= kMaxBin, op, ": every bin count must be in [1, ", kMaxBin, "], got ", bins);
    t.bins[l] = b;
    t.offs[l + 1] = t.offs[l] + b * b;
    t.boff[l + 1] = t.boff[l] + b;
  }
  return t;
}

// A tensor argument on x's CUDA device.
inline void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), op, ": expected ", name, " on a CUDA device, got ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, ": expected ", name, " on ", ref.device(), " (x's device), got ",
              t.device());
}

// A 4-d feature map argument of the PPM ops (x, or grad_out of the backward ops): C, H, W >= 1.
inline void check_x(const char* op, const at::Tensor& x, const char* name = "x") {
  TORCH_CHECK(x.is_cuda(), op, ": expected ", name, " on a CUDA device, got ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": expected ", name, " of shape (N, C, H, W), got ", x.dim(), " dims ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op, ": expected ",
              name, " of dtype float32, float64, float16 or bfloat16, got ", st);
  TORCH_CHECK(x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0, op, ": expected ", name, " with C, H, W >= 1, got ",
              x.sizes());
  TORCH_CHECK(x.size(2) <= std::numeric_limits<int32_t>::max() && x.size(3) <= std::numeric_limits<int32_t>::max(),
              op, ": H and W must fit in int32, got ", name, " of shape ", x.sizes());
}

// A 4-d feature map argument of the head ops (z, grad): O may be 0.
inline void check_map(const char* op, const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), op, ": expected ", name, " on a CUDA device, got ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": expected ", name, " of shape (N, O, H, W), got ", x.dim(), " dims ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op, ": expected ",
              name, " of dtype float32, float64, float16 or bfloat16, got ", st);
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, op, ": expected ", name, " with H, W >= 1, got ", x.sizes());
  TORCH_CHECK(x.size(2) <= std::numeric_limits<int32_t>::max() && x.size(3) <= std::numeric_limits<int32_t>::max(),
              op, ": H and W must fit in int32, got ", name, " of shape ", x.sizes());
}

// channels_last fast path only when the layout is unambiguous (C == 1 or H == W == 1 tensors are both).
inline bool use_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline int current_device() {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

inline int sm_count() {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, current_device()));
  return std::max(v, 1);
}

// The most dynamic shared memory one block may opt in to (at least the default 48 KiB).
inline int64_t smem_optin() {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, current_device()));
  return std::max<int64_t>(v, kDefaultSmem);
}

// Raises the kernel's dynamic shared memory limit when a plan needs more than the default 48 KiB.
template <typename Kernel>
void allow_smem(Kernel kernel, int64_t bytes) {
  if (bytes > kDefaultSmem) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

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
