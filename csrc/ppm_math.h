// Index and weight arithmetic shared by the CPU and CUDA kernels.
//
// Everything here reproduces PyTorch's own definitions (ATen AdaptivePooling.h and UpSample.h) so that the fused
// kernels agree with F.adaptive_avg_pool2d and F.interpolate(mode="bilinear") to a few ulps. Keep the order of
// operations: reordering changes float32 rounding.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PSP_HD __host__ __device__ __forceinline__
#else
#define PSP_HD inline
#endif

namespace pspnet_fast {

// Most pyramid levels one op accepts; the CUDA kernels pass per-level tables by value in a kernel argument.
constexpr int kMaxLevels = 16;

// Adaptive average pooling, output size k over extent n: bin i covers [start, end). Integer arithmetic as ATen's
// start_index / end_index; neighbouring bins overlap when k does not divide n, and bins repeat rows when k > n.
PSP_HD int64_t pool_start(int64_t i, int64_t k, int64_t n) { return (i * n) / k; }
PSP_HD int64_t pool_end(int64_t i, int64_t k, int64_t n) { return ((i + 1) * n + k - 1) / k; }

// Bilinear source scale for `in` samples resampled to `out` samples (ATen area_pixel_compute_scale, no explicit
// scale_factor). opmath_t is float for float/half/bfloat16 inputs and double for double, as in ATen.
template <typename opmath_t>
PSP_HD opmath_t linear_scale(int64_t in, int64_t out, bool align_corners) {
  if (align_corners) {
    return out > 1 ? static_cast<opmath_t>(in - 1) / static_cast<opmath_t>(out - 1) : static_cast<opmath_t>(0);
  }
  return static_cast<opmath_t>(in) / static_cast<opmath_t>(out);
}

// a * b + c rounded once, in the operands' own precision (fmaf for float: no detour through double).
PSP_HD float fused_mul_add(float a, float b, float c) { return fmaf(a, b, c); }
PSP_HD double fused_mul_add(double a, double b, double c) { return fma(a, b, c); }

// Source coordinate of destination index dst (ATen area_pixel_compute_source_index, linear mode).
template <typename opmath_t>
PSP_HD opmath_t linear_source(opmath_t scale, int64_t dst, bool align_corners) {
  if (align_corners) {
    return scale * static_cast<opmath_t>(dst);
  }
  // One fused multiply-add, as the compilers contract ATen's `scale * (dst + 0.5) - 0.5` in its AVX2 CPU kernels and
  // under nvcc's default --fmad: the rounding decides whether a weight is exactly 0, and so whether an Inf in the
  // level map becomes NaN (0 * Inf) at that output, as in PyTorch.
  const opmath_t src = fused_mul_add(scale, static_cast<opmath_t>(dst) + static_cast<opmath_t>(0.5),
                                     static_cast<opmath_t>(-0.5));
  return src < static_cast<opmath_t>(0) ? static_cast<opmath_t>(0) : src;
}

// The two taps and weights of one destination index. i1 == i0 at the last source sample; both taps are always read
// (a NaN behind a zero weight reaches the output, as in PyTorch).
template <typename opmath_t>
struct LinearTap {
  int64_t i0;
  int64_t i1;
  opmath_t l0;
  opmath_t l1;
};

template <typename opmath_t>
PSP_HD LinearTap<opmath_t> linear_tap(opmath_t scale, int64_t dst, int64_t in, int64_t out, bool align_corners) {
  LinearTap<opmath_t> t;
  if (in == out) {
    // ATen's CPU kernel copies a dimension that keeps its size (no neighbour tap, so a NaN stays where it is).
    t.i0 = t.i1 = dst;
    t.l0 = static_cast<opmath_t>(1);
    t.l1 = static_cast<opmath_t>(0);
    return t;
  }
  const opmath_t src = linear_source<opmath_t>(scale, dst, align_corners);
  // ATen guard_index_and_lambda: floor in opmath, clamp the index, clamp the weight to [0, 1].
  int64_t i0 = static_cast<int64_t>(floor(src));
  t.i0 = i0 < in - 1 ? i0 : in - 1;
  opmath_t l1 = src - static_cast<opmath_t>(t.i0);
  l1 = l1 < static_cast<opmath_t>(0) ? static_cast<opmath_t>(0) : l1;
  l1 = l1 > static_cast<opmath_t>(1) ? static_cast<opmath_t>(1) : l1;
  t.l1 = l1;
  t.l0 = static_cast<opmath_t>(1) - l1;
  t.i1 = t.i0 + (t.i0 < in - 1 ? 1 : 0);
  return t;
}

// Bilinear combination in ATen's order: lh0 * (lw0 * v00 + lw1 * v01) + lh1 * (lw0 * v10 + lw1 * v11).
template <typename opmath_t>
PSP_HD opmath_t bilinear(opmath_t lh0, opmath_t lh1, opmath_t lw0, opmath_t lw1, opmath_t v00, opmath_t v01,
                         opmath_t v10, opmath_t v11) {
  return lh0 * (lw0 * v00 + lw1 * v01) + lh1 * (lw0 * v10 + lw1 * v11);
}

// ReLU that lets NaN through, as torch.relu does.
template <typename T>
PSP_HD T relu_nan(T v) {
  return v < static_cast<T>(0) ? static_cast<T>(0) : v;
}

}  // namespace pspnet_fast
