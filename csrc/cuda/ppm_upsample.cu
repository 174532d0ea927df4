// upsample_concat on CUDA: x (N, C, H, W), levels (N, R, S) -> out (N, C + L*R, H, W), one launch that writes the copy of
// x and every level, bilinear as F.interpolate (ppm_math.h: linear_tap / bilinear in ATen's order).
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

constexpr int kUpThreads = 256;
constexpr int kUpRChunk = 32;        // channels_last upsampling: level channels per warp (one pixel per warp)
constexpr int kUpStageMaxBin = 64;   // channels_last upsampling: levels up to this b are staged in shared memory

// ------------------------------------------------------------------------------------------------------------------
// upsample_concat
// ------------------------------------------------------------------------------------------------------------------

struct UpParams {
  LevelTable lv;
  int64_t C, H, W, R, Ctot, S;
  int64_t X0, L0;  // first output channel of x and of the levels: [x, levels] 0, C; x_last [levels, x] L*R, 0
  bool align;
  bool lv_double;  // levels are float64 (else float32); converted to opmath on load
  int64_t units;   // NCHW: N*Ctot*H*W / VEC vectors; channels_last: N*H*W*C / VEC copy vectors
  // channels_last only
  int64_t tasks;        // N * H * L * rchunks level tasks
  int64_t rchunks;      // ceil(R / kUpRChunk)
  int copy_blocks;      // blocks [0, copy_blocks) copy x; the rest compute levels
  int stage_b;          // levels with b <= stage_b are staged in shared memory
};

// NCHW: out (N, Ctot, H, W) contiguous. Grid-stride loop over VEC-element vectors of the output in memory order, so
// every warp writes 32 consecutive 16-byte vectors. H*W % VEC == 0 for VEC > 1, so a vector never leaves its plane:
// a vector of the first C channels is one 16-byte load of x; a level vector reads the tiny b x b map (L1-resident,
// the lanes of a warp share it) through linear_tap / bilinear in ATen's order.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kUpThreads)
    upsample_nchw_kernel(const scalar_t* __restrict__ x, const void* __restrict__ lv, scalar_t* __restrict__ out,
                         const __grid_constant__ UpParams p) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t HW = p.H * p.W;
  const int64_t img = p.Ctot * HW;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < p.units; u += stride) {
    const int64_t e = u * VEC;
    const int64_t n = div_nn(e, img);
    const int64_t rem = e - n * img;
    const int64_t ch = div_nn(rem, HW);
    const int64_t pos = rem - ch * HW;
    AlignedVec<scalar_t, VEC> v;
    if (ch >= p.X0 && ch < p.X0 + p.C) {
      v = load_vec<scalar_t, VEC>(x + (n * p.C + ch - p.X0) * HW + pos);
    } else {
      const int64_t q = ch - p.L0;
      const int l = static_cast<int>(div_nn(q, p.R));
      const int64_t r = q - l * p.R;
      const int64_t b = p.lv.bins[l];
      const opmath_t sh = linear_scale<opmath_t>(b, p.H, p.align);
      const opmath_t sw = linear_scale<opmath_t>(b, p.W, p.align);
      int64_t h = div_nn(pos, p.W);
      int64_t w = pos - h * p.W;
      const int64_t base = (n * p.R + r) * p.S + p.lv.offs[l];
      LinearTap<opmath_t> th = linear_tap<opmath_t>(sh, h, b, p.H, p.align);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const LinearTap<opmath_t> tw = linear_tap<opmath_t>(sw, w, b, p.W, p.align);
        const int64_t r0 = base + th.i0 * b, r1 = base + th.i1 * b;
        const opmath_t v00 = load_level<opmath_t>(lv, p.lv_double, r0 + tw.i0);
        const opmath_t v01 = load_level<opmath_t>(lv, p.lv_double, r0 + tw.i1);
        const opmath_t v10 = load_level<opmath_t>(lv, p.lv_double, r1 + tw.i0);
        const opmath_t v11 = load_level<opmath_t>(lv, p.lv_double, r1 + tw.i1);
        v.v[k] = static_cast<scalar_t>(bilinear<opmath_t>(th.l0, th.l1, tw.l0, tw.l1, v00, v01, v10, v11));
        if (++w == p.W && k + 1 < VEC) {
          w = 0;
          ++h;  // < H: the vector stays inside the plane
          th = linear_tap<opmath_t>(sh, h, b, p.H, p.align);
        }
      }
    }
    store_vec<scalar_t, VEC>(out + e, v);
  }
}

