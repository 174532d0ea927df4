// pyramid_pool and ppm_forward on CUDA.
//
//   pyramid_pool  x (N, C, H, W) -> pooled (N, C, S)          one launch, x read once for all levels
//   ppm_forward   x, weight, scale, shift -> out (N, C + L*R, H, W): the pooling launch also writes x into its
//                 channels of out; then ppm_reduce (ppm_reduce.cpp) and the levels-only upsample (ppm_upsample.cu)
//
// Pooling works on "segments": the disjoint intervals that all levels' bin boundaries cut an extent into. Each input
// element is added to exactly one (row segment, column segment) cell; every bin of every level is then a sum of a
// rectangle of cells. Segment tables depend only on bins, H and W, so the host computes them and passes them by value.
// No atomics: every output is a fixed-order sum, so results are bitwise reproducible run to run.
//
// Cost per input element and what bounds it:
//   NCHW (pool_nchw_kernel): 1/V of an aligned 16-byte global load (stage_contiguous; V = 16 / element size; a
//     misaligned plane costs a second, L1-hit load and 4 funnel shifts per vector), 1/V of a 16-byte shared store,
//     one shared load + add (phase 1); per tile, an epilogue over the tile's rows x segments. Bound: bytes of x
//     (8x2048x90x90 bf16: 265 MB, ~55 us at 4.8 TB/s). With the copy (ppm_forward): + 1/V of a 16-byte shared load
//     (two, and 4 funnel shifts, when out's plane has another alignment) and 1/V of an aligned 16-byte global store:
//     bound by x read + x written once.
//   channels_last (pool_cl_kernel): one load per element, 16-byte vectors of V channels when C % V == 0 (else 2-byte
//     scalars, 32 bytes per pixel group), V register sums; the copy stores the same vectors (16-byte when Ctot and the
//     x offset are multiples of V). Bound: bytes, with 4 independent loads per thread in flight.
// Launch geometry: NCHW one 256-thread block per P planes (P > 1 only when whole planes fit a 16 KiB tile), tiles of
// 16 KiB (whole planes, bands of rows, or pieces of a row); channels_last one 512-thread block per (n, tc channels),
// tc = 128 bytes of channels (vectorized) or 32 bytes, halved when shared memory requires.
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

// Most segments one extent may be cut into. A level of b bins adds at most 2b boundaries, so an extent has at most
// 2 * sum(bins) - 1 segments (and at most H of them); the tables travel in a kernel argument (< 4 KiB in all).
constexpr int kMaxSegs = 256;
constexpr int kPoolThreads = 256;    // NCHW pooling block
constexpr int kPoolClThreads = 512;  // channels_last pooling block: channels x pixel groups
constexpr int kTileBytes = 16 * 1024;  // NCHW pooling: bytes of x staged in shared memory per step

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
  // ppm_forward (COPY kernels): x's plane (n, c) is copied to channel X0 + c of xout (N, Ctot, H, W) as it is read.
  int64_t Ctot, X0;
  bool copy_vec;  // channels_last COPY: 16-byte stores into xout
  float rS;       // 1 / S: pool_finish's (group, column) by div_est
  double rC;      // 1 / C: (n, c) of an NCHW block's first plane by div_est
};

