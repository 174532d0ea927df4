// upsample_concat on CUDA: x (N, C, H, W), levels (N, R, S) -> out (N, C + L*R, H, W), one launch that writes the copy
// of x and every level, bilinear as F.interpolate (ppm_math.h: linear_tap / bilinear in ATen's order). Also the
// levels-only pass of ppm_forward (upsample_levels_into: the same kernels without the copy).
//
// Cost per output element and what bounds it:
//   NCHW tabled (upsample_nchw_kernel): a level element is two shared loads (U[i0][w], U[i1][w]), two multiply-adds
//     and a conversion, stored in aligned 16-byte vectors (a plane's unaligned head and tail element-wise), pos / W
//     by multiply-high once per vector; per block a setup of b * W + W + rows tap computations for up to 16384
//     outputs. An x element is 1/V of a 16-byte load (two and 4 funnel shifts when x and out differ in alignment)
//     and 1/V of an aligned 16-byte store. Bound: bytes written (8x2048x90x90 bf16: 531 MB out + 265 MB x).
//   NCHW generic (tables over 32 KiB: enormous b * W): per element taps and 4 L1-resident map loads; instruction
//     bound, only for shapes PSPNet never uses.
//   channels_last: the copy is 16-byte vectors when C, Ctot and the x offset are multiples of V; a level element is
//     4 shared loads of a staged pair of map rows and the bilinear sum, the pixel's column taps shared by V channels,
//     stored as 16-byte vectors of V channels when R, the level offset and Ctot are multiples of V (else 2-byte
//     stores, 32 consecutive channels per pixel). Bound: bytes written.
// Launch geometry: NCHW one 256-thread block per 16384 elements of x (copy) and per (n, level channel, 16384
// positions); channels_last grid-stride loops over tasks (n, row, level, 32 channels), 4 waves of resident blocks
// (cudaOccupancyMaxActiveBlocksPerMultiprocessor) for each of the copy and the levels.
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
#include "op_checks.h"
#include "ppm_cuda.h"
#include "ppm_math.h"

