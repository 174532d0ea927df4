// CUDA backend of the ops declared in csrc/ops.cpp. Index and weight arithmetic comes from ppm_math.h so the
// results agree with F.adaptive_avg_pool2d and F.interpolate(mode="bilinear") to a few ulps. No atomics: every output
// is a fixed-order sum, so results are bitwise reproducible run to run.
//
//   pyramid_pool    x (N, C, H, W) -> (N, C, S)     one launch reads x once for all levels
//   ppm_reduce      (N, C, S) x (L, R, C) -> (N, R, S)  one launch, a grouped GEMM with one group per level
//   upsample_concat x, (N, R, S) -> (N, C + L*R, H, W) one launch writes the copy of x and every level
//   upsample_concat_backward  grad_out (N, C + L*R, H, W) -> grad_levels (N, R, S)  one launch, separable gather
//   pyramid_pool_backward     grad_pooled (N, C, S), grad_out -> grad_x (N, C, H, W)  one launch, per-element gather
//
// Pooling works on "segments": the disjoint intervals that all levels' bin boundaries cut an extent into. Each input
// element is added to exactly one (row segment, column segment) cell; every bin of every level is then a sum of a
// rectangle of cells. Segment tables depend only on bins, H and W, so the host computes them and passes them by value.
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

// Most segments one extent may be cut into. A level of b bins adds at most 2b boundaries, so an extent has at most
// 2 * sum(bins) - 1 segments (and at most H of them); the tables travel in a kernel argument (< 4 KiB in all).
constexpr int kMaxSegs = 256;
constexpr int kPoolThreads = 256;    // NCHW pooling block
constexpr int kPoolClThreads = 512;  // channels_last pooling block: channels x pixel groups
constexpr int kTileBytes = 16 * 1024;  // NCHW pooling: bytes of x staged in shared memory per step
constexpr int kUpThreads = 256;
constexpr int kUpRChunk = 32;        // channels_last upsampling: level channels per warp (one pixel per warp)
constexpr int kUpStageMaxBin = 64;   // channels_last upsampling: levels up to this b are staged in shared memory

// ------------------------------------------------------------------------------------------------------------------
// Device helpers
// ------------------------------------------------------------------------------------------------------------------

// Largest k in [0, n) with bnd[k] <= v (bnd ascending, bnd[0] <= v). For a bin boundary, the index of that boundary;
// for a position, the segment holding it.
__device__ __forceinline__ int seg_find(const int* bnd, int n, int64_t v) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (bnd[mid] <= v) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// ------------------------------------------------------------------------------------------------------------------
// pyramid_pool
// ------------------------------------------------------------------------------------------------------------------

struct PoolParams {
  LevelTable lv;
  int64_t planes;  // N * C
  int64_t C, H, W, S;
  int sumb;        // sum(bins): column bins of all levels, the middle index of the two-step bin combination
  int nsh, nsw;    // segments along H and W
  int bh[kMaxSegs + 1];  // row segment boundaries, bh[0] = 0, bh[nsh] = H
  int bw[kMaxSegs + 1];  // column segment boundaries, bw[0] = 0, bw[nsw] = W
  // NCHW plan: P planes per block, tiles of TH rows x TW columns (TW < W only when TH == 1 and P == 1).
  int P, TH, TW;
  // channels_last plan: tc channels per block (blockDim = tc * groups), cchunks = ceil(C / tc).
  int tc;
  int64_t cchunks;
  // Dynamic shared memory layout, byte offsets.
  int off_tile, off_r1, off_colsum, off_acc, off_tab;
};

// Steps shared by both layouts once the cells are complete: colsum[rs][jj] = sum of a column bin's cells in row
// segment rs (jj runs over every level's column bins), then out = sum of a row bin's colsum / count. Two short serial
// sums instead of one over the whole rectangle keep the tail short when a bin covers many cells (b = 1).
// Element e (a cell (rs, cs) or a colsum (rs, jj), flattened row-major) of group g sits at e * estride + g * gstride:
// channels_last keeps its tc channels fastest (estride = tc, gstride = 1), NCHW its planes apart (estride = 1).
template <typename acc_t>
__device__ __forceinline__ void pool_colsum(const PoolParams& p, const int* bw, const acc_t* cells, acc_t* colsum,
                                            int groups, int64_t estride, int64_t cells_gstride,
                                            int64_t colsum_gstride, int tid, int nt) {
  const int64_t per_group = static_cast<int64_t>(p.nsh) * p.sumb;
  const int64_t items = groups * per_group;
  for (int64_t it = tid; it < items; it += nt) {
    // Consecutive threads take consecutive words: group fastest when groups are interleaved (channels_last).
    int64_t g, q;
    if (estride != 1) {
      g = it % groups;
      q = it / groups;
    } else {
      g = it / per_group;
      q = it - g * per_group;
    }
    const int rs = static_cast<int>(q / p.sumb);
    const int jj = static_cast<int>(q - static_cast<int64_t>(rs) * p.sumb);
    const int l = level_of(p.lv.boff, p.lv.num, jj);
    const int64_t b = p.lv.bins[l];
    const int64_t j = jj - p.lv.boff[l];
    const int cs0 = seg_find(bw, p.nsw + 1, pool_start(j, b, p.W));
    const int cs1 = seg_find(bw, p.nsw + 1, pool_end(j, b, p.W));
    const acc_t* c = cells + static_cast<int64_t>(rs) * p.nsw * estride + g * cells_gstride;
    acc_t s = c[cs0 * estride];
    for (int cs = cs0 + 1; cs < cs1; ++cs) s += c[cs * estride];
    colsum[q * estride + g * colsum_gstride] = s;
  }
}

// Writes out[base(g) + col] for col in [0, S) and group g < ngroups (groups whose rows exist), rows contiguous.
template <typename acc_t>
__device__ __forceinline__ void pool_finish(const PoolParams& p, const int* bh, const acc_t* colsum, int ngroups,
                                            int64_t estride, int64_t gstride, acc_t* out, int tid, int nt) {
  const int64_t items = static_cast<int64_t>(ngroups) * p.S;
  for (int64_t it = tid; it < items; it += nt) {
    const int64_t g = it / p.S;
    const int64_t col = it - g * p.S;
    const int l = level_of(p.lv.offs, p.lv.num, col);
    const int64_t b = p.lv.bins[l];
    const int64_t k = col - p.lv.offs[l];
    const int64_t i = k / b;
    const int64_t j = k - i * b;
    const int64_t hs = pool_start(i, b, p.H), he = pool_end(i, b, p.H);
    const int64_t ws = pool_start(j, b, p.W), we = pool_end(j, b, p.W);
    const int rs0 = seg_find(bh, p.nsh + 1, hs);
    const int rs1 = seg_find(bh, p.nsh + 1, he);
    const int64_t jj = p.lv.boff[l] + j;
    const acc_t* c = colsum + jj * estride + g * gstride;
    const int64_t rstride = static_cast<int64_t>(p.sumb) * estride;
    acc_t s = c[rs0 * rstride];
    for (int rs = rs0 + 1; rs < rs1; ++rs) s += c[rs * rstride];
    out[it] = s / static_cast<acc_t>((he - hs) * (we - ws));
  }
}

