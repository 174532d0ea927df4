// Host helpers shared by the CUDA sources of csrc/cuda (the .cu files through cuda_common.cuh, and the .cpp files
// compiled only in the CUDA build, which include this header alone): the per-level table, argument checks, device
// queries and the shared-memory opt-in. Everything is inline in namespace pspnet_fast. tools/cuda_emu inlines it (see
// cuda_common.cuh), so keep device checks and queries written as in the .cu files.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "ppm_math.h"

namespace pspnet_fast {

// Largest bin count: keeps b^2, i * H and the host's boundary lists (2 * sum(bins) entries) small.
constexpr int64_t kMaxBin = int64_t{1} << 16;
// Shared memory a block may use without opting in; plans aim under it and opt in only when they cannot.
constexpr int64_t kDefaultSmem = 48 * 1024;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

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

}  // namespace pspnet_fast