namespace pspnet_fast {
namespace {

using at::Tensor;

constexpr int kUpThreads = 256;
constexpr int kUpRChunk = 32;        // channels_last upsampling: level channels per task (one pixel at a time)
constexpr int kUpStageMaxBin = 64;   // channels_last upsampling: levels up to this b are staged in shared memory
constexpr int64_t kUpCopyChunk = 16384;  // NCHW: elements of x copied per block
constexpr int64_t kUpChunk = 16384;      // NCHW: output positions per level block
constexpr int64_t kUpTabBytes = 32 * 1024;  // NCHW: most shared memory for a block's tap tables (else generic)

// ------------------------------------------------------------------------------------------------------------------
// upsample_concat
// ------------------------------------------------------------------------------------------------------------------

struct UpParams {
  LevelTable lv;
  int64_t C, H, W, R, Ctot, S;
  int64_t X0, L0;  // first output channel of x and of the levels: [x, levels] 0, C; x_last [levels, x] L*R, 0
  bool align;
  bool lv_double;  // levels are float64 (else float32); converted to opmath on load
  bool copy;       // x is copied into its channels (upsample_concat); false: the level channels only (ppm_forward)
  int64_t units;   // NCHW generic: N*Ctot*H*W elements; channels_last: N*H*W*C / VEC copy vectors
  // NCHW tabled plan: blocks [0, copy_blocks) copy x (chunks of kUpCopyChunk elements of each image's C*H*W run),
  // then one block per (n, level plane q, chunk of E positions of the plane).
  int64_t copy_chunks;   // per image
  int64_t E, chunks;     // positions per level block, chunks per plane
  FastDiv wdiv;          // pos / W
  int off_rt;            // shared memory: U[i][w] (b x W opmath values) at 0, row taps at off_rt
  // channels_last only
  int64_t tasks;        // N * H * L * rchunks level tasks
  int64_t rchunks;      // ceil(R / kUpRChunk)
  int copy_blocks;      // blocks [0, copy_blocks) copy x; the rest compute levels
  int stage_b;          // levels with b <= stage_b are staged in shared memory
  double rcv;           // 1 / (C / VEC): the copy's pixel by div_est
  double rimg, rhw, rr, rw;  // NCHW generic: 1 / (Ctot H W), 1 / (H W), 1 / R, 1 / W, for div_est
  double sh[kMaxLevels], sw[kMaxLevels];  // linear_scale<opmath_t>(b_l, H | W), host-computed (exact in opmath_t)
};

// NCHW, generic (the tabled kernel's tables would not fit: enormous bins or W): out (N, Ctot, H, W) contiguous.
// Grid-stride loop over the output elements in memory order; an x element is copied, a level element reads the b x b
// map (L1-resident, the lanes of a warp share it) through linear_tap / bilinear in ATen's order. Slow, but bounded.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kUpThreads)
    upsample_nchw_generic_kernel(const scalar_t* __restrict__ x, const void* __restrict__ lv,
                                 scalar_t* __restrict__ out,
                         const __grid_constant__ UpParams p) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t HW = p.H * p.W;
  const int64_t img = p.Ctot * HW;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < p.units; u += stride) {
    const int64_t e = u * VEC;
    // div_est with the host's reciprocals: no 64-bit division (whose subroutine call is a slow path per element).
    const int64_t n = div_est(e, img, p.rimg);
    const int64_t rem = e - n * img;
    const int64_t ch = div_est(rem, HW, p.rhw);
    const int64_t pos = rem - ch * HW;
    AlignedVec<scalar_t, VEC> v;
    if (ch >= p.X0 && ch < p.X0 + p.C) {
      if (!p.copy) continue;
      v = load_vec<scalar_t, VEC>(x + (n * p.C + ch - p.X0) * HW + pos);
    } else {
      const int64_t q = ch - p.L0;
      const int l = static_cast<int>(div_est(q, p.R, p.rr));
      const int64_t r = q - l * p.R;
      const int64_t b = p.lv.bins[l];
      const opmath_t sh = static_cast<opmath_t>(p.sh[l]);
      const opmath_t sw = static_cast<opmath_t>(p.sw[l]);
      int64_t h = div_est(pos, p.W, p.rw);
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

// Row taps of one output row: offsets of its two source rows in U (i0 * W, i1 * W) and their weights.
template <typename opmath_t>
struct RowTap {
  int u0, u1;
  opmath_t l0, l1;
};

// NCHW, tabled: out (N, Ctot, H, W) contiguous. Blocks [0, copy_blocks) copy x: block k takes chunk k % copy_chunks
// of image k / copy_chunks's C*H*W run (contiguous in x and in out): aligned 16-byte stores. Each other block owns
// positions [pos0, pos1) of one level plane (n, l, r) and first builds in shared memory the horizontal pass of its
// b x b map m for every column, U[i][w] = lw0(w) m[i][j0(w)] + lw1(w) m[i][j1(w)] (ATen's inner sums; b * W values),
// and the taps of its rows; each output is then lh0 U[i0][w] + lh1 U[i1][w]: two shared loads and two multiply-adds,
// row taps read once per row, no division (pos / W once per vector, by multiply-high), int32 offsets within the plane.
// Outputs are aligned 16-byte vectors of the plane run; its unaligned head and tail (H*W need not be a multiple of 8,
// nor the plane start 16-byte aligned) are element stores.
template <typename scalar_t>
__global__ void __launch_bounds__(kUpThreads)
    upsample_nchw_kernel(const scalar_t* __restrict__ x, const void* __restrict__ lv, scalar_t* __restrict__ out,
                         const __grid_constant__ UpParams p) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int V = 16 / sizeof(scalar_t);
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int64_t HW = p.H * p.W;
  const int64_t copy_blocks = p.copy_blocks;  // N * copy_chunks, 0 without the copy
  const int64_t bid = blockIdx.x;
  if (bid < copy_blocks) {
    const int64_t n = div_nn(bid, p.copy_chunks);
    const int64_t e0 = (bid - n * p.copy_chunks) * kUpCopyChunk;
    const int64_t len = min(kUpCopyChunk, p.C * HW - e0);
    copy_contiguous(x + n * p.C * HW + e0, out + (n * p.Ctot + p.X0) * HW + e0, len, tid, nt);
    return;
  }
  const int64_t lb = bid - copy_blocks;
  const int64_t LR = p.lv.num * p.R;
  const int64_t plane = div_nn(lb, p.chunks);  // n * LR + q
  const int64_t n = div_nn(plane, LR);
  const int64_t q = plane - n * LR;
  const int l = static_cast<int>(div_nn(q, p.R));
  const int64_t r = q - l * p.R;
  const int b = static_cast<int>(p.lv.bins[l]);
  const int W = static_cast<int>(p.W);
  const int pos0 = static_cast<int>((lb - plane * p.chunks) * p.E);
  const int pos1 = static_cast<int>(min(HW, pos0 + p.E));
  const int h_lo = static_cast<int>(fast_div(p.wdiv, pos0));
  const int h_hi = static_cast<int>(fast_div(p.wdiv, pos1 - 1));
  opmath_t* U = reinterpret_cast<opmath_t*>(smem);
  RowTap<opmath_t>* rt = reinterpret_cast<RowTap<opmath_t>*>(smem + p.off_rt);
  const int64_t mbase = (n * p.R + r) * p.S + p.lv.offs[l];  // m[i][j] = levels[mbase + i * b + j]
  {
    const opmath_t sw = linear_scale<opmath_t>(b, p.W, p.align);
    const int items = b * W;
    for (int it = tid; it < items; it += nt) {
      const int i = it / W;  // setup only: b * W items per block
      const int w = it - i * W;
      const LinearTap<opmath_t> tw = linear_tap<opmath_t>(sw, w, b, p.W, p.align);
      const opmath_t v0 = load_level<opmath_t>(lv, p.lv_double, mbase + i * b + tw.i0);
      const opmath_t v1 = load_level<opmath_t>(lv, p.lv_double, mbase + i * b + tw.i1);
      U[it] = tw.l0 * v0 + tw.l1 * v1;
    }
    const opmath_t sh = linear_scale<opmath_t>(b, p.H, p.align);
    for (int h = h_lo + tid; h <= h_hi; h += nt) {
      const LinearTap<opmath_t> th = linear_tap<opmath_t>(sh, h, b, p.H, p.align);
      RowTap<opmath_t> t;
      t.u0 = static_cast<int>(th.i0) * W;
      t.u1 = static_cast<int>(th.i1) * W;
      t.l0 = th.l0;
      t.l1 = th.l1;
      rt[h - h_lo] = t;
    }
  }
  __syncthreads();
  scalar_t* o = out + (n * p.Ctot + p.L0 + q) * HW;  // int64 base of the plane; int32 positions below
  // Element e of the plane: row h = e / W, column w; value lh0 U[i0][w] + lh1 U[i1][w] in ATen's order.
  const auto value = [&](int h, int w) {
    const RowTap<opmath_t> t = rt[h - h_lo];
    return static_cast<scalar_t>(t.l0 * U[t.u0 + w] + t.l1 * U[t.u1 + w]);
  };
  const int a = static_cast<int>(reinterpret_cast<uintptr_t>(o + pos0) & 15);
  int head = ((16 - a) & 15) / static_cast<int>(sizeof(scalar_t));
  head = min(head, pos1 - pos0);
  if (tid < head) {
    const int e = pos0 + tid;
    const int h = static_cast<int>(fast_div(p.wdiv, e));
    o[e] = value(h, e - h * W);
  }
  const int body0 = pos0 + head;
  const int nv = (pos1 - body0) / V;
  for (int k = tid; k < nv; k += nt) {
    const int e = body0 + k * V;
    int h = static_cast<int>(fast_div(p.wdiv, e));
    int w = e - h * W;
    RowTap<opmath_t> t = rt[h - h_lo];
    AlignedVec<scalar_t, V> v;
#pragma unroll
    for (int m = 0; m < V; ++m) {
      v.v[m] = static_cast<scalar_t>(t.l0 * U[t.u0 + w] + t.l1 * U[t.u1 + w]);
      if (++w == W && m + 1 < V) {  // the vector continues on the next row (never past the plane: e + V <= pos1)
        w = 0;
        t = rt[++h - h_lo];
      }
    }
    store_vec<scalar_t, V>(o + e, v);
  }
  for (int e = body0 + nv * V + tid; e < pos1; e += nt) {
    const int h = static_cast<int>(fast_div(p.wdiv, e));
    o[e] = value(h, e - h * W);
  }
}

// channels_last: out (N, H, W, Ctot) in memory. Blocks [0, copy_blocks) copy x into channels [X0, X0 + C) of every
// pixel (grid-stride over VEC-element vectors; both rows are contiguous). The other blocks loop over level tasks
// (n, h, l, chunk of 32 level channels): the two map rows i0(h), i1(h) of those 32 channels are gathered once into
// shared memory as [row][j][r] (the channel is fastest, as in the output), then each group of 32 / LV threads
// produces one pixel's 32 consecutive channels at a time, LV per thread (one 16-byte store when LV > 1: R, the level
// offset and Ctot multiples of LV), the pixel's column taps computed once for its LV channels.
template <typename scalar_t, int VEC, int LV>
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
      const int64_t pix = div_est(u, cv, p.rcv);  // units may pass 2^32: no 64-bit division (its call spilled)
      const int64_t k = u - pix * cv;
      store_vec<scalar_t, VEC>(out + pix * p.Ctot + p.X0 + k * VEC, load_vec<scalar_t, VEC>(x + pix * p.C + k * VEC));
    }
    return;
  }
  const int64_t lb = blockIdx.x - p.copy_blocks;
  const int64_t nlb = gridDim.x - p.copy_blocks;
  constexpr int TPP = kUpRChunk / LV;  // threads per pixel: LV consecutive level channels each
  const int cv = tid % TPP;
  const int slot = tid / TPP;
  const int slots = blockDim.x / TPP;
  const int L = p.lv.num;
  // tasks <= INT32_MAX (the launcher checks): 32-bit divisions.
  const uint32_t rchunks = static_cast<uint32_t>(p.rchunks), H32 = static_cast<uint32_t>(p.H);
  for (int64_t t = lb; t < p.tasks; t += nlb) {
    uint32_t q = static_cast<uint32_t>(t);
    const uint32_t q1 = q / rchunks;
    const int64_t rc = q - q1 * rchunks;
    const uint32_t q2 = q1 / static_cast<uint32_t>(L);
    const int l = static_cast<int>(q1 - q2 * static_cast<uint32_t>(L));
    const uint32_t n32 = q2 / H32;
    const int64_t h = q2 - n32 * H32;
    const int64_t n = n32;
    const int64_t b = p.lv.bins[l];
    const opmath_t sh = static_cast<opmath_t>(p.sh[l]);
    const opmath_t sw = static_cast<opmath_t>(p.sw[l]);
    const LinearTap<opmath_t> th = linear_tap<opmath_t>(sh, h, b, p.H, p.align);
    const int64_t r0c = rc * kUpRChunk + cv * LV;  // this thread's first level channel
    // levels[n, r, off_l + i*b + j] = lvn[r * S + i * b + j]
    const int64_t lvn = n * p.R * p.S + p.lv.offs[l];
    const bool staged = b <= p.stage_b;  // uniform over the block
    if (staged) {
      __syncthreads();  // the previous task's readers are done with st
      const int per_row = static_cast<int>(b) * kUpRChunk;  // b <= stage_b <= kUpStageMaxBin
      for (int e = tid; e < 2 * per_row; e += blockDim.x) {
        const int row = e >= per_row ? 1 : 0;
        const int j = (e - row * per_row) / kUpRChunk;
        const int64_t rr = rc * kUpRChunk + (e & (kUpRChunk - 1));
        const int64_t i = row == 0 ? th.i0 : th.i1;
        st[e] = rr < p.R ? load_level<opmath_t>(lv, p.lv_double, lvn + rr * p.S + i * b + j) : opmath_t(0);
      }
      __syncthreads();
    }
    if (r0c < p.R) {  // LV > 1: R % LV == 0, so all LV channels exist
      scalar_t* o = out + (n * p.H + h) * p.W * p.Ctot + p.L0 + l * p.R + r0c;
      for (int64_t w = slot; w < p.W; w += slots) {
        const LinearTap<opmath_t> tw = linear_tap<opmath_t>(sw, w, b, p.W, p.align);
        AlignedVec<scalar_t, LV> v;
#pragma unroll
        for (int m = 0; m < LV; ++m) {
          opmath_t v00, v01, v10, v11;
          if (staged) {
            const int c = cv * LV + m;
            v00 = st[tw.i0 * kUpRChunk + c];
            v01 = st[tw.i1 * kUpRChunk + c];
            v10 = st[(b + tw.i0) * kUpRChunk + c];
            v11 = st[(b + tw.i1) * kUpRChunk + c];
          } else {
            const int64_t m0 = lvn + (r0c + m) * p.S + th.i0 * b, m1 = lvn + (r0c + m) * p.S + th.i1 * b;
            v00 = load_level<opmath_t>(lv, p.lv_double, m0 + tw.i0);
            v01 = load_level<opmath_t>(lv, p.lv_double, m0 + tw.i1);
            v10 = load_level<opmath_t>(lv, p.lv_double, m1 + tw.i0);
            v11 = load_level<opmath_t>(lv, p.lv_double, m1 + tw.i1);
          }
          v.v[m] = static_cast<scalar_t>(bilinear<opmath_t>(th.l0, th.l1, tw.l0, tw.l1, v00, v01, v10, v11));
        }
        store_vec<scalar_t, LV>(o + w * p.Ctot, v);
      }
    }
  }
}