// NCHW: x (planes, H, W) contiguous, out (planes, S). One block per P consecutive planes (P > 1 only for planes small
// enough that P of them fit one tile). The block streams its planes through shared memory in tiles that are
// contiguous in x (whole planes, a band of whole rows, or a piece of one row), so every global read is a coalesced
// 16-byte load and x is read exactly once for all levels:
//   phase 1, per tile: r1[p][h][cs] (+)= sum of the tile's part of column segment cs in row h;
//   phase 2, per row band: acc[p][rs][cs] (+)= sum over the band's rows of row segment rs of r1;
//   then colsum / finish combine cells into every level's bins.
// Each accumulator has one owner thread per step and steps are separated by barriers: a fixed summation order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPoolThreads)
    pool_nchw_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ out, const __grid_constant__ PoolParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  scalar_t* tile = reinterpret_cast<scalar_t*>(smem + p.off_tile);
  acc_t* r1 = reinterpret_cast<acc_t*>(smem + p.off_r1);
  acc_t* colsum = reinterpret_cast<acc_t*>(smem + p.off_colsum);  // aliases tile and r1, used after the last tile
  acc_t* acc = reinterpret_cast<acc_t*>(smem + p.off_acc);
  int* bh = reinterpret_cast<int*>(smem + p.off_tab);
  int* bw = bh + p.nsh + 1;

  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int64_t plane0 = static_cast<int64_t>(blockIdx.x) * p.P;
  const int np = static_cast<int>(min(static_cast<int64_t>(p.P), p.planes - plane0));
  const int H = static_cast<int>(p.H), W = static_cast<int>(p.W);
  const int nsh = p.nsh, nsw = p.nsw;
  for (int i = tid; i <= nsh; i += nt) bh[i] = p.bh[i];
  for (int i = tid; i <= nsw; i += nt) bw[i] = p.bw[i];

  for (int h0 = 0; h0 < H; h0 += p.TH) {
    const int th = min(p.TH, H - h0);
    for (int w0 = 0; w0 < W; w0 += p.TW) {
      const int tw = min(p.TW, W - w0);
      __syncthreads();  // tables written; the previous step is done with tile and r1
      const int64_t g0 = plane0 * p.H * p.W + static_cast<int64_t>(h0) * W + w0;
      stage_contiguous(x + g0, tile, np * th * tw, tid, nt);
      __syncthreads();
      // Phase 1: items (plane, row, column segment) in tile order; segment pieces are short serial shared reads.
      const int cs_lo = seg_find(bw, nsw + 1, w0);
      const int ncs = seg_find(bw, nsw + 1, w0 + tw - 1) + 1 - cs_lo;
      const int per_p = th * ncs;
      for (int it = tid; it < np * per_p; it += nt) {
        const int pp = it / per_p;
        const int rem = it - pp * per_p;
        const int hl = rem / ncs;
        const int cs = cs_lo + (rem - hl * ncs);
        const int wa = max(bw[cs], w0), wb = min(bw[cs + 1], w0 + tw);
        const scalar_t* row = tile + (pp * th + hl) * tw;  // column w of x sits at row[w - w0]
        acc_t s = static_cast<acc_t>(row[wa - w0]);
        for (int w = wa + 1; w < wb; ++w) s += static_cast<acc_t>(row[w - w0]);
        acc_t* d = r1 + (pp * th + hl) * nsw + cs;
        *d = bw[cs] >= w0 ? s : *d + s;  // first tile of this segment assigns, later ones add
      }
    }
    __syncthreads();
    // Phase 2: items (plane, row segment in this band, column segment).
    const int rs_lo = seg_find(bh, nsh + 1, h0);
    const int nrs = seg_find(bh, nsh + 1, h0 + th - 1) + 1 - rs_lo;
    const int per_p = nrs * nsw;
    for (int it = tid; it < np * per_p; it += nt) {
      const int pp = it / per_p;
      const int rem = it - pp * per_p;
      const int rs = rs_lo + rem / nsw;
      const int cs = rem - (rs - rs_lo) * nsw;
      const int ha = max(bh[rs], h0), hb = min(bh[rs + 1], h0 + th);
      const acc_t* c = r1 + pp * th * nsw + cs;  // row h of x sits at c[(h - h0) * nsw]
      acc_t s = c[(ha - h0) * nsw];
      for (int h = ha + 1; h < hb; ++h) s += c[(h - h0) * nsw];
      acc_t* d = acc + (pp * nsh + rs) * nsw + cs;
      *d = bh[rs] >= h0 ? s : *d + s;
    }
  }
  __syncthreads();
  const int64_t colsum_plane = static_cast<int64_t>(nsh) * p.sumb;
  pool_colsum(p, bw, acc, colsum, np, 1, static_cast<int64_t>(nsh) * nsw, colsum_plane, tid, nt);
  __syncthreads();
  // This block's out rows are contiguous: (plane0 + pp) * S + col.
  pool_finish(p, bh, colsum, np, 1, colsum_plane, out + plane0 * p.S, tid, nt);
}

// channels_last: x (N, H, W, C) in memory, out (N, C, S). One block per (n, chunk of tc channels): thread (g, c)
// with c fastest, so each pixel's tc channels are one coalesced 32-byte run. Cells (row segment x column segment,
// refined on the host so there are several per pixel group) are assigned to the groups round robin; each cell is
// summed in a register by the thread of its channel and stored to cells[cell][c]. Then the same two-step bin
// combination; out rows (n, c0 .. c0+tc) are one contiguous run of tc * S values.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPoolClThreads)
    pool_cl_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ out, const __grid_constant__ PoolParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  int* bh = reinterpret_cast<int*>(smem + p.off_tab);
  int* bw = bh + p.nsh + 1;
  acc_t* cells = reinterpret_cast<acc_t*>(smem + p.off_acc);
  acc_t* colsum = reinterpret_cast<acc_t*>(smem + p.off_colsum);

  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int tc = p.tc;
  const int cl = tid % tc;
  const int grp = tid / tc;
  const int groups = nt / tc;
  const int64_t n = blockIdx.x / p.cchunks;
  const int64_t c0 = (blockIdx.x - n * p.cchunks) * tc;
  const int64_t c = c0 + cl;
  const bool valid = c < p.C;
  const int nsh = p.nsh, nsw = p.nsw;
  for (int i = tid; i <= nsh; i += nt) bh[i] = p.bh[i];
  for (int i = tid; i <= nsw; i += nt) bw[i] = p.bw[i];
  __syncthreads();

  const int64_t C = p.C;
  const scalar_t* xn = x + n * p.H * p.W * C + c;
  const int ncells = nsh * nsw;
  for (int k = grp; k < ncells; k += groups) {
    const int rs = k / nsw;
    const int cs = k - rs * nsw;
    acc_t s = 0;
    if (valid) {
      const int wa = bw[cs];
      const int cw = bw[cs + 1] - wa;
      for (int h = bh[rs]; h < bh[rs + 1]; ++h) {
        const scalar_t* q = xn + (static_cast<int64_t>(h) * p.W + wa) * C;
        int w = 0;
        // Four independent loads in flight before their adds (memory-level parallelism per thread).
        for (; w + 4 <= cw; w += 4) {
          const acc_t v0 = static_cast<acc_t>(q[0]);
          const acc_t v1 = static_cast<acc_t>(q[C]);
          const acc_t v2 = static_cast<acc_t>(q[2 * C]);
          const acc_t v3 = static_cast<acc_t>(q[3 * C]);
          s += v0;
          s += v1;
          s += v2;
          s += v3;
          q += 4 * C;
        }
        for (; w < cw; ++w) {
          s += static_cast<acc_t>(q[0]);
          q += C;
        }
      }
    }
    cells[static_cast<int64_t>(k) * tc + cl] = s;
  }
  __syncthreads();
  pool_colsum(p, bw, cells, colsum, tc, tc, 1, 1, tid, nt);
  __syncthreads();
  const int nvalid = static_cast<int>(min(static_cast<int64_t>(tc), C - c0));
  pool_finish(p, bh, colsum, nvalid, tc, 1, out + (n * C + c0) * p.S, tid, nt);
}

// Sorted distinct bin boundaries of all levels along an extent of n.
std::vector<int> segment_bounds(const LevelTable& lv, int64_t n) {
  std::vector<int64_t> v;
  for (int l = 0; l < lv.num; ++l) {
    const int64_t b = lv.bins[l];
    for (int64_t i = 0; i < b; ++i) {
      v.push_back(pool_start(i, b, n));
      v.push_back(pool_end(i, b, n));
    }
  }
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return std::vector<int>(v.begin(), v.end());
}

// Cuts every segment longer than k into ceil(len / k) near-equal pieces (bin boundaries stay boundaries).
std::vector<int> refine_bounds(const std::vector<int>& bnd, int64_t k) {
  std::vector<int> out{bnd[0]};
  for (size_t s = 0; s + 1 < bnd.size(); ++s) {
    const int64_t len = bnd[s + 1] - bnd[s];
    const int64_t pieces = ceil_div(len, k);
    for (int64_t q = 1; q <= pieces; ++q) out.push_back(static_cast<int>(bnd[s] + len * q / pieces));
  }
  return out;
}

int64_t refined_count(const std::vector<int>& bnd, int64_t k) {
  int64_t c = 0;
  for (size_t s = 0; s + 1 < bnd.size(); ++s) c += ceil_div(bnd[s + 1] - bnd[s], k);
  return c;
}

void set_bounds(PoolParams& p, const std::vector<int>& bh, const std::vector<int>& bw) {
  p.nsh = static_cast<int>(bh.size()) - 1;
  p.nsw = static_cast<int>(bw.size()) - 1;
  std::copy(bh.begin(), bh.end(), p.bh);
  std::copy(bw.begin(), bw.end(), p.bw);
}