// channels_last: out (N, H, W, Ctot) in memory. Blocks [0, copy_blocks) copy x into channels [X0, X0 + C) of every
// pixel (grid-stride over VEC-element vectors; both rows are contiguous). The other blocks loop over level tasks
// (n, h, l, chunk of 32 level channels): the two map rows i0(h), i1(h) of those 32 channels are gathered once into
// shared memory as [row][j][r] (the channel is fastest, as in the output), then each warp produces one pixel's 32
// consecutive channels at a time, a coalesced store, reading its taps from shared memory without bank conflicts.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kUpThreads)
    upsample_cl_kernel(const scalar_t* __restrict__ x, const void* __restrict__ lv, scalar_t* __restrict__ out,
                       const __grid_constant__ UpParams p) {
  using opmath_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  opmath_t* st = reinterpret_cast<opmath_t*>(smem);
  const int tid = threadIdx.x;
  if (static_cast<int>(blockIdx.x) < p.copy_blocks) {
    const int64_t cv = p.C / VEC;
    const int64_t stride = static_cast<int64_t>(p.copy_blocks) * blockDim.x;
    for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + tid; u < p.units; u += stride) {
      const int64_t pix = div_nn(u, cv);
      const int64_t k = u - pix * cv;
      store_vec<scalar_t, VEC>(out + pix * p.Ctot + p.X0 + k * VEC, load_vec<scalar_t, VEC>(x + pix * p.C + k * VEC));
    }
    return;
  }
  const int64_t lb = blockIdx.x - p.copy_blocks;
  const int64_t nlb = gridDim.x - p.copy_blocks;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int nwarps = blockDim.x >> 5;
  const int L = p.lv.num;
  for (int64_t t = lb; t < p.tasks; t += nlb) {
    int64_t q = t;
    const int64_t rc = q % p.rchunks;
    q /= p.rchunks;
    const int l = static_cast<int>(q % L);
    q /= L;
    const int64_t h = q % p.H;
    const int64_t n = q / p.H;
    const int64_t b = p.lv.bins[l];
    const opmath_t sh = linear_scale<opmath_t>(b, p.H, p.align);
    const opmath_t sw = linear_scale<opmath_t>(b, p.W, p.align);
    const LinearTap<opmath_t> th = linear_tap<opmath_t>(sh, h, b, p.H, p.align);
    const int64_t r = rc * kUpRChunk + lane;
    // levels[n, r, off_l + i*b + j] = lvn[r * S + i * b + j]
    const int64_t lvn = n * p.R * p.S + p.lv.offs[l];
    const bool staged = b <= p.stage_b;  // uniform over the block
    if (staged) {
      __syncthreads();  // the previous task's readers are done with st
      const int64_t per_row = b * kUpRChunk;
      for (int64_t e = tid; e < 2 * per_row; e += blockDim.x) {
        const int64_t row = e / per_row;
        const int64_t j = (e - row * per_row) / kUpRChunk;
        const int64_t rr = rc * kUpRChunk + (e & (kUpRChunk - 1));
        const int64_t i = row == 0 ? th.i0 : th.i1;
        st[e] = rr < p.R ? load_level<opmath_t>(lv, p.lv_double, lvn + rr * p.S + i * b + j) : opmath_t(0);
      }
      __syncthreads();
    }
    if (r < p.R) {
      scalar_t* o = out + (n * p.H + h) * p.W * p.Ctot + p.L0 + l * p.R + r;
      for (int64_t w = warp; w < p.W; w += nwarps) {
        const LinearTap<opmath_t> tw = linear_tap<opmath_t>(sw, w, b, p.W, p.align);
        opmath_t v00, v01, v10, v11;
        if (staged) {
          v00 = st[tw.i0 * kUpRChunk + lane];
          v01 = st[tw.i1 * kUpRChunk + lane];
          v10 = st[(b + tw.i0) * kUpRChunk + lane];
          v11 = st[(b + tw.i1) * kUpRChunk + lane];
        } else {
          const int64_t r0 = lvn + r * p.S + th.i0 * b, r1 = lvn + r * p.S + th.i1 * b;
          v00 = load_level<opmath_t>(lv, p.lv_double, r0 + tw.i0);
          v01 = load_level<opmath_t>(lv, p.lv_double, r0 + tw.i1);
          v10 = load_level<opmath_t>(lv, p.lv_double, r1 + tw.i0);
          v11 = load_level<opmath_t>(lv, p.lv_double, r1 + tw.i1);
        }
        o[w * p.Ctot] = static_cast<scalar_t>(bilinear<opmath_t>(th.l0, th.l1, tw.l0, tw.l1, v00, v01, v10, v11));
      }
    }
  }
}