// Blocks of a grid-stride kernel: enough waves of resident blocks to hide the tail (resident blocks from the
// occupancy calculator, not a fixed multiple of the SM count).
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, int threads, int64_t smem) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, static_cast<size_t>(smem)));
  return static_cast<int64_t>(std::max(per_sm, 1)) * sm_count();
}

template <typename scalar_t>
void launch_upsample(const Tensor& x, const Tensor& levels, Tensor& out, UpParams& p, bool cl, int64_t N) {
  constexpr int V = 16 / sizeof(scalar_t);
  using opmath_t = at::opmath_type<scalar_t>;
  const char* op = "upsample_concat";
  const scalar_t* xp = p.copy ? x.const_data_ptr<scalar_t>() : nullptr;  // x undefined without the copy
  scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
  const void* lp = levels.const_data_ptr();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t HW = p.H * p.W;
  for (int l = 0; l < p.lv.num; ++l) {
    p.sh[l] = static_cast<double>(linear_scale<opmath_t>(p.lv.bins[l], p.H, p.align));
    p.sw[l] = static_cast<double>(linear_scale<opmath_t>(p.lv.bins[l], p.W, p.align));
  }
  if (!cl) {
    int64_t maxb = 1;
    for (int l = 0; l < p.lv.num; ++l) maxb = std::max(maxb, p.lv.bins[l]);
    p.E = std::min<int64_t>(HW, kUpChunk);
    const int64_t rows = std::min<int64_t>(p.H, p.E / p.W + 2);  // rows a chunk of E positions may touch
    const int64_t u_b = align16(maxb * p.W * static_cast<int64_t>(sizeof(opmath_t)));
    const int64_t smem = u_b + align16(rows * static_cast<int64_t>(sizeof(RowTap<opmath_t>)));
    if (smem <= kUpTabBytes && HW <= INT32_MAX / 2) {
      p.off_rt = static_cast<int>(u_b);
      p.chunks = ceil_div(HW, p.E);
      p.wdiv = make_fastdiv(static_cast<uint32_t>(p.W));
      p.copy_chunks = ceil_div(p.C * HW, kUpCopyChunk);
      const int64_t copy_blocks = p.copy ? N * p.copy_chunks : 0;
      const int64_t blocks = copy_blocks + N * p.lv.num * p.R * p.chunks;
      TORCH_CHECK(copy_blocks <= INT32_MAX && blocks <= INT32_MAX, op, ": N * C' * H * W = ", N * p.Ctot * HW,
                  " is too large for one launch");
      p.copy_blocks = static_cast<int>(copy_blocks);
      if (blocks > 0) {
        upsample_nchw_kernel<scalar_t><<<static_cast<unsigned>(blocks), kUpThreads, smem, stream>>>(xp, lp, op_, p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      return;
    }
    p.units = N * p.Ctot * HW;
    p.rimg = 1.0 / static_cast<double>(p.Ctot * HW);
    p.rhw = 1.0 / static_cast<double>(HW);
    p.rr = 1.0 / static_cast<double>(p.R);
    p.rw = 1.0 / static_cast<double>(p.W);
    auto kernel = upsample_nchw_generic_kernel<scalar_t, 1>;
    const int64_t blocks = std::max<int64_t>(
        1, std::min(ceil_div(p.units, kUpThreads), 4 * resident_blocks(kernel, kUpThreads, 0)));
    kernel<<<static_cast<unsigned>(blocks), kUpThreads, 0, stream>>>(xp, lp, op_, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const bool vec = (!p.copy || (aligned16(xp) && p.C % V == 0)) && aligned16(op_) && p.Ctot % V == 0 &&
                   p.X0 % V == 0;
  const int vw = vec ? V : 1;
  p.units = p.copy ? N * HW * p.C / vw : 0;
  p.rchunks = ceil_div(p.R, kUpRChunk);
  p.tasks = N * p.H * p.lv.num * p.rchunks;
  TORCH_CHECK(p.tasks <= INT32_MAX, op, ": N * H * levels * ceil(R / 32) = ", p.tasks, " is too large for one launch");
  p.rcv = 1.0 / static_cast<double>(std::max<int64_t>(1, p.C / vw));
  int64_t maxb = 1;
  for (int l = 0; l < p.lv.num; ++l) maxb = std::max(maxb, p.lv.bins[l]);
  p.stage_b = static_cast<int>(std::min<int64_t>(maxb, kUpStageMaxBin));
  const int64_t smem = 2 * p.stage_b * kUpRChunk * static_cast<int64_t>(sizeof(opmath_t));
  const bool lvec = aligned16(op_) && p.R % V == 0 && p.L0 % V == 0 && p.Ctot % V == 0;
  auto kernel = vec ? (lvec ? upsample_cl_kernel<scalar_t, V, V> : upsample_cl_kernel<scalar_t, V, 1>)
                    : (lvec ? upsample_cl_kernel<scalar_t, 1, V> : upsample_cl_kernel<scalar_t, 1, 1>);
  // Grid-stride loops: 4 waves of resident blocks for each part (copy, levels).
  const int64_t cap = 4 * resident_blocks(kernel, kUpThreads, smem);
  const int64_t copy_blocks = p.copy ? std::max<int64_t>(1, std::min(ceil_div(p.units, kUpThreads), cap)) : 0;
  const int64_t level_blocks = std::min(p.tasks, cap);
  p.copy_blocks = static_cast<int>(copy_blocks);
  const int64_t blocks = copy_blocks + level_blocks;
  if (blocks == 0) return;
  kernel<<<static_cast<unsigned>(blocks), kUpThreads, smem, stream>>>(xp, lp, op_, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

UpParams make_up_params(const LevelTable& lv, int64_t C, int64_t H, int64_t W, int64_t R, bool align_corners,
                        bool x_last, bool lv_double, bool copy) {
  UpParams p{};
  p.lv = lv;
  p.C = C;
  p.H = H;
  p.W = W;
  p.R = R;
  p.Ctot = C + lv.num * R;
  p.X0 = x_last ? lv.num * R : 0;
  p.L0 = x_last ? 0 : C;
  p.S = lv.offs[lv.num];
  p.align = align_corners;
  p.lv_double = lv_double;
  p.copy = copy;
  return p;
}

Tensor upsample_concat_cuda(const Tensor& x_in, const Tensor& levels_in, at::IntArrayRef bins, bool align_corners,
                            bool x_last) {
  checks::upsample_concat(x_in, levels_in, bins);
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
  UpParams p = make_up_params(lv, C, H, W, R, align_corners, x_last, levels.scalar_type() == at::kDouble, true);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upsample_concat_cuda",
                                  [&] { launch_upsample<scalar_t>(x, levels, out, p, cl, N); });
  return out;
}

}  // namespace

void upsample_levels_into(const Tensor& levels_in, Tensor& out, int64_t C, at::IntArrayRef bins, bool align_corners,
                          bool x_last) {
  const LevelTable lv = make_levels("ppm_forward", bins);
  const int64_t N = out.size(0), H = out.size(2), W = out.size(3);
  const int64_t R = levels_in.size(1);
  TORCH_INTERNAL_ASSERT(out.size(1) == C + lv.num * R && levels_in.size(0) == N);
  if (N == 0) return;
  const bool cl = !out.is_contiguous();  // the caller allocated out contiguous or channels_last
  const Tensor levels = levels_in.contiguous();
  UpParams p = make_up_params(lv, C, H, W, R, align_corners, x_last, levels.scalar_type() == at::kDouble, false);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "upsample_levels_into",
                                  [&] { launch_upsample<scalar_t>(Tensor(), levels, out, p, cl, N); });
}

}  // namespace pspnet_fast

TORCH_LIBRARY_IMPL(pspnet_fast, CUDA, m) {
  m.impl("upsample_concat", &pspnet_fast::upsample_concat_cuda);
}