// Steps shared by both layouts once the cells are complete: colsum[rs][jj] = sum of a column bin's cells in row
// segment rs (jj runs over every level's column bins), then out = sum of a row bin's colsum / count. Two short serial
// sums instead of one over the whole rectangle keep the tail short when a bin covers many cells (b = 1).
// Element e (a cell (rs, cs) or a colsum (rs, jj), flattened row-major) of group g sits at e * estride + g * gstride:
// channels_last keeps its tc channels fastest (estride = tc, gstride = 1), NCHW its planes apart (estride = 1).
template <typename acc_t>
__device__ __forceinline__ void pool_colsum(const PoolParams& p, const int* bw, const acc_t* cells, acc_t* colsum,
                                            int groups, int estride, int cells_gstride, int colsum_gstride, int tid,
                                            int nt) {
  // colsum lies in shared memory: every index and item count fits 32 bits (unsigned divisions, no 64-bit ones).
  const uint32_t sumb = static_cast<uint32_t>(p.sumb);
  const uint32_t per_group = static_cast<uint32_t>(p.nsh) * sumb;
  const uint32_t items = static_cast<uint32_t>(groups) * per_group;
  const int W = static_cast<int>(p.W);
  for (uint32_t it = tid; it < items; it += nt) {
    // Consecutive threads take consecutive words: group fastest when groups are interleaved (channels_last).
    uint32_t g, q;
    if (estride != 1) {
      q = it / static_cast<uint32_t>(groups);
      g = it - q * static_cast<uint32_t>(groups);
    } else {
      g = it / per_group;
      q = it - g * per_group;
    }
    const int rs = static_cast<int>(q / sumb);
    const int jj = static_cast<int>(q - static_cast<uint32_t>(rs) * sumb);
    const int l = level_of(p.lv.boff, p.lv.num, jj);
    const int b = static_cast<int>(p.lv.bins[l]);
    const int j = jj - static_cast<int>(p.lv.boff[l]);
    const int cs0 = seg_find(bw, p.nsw + 1, pool_start32(j, b, W));
    const int cs1 = seg_find(bw, p.nsw + 1, pool_end32(j, b, W));
    const acc_t* c = cells + rs * p.nsw * estride + static_cast<int>(g) * cells_gstride;
    acc_t s = c[cs0 * estride];
    for (int cs = cs0 + 1; cs < cs1; ++cs) s += c[cs * estride];
    colsum[q * estride + g * colsum_gstride] = s;
  }
}

