// ppm_reduce's epilogue on CUDA (the GEMM itself is ppm_reduce.cpp's cuBLAS call): out (N, R, S) in place,
// out = relu(out * scale[l(s), r] + shift[l(s), r]).
//
// Per output: one 4- or 8-byte load and store, an FMA, a max; bound by bytes (N * R * S * 8 bytes read and written,
// 1.6 MB at N=8, R=512, S=50: ~1 us of a launch). Launch: a grid-stride loop over (n, r) rows, one block of 256
// threads per row at a time (S is small), the row's level of each column found by a short scan of the table.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "cuda_common.cuh"
#include "ppm_cuda.h"
#include "ppm_math.h"

namespace pspnet_fast {
namespace {

constexpr int kEpiThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kEpiThreads)
    reduce_epilogue_kernel(T* __restrict__ out, const T* __restrict__ scale, const T* __restrict__ shift,
                           const __grid_constant__ LevelTable lv, int64_t rows, int R, int S, bool relu) {
  // Row q = n * R + r; columns s of one row are one contiguous run. r = q mod R stepped with q (32-bit remainders of
  // blockIdx.x and gridDim.x once; no division in the loop).
  const uint32_t R32 = static_cast<uint32_t>(R);
  const int step = static_cast<int>(gridDim.x % R32);
  int r = static_cast<int>(blockIdx.x % R32);
  for (int64_t q = blockIdx.x; q < rows; q += gridDim.x) {
    T* o = out + q * S;
    for (int s = threadIdx.x; s < S; s += blockDim.x) {
      T v = o[s];
      if (scale != nullptr) {
        const int l = level_of(lv.offs, lv.num, s);
        v = v * scale[l * R + r] + shift[l * R + r];
      }
      o[s] = relu ? relu_nan(v) : v;
    }
    r += step;
    if (r >= R) r -= R;
  }
}

}  // namespace

void reduce_epilogue_cuda(at::Tensor& out, const at::Tensor& scale, const at::Tensor& shift, const LevelTable& lv,
                          bool relu) {
  const int64_t rows = out.size(0) * out.size(1);
  if (rows == 0) return;
  TORCH_CHECK(out.is_contiguous() && out.size(1) <= INT32_MAX && out.size(2) <= INT32_MAX,
              "ppm_reduce: internal: epilogue on a non-contiguous or oversized output ", out.sizes());
  const int64_t blocks = std::min<int64_t>(rows, static_cast<int64_t>(sm_count()) * 32);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "ppm_reduce_epilogue", [&] {
    reduce_epilogue_kernel<scalar_t><<<static_cast<unsigned>(blocks), kEpiThreads, 0,
                                       c10::cuda::getCurrentCUDAStream()>>>(
        out.mutable_data_ptr<scalar_t>(), scale.defined() ? scale.const_data_ptr<scalar_t>() : nullptr,
        shift.defined() ? shift.const_data_ptr<scalar_t>() : nullptr, lv, rows, static_cast<int>(out.size(1)),
        static_cast<int>(out.size(2)), relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace pspnet_fast