template <typename scalar_t, typename acc_t>
void launch_pool_nchw(const Tensor& x, Tensor& out, PoolParams& p, const std::vector<int>& bh,
                      const std::vector<int>& bw) {
  TORCH_CHECK(static_cast<int>(bh.size()) - 1 <= kMaxSegs && static_cast<int>(bw.size()) - 1 <= kMaxSegs,
              "pyramid_pool: the bins cut H into ", bh.size() - 1, " and W into ", bw.size() - 1,
              " segments; at most ", kMaxSegs, " per dimension are supported (use fewer or smaller bins)");
  set_bounds(p, bh, bw);
  const int64_t esz = sizeof(scalar_t), asz = sizeof(acc_t);
  const int64_t E = kTileBytes / esz;  // tile elements
  p.TW = static_cast<int>(std::min<int64_t>(p.W, E));
  p.TH = p.TW == p.W ? static_cast<int>(std::min<int64_t>(p.H, E / p.W)) : 1;
  const int64_t nsh = p.nsh, nsw = p.nsw;
  // Several planes per block only when whole planes fit a tile; keep about a thousand blocks or more.
  int64_t P = (p.TH == p.H && p.TW == p.W) ? std::max<int64_t>(1, E / (p.H * p.W)) : 1;
  P = std::min<int64_t>(P, std::max<int64_t>(1, ceil_div(p.planes, 1024)));
  auto layout = [&](int64_t planes_per_block) {
    const int64_t tile_b = align16(planes_per_block * p.TH * p.TW * esz);
    const int64_t r1_b = align16(planes_per_block * p.TH * nsw * asz);
    const int64_t colsum_b = align16(planes_per_block * nsh * p.sumb * asz);
    const int64_t acc_b = align16(planes_per_block * nsh * nsw * asz);
    const int64_t region0 = std::max(tile_b + r1_b, colsum_b);
    p.off_tile = 0;
    p.off_r1 = static_cast<int>(std::min<int64_t>(tile_b, INT32_MAX));
    p.off_colsum = 0;
    p.off_acc = static_cast<int>(std::min<int64_t>(region0, INT32_MAX));
    p.off_tab = static_cast<int>(std::min<int64_t>(region0 + acc_b, INT32_MAX));
    return region0 + acc_b + (nsh + nsw + 2) * 4;
  };
  int64_t smem = layout(P);
  while (P > 1 && smem > kDefaultSmem) smem = layout(--P);
  p.P = static_cast<int>(P);
  const int64_t optin = smem_optin();
  TORCH_CHECK(smem <= optin, "pyramid_pool: ", nsh, " x ", nsw, " segments need ", smem,
              " bytes of shared memory per block, the device allows ", optin, " (use fewer or smaller bins)");
  const int64_t blocks = ceil_div(p.planes, P);
  TORCH_CHECK(blocks <= INT32_MAX, "pyramid_pool: N * C = ", p.planes, " is too large for one launch");
  auto kernel = pool_nchw_kernel<scalar_t, acc_t>;
  allow_smem(kernel, smem);
  kernel<<<static_cast<unsigned>(blocks), kPoolThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<acc_t>(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
void launch_pool_cl(const Tensor& x, Tensor& out, PoolParams& p, const std::vector<int>& bh,
                    const std::vector<int>& bw) {
  const int64_t asz = sizeof(acc_t);
  // 32 bytes of channels per pixel group: one full sector per load.
  int64_t tc0 = std::max<int64_t>(1, 32 / static_cast<int64_t>(sizeof(scalar_t)));
  int64_t pow2c = 1;
  while (pow2c < p.C) pow2c *= 2;
  tc0 = std::min(tc0, pow2c);
  auto smem_for = [&](int64_t nh, int64_t nw, int64_t tc) {
    return align16((nh + nw + 2) * 4) + align16(nh * nw * tc * asz) + align16(nh * p.sumb * tc * asz);
  };
  int64_t maxlen = 1;
  for (size_t s = 0; s + 1 < bh.size(); ++s) maxlen = std::max<int64_t>(maxlen, bh[s + 1] - bh[s]);
  for (size_t s = 0; s + 1 < bw.size(); ++s) maxlen = std::max<int64_t>(maxlen, bw[s + 1] - bw[s]);
  const int64_t optin = smem_optin();

  // Pick tc and the refinement (pieces of at most k rows/columns): the largest k that still gives ~4 cells per pixel
  // group (load balance across groups, fewest cells to combine), made larger if needed to fit shared memory. Prefer
  // the 48 KiB default, then fewer channels per block, then the opt-in limit.
  int64_t tc = 0, k = 0;
  for (int64_t budget : {kDefaultSmem, optin}) {
    for (int64_t t = tc0; t >= 1 && tc == 0; t /= 2) {
      const int64_t target = 4 * (kPoolClThreads / t);
      auto fits = [&](int64_t kk) {
        const int64_t ch = refined_count(bh, kk), cw = refined_count(bw, kk);
        return ch <= kMaxSegs && cw <= kMaxSegs && smem_for(ch, cw, t) <= budget;
      };
      auto enough = [&](int64_t kk) { return refined_count(bh, kk) * refined_count(bw, kk) >= target; };
      if (!fits(maxlen)) continue;  // even the unrefined segments do not fit with t channels
      // Largest k in [1, maxlen] with enough cells (1 if none has).
      int64_t lo = 1, hi = maxlen;
      while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (enough(mid)) {
          lo = mid;
        } else {
          hi = mid - 1;
        }
      }
      // Smallest k >= lo that fits (fits(maxlen) holds).
      int64_t a = lo, z = maxlen;
      while (a < z) {
        const int64_t mid = (a + z) / 2;
        if (fits(mid)) {
          z = mid;
        } else {
          a = mid + 1;
        }
      }
      tc = t;
      k = a;
    }
    if (tc != 0) break;
  }
  TORCH_CHECK(tc != 0, "pyramid_pool: the bins cut H into ", bh.size() - 1, " and W into ", bw.size() - 1,
              " segments; channels_last pooling supports at most ", kMaxSegs,
              " per dimension within the device's shared memory (use fewer or smaller bins)");
  set_bounds(p, refine_bounds(bh, k), refine_bounds(bw, k));
  p.tc = static_cast<int>(tc);
  p.cchunks = ceil_div(p.C, tc);
  const int64_t nsh = p.nsh, nsw = p.nsw;
  p.off_tab = 0;
  p.off_acc = static_cast<int>(align16((nsh + nsw + 2) * 4));
  p.off_colsum = static_cast<int>(p.off_acc + align16(nsh * nsw * tc * asz));
  p.off_tile = p.off_r1 = 0;  // unused
  const int64_t smem = smem_for(nsh, nsw, tc);
  const int64_t blocks = (p.planes / p.C) * p.cchunks;
  TORCH_CHECK(blocks <= INT32_MAX, "pyramid_pool: N * C = ", p.planes, " is too large for one launch");
  auto kernel = pool_cl_kernel<scalar_t, acc_t>;
  allow_smem(kernel, smem);
  kernel<<<static_cast<unsigned>(blocks), kPoolClThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<acc_t>(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor pyramid_pool_cuda(const Tensor& x_in, at::IntArrayRef bins) {
  check_x("pyramid_pool", x_in);
  const LevelTable lv = make_levels("pyramid_pool", bins);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const auto out_type = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor out = at::empty({N, C, lv.offs[lv.num]}, x_in.options().dtype(out_type));
  if (N == 0) return out;
  const bool cl = use_channels_last(x_in);
  const Tensor x = cl ? x_in : x_in.contiguous();

  PoolParams p{};
  p.lv = lv;
  p.planes = N * C;
  p.C = C;
  p.H = H;
  p.W = W;
  p.S = lv.offs[lv.num];
  TORCH_CHECK(lv.boff[lv.num] <= INT32_MAX, "pyramid_pool: sum(bins) too large, got ", bins);
  p.sumb = static_cast<int>(lv.boff[lv.num]);
  const std::vector<int> bh = segment_bounds(lv, H), bw = segment_bounds(lv, W);
  // Every level contributes 0 and the extent, and at most 2b boundaries.
  TORCH_INTERNAL_ASSERT(bh.front() == 0 && bh.back() == H && bw.front() == 0 && bw.back() == W);
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(bh.size()) - 1 <= 2 * lv.boff[lv.num] - 1 &&
                        static_cast<int64_t>(bw.size()) - 1 <= 2 * lv.boff[lv.num] - 1);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pyramid_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (cl) {
      launch_pool_cl<scalar_t, acc_t>(x, out, p, bh, bw);
    } else {
      launch_pool_nchw<scalar_t, acc_t>(x, out, p, bh, bw);
    }
  });
  return out;
}

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