// Writes out[base(g) + col] for col in [0, S) and group g < ngroups (groups whose rows exist), rows contiguous.
// The item count may pass 2^32 (out is global); the group is div_est's from 1 / S (ngroups <= 8192: the planes of
// one 16 KiB tile or tc channels, so quotients < 2^20), everything within a row in 32 bits.
template <typename acc_t>
__device__ __forceinline__ void pool_finish(const PoolParams& p, const int* bh, const acc_t* colsum, int ngroups,
                                            int estride, int gstride, acc_t* out, int tid, int nt) {
  const int64_t S = p.S;  // < 2^31
  const int64_t items = static_cast<int64_t>(ngroups) * S;
  const int H = static_cast<int>(p.H), W = static_cast<int>(p.W);
  const int rstride = p.sumb * estride;
  for (int64_t it = tid; it < items; it += nt) {
    const int g = static_cast<int>(div_est(it, S, p.rS));
    const int col = static_cast<int>(it - g * S);
    const int l = level_of(p.lv.offs, p.lv.num, col);
    const uint32_t b = static_cast<uint32_t>(p.lv.bins[l]);
    const uint32_t k = static_cast<uint32_t>(col - static_cast<int>(p.lv.offs[l]));
    const int i = static_cast<int>(k / b);
    const int j = static_cast<int>(k - static_cast<uint32_t>(i) * b);
    const int hs = pool_start32(i, b, H), he = pool_end32(i, b, H);
    const int ws = pool_start32(j, b, W), we = pool_end32(j, b, W);
    const int rs0 = seg_find(bh, p.nsh + 1, hs);
    const int rs1 = seg_find(bh, p.nsh + 1, he);
    const int jj = static_cast<int>(p.lv.boff[l]) + j;
    const acc_t* c = colsum + jj * estride + g * gstride;
    acc_t s = c[rs0 * rstride];
    for (int rs = rs0 + 1; rs < rs1; ++rs) s += c[rs * rstride];
    out[it] = s / static_cast<acc_t>(static_cast<int64_t>(he - hs) * (we - ws));
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
// COPY (ppm_forward): each staged tile is also written to xout from shared memory (store_contiguous: aligned 16-byte
// stores whatever the two tensors' alignments), so x is read once for both the pooling and the copy.
template <typename scalar_t, typename acc_t, bool COPY>
__global__ void __launch_bounds__(kPoolThreads)
    pool_nchw_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ out, scalar_t* __restrict__ xout,
                     const __grid_constant__ PoolParams p) {
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
  // COPY: (n, c) of plane0 (div_est, no 64-bit division); the block's planes are consecutive from there.
  const int64_t n0 = COPY ? div_est(plane0, p.C, p.rC) : 0;
  const int64_t c0 = plane0 - n0 * p.C;

  for (int h0 = 0; h0 < H; h0 += p.TH) {
    const int th = min(p.TH, H - h0);
    for (int w0 = 0; w0 < W; w0 += p.TW) {
      const int tw = min(p.TW, W - w0);
      __syncthreads();  // tables written; the previous step is done with tile and r1
      const int64_t g0 = plane0 * p.H * p.W + static_cast<int64_t>(h0) * W + w0;
      stage_contiguous(x + g0, tile, np * th * tw, tid, nt);
      __syncthreads();
      if constexpr (COPY) {
        // Plane pp's part of the tile: th * tw elements at tile + pp * th * tw, contiguous in xout too. Whole planes
        // of one image (or a single plane) are one run in xout; planes of two images, one run per plane.
        const int run = th * tw;
        const int64_t HW = p.H * p.W;
        const int64_t pos = static_cast<int64_t>(h0) * W + w0;
        if (c0 + np <= p.C) {
          store_contiguous(tile, xout + (n0 * p.Ctot + p.X0 + c0) * HW + pos, np * run, tid, nt);
        } else {
          int64_t n = n0, c = c0;
          for (int pp = 0; pp < np; ++pp, ++c) {
            if (c == p.C) {
              c = 0;
              ++n;
            }
            store_contiguous(tile + pp * run, xout + (n * p.Ctot + p.X0 + c) * HW + pos, run, tid, nt);
          }
        }
      }
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
  pool_colsum(p, bw, acc, colsum, np, 1, nsh * nsw, static_cast<int>(colsum_plane), tid, nt);
  __syncthreads();
  // This block's out rows are contiguous: (plane0 + pp) * S + col.
  pool_finish(p, bh, colsum, np, 1, static_cast<int>(colsum_plane), out + plane0 * p.S, tid, nt);
}

// channels_last: x (N, H, W, C) in memory, out (N, C, S). One block per (n, chunk of tc channels): thread (g, c) with
// c fastest takes VEC consecutive channels c .. c + VEC of every pixel of its cells (one 16-byte load per pixel when
// VEC > 1: C a multiple of VEC and x aligned), so a pixel's tc channels are one coalesced run of tc / VEC threads.
// Cells (row segment x column segment, refined on the host so there are several per pixel group) are assigned to the
// groups round robin; each cell is summed in registers and stored to cells[cell][c]. Then the same two-step bin
// combination; out rows (n, c0 .. c0+tc) are one contiguous run of tc * S values.
// COPY (ppm_forward): every vector read is also stored to channels X0 + c of the same pixel of xout (N, H, W, Ctot):
// one 16-byte store when copy_vec (Ctot and X0 multiples of VEC, xout aligned), else element stores.
// Launch bounds: explicit register limits (COPY 128, else 64); without one, ptxas's own target (64) spilled the COPY
// vector variants (8-40 bytes of stack on sm_90, CUDA 13.0), which compile without spills under 128.
template <typename scalar_t, typename acc_t, bool COPY, int VEC>
__global__ void __launch_bounds__(kPoolClThreads, COPY ? 1 : 2)
    pool_cl_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ out, scalar_t* __restrict__ xout,
                   const __grid_constant__ PoolParams p) {
  using Vec = AlignedVec<scalar_t, VEC>;
  extern __shared__ __align__(16) unsigned char smem[];
  int* bh = reinterpret_cast<int*>(smem + p.off_tab);
  int* bw = bh + p.nsh + 1;
  acc_t* cells = reinterpret_cast<acc_t*>(smem + p.off_acc);
  acc_t* colsum = reinterpret_cast<acc_t*>(smem + p.off_colsum);

  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int tc = p.tc;
  const int tpp = tc / VEC;  // threads per pixel
  const int cl = (tid % tpp) * VEC;
  const int grp = tid / tpp;
  const int groups = nt / tpp;
  const uint32_t cchunks = static_cast<uint32_t>(p.cchunks);  // blocks = N * cchunks <= INT32_MAX
  const uint32_t n32 = blockIdx.x / cchunks;
  const int64_t n = n32;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x - n32 * cchunks) * tc;
  const int64_t c = c0 + cl;
  const bool valid = c < p.C;  // VEC > 1: C % VEC == 0, so all VEC channels exist
  const int nsh = p.nsh, nsw = p.nsw;
  for (int i = tid; i <= nsh; i += nt) bh[i] = p.bh[i];
  for (int i = tid; i <= nsw; i += nt) bw[i] = p.bw[i];
  __syncthreads();

  const int64_t C = p.C;
  const scalar_t* xn = x + n * p.H * p.W * C + c;
  const int64_t Ctot = p.Ctot;
  scalar_t* xo = COPY ? xout + n * p.H * p.W * Ctot + p.X0 + c : nullptr;
  const auto put = [&](scalar_t* d, const Vec& v) {
    if (VEC > 1 && p.copy_vec) {
      store_vec<scalar_t, VEC>(d, v);
    } else {
#pragma unroll
      for (int m = 0; m < VEC; ++m) d[m] = v.v[m];
    }
  };
  const int ncells = nsh * nsw;
  for (int k = grp; k < ncells; k += groups) {
    const int rs = k / nsw;
    const int cs = k - rs * nsw;
    acc_t s[VEC];
#pragma unroll
    for (int m = 0; m < VEC; ++m) s[m] = 0;
    if (valid) {
      const int wa = bw[cs];
      const int cw = bw[cs + 1] - wa;
      for (int h = bh[rs]; h < bh[rs + 1]; ++h) {
        const scalar_t* q = xn + (static_cast<int64_t>(h) * p.W + wa) * C;
        scalar_t* qo = COPY ? xo + (static_cast<int64_t>(h) * p.W + wa) * Ctot : nullptr;
        int w = 0;
        // Independent loads in flight before their adds (memory-level parallelism per thread): four scalars, or two
        // 16-byte vectors (four made the copy variant spill on sm_90).
        constexpr int U = VEC > 1 ? 2 : 4;
        for (; w + U <= cw; w += U) {
          Vec e[U];
#pragma unroll
          for (int u = 0; u < U; ++u) e[u] = load_vec<scalar_t, VEC>(q + u * C);
          if constexpr (COPY) {
#pragma unroll
            for (int u = 0; u < U; ++u) put(qo + u * Ctot, e[u]);
            qo += U * Ctot;
          }
#pragma unroll
          for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int m = 0; m < VEC; ++m) s[m] += static_cast<acc_t>(e[u].v[m]);
          }
          q += U * C;
        }
        for (; w < cw; ++w) {
          const Vec e0 = load_vec<scalar_t, VEC>(q);
          if constexpr (COPY) {
            put(qo, e0);
            qo += Ctot;
          }
#pragma unroll
          for (int m = 0; m < VEC; ++m) s[m] += static_cast<acc_t>(e0.v[m]);
          q += C;
        }
      }
    }
#pragma unroll
    for (int m = 0; m < VEC; ++m) cells[static_cast<int64_t>(k) * tc + cl + m] = s[m];
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
void launch_pool_nchw(const Tensor& x, Tensor& out, scalar_t* xout, PoolParams& p, const std::vector<int>& bh,
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
    // + 16: store_contiguous (COPY) may read one chunk past the tile.
    const int64_t tile_b = align16(planes_per_block * p.TH * p.TW * esz) + 16;
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
  auto kernel = xout != nullptr ? pool_nchw_kernel<scalar_t, acc_t, true> : pool_nchw_kernel<scalar_t, acc_t, false>;
  allow_smem(kernel, smem);
  kernel<<<static_cast<unsigned>(blocks), kPoolThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<acc_t>(), xout, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
void launch_pool_cl(const Tensor& x, Tensor& out, scalar_t* xout, PoolParams& p, const std::vector<int>& bh,
                    const std::vector<int>& bw) {
  const int64_t asz = sizeof(acc_t);
  constexpr int V = 16 / sizeof(scalar_t);
  // 16-byte loads of V channels when every pixel's channels are aligned; the copy's stores when xout's are too.
  const bool vec = aligned16(x.const_data_ptr()) && p.C % V == 0;
  p.copy_vec = xout != nullptr && aligned16(xout) && p.Ctot % V == 0 && p.X0 % V == 0;
  int64_t pow2c = 1;
  while (pow2c < p.C) pow2c *= 2;
  auto smem_for = [&](int64_t nh, int64_t nw, int64_t tc) {
    return align16((nh + nw + 2) * 4) + align16(nh * nw * tc * asz) + align16(nh * p.sumb * tc * asz);
  };
  int64_t maxlen = 1;
  for (size_t s = 0; s + 1 < bh.size(); ++s) maxlen = std::max<int64_t>(maxlen, bh[s + 1] - bh[s]);
  for (size_t s = 0; s + 1 < bw.size(); ++s) maxlen = std::max<int64_t>(maxlen, bw[s + 1] - bw[s]);
  const int64_t optin = smem_optin();

  // Pick tc and the refinement (pieces of at most k rows/columns): the largest k that still gives ~4 cells per pixel
  // group (load balance across groups, fewest cells to combine), made larger if needed to fit shared memory. Prefer
  // the 48 KiB default, then fewer channels per block, then the opt-in limit. tc starts at 128 bytes of channels
  // (vectorized: 8 threads of 16 bytes per pixel) or 32 bytes (scalar: one sector per load of a pixel group) and
  // halves down to the vector width; when no vectorized plan fits, the scalar one is tried.
  int64_t tc = 0, k = 0, vw = 1;
  for (const int64_t w : {static_cast<int64_t>(vec ? V : 0), int64_t{1}}) {
    if (w == 0 || tc != 0) continue;
    const int64_t bytes0 = w > 1 ? 128 : 32;
    const int64_t tc0 = std::min<int64_t>(std::max<int64_t>(w, bytes0 / static_cast<int64_t>(sizeof(scalar_t))), pow2c);
    for (int64_t budget : {kDefaultSmem, optin}) {
      for (int64_t t = tc0; t >= w && tc == 0; t /= 2) {
        const int64_t target = 4 * (kPoolClThreads / (t / w));
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
        vw = w;
      }
      if (tc != 0) break;
    }
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
  auto kernel = xout != nullptr
                    ? (vw > 1 ? pool_cl_kernel<scalar_t, acc_t, true, V> : pool_cl_kernel<scalar_t, acc_t, true, 1>)
                    : (vw > 1 ? pool_cl_kernel<scalar_t, acc_t, false, V> : pool_cl_kernel<scalar_t, acc_t, false, 1>);
  allow_smem(kernel, smem);
  kernel<<<static_cast<unsigned>(blocks), kPoolClThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<acc_t>(), xout, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Pools x (N, C, H, W; contiguous or channels_last, as use_channels_last says) into out (N, C, S); with xout
// (ppm_forward's output, same layout) also copies x into its channels [X0, X0 + C) in the same pass.
void run_pool(const char* op, const Tensor& x, const LevelTable& lv, Tensor& out, Tensor* xout, int64_t X0) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  PoolParams p{};
  p.lv = lv;
  p.planes = N * C;
  p.C = C;
  p.H = H;
  p.W = W;
  p.S = lv.offs[lv.num];
  TORCH_CHECK(H <= INT32_MAX && W <= INT32_MAX, op, ": H and W must be below 2^31, got ", H, " x ", W);
  p.rS = 1.0f / static_cast<float>(p.S);
  p.rC = 1.0 / static_cast<double>(C);
  TORCH_CHECK(lv.boff[lv.num] <= INT32_MAX, op, ": sum(bins) too large, got ", lv.boff[lv.num]);
  p.sumb = static_cast<int>(lv.boff[lv.num]);
  p.Ctot = xout != nullptr ? xout->size(1) : C;
  p.X0 = X0;
  const std::vector<int> bh = segment_bounds(lv, H), bw = segment_bounds(lv, W);
  // Every level contributes 0 and the extent, and at most 2b boundaries.
  TORCH_INTERNAL_ASSERT(bh.front() == 0 && bh.back() == H && bw.front() == 0 && bw.back() == W);
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(bh.size()) - 1 <= 2 * lv.boff[lv.num] - 1 &&
                        static_cast<int64_t>(bw.size()) - 1 <= 2 * lv.boff[lv.num] - 1);
  const bool cl = use_channels_last(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pyramid_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* xo = xout != nullptr ? xout->mutable_data_ptr<scalar_t>() : nullptr;
    if (cl) {
      launch_pool_cl<scalar_t, acc_t>(x, out, xo, p, bh, bw);
    } else {
      launch_pool_nchw<scalar_t, acc_t>(x, out, xo, p, bh, bw);
    }
  });
}

Tensor pyramid_pool_cuda(const Tensor& x_in, at::IntArrayRef bins) {
  checks::pyramid_pool(x_in, bins);
  check_x("pyramid_pool", x_in);
  const LevelTable lv = make_levels("pyramid_pool", bins);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t N = x_in.size(0), C = x_in.size(1);
  const auto out_type = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor out = at::empty({N, C, lv.offs[lv.num]}, x_in.options().dtype(out_type));
  if (N == 0) return out;
  const Tensor x = use_channels_last(x_in) ? x_in : x_in.contiguous();
  run_pool("pyramid_pool", x, lv, out, nullptr, 0);
  return out;
}

// ------------------------------------------------------------------------------------------------------------------
// ppm_forward: the eval forward with x read once
// ------------------------------------------------------------------------------------------------------------------
//
// Three steps, the same code as the composition upsample_concat(x, ppm_reduce(pyramid_pool(x))) so the values are
// the composition's bit for bit: (1) the pooling pass above, which also writes x into its channels of out (x read
// once, written once); (2) ppm_reduce (cuBLAS) on the small pooled tensor; (3) upsample_concat's level pass, which
// writes only the level channels. Bytes: N C H W read + N (C + L R) H W written, the floor of the op.
Tensor ppm_forward_cuda(const Tensor& x_in, const Tensor& weight, const std::optional<Tensor>& scale,
                        const std::optional<Tensor>& shift, at::IntArrayRef bins, bool relu, bool align_corners,
                        bool x_last) {
  checks::ppm_forward(x_in, weight, scale, shift, bins);
  const char* op = "ppm_forward";
  check_x(op, x_in);
  check_cuda(op, "weight", weight, x_in);
  const LevelTable lv = make_levels(op, bins);
  TORCH_CHECK(weight.dim() == 3, op, ": expected weight of shape (L, R, C), got ", weight.sizes());
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t R = weight.size(1);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool cl = use_channels_last(x_in);
  Tensor out = at::empty({N, C + lv.num * R, H, W}, x_in.options(),
                         cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const auto pooled_type = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor pooled = at::empty({N, C, lv.offs[lv.num]}, x_in.options().dtype(pooled_type));
  if (N > 0) {
    const Tensor x = cl ? x_in : x_in.contiguous();
    run_pool(op, x, lv, pooled, &out, x_last ? lv.num * R : 0);
  }
  // Checks weight, scale and shift against pooled (also for N = 0).
  const Tensor levels = ppm_reduce_cuda(pooled, weight, scale, shift, bins, relu);
  if (N > 0) upsample_levels_into(levels, out, C, bins, align_corners, x_last);
  return out;
}

}  // namespace
}  // namespace pspnet_fast

TORCH_LIBRARY_IMPL(pspnet_fast, CUDA, m) {
  m.impl("pyramid_pool", &pspnet_fast::pyramid_pool_cuda);
  m.impl("ppm_forward", &pspnet_fast::ppm_forward_cuda);
}