template <typename scalar_t>
void launch_upsample(const Tensor& x, const Tensor& levels, Tensor& out, UpParams& p, bool cl, int64_t N) {
  constexpr int V = 16 / sizeof(scalar_t);
  using opmath_t = at::opmath_type<scalar_t>;
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const void* lp = levels.const_data_ptr();
  const bool ptrs_aligned = aligned(xp) && aligned(op);
  const int64_t cap = static_cast<int64_t>(sm_count()) * 16;  // grid-stride loops: a few waves of resident blocks
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (!cl) {
    const bool vec = ptrs_aligned && (p.H * p.W) % V == 0;
    const int vw = vec ? V : 1;
    p.units = N * p.Ctot * p.H * p.W / vw;
    const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(p.units, kUpThreads), cap));
    if (vec) {
      upsample_nchw_kernel<scalar_t, V><<<static_cast<unsigned>(blocks), kUpThreads, 0, stream>>>(xp, lp, op, p);
    } else {
      upsample_nchw_kernel<scalar_t, 1><<<static_cast<unsigned>(blocks), kUpThreads, 0, stream>>>(xp, lp, op, p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const bool vec = ptrs_aligned && p.C % V == 0 && p.Ctot % V == 0 && p.X0 % V == 0;
  const int vw = vec ? V : 1;
  p.units = N * p.H * p.W * p.C / vw;
  p.rchunks = ceil_div(p.R, kUpRChunk);
  p.tasks = N * p.H * p.lv.num * p.rchunks;
  int64_t maxb = 1;
  for (int l = 0; l < p.lv.num; ++l) maxb = std::max(maxb, p.lv.bins[l]);
  p.stage_b = static_cast<int>(std::min<int64_t>(maxb, kUpStageMaxBin));
  const int64_t smem = 2 * p.stage_b * kUpRChunk * static_cast<int64_t>(sizeof(opmath_t));
  const int64_t copy_blocks = std::max<int64_t>(1, std::min(ceil_div(p.units, kUpThreads), cap));
  const int64_t level_blocks = std::min(p.tasks, cap);
  p.copy_blocks = static_cast<int>(copy_blocks);
  const int64_t blocks = copy_blocks + level_blocks;
  if (vec) {
    upsample_cl_kernel<scalar_t, V><<<static_cast<unsigned>(blocks), kUpThreads, smem, stream>>>(xp, lp, op, p);
  } else {
    upsample_cl_kernel<scalar_t, 1><<<static_cast<unsigned>(blocks), kUpThreads, smem, stream>>>(xp, lp, op, p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor upsample_concat_cuda(const Tensor& x_in, const Tensor& levels_in, at::IntArrayRef bins, bool align_corners,
                            bool x_last) {
  const char* op = "upsample_concat";
  check_x(op, x_in);
  check_cuda(op, "levels", levels_in, x_in);
  const LevelTable lv = make_levels(op, bins);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  TORCH_CHECK(levels_in.dim() == 3 && levels_in.size(0) == N && levels_in.size(2) == lv.offs[lv.num], op,
              ": expected levels of shape (", N, ", R, ", lv.offs[lv.num], "), got ", levels_in.sizes());
  TORCH_CHECK(levels_in.scalar_type() == at::kFloat || levels_in.scalar_type() == at::kDouble, op,
              ": expected float32 or float64 levels, got ", levels_in.scalar_type());
  const int64_t R = levels_in.size(1);
  const int64_t Ctot = C + lv.num * R;
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool cl = use_channels_last(x_in);
  Tensor out = at::empty({N, Ctot, H, W}, x_in.options(),
                         cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (N == 0) return out;
  const Tensor x = cl ? x_in : x_in.contiguous();
  const Tensor levels = levels_in.contiguous();

  UpParams p{};
  p.lv = lv;
  p.C = C;
  p.H = H;
  p.W = W;
  p.R = R;
  p.Ctot = Ctot;
  p.X0 = x_last ? lv.num * R : 0;
  p.L0 = x_last ? 0 : C;
  p.S = lv.offs[lv.num];
  p.align = align_corners;
  p.lv_double = levels.scalar_type() == at::kDouble;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upsample_concat_cuda",
                                  [&] { launch_upsample<scalar_t>(x, levels, out, p, cl, N); });
  return out;
}

}  // namespace
}  // namespace pspnet_fast

TORCH_LIBRARY_IMPL(pspnet_fast, CUDA, m) {
  m.impl("upsample_concat", &pspnet_fast::upsample_concat_cuda);
}