template <typename opmath_t>
__device__ __forceinline__ opmath_t load_level(const void* lv, bool dbl, int64_t i) {
  return dbl ? static_cast<opmath_t>(__ldg(static_cast<const double*>(lv) + i))
             : static_cast<opmath_t>(__ldg(static_cast<const float*>(lv) + i));
}

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

// ------------------------------------------------------------------------------------------------------------------
// upsample_concat_backward
// ------------------------------------------------------------------------------------------------------------------
//
// grad_levels[n, r, off_l + i*b + j] = sum_{h,w} Ah[h,i] Aw[w,j] g[n, C + l*R + r, h, w], Ah/Aw the bilinear
// resampling matrices (interp_matrix in pspnet_fast/ops.py), computed separably by owners, never by atomics:
//   T[h][j] = sum over the columns w whose taps reach j of Aw[w,j] g[h,w]    (owner: one thread per (h, j))
//   G[i][j] = sum over the rows h whose taps reach i of Ah[h,i] T[h][j]      (owner: one thread per (i, j))
// The rows whose taps reach bin i form one range [lo_i, hi_i) (taps are monotone in h), found per block by binary
// search, so each owner loops over its rows only. T covers a band of rows at a time; G of a bin whose rows span
// several bands is assigned by the first band and added to by the next ones, in band order (fixed, barrier-ordered).

constexpr int kUbThreads = 256;
constexpr int64_t kUbClTBytes = 32 * 1024;  // channels_last: shared memory for a band of T

struct UpBwdParams {
  LevelTable lv;
  int64_t C, H, W, R, Ctot, S;
  bool align;
  int64_t rblocks;     // blocks per (n, level): ceil(R / P)
  int P;               // level channels per block (NCHW: planes; channels_last: channels across threads)
  int TH, TW;          // rows of T per band; NCHW: columns of a staged tile (TW < W only when TH == 1)
  int off_t, off_tab;  // dynamic shared memory byte offsets of T and of the range tables (the NCHW tile sits at 0)
};

// tab[0..b) = lo, tab[b..2b) = hi of each row bin over H; tab[2b..3b), tab[3b..4b) the same for columns over W.
template <typename acc_t>
__device__ __forceinline__ void tap_ranges(const UpBwdParams& p, int64_t b, int* tab, int tid, int nt) {
  const acc_t sh = linear_scale<acc_t>(b, p.H, p.align);
  const acc_t sw = linear_scale<acc_t>(b, p.W, p.align);
  for (int64_t k = tid; k < 4 * b; k += nt) {
    const int64_t q = div_nn(k, b);
    const bool col = q >= 2;
    tab[k] = tap_bound<acc_t>(col ? sw : sh, k - q * b, b, col ? p.W : p.H, p.align, (q & 1) != 0);
  }
}

// First k in [0, n) with a[k] > v (a non-decreasing); n if none.
__device__ __forceinline__ int first_above(const int* a, int n, int64_t v) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (a[mid] > v) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// NCHW: grad_out (N, Ctot, H, W) contiguous. One block per (n, level, P consecutive level channels): P planes of
// one level, consecutive in memory. The block streams them through shared memory in tiles contiguous in grad_out
// (whole planes, a band of whole rows, or a piece of one row; as pool_nchw_kernel), each read once with 16-byte
// loads. Per tile, T[p][h][j] (+)= the tile's part of column bin j's sum (first tile of j assigns); per band,
// G[p][i][j] (+)= the band's part of row bin i's sum, in global memory (first band of i assigns).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kUbThreads)
    up_bwd_nchw_kernel(const scalar_t* __restrict__ g, acc_t* __restrict__ out, const __grid_constant__ UpBwdParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  scalar_t* tile = reinterpret_cast<scalar_t*>(smem);
  acc_t* T = reinterpret_cast<acc_t*>(smem + p.off_t);  // T[(pp * TH + hl) * b + j]
  int* tab = reinterpret_cast<int*>(smem + p.off_tab);

  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int L = p.lv.num;
  const int64_t bid = blockIdx.x;
  const int64_t nl = div_nn(bid, p.rblocks);
  const int64_t r0 = (bid - nl * p.rblocks) * p.P;
  const int64_t n = div_nn(nl, L);
  const int l = static_cast<int>(nl - n * L);
  const int np = static_cast<int>(min(static_cast<int64_t>(p.P), p.R - r0));
  const int b = static_cast<int>(p.lv.bins[l]);
  const int H = static_cast<int>(p.H), W = static_cast<int>(p.W);
  const int TH = p.TH;
  const acc_t sh = linear_scale<acc_t>(b, p.H, p.align);
  const acc_t sw = linear_scale<acc_t>(b, p.W, p.align);
  tap_ranges<acc_t>(p, b, tab, tid, nt);
  const int* rlo = tab;
  const int* rhi = tab + b;
  const int* clo = tab + 2 * b;
  const int* chi = tab + 3 * b;
  __syncthreads();

  acc_t* o = out + (n * p.R + r0) * p.S + p.lv.offs[l];  // plane pp's bins at o[pp * S + i * b + j]
  const int64_t bb = static_cast<int64_t>(b) * b;
  // Bins no tap reaches (b > H or b > W) get a zero gradient: whole rows of G here, columns through T's zeros
  // (phase 1 never writes an empty column bin).
  for (int64_t it = tid; it < np * bb; it += nt) {
    const int64_t pp = div_nn(it, bb);
    const int64_t k = it - pp * bb;
    const int64_t i = div_nn(k, b);
    if (rlo[i] >= rhi[i]) o[pp * p.S + k] = 0;
  }
  for (int64_t it = tid; it < static_cast<int64_t>(np) * TH * b; it += nt) {
    const int64_t j = it - div_nn(it, b) * b;
    if (clo[j] >= chi[j]) T[it] = 0;
  }

  const scalar_t* gp = g + (n * p.Ctot + p.C + l * p.R + r0) * p.H * p.W;
  for (int h0 = 0; h0 < H; h0 += TH) {
    const int th = min(TH, H - h0);
    for (int w0 = 0; w0 < W; w0 += p.TW) {
      const int tw = min(p.TW, W - w0);
      __syncthreads();  // zeros and tables written; the previous step is done with tile and T
      stage_contiguous(gp + static_cast<int64_t>(h0) * W + w0, tile, np * th * tw, tid, nt);
      __syncthreads();
      // Phase 1: items (plane, row, column bin reaching this tile), column bin fastest.
      const int j0 = first_above(chi, b, w0);
      const int nj = first_above(clo, b, w0 + tw - 1) - j0;
      for (int64_t it = tid; it < static_cast<int64_t>(np) * th * nj; it += nt) {
        const int64_t pr = div_nn(it, nj);  // pp * th + hl
        const int j = j0 + static_cast<int>(it - pr * nj);
        const int wa = max(clo[j], w0), wb = min(chi[j], w0 + tw);
        if (wa >= wb) continue;  // an empty column bin
        const scalar_t* row = tile + pr * tw;  // column w at row[w - w0]
        acc_t s = 0;
        for (int w = wa; w < wb; ++w) {
          s += tap_weight<acc_t>(sw, w, j, b, p.W, p.align) * static_cast<acc_t>(row[w - w0]);
        }
        const int64_t pp = div_nn(pr, th);
        acc_t* d = T + (pp * TH + (pr - pp * th)) * b + j;
        *d = clo[j] >= w0 ? s : *d + s;  // the first tile of this column bin assigns, later ones add
      }
    }
    __syncthreads();
    // Phase 2: items (plane, row bin reaching this band, column bin), column bin fastest.
    const int i0 = first_above(rhi, b, h0);
    const int64_t ni = first_above(rlo, b, h0 + th - 1) - i0;
    for (int64_t it = tid; it < np * ni * b; it += nt) {
      const int64_t q = div_nn(it, b);
      const int j = static_cast<int>(it - q * b);
      const int64_t pp = div_nn(q, ni);
      const int i = i0 + static_cast<int>(q - pp * ni);
      const int ha = max(rlo[i], h0), hb = min(rhi[i], h0 + th);
      if (ha >= hb) continue;  // an empty row bin, zeroed above
      const acc_t* t = T + pp * TH * b + j;  // row h at t[(h - h0) * b]
      acc_t s = 0;
      for (int h = ha; h < hb; ++h) {
        s += tap_weight<acc_t>(sh, h, i, b, p.H, p.align) * t[static_cast<int64_t>(h - h0) * b];
      }
      acc_t* d = o + pp * p.S + static_cast<int64_t>(i) * b + j;
      *d = rlo[i] >= h0 ? s : *d + s;  // the first band of this row bin assigns, later ones add (barrier-ordered)
    }
  }
}

