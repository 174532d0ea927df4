// ppm_reduce on CUDA: pooled (N, C, S) x weight (L, R, C) -> levels (N, R, S), a grouped GEMM with one group per level.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "cuda_common.cuh"
#include "ppm_math.h"

namespace pspnet_fast {
namespace {

using at::Tensor;

// ------------------------------------------------------------------------------------------------------------------
// ppm_reduce
// ------------------------------------------------------------------------------------------------------------------

constexpr int kRedTM = 32;  // output rows (r) per block
constexpr int kRedTN = 32;  // output columns ((n, bin) pairs of one level) per block
constexpr int kRedKG = 4;   // K split across the block's four 64-thread groups, summed in a fixed order at the end
constexpr int kRedThreads = 64 * kRedKG;

struct ReduceParams {
  LevelTable lv;
  int64_t N, C, R, S;
  int64_t tiles_m;                     // ceil(R / TM)
  int64_t tile_off[kMaxLevels + 1];    // first block of each level
  bool affine;
  bool relu;
};

// Group l is the GEMM out_l (R x N*b^2) = weight[l] (R x C) @ B_l (C x N*b^2) with B_l[c][n*b^2 + k] =
// pooled[n, c, off_l + k]: one group per level (not per image) so weight[l] is read once per column tile. Block =
// one 32 x 32 output tile; its four 64-thread groups take interleaved K chunks of TK (one 128-byte weight row piece)
// into their own shared tiles, each thread keeps a 4 x 4 register tile, and the next chunk is prefetched into
// registers while the current one is multiplied. The four partial tiles are then summed in group order.
template <typename T>
__global__ void __launch_bounds__(kRedThreads)
    ppm_reduce_kernel(const T* __restrict__ pooled, const T* __restrict__ weight, const T* __restrict__ scale,
                      const T* __restrict__ shift, T* __restrict__ out, const __grid_constant__ ReduceParams p) {
  constexpr int TK = 128 / sizeof(T);
  constexpr int A_STRIDE = kRedTM + 1;  // As[k][m]: +1 so the transposing stores hit distinct banks
  constexpr int GROUP_ELEMS = TK * A_STRIDE + TK * kRedTN;
  constexpr int QA = kRedTM * TK / 64;  // weight elements per thread per chunk
  constexpr int QB = TK * kRedTN / 64;  // pooled elements per thread per chunk
  static_assert(kRedKG * kRedTM * kRedTN <= kRedKG * GROUP_ELEMS, "reduction tile must fit the operand tiles");
  static_assert(64 % TK == 0 && 64 % kRedTN == 0, "load mapping assumes TK and TN divide 64");
  __shared__ __align__(16) T smem[kRedKG * GROUP_ELEMS];

  const int tid = threadIdx.x;
  const int g = tid >> 6;
  const int lt = tid & 63;
  const int tr = lt >> 3;  // output rows tr + 8i
  const int tcn = lt & 7;  // output cols tcn + 8j

  const int64_t bid = blockIdx.x;
  const int l = level_of(p.tile_off, p.lv.num, bid);
  const int64_t t = bid - p.tile_off[l];
  const int64_t tn = t / p.tiles_m;
  const int64_t r0 = (t - tn * p.tiles_m) * kRedTM;
  const int64_t col0 = tn * kRedTN;
  const int64_t b = p.lv.bins[l];
  const int64_t b2 = b * b;
  const int64_t ncols = p.N * b2;
  const int64_t off = p.lv.offs[l];
  const int64_t C = p.C, R = p.R, S = p.S;

  // Load geometry: weight rows am0 + q*(64/TK) at k = ak; pooled k = bk0 + q*(64/TN) at column bn.
  const int ak = lt % TK;
  const int am0 = lt / TK;
  const int bn = lt % kRedTN;
  const int bk0 = lt / kRedTN;
  const T* wrow = weight + (static_cast<int64_t>(l) * R + r0 + am0) * C + ak;
  const int64_t bcol = col0 + bn;
  const bool bvalid = bcol < ncols;
  const T* pcol = pooled + (bvalid ? (bcol / b2) * C * S + off + bcol % b2 : 0);

  T ra[QA], rb[QB];
  auto load = [&](int64_t k0) {
#pragma unroll
    for (int q = 0; q < QA; ++q) {
      const int64_t r = r0 + am0 + q * (64 / TK);
      const int64_t kk = k0 + ak;
      ra[q] = (r < R && kk < C) ? wrow[q * (64 / TK) * C + k0] : T(0);
    }
#pragma unroll
    for (int q = 0; q < QB; ++q) {
      const int64_t kk = k0 + bk0 + q * (64 / kRedTN);
      rb[q] = (bvalid && kk < C) ? pcol[kk * S] : T(0);
    }
  };

  T acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = T(0);

  T* As = smem + g * GROUP_ELEMS;
  T* Bs = As + TK * A_STRIDE;
  auto mac = [&](int k) {
    T a[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = As[k * A_STRIDE + tr + 8 * i];
#pragma unroll
    for (int j = 0; j < 4; ++j) bv[j] = Bs[k * kRedTN + tcn + 8 * j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * bv[j];
  };

  const int64_t rounds = ceil_div(C, static_cast<int64_t>(kRedKG) * TK);
  if (rounds > 0) load(static_cast<int64_t>(g) * TK);
  for (int64_t rd = 0; rd < rounds; ++rd) {
    const int64_t k0 = (rd * kRedKG + g) * TK;
#pragma unroll
    for (int q = 0; q < QA; ++q) As[ak * A_STRIDE + am0 + q * (64 / TK)] = ra[q];
#pragma unroll
    for (int q = 0; q < QB; ++q) Bs[(bk0 + q * (64 / kRedTN)) * kRedTN + bn] = rb[q];
    __syncthreads();
    if (rd + 1 < rounds) load(k0 + static_cast<int64_t>(kRedKG) * TK);
    const int64_t kmax = C - k0;  // <= 0 for groups past the end in the last round
    if (kmax >= TK) {
#pragma unroll
      for (int k = 0; k < TK; ++k) mac(k);
    } else {
      for (int k = 0; k < kmax; ++k) mac(k);
    }
    __syncthreads();
  }

  // The operand tiles are free after the last barrier: reuse them for the four partial tiles.
  T* red = smem;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) red[(g * kRedTM + tr + 8 * i) * kRedTN + tcn + 8 * j] = acc[i][j];
  __syncthreads();
  for (int o = tid; o < kRedTM * kRedTN; o += kRedThreads) {
    const int m = o / kRedTN;
    const int nn = o - m * kRedTN;
    const int64_t r = r0 + m;
    const int64_t col = col0 + nn;
    if (r < R && col < ncols) {
      T v = red[o];
#pragma unroll
      for (int g2 = 1; g2 < kRedKG; ++g2) v += red[g2 * kRedTM * kRedTN + o];
      if (p.affine) v = v * scale[l * R + r] + shift[l * R + r];
      if (p.relu) v = relu_nan(v);
      const int64_t n = col / b2;
      out[(n * R + r) * S + off + (col - n * b2)] = v;
    }
  }
}

Tensor ppm_reduce_cuda(const Tensor& pooled_in, const Tensor& weight_in, const std::optional<Tensor>& scale,
                       const std::optional<Tensor>& shift, at::IntArrayRef bins, bool relu) {
  const char* op = "ppm_reduce";
  TORCH_CHECK(pooled_in.is_cuda(), op, ": expected pooled on a CUDA device, got ", pooled_in.device());
  check_cuda(op, "weight", weight_in, pooled_in);
  const LevelTable lv = make_levels(op, bins);
  TORCH_CHECK(pooled_in.dim() == 3, op, ": expected pooled of shape (N, C, S), got ", pooled_in.sizes());
  TORCH_CHECK(weight_in.dim() == 3, op, ": expected weight of shape (L, R, C), got ", weight_in.sizes());
  const int64_t N = pooled_in.size(0), C = pooled_in.size(1), S = pooled_in.size(2);
  const int64_t L = lv.num, R = weight_in.size(1);
  TORCH_CHECK(weight_in.size(0) == L && weight_in.size(2) == C, op, ": expected weight of shape (", L, ", R, ", C,
              "), got ", weight_in.sizes());
  TORCH_CHECK(S == lv.offs[lv.num], op, ": expected pooled with ", lv.offs[lv.num], " bins (sum of b^2 for bins ",
              bins, "), got ", S);
  const auto st = pooled_in.scalar_type();
  TORCH_CHECK((st == at::kFloat || st == at::kDouble) && weight_in.scalar_type() == st, op,
              ": expected float32 or float64 pooled and weight of one dtype, got ", st, " and ",
              weight_in.scalar_type());
  TORCH_CHECK(scale.has_value() == shift.has_value(), op, ": scale and shift come together, got ",
              scale.has_value() ? "scale without shift" : "shift without scale");
  const bool affine = scale.has_value();
  if (affine) {
    for (const Tensor* t : {&*scale, &*shift}) {
      check_cuda(op, t == &*scale ? "scale" : "shift", *t, pooled_in);
      TORCH_CHECK(t->sizes() == at::IntArrayRef({L, R}) && t->scalar_type() == st, op,
                  ": expected scale and shift of shape (", L, ", ", R, ") and dtype ", st, ", got ", t->sizes(),
                  " ", t->scalar_type());
    }
  }
  const c10::cuda::CUDAGuard guard(pooled_in.device());
  Tensor out = at::empty({N, R, S}, pooled_in.options());
  if (N == 0 || R == 0) return out;
  const Tensor pooled = pooled_in.contiguous();
  const Tensor weight = weight_in.contiguous();
  const Tensor scale_c = affine ? scale->contiguous() : Tensor();
  const Tensor shift_c = affine ? shift->contiguous() : Tensor();

  ReduceParams p{};
  p.lv = lv;
  p.N = N;
  p.C = C;
  p.R = R;
  p.S = S;
  p.tiles_m = ceil_div(R, kRedTM);
  p.tile_off[0] = 0;
  for (int l = 0; l < lv.num; ++l) {
    p.tile_off[l + 1] = p.tile_off[l] + p.tiles_m * ceil_div(N * lv.bins[l] * lv.bins[l], kRedTN);
  }
  p.affine = affine;
  p.relu = relu;
  const int64_t blocks = p.tile_off[lv.num];
  TORCH_CHECK(blocks <= INT32_MAX, op, ": problem too large for one launch (", blocks, " tiles)");

  AT_DISPATCH_FLOATING_TYPES(st, "ppm_reduce_cuda", [&] {
    ppm_reduce_kernel<scalar_t><<<static_cast<unsigned>(blocks), kRedThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        pooled.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
        affine ? scale_c.const_data_ptr<scalar_t>() : nullptr, affine ? shift_c.const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace pspnet_fast

TORCH_LIBRARY_IMPL(pspnet_fast, CUDA, m) {
  m.impl("ppm_reduce", &pspnet_fast::ppm_reduce_cuda);
}