// channels_last: grad_out (N, H, W, Ctot) in memory. One block per (n, level, chunk of tc = P level channels);
// thread (group, c) with c fastest, so every load of a pixel's tc channels is one coalesced run. Per band of TH
// rows, the groups take the (row, column bin) items of T round robin and read grad_out directly (a column bin's
// columns are contiguous pixels; only the one or two columns shared with a neighbour bin are read twice), then the
// (row bin, column bin) items of G. T[(hl * b + j) * tc + c] in shared memory.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kUbThreads)
    up_bwd_cl_kernel(const scalar_t* __restrict__ g, acc_t* __restrict__ out, const __grid_constant__ UpBwdParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* T = reinterpret_cast<acc_t*>(smem + p.off_t);
  int* tab = reinterpret_cast<int*>(smem + p.off_tab);

  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int tc = p.P;
  const int cl = tid % tc;
  const int grp = tid / tc;
  const int groups = nt / tc;
  const int L = p.lv.num;
  const int64_t bid = blockIdx.x;
  const int64_t nl = div_nn(bid, p.rblocks);
  const int64_t r = (bid - nl * p.rblocks) * tc + cl;
  const bool valid = r < p.R;
  const int64_t n = div_nn(nl, L);
  const int l = static_cast<int>(nl - n * L);
  const int b = static_cast<int>(p.lv.bins[l]);
  const int H = static_cast<int>(p.H);
  const int TH = p.TH;
  const acc_t sh = linear_scale<acc_t>(b, p.H, p.align);
  const acc_t sw = linear_scale<acc_t>(b, p.W, p.align);
  tap_ranges<acc_t>(p, b, tab, tid, nt);
  const int* rlo = tab;
  const int* rhi = tab + b;
  const int* clo = tab + 2 * b;
  const int* chi = tab + 3 * b;
  __syncthreads();

  acc_t* o = out + (n * p.R + r) * p.S + p.lv.offs[l];  // only dereferenced when valid
  const int64_t bb = static_cast<int64_t>(b) * b;
  if (valid) {
    for (int64_t k = grp; k < bb; k += groups) {
      const int64_t i = div_nn(k, b);
      if (rlo[i] >= rhi[i]) o[k] = 0;
    }
  }
  for (int64_t it = tid; it < static_cast<int64_t>(TH) * b * tc; it += nt) {
    const int64_t e = div_nn(it, tc);
    const int64_t j = e - div_nn(e, b) * b;
    if (clo[j] >= chi[j]) T[it] = 0;
  }

  const int64_t Ctot = p.Ctot;
  const scalar_t* gn = g + n * p.H * p.W * Ctot + p.C + l * p.R + r;  // pixel (h, w) at gn[(h * W + w) * Ctot]
  for (int h0 = 0; h0 < H; h0 += TH) {
    const int th = min(TH, H - h0);
    __syncthreads();  // zeros and tables written; the previous band's phase 2 is done with T
    for (int64_t it = grp; it < static_cast<int64_t>(th) * b; it += groups) {
      const int64_t hl = div_nn(it, b);
      const int j = static_cast<int>(it - hl * b);
      const int wa = clo[j], wb = chi[j];
      if (wa >= wb) continue;  // an empty column bin
      acc_t s = 0;
      if (valid) {
        const scalar_t* q = gn + ((h0 + hl) * p.W + wa) * Ctot;
        int w = wa;
        // Four independent loads in flight before their multiply-adds.
        for (; w + 4 <= wb; w += 4) {
          const acc_t v0 = static_cast<acc_t>(q[0]);
          const acc_t v1 = static_cast<acc_t>(q[Ctot]);
          const acc_t v2 = static_cast<acc_t>(q[2 * Ctot]);
          const acc_t v3 = static_cast<acc_t>(q[3 * Ctot]);
          s += tap_weight<acc_t>(sw, w, j, b, p.W, p.align) * v0;
          s += tap_weight<acc_t>(sw, w + 1, j, b, p.W, p.align) * v1;
          s += tap_weight<acc_t>(sw, w + 2, j, b, p.W, p.align) * v2;
          s += tap_weight<acc_t>(sw, w + 3, j, b, p.W, p.align) * v3;
          q += 4 * Ctot;
        }
        for (; w < wb; ++w) {
          s += tap_weight<acc_t>(sw, w, j, b, p.W, p.align) * static_cast<acc_t>(q[0]);
          q += Ctot;
        }
      }
      T[it * tc + cl] = s;
    }
    __syncthreads();
    const int i0 = first_above(rhi, b, h0);
    const int64_t ni = first_above(rlo, b, h0 + th - 1) - i0;
    for (int64_t it = grp; it < ni * b; it += groups) {
      const int64_t q = div_nn(it, b);
      const int j = static_cast<int>(it - q * b);
      const int i = i0 + static_cast<int>(q);
      const int ha = max(rlo[i], h0), hb = min(rhi[i], h0 + th);
      if (ha >= hb) continue;  // an empty row bin, zeroed above
      const acc_t* t = T + static_cast<int64_t>(j) * tc + cl;  // row h at t[(h - h0) * b * tc]
      acc_t s = 0;
      for (int h = ha; h < hb; ++h) {
        s += tap_weight<acc_t>(sh, h, i, b, p.H, p.align) * t[static_cast<int64_t>(h - h0) * b * tc];
      }
      if (valid) {
        acc_t* d = o + static_cast<int64_t>(i) * b + j;
        *d = rlo[i] >= h0 ? s : *d + s;
      }
    }
  }
}

template <typename scalar_t>
void launch_up_bwd(const Tensor& g, Tensor& out, UpBwdParams& p, bool cl, int64_t N) {
  using acc_t = at::opmath_type<scalar_t>;
  const char* op = "upsample_concat_backward";
  const int64_t esz = sizeof(scalar_t), asz = sizeof(acc_t);
  const int64_t L = p.lv.num;
  int64_t maxb = 1;
  for (int l = 0; l < p.lv.num; ++l) maxb = std::max(maxb, p.lv.bins[l]);
  const int64_t tab_b = align16(4 * maxb * 4);
  const int64_t optin = smem_optin();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  int64_t smem = 0;
  if (!cl) {
    const int64_t E = kTileBytes / esz;  // tile elements
    const int64_t TW = std::min<int64_t>(p.W, E);
    int64_t TH = TW == p.W ? std::min<int64_t>(p.H, E / p.W) : 1;
    // Several planes per block only when whole planes fit a tile; keep about a thousand blocks or more.
    int64_t P = (TH == p.H && TW == p.W) ? std::max<int64_t>(1, E / (p.H * p.W)) : 1;
    P = std::min(P, p.R);
    P = std::min<int64_t>(P, std::max<int64_t>(1, ceil_div(N * L * p.R, 1024)));
    auto layout = [&](int64_t planes, int64_t rows) {
      const int64_t tile_b = align16(planes * rows * TW * esz);
      const int64_t t_b = align16(planes * rows * maxb * asz);
      p.off_t = static_cast<int>(std::min<int64_t>(tile_b, INT32_MAX));
      p.off_tab = static_cast<int>(std::min<int64_t>(tile_b + t_b, INT32_MAX));
      return tile_b + t_b + tab_b;
    };
    smem = layout(P, TH);
    while (smem > kDefaultSmem && P > 1) smem = layout(--P, TH);
    while (smem > kDefaultSmem && TH > 1) smem = layout(P, TH = (TH + 1) / 2);
    TORCH_CHECK(smem <= optin, op, ": bins up to ", maxb, " need ", smem,
                " bytes of shared memory per block, the device allows ", optin, " (use smaller bins)");
    p.P = static_cast<int>(P);
    p.TH = static_cast<int>(TH);
    p.TW = static_cast<int>(TW);
  } else {
    int64_t tc = 1;
    while (tc < p.R && tc < 32) tc *= 2;
    // Fewer channels per block when there would be too few blocks, down to one 32-byte sector per pixel.
    const int64_t sms = sm_count();
    while (tc * esz > 32 && N * L * ceil_div(p.R, tc) < 2 * sms) tc /= 2;
    auto rows_for = [&](int64_t t) {
      return std::max<int64_t>(1, std::min<int64_t>(p.H, kUbClTBytes / (maxb * t * asz)));
    };
    auto layout = [&](int64_t t, int64_t rows) {
      const int64_t t_b = align16(rows * maxb * t * asz);
      p.off_t = 0;
      p.off_tab = static_cast<int>(std::min<int64_t>(t_b, INT32_MAX));
      return t_b + tab_b;
    };
    smem = layout(tc, rows_for(tc));
    while (smem > kDefaultSmem && tc > 1) {
      tc /= 2;
      smem = layout(tc, rows_for(tc));
    }
    TORCH_CHECK(smem <= optin, op, ": bins up to ", maxb, " need ", smem,
                " bytes of shared memory per block, the device allows ", optin, " (use smaller bins)");
    p.P = static_cast<int>(tc);
    p.TH = static_cast<int>(rows_for(tc));
    p.TW = static_cast<int>(p.W);
  }
  p.rblocks = ceil_div(p.R, p.P);
  const int64_t blocks = N * L * p.rblocks;
  TORCH_CHECK(blocks <= INT32_MAX, op, ": N * levels * R = ", N * L * p.R, " is too large for one launch");
  auto kernel = cl ? up_bwd_cl_kernel<scalar_t, acc_t> : up_bwd_nchw_kernel<scalar_t, acc_t>;
  allow_smem(kernel, smem);
  kernel<<<static_cast<unsigned>(blocks), kUbThreads, smem, stream>>>(g.const_data_ptr<scalar_t>(),
                                                                     out.mutable_data_ptr<acc_t>(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor upsample_concat_backward_cuda(const Tensor& grad_in, int64_t in_channels, at::IntArrayRef bins,
                                     bool align_corners, bool x_last) {
  const char* op = "upsample_concat_backward";
  TORCH_CHECK(!x_last, op, ": x_last=True is not implemented in the CUDA kernels",
              " (pspnet_fast/_order.py handles that layout for CUDA tensors)");
  check_x(op, grad_in, "grad_out");
  const LevelTable lv = make_levels(op, bins);
  const int64_t N = grad_in.size(0), Ctot = grad_in.size(1), H = grad_in.size(2), W = grad_in.size(3);
  const int64_t L = lv.num;
  TORCH_CHECK(in_channels >= 0 && in_channels < Ctot, op, ": expected 0 <= in_channels < grad_out.size(1) = ", Ctot,
              ", got in_channels = ", in_channels);
  TORCH_CHECK((Ctot - in_channels) % L == 0, op, ": grad_out has ", Ctot - in_channels,
              " level channels after in_channels = ", in_channels, ", not a multiple of the ", L, " levels of bins ",
              bins);
  const int64_t R = (Ctot - in_channels) / L;  // >= 1
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const auto out_type = grad_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor out = at::empty({N, R, lv.offs[lv.num]}, grad_in.options().dtype(out_type));
  if (N == 0) return out;
  const bool cl = use_channels_last(grad_in);
  const Tensor g = cl ? grad_in : grad_in.contiguous();

  UpBwdParams p{};
  p.lv = lv;
  p.C = in_channels;
  p.H = H;
  p.W = W;
  p.R = R;
  p.Ctot = Ctot;
  p.S = lv.offs[lv.num];
  p.align = align_corners;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "upsample_concat_backward_cuda",
                                  [&] { launch_up_bwd<scalar_t>(g, out, p, cl, N); });
  return out;
}

// ------------------------------------------------------------------------------------------------------------------
// pyramid_pool_backward
// ------------------------------------------------------------------------------------------------------------------
//
// grad_x[n,c,h,w] = grad_out[n,c,h,w] + sum over levels, row bins i containing h and column bins j containing w of
// grad_pooled[n,c,off_l + i*b + j] / kh_i / kw_j: a gather, every output element computed by one thread. A block
// first stages its planes' (channels') grad_pooled, divided by the bin sizes, in shared memory (q), and tables of the
// bins containing each column and each of its rows (per level, first | last << 16); elements then take a few
// shared-memory reads each. Where q or the tables would not fit, a GENERIC kernel (one element per thread) computes
// them per use instead.

constexpr int kPbThreads = 256;
constexpr int64_t kPbChunk = 4096;  // output elements per block

struct PoolBwdParams {
  LevelTable lv;
  int64_t planes, C, C2, H, W, S;
  bool gp_double;  // grad_pooled is float64 (else float32); converted to acc_t on load
  bool stage_q;    // q in shared memory
  bool tabs;       // bin tables in shared memory
  int P;           // NCHW: planes per block (chunks == 1 when P > 1)
  int64_t E;       // positions h * W + w per chunk
  int64_t chunks;  // chunks per plane (NCHW) or per image (channels_last)
  int tc;          // channels_last: channels per block
  int64_t cchunks; // channels_last: ceil(C / tc)
  int rows;        // row table entries per level
  int off_col, off_row;  // dynamic shared memory byte offsets (q at 0)
};

// Bins of a level of b that contain index x of an extent n (pool_start <= x < pool_end): first = floor(x*b / n),
// last = floor(((x + 1) * b - 1) / n), packed as first | last << 16 (b <= kMaxBin).
__device__ __forceinline__ uint32_t pool_bins_of(int64_t x, int64_t b, int64_t n) {
  const int64_t first = div_nn(x * b, n);
  const int64_t last = div_nn((x + 1) * b - 1, n);
  return static_cast<uint32_t>(first) | (static_cast<uint32_t>(last) << 16);
}

// pool_end(i, k, n) - pool_start(i, k, n) through the 32-bit division fast path.
__device__ __forceinline__ int64_t pool_len(int64_t i, int64_t k, int64_t n) {
  return div_nn((i + 1) * n + k - 1, k) - div_nn(i * n, k);
}

// grad_pooled[idx] / kh_i / kw_j in acc_t (the forward's sum / kh / kw, transposed).
template <typename acc_t>
__device__ __forceinline__ acc_t pool_share(const PoolBwdParams& p, const void* gp, int64_t idx, int64_t b,
                                            int64_t i, int64_t j) {
  const int64_t kh = pool_len(i, b, p.H);
  const int64_t kw = pool_len(j, b, p.W);
  return load_level<acc_t>(gp, p.gp_double, idx) / static_cast<acc_t>(kh) / static_cast<acc_t>(kw);
}

// Fills the tables for positions [pos0, pos1): colr[l * W + w] for every column, rowr[l * rows + h - h_lo] for the
// rows the positions touch.
__device__ __forceinline__ void pool_bwd_tables(const PoolBwdParams& p, uint32_t* colr, uint32_t* rowr, int64_t pos0,
                                                int64_t pos1, int tid, int nt) {
  const int L = p.lv.num;
  for (int64_t it = tid; it < L * p.W; it += nt) {
    const int64_t l = div_nn(it, p.W);
    colr[it] = pool_bins_of(it - l * p.W, p.lv.bins[l], p.W);
  }
  const int64_t h_lo = div_nn(pos0, p.W);
  const int64_t nrows = div_nn(pos1 - 1, p.W) - h_lo + 1;
  for (int64_t it = tid; it < L * nrows; it += nt) {
    const int64_t l = div_nn(it, nrows);
    const int64_t hr = it - l * nrows;
    rowr[l * p.rows + hr] = pool_bins_of(h_lo + hr, p.lv.bins[l], p.H);
  }
}

// NCHW: grad_out (N, C2, H, W) contiguous, out (N, C, H, W). One block per P whole planes or per chunk of E
// positions of one plane; threads take VEC-element vectors in memory order (16-byte loads and stores; a vector may
// wrap to the next row, never to the next plane: H*W % VEC == 0).
template <typename scalar_t, typename acc_t, int VEC, bool GENERIC>
__global__ void __launch_bounds__(kPbThreads)
    pool_bwd_nchw_kernel(const void* __restrict__ gp, const scalar_t* __restrict__ go, scalar_t* __restrict__ out,
                         const __grid_constant__ PoolBwdParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* q = reinterpret_cast<acc_t*>(smem);
  uint32_t* colr = reinterpret_cast<uint32_t*>(smem + p.off_col);
  uint32_t* rowr = reinterpret_cast<uint32_t*>(smem + p.off_row);
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int L = p.lv.num;
  const int64_t HW = p.H * p.W;
  const int64_t S = p.S;
  // GENERIC kernels read the plan's flags; the others are compiled for q and tables in shared memory.
  const bool stage_q = !GENERIC || p.stage_q;
  const bool tabs = !GENERIC || p.tabs;
  int64_t plane0, pos0, pos1;
  int np;
  if (p.P > 1) {
    plane0 = static_cast<int64_t>(blockIdx.x) * p.P;
    np = static_cast<int>(min(static_cast<int64_t>(p.P), p.planes - plane0));
    pos0 = 0;
    pos1 = HW;
  } else {
    plane0 = div_nn(blockIdx.x, p.chunks);
    pos0 = (blockIdx.x - plane0 * p.chunks) * p.E;
    pos1 = min(HW, pos0 + p.E);
    np = 1;
  }
  if (stage_q) {
    for (int64_t it = tid; it < np * S; it += nt) {
      const int64_t pp = div_nn(it, S);
      const int64_t k = it - pp * S;
      const int l = level_of(p.lv.offs, L, k);
      const int64_t b = p.lv.bins[l];
      const int64_t kk = k - p.lv.offs[l];
      const int64_t i = div_nn(kk, b);
      q[it] = pool_share<acc_t>(p, gp, plane0 * S + it, b, i, kk - i * b);
    }
  }
  if (tabs) pool_bwd_tables(p, colr, rowr, pos0, pos1, tid, nt);
  __syncthreads();

  const int64_t h_lo = div_nn(pos0, p.W);
  const int64_t per_plane = (pos1 - pos0) / VEC;
  for (int64_t u = tid; u < np * per_plane; u += nt) {
    const int64_t pp = div_nn(u, per_plane);
    const int64_t e = pos0 + (u - pp * per_plane) * VEC;
    const int64_t plane = plane0 + pp;
    const int64_t n = div_nn(plane, p.C);
    const int64_t c = plane - n * p.C;
    const AlignedVec<scalar_t, VEC> gv = load_vec<scalar_t, VEC>(go + (n * p.C2 + c) * HW + e);
    AlignedVec<scalar_t, VEC> ov;
    int64_t h = div_nn(e, p.W);
    int64_t w = e - h * p.W;
    const acc_t* qp = q + pp * S;
    const int64_t gbase = plane * S;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc_t s = 0;
      for (int l = 0; l < L; ++l) {
        const int64_t b = p.lv.bins[l];
        const int64_t off = p.lv.offs[l];
        const uint32_t rr = tabs ? rowr[l * p.rows + (h - h_lo)] : pool_bins_of(h, b, p.H);
        const uint32_t cr = tabs ? colr[l * p.W + w] : pool_bins_of(w, b, p.W);
        const int i1 = static_cast<int>(rr >> 16), j0 = static_cast<int>(cr & 0xFFFF), j1 = static_cast<int>(cr >> 16);
        for (int i = static_cast<int>(rr & 0xFFFF); i <= i1; ++i) {
          const int64_t row = off + i * b;
          for (int j = j0; j <= j1; ++j) {
            s += stage_q ? qp[row + j] : pool_share<acc_t>(p, gp, gbase + row + j, b, i, j);
          }
        }
      }
      ov.v[k] = static_cast<scalar_t>(static_cast<acc_t>(gv.v[k]) + s);
      if (++w == p.W) {
        w = 0;
        ++h;
      }
    }
    store_vec<scalar_t, VEC>(out + plane * HW + e, ov);
  }
}

// channels_last: grad_out (N, H, W, C2) and out (N, H, W, C) in memory. One block per (n, chunk of tc channels,
// chunk of E pixels); a thread takes VEC consecutive channels of one pixel (one 16-byte load and store), so the
// bin lookups of a pixel serve VEC channels. q[k * tc + c]: a bin's tc channels side by side.
template <typename scalar_t, typename acc_t, int VEC, bool GENERIC>
__global__ void __launch_bounds__(kPbThreads)
    pool_bwd_cl_kernel(const void* __restrict__ gp, const scalar_t* __restrict__ go, scalar_t* __restrict__ out,
                       const __grid_constant__ PoolBwdParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* q = reinterpret_cast<acc_t*>(smem);
  uint32_t* colr = reinterpret_cast<uint32_t*>(smem + p.off_col);
  uint32_t* rowr = reinterpret_cast<uint32_t*>(smem + p.off_row);
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int L = p.lv.num;
  const int64_t HW = p.H * p.W;
  const int64_t S = p.S;
  // GENERIC kernels read the plan's flags; the others are compiled for q and tables in shared memory.
  const bool stage_q = !GENERIC || p.stage_q;
  const bool tabs = !GENERIC || p.tabs;
  const int tc = p.tc;
  const int64_t per_n = p.cchunks * p.chunks;
  const int64_t n = div_nn(blockIdx.x, per_n);
  const int64_t rem = blockIdx.x - n * per_n;
  const int64_t cb = div_nn(rem, p.chunks);
  const int64_t c0 = cb * tc;
  const int nc = static_cast<int>(min(static_cast<int64_t>(tc), p.C - c0));
  const int64_t pos0 = (rem - cb * p.chunks) * p.E;
  const int64_t pos1 = min(HW, pos0 + p.E);
  const int64_t gbase = (n * p.C + c0) * S;  // grad_pooled rows of this block's channels: one contiguous run
  if (stage_q) {
    for (int64_t it = tid; it < nc * S; it += nt) {
      const int64_t c = div_nn(it, S);
      const int64_t k = it - c * S;
      const int l = level_of(p.lv.offs, L, k);
      const int64_t b = p.lv.bins[l];
      const int64_t kk = k - p.lv.offs[l];
      const int64_t i = div_nn(kk, b);
      q[k * tc + c] = pool_share<acc_t>(p, gp, gbase + it, b, i, kk - i * b);
    }
  }
  if (tabs) pool_bwd_tables(p, colr, rowr, pos0, pos1, tid, nt);
  __syncthreads();

  const int64_t h_lo = div_nn(pos0, p.W);
  const int cv = nc / VEC;
  for (int64_t u = tid; u < (pos1 - pos0) * cv; u += nt) {
    const int64_t px = div_nn(u, cv);
    const int c = static_cast<int>(u - px * cv) * VEC;
    const int64_t pos = pos0 + px;
    const int64_t h = div_nn(pos, p.W);
    const int64_t w = pos - h * p.W;
    const AlignedVec<scalar_t, VEC> gv = load_vec<scalar_t, VEC>(go + (n * HW + pos) * p.C2 + c0 + c);
    acc_t s[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) s[k] = 0;
    for (int l = 0; l < L; ++l) {
      const int64_t b = p.lv.bins[l];
      const int64_t off = p.lv.offs[l];
      const uint32_t rr = tabs ? rowr[l * p.rows + (h - h_lo)] : pool_bins_of(h, b, p.H);
      const uint32_t cr = tabs ? colr[l * p.W + w] : pool_bins_of(w, b, p.W);
      const int i1 = static_cast<int>(rr >> 16), j0 = static_cast<int>(cr & 0xFFFF), j1 = static_cast<int>(cr >> 16);
      for (int i = static_cast<int>(rr & 0xFFFF); i <= i1; ++i) {
        const int64_t row = off + i * b;
        for (int j = j0; j <= j1; ++j) {
          if (stage_q) {
            const acc_t* qk = q + (row + j) * tc + c;
#pragma unroll
            for (int k = 0; k < VEC; ++k) s[k] += qk[k];
          } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k) s[k] += pool_share<acc_t>(p, gp, gbase + (c + k) * S + row + j, b, i, j);
          }
        }
      }
    }
    AlignedVec<scalar_t, VEC> ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) ov.v[k] = static_cast<scalar_t>(static_cast<acc_t>(gv.v[k]) + s[k]);
    store_vec<scalar_t, VEC>(out + (n * HW + pos) * p.C + c0 + c, ov);
  }
}

template <typename scalar_t>
void launch_pool_bwd(const Tensor& gp, const Tensor& go, Tensor& out, PoolBwdParams& p, bool cl, int64_t N) {
  using acc_t = at::opmath_type<scalar_t>;
  const char* op = "pyramid_pool_backward";
  constexpr int V = 16 / sizeof(scalar_t);
  const int64_t asz = sizeof(acc_t);
  const int64_t L = p.lv.num;
  const int64_t HW = p.H * p.W;
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const scalar_t* gop = go.const_data_ptr<scalar_t>();
  scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
  const bool ptrs_aligned = aligned(gop) && aligned(op_);
  const bool vec = ptrs_aligned && (cl ? (p.C % V == 0 && p.C2 % V == 0) : HW % V == 0);
  const int64_t vw = vec ? V : 1;
  const int64_t optin = smem_optin();

  // Shared memory of a plan: q for `units` planes (NCHW) or channels (channels_last), tables for W columns and the
  // rows that `positions` consecutive positions may touch.
  auto layout = [&](int64_t units, int64_t positions, bool sq, bool tb) {
    const int64_t rows = positions >= HW ? p.H : std::min<int64_t>(p.H, positions / p.W + 2);
    const int64_t q_b = sq ? align16(units * p.S * asz) : 0;
    p.rows = static_cast<int>(rows);
    p.off_col = static_cast<int>(std::min<int64_t>(q_b, INT32_MAX));
    p.off_row = static_cast<int>(std::min<int64_t>(q_b + 4 * L * p.W, INT32_MAX));
    return q_b + (tb ? align16(4 * L * (p.W + rows)) : 0);
  };
  // Preference: everything in shared memory within the default 48 KiB, then within the opt-in limit, then per-use
  // divisions for q (tables kept when they fit), then nothing staged.
  struct Choice {
    int64_t budget;
    bool sq, tb;
  };
  const Choice prefs[] = {{kDefaultSmem, true, true},  {kDefaultSmem, true, false}, {optin, true, true},
                          {optin, true, false},        {kDefaultSmem, false, true}, {optin, false, false}};
  int64_t smem = 0;
  if (!cl) {
    // Several whole planes per block when planes are small; keep about a thousand blocks or more.
    int64_t P = 2 * HW <= kPbChunk ? kPbChunk / HW : 1;
    P = std::min<int64_t>(P, std::max<int64_t>(1, ceil_div(p.planes, 1024)));
    const int64_t E1 = std::min<int64_t>(HW, kPbChunk);  // positions of a one-plane block: a multiple of vw
    bool found = false;
    for (const Choice& ch : prefs) {
      if (layout(1, E1, ch.sq, ch.tb) > ch.budget) continue;
      p.stage_q = ch.sq;
      p.tabs = ch.tb;
      found = true;
      break;
    }
    TORCH_INTERNAL_ASSERT(found);
    while (P > 1 && layout(P, HW, p.stage_q, p.tabs) > kDefaultSmem) --P;
    p.E = P > 1 ? HW : E1;
    p.chunks = ceil_div(HW, p.E);
    p.P = static_cast<int>(P);
    smem = layout(P, p.E, p.stage_q, p.tabs);
    const int64_t blocks = P > 1 ? ceil_div(p.planes, P) : p.planes * p.chunks;
    TORCH_CHECK(blocks <= INT32_MAX, op, ": N * C * H * W = ", p.planes * HW, " is too large for one launch");
    const auto stream = c10::cuda::getCurrentCUDAStream();
    auto launch = [&](auto kernel) {
      allow_smem(kernel, smem);
      kernel<<<static_cast<unsigned>(blocks), kPbThreads, smem, stream>>>(gp.const_data_ptr(), gop, op_, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (!(p.stage_q && p.tabs)) {
      launch(pool_bwd_nchw_kernel<scalar_t, acc_t, 1, true>);
    } else if (vec) {
      launch(pool_bwd_nchw_kernel<scalar_t, acc_t, V, false>);
    } else {
      launch(pool_bwd_nchw_kernel<scalar_t, acc_t, 1, false>);
    }
    return;
  }
  // channels_last: up to 64 channels per block (a multiple of the vector width), fewer when q would not fit.
  int64_t tc0 = std::min<int64_t>(p.C, 64);
  bool found = false;
  for (const Choice& ch : prefs) {
    for (int64_t t = tc0;; t = std::max<int64_t>(vw, (t / 2) / vw * vw)) {
      const int64_t E = std::max<int64_t>(1, kPbChunk / t);
      if (layout(t, E, ch.sq, ch.tb) <= ch.budget) {
        p.tc = static_cast<int>(t);
        p.E = std::min(E, HW);
        p.stage_q = ch.sq;
        p.tabs = ch.tb;
        found = true;
        break;
      }
      if (t == vw) break;
    }
    if (found) break;
  }
  TORCH_INTERNAL_ASSERT(found);
  smem = layout(p.tc, p.E, p.stage_q, p.tabs);
  p.cchunks = ceil_div(p.C, p.tc);
  p.chunks = ceil_div(HW, p.E);
  const int64_t blocks = N * p.cchunks * p.chunks;
  TORCH_CHECK(blocks <= INT32_MAX, op, ": N * C * H * W = ", p.planes * HW, " is too large for one launch");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto kernel) {
    allow_smem(kernel, smem);
    kernel<<<static_cast<unsigned>(blocks), kPbThreads, smem, stream>>>(gp.const_data_ptr(), gop, op_, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (!(p.stage_q && p.tabs)) {
    launch(pool_bwd_cl_kernel<scalar_t, acc_t, 1, true>);
  } else if (vec) {
    launch(pool_bwd_cl_kernel<scalar_t, acc_t, V, false>);
  } else {
    launch(pool_bwd_cl_kernel<scalar_t, acc_t, 1, false>);
  }
}

Tensor pyramid_pool_backward_cuda(const Tensor& grad_pooled_in, const Tensor& grad_out_in, at::IntArrayRef bins,
                                  int64_t x_offset) {
  const char* op = "pyramid_pool_backward";
  TORCH_CHECK(x_offset == 0, op, ": x_offset != 0 is not implemented in the CUDA kernels",
              " (pspnet_fast/_order.py handles that layout for CUDA tensors)");
  check_x(op, grad_out_in, "grad_out");
  TORCH_CHECK(grad_pooled_in.is_cuda(), op, ": expected grad_pooled on a CUDA device, got ", grad_pooled_in.device());
  TORCH_CHECK(grad_pooled_in.device() == grad_out_in.device(), op, ": expected grad_pooled on ", grad_out_in.device(),
              " (grad_out's device), got ", grad_pooled_in.device());
  const LevelTable lv = make_levels(op, bins);
  const int64_t N = grad_out_in.size(0), C2 = grad_out_in.size(1), H = grad_out_in.size(2), W = grad_out_in.size(3);
  const int64_t S = lv.offs[lv.num];
  TORCH_CHECK(grad_pooled_in.dim() == 3 && grad_pooled_in.size(0) == N && grad_pooled_in.size(2) == S, op,
              ": expected grad_pooled of shape (", N, ", C, ", S, ") for grad_out of shape ", grad_out_in.sizes(),
              " and bins ", bins, ", got ", grad_pooled_in.sizes());
  const int64_t C = grad_pooled_in.size(1);
  TORCH_CHECK(C <= C2, op, ": grad_pooled has ", C, " channels, more than grad_out's ", C2);
  const auto gst = grad_pooled_in.scalar_type();
  TORCH_CHECK(gst == at::kFloat || gst == at::kDouble, op, ": expected float32 or float64 grad_pooled, got ", gst);
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const bool cl = use_channels_last(grad_out_in);
  Tensor out = at::empty({N, C, H, W}, grad_out_in.options(),
                         cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (N == 0 || C == 0) return out;
  const Tensor go = cl ? grad_out_in : grad_out_in.contiguous();
  const Tensor gp = grad_pooled_in.contiguous();

  PoolBwdParams p{};
  p.lv = lv;
  p.planes = N * C;
  p.C = C;
  p.C2 = C2;
  p.H = H;
  p.W = W;
  p.S = S;
  p.gp_double = gst == at::kDouble;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "pyramid_pool_backward_cuda",
                                  [&] { launch_pool_bwd<scalar_t>(gp, go, out, p, cl, N); });
  return out;
}

}  // namespace
}  // namespace pspnet_fast

TORCH_LIBRARY_IMPL(pspnet_fast, CUDA, m) {
  m.impl("pyramid_pool", &pspnet_fast::pyramid_pool_cuda);
  m.impl("ppm_reduce", &pspnet_fast::ppm_reduce_cuda);
  m.impl("upsample_concat", &pspnet_fast::upsample_concat_cuda);
  m.impl("upsample_concat_backward", &pspnet_fast::upsample_concat_backward_cuda);
  m.impl("pyramid_pool_backward", &pspnet_fast::pyramid_pool_backward_cuda);
}
