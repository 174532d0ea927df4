// The adjoints on CUDA, deterministic (every output is a fixed-order sum by its one owner thread, no atomics):
//   upsample_concat_backward  grad_out (N, C + L*R, H, W) -> grad_levels (N, R, S)  one launch, separable gather
//   pyramid_pool_backward     grad_pooled (N, C, S), grad_out -> grad_x (N, C, H, W)  one launch, per-element gather
//
// Cost per element of grad_out read (upsample_concat_backward) and what bounds it: NCHW, 1/V of a 16-byte load
// (stage_contiguous: aligned, or two and 4 funnel shifts), a shared load and a multiply-add with the column weight
// from the block's tap table (W + H entries computed once per block; per use only when the table would not fit);
// per band, the row pass over b x b bins. channels_last: one 16-byte load per (pixel, V level channels) when C and R
// are multiples of V = 16 / element size (else one element per load), tc channels per pixel group. Bound: bytes of
// the level channels of grad_out.
// Cost per grad_x element (pyramid_pool_backward): NCHW, 1/V of an aligned 16-byte store (plane heads and tails
// element-wise, at any H * W) and of a 16-byte grad_out load (two and 4 funnel shifts when grad_out's plane has
// another alignment), the bins of (h, w) from per-block row / column tables and L short sums of staged
// grad_pooled / bin size; channels_last, 16-byte vectors of V channels when C and C' are multiples of V. Bound: bytes
// (read grad_out's x channels, write grad_x), plus ~L * (2 + bins per element) shared loads.
// Launch geometry: upsample_concat_backward one 256-thread block per (n, level, P level channels), bands of rows
// through 16 KiB tiles (NCHW) or 32 KiB of T (channels_last); pyramid_pool_backward one 256-thread block per P whole
// planes or per 4096 positions of a plane (NCHW), per (n, tc channels, chunk of pixels) (channels_last).
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
#include "ppm_math.h"

namespace pspnet_fast {
namespace {

using at::Tensor;

constexpr int kTileBytes = 16 * 1024;  // NCHW: bytes of grad_out staged in shared memory per step
// Every kernel here declares 4 resident 256-thread blocks per SM, an explicit limit of 64 registers: without a
// limit, ptxas's own register target spilled values to local memory (up_bwd_cl_kernel 8 bytes at 48 registers on
// sm_90; pool_bwd_nchw_kernel<*, true> 24 bytes at 32 and up_bwd_nchw_kernel<float> 24 at 48 on sm_80; CUDA 13.0)
// that the explicit limit compiles without (tools/sass_report.py: stack 0 for both archs).
constexpr int kMinBlocks = 4;

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
  bool taps;           // the block's tap table (W columns, then H rows) in shared memory at off_taps
  int off_taps;
  double sh[kMaxLevels], sw[kMaxLevels];  // linear_scale<acc_t>(b_l, H | W), host-computed (exact as acc_t)
};

// tab[0..b) = lo, tab[b..2b) = hi of each row bin over H; tab[2b..3b), tab[3b..4b) the same for columns over W.
template <typename acc_t>
__device__ __forceinline__ void tap_ranges(const UpBwdParams& p, int b, acc_t sh, acc_t sw, int* tab, int tid,
                                           int nt) {
  for (int k = tid; k < 4 * b; k += nt) {
    const int q = static_cast<int>(static_cast<uint32_t>(k) / static_cast<uint32_t>(b));
    const bool col = q >= 2;
    tab[k] = static_cast<int>(tap_bound<acc_t>(col ? sw : sh, k - q * b, b, col ? p.W : p.H, p.align, (q & 1) != 0));
  }
}

// The two taps and weights of one destination index, as a block computes them once for every column and row.
template <typename acc_t>
struct TapEntry {
  int i0, i1;
  acc_t l0, l1;
};

// taps[0, W): the columns' taps of a level of b bins; taps[W, W + H): the rows'.
template <typename acc_t>
__device__ __forceinline__ void fill_taps(const UpBwdParams& p, int b, acc_t sh, acc_t sw, TapEntry<acc_t>* taps,
                                          int tid, int nt) {
  const int W = static_cast<int>(p.W);
  const int n = W + static_cast<int>(p.H);  // the table is used only when it fits in shared memory
  for (int k = tid; k < n; k += nt) {
    const bool col = k < W;
    const LinearTap<acc_t> t = linear_tap<acc_t>(col ? sw : sh, col ? k : k - W, b, col ? W : p.H, p.align);
    taps[k] = TapEntry<acc_t>{static_cast<int>(t.i0), static_cast<int>(t.i1), t.l0, t.l1};
  }
}

// tap_weight from a table entry: the same operations, so the same value.
template <typename acc_t>
__device__ __forceinline__ acc_t entry_weight(const TapEntry<acc_t>& t, int i) {
  const acc_t w = t.i0 == i ? t.l0 : static_cast<acc_t>(0);
  return t.i1 == i ? w + t.l1 : w;
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

// A block's level set-up, the same in both layouts: (image n, level l, chunk of level channels) from the block
// index (blocks = N * L * rblocks <= INT32_MAX: 32-bit divisions), the level's host-computed scales, its row and column
// range tables in shared memory (tab: rlo, rhi, clo, chi of b entries each) and, when the plan has room, the tap table
// (W columns, then H rows); the caller's barrier publishes the tables.
template <typename acc_t>
struct UpBwdLevel {
  int64_t n, chunk;
  int l, b;
  acc_t sh, sw;
  const int* tab;
  const TapEntry<acc_t>* taps;
  // Entry [w, j] of the column resampling matrix and [h, i] of the row one: from the table, or computed per use.
  __device__ __forceinline__ acc_t wcol(const UpBwdParams& p, int w, int j) const {
    return p.taps ? entry_weight(taps[w], j) : tap_weight<acc_t>(sw, w, j, b, p.W, p.align);
  }
  __device__ __forceinline__ acc_t wrow(const UpBwdParams& p, int h, int i) const {
    return p.taps ? entry_weight(taps[p.W + h], i) : tap_weight<acc_t>(sh, h, i, b, p.H, p.align);
  }
};

template <typename acc_t>
__device__ __forceinline__ UpBwdLevel<acc_t> up_bwd_level(const UpBwdParams& p, unsigned char* smem, int tid, int nt) {
  UpBwdLevel<acc_t> v;
  const uint32_t L = static_cast<uint32_t>(p.lv.num);
  const uint32_t rblocks = static_cast<uint32_t>(p.rblocks);
  const uint32_t nl = blockIdx.x / rblocks;
  const uint32_t n32 = nl / L;
  v.chunk = blockIdx.x - nl * rblocks;
  v.n = n32;
  v.l = static_cast<int>(nl - n32 * L);
  v.b = static_cast<int>(p.lv.bins[v.l]);
  v.sh = static_cast<acc_t>(p.sh[v.l]);
  v.sw = static_cast<acc_t>(p.sw[v.l]);
  int* tab = reinterpret_cast<int*>(smem + p.off_tab);
  tap_ranges<acc_t>(p, v.b, v.sh, v.sw, tab, tid, nt);
  TapEntry<acc_t>* taps = reinterpret_cast<TapEntry<acc_t>*>(smem + p.off_taps);
  if (p.taps) fill_taps<acc_t>(p, v.b, v.sh, v.sw, taps, tid, nt);
  v.tab = tab;
  v.taps = taps;
  return v;
}

// NCHW: grad_out (N, Ctot, H, W) contiguous. One block per (n, level, P consecutive level channels): P planes of
// one level, consecutive in memory. The block streams them through shared memory in tiles contiguous in grad_out
// (whole planes, a band of whole rows, or a piece of one row; as pool_nchw_kernel), each read once with 16-byte
// loads. Per tile, T[p][h][j] (+)= the tile's part of column bin j's sum (first tile of j assigns); per band,
// G[p][i][j] (+)= the band's part of row bin i's sum, in global memory (first band of i assigns).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kUbThreads, kMinBlocks)
    up_bwd_nchw_kernel(const scalar_t* __restrict__ g, acc_t* __restrict__ out, const __grid_constant__ UpBwdParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  scalar_t* tile = reinterpret_cast<scalar_t*>(smem);
  acc_t* T = reinterpret_cast<acc_t*>(smem + p.off_t);  // T[(pp * TH + hl) * b + j]

  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const UpBwdLevel<acc_t> lvl = up_bwd_level<acc_t>(p, smem, tid, nt);
  const int64_t n = lvl.n;
  const int l = lvl.l, b = lvl.b;
  const int64_t r0 = lvl.chunk * p.P;
  const int np = static_cast<int>(min(static_cast<int64_t>(p.P), p.R - r0));
  const int H = static_cast<int>(p.H), W = static_cast<int>(p.W);
  const int TH = p.TH;
  const auto wcol = [&](int w, int j) { return lvl.wcol(p, w, j); };
  const auto wrow = [&](int h, int i) { return lvl.wrow(p, h, i); };
  const int* rlo = lvl.tab;
  const int* rhi = lvl.tab + b;
  const int* clo = lvl.tab + 2 * b;
  const int* chi = lvl.tab + 3 * b;
  __syncthreads();

  acc_t* o = out + (n * p.R + r0) * p.S + p.lv.offs[l];  // plane pp's bins at o[pp * S + i * b + j]
  const uint32_t ub = static_cast<uint32_t>(b);
  const int bb = b * b;  // <= 2^24
  // Bins no tap reaches (b > H or b > W) get a zero gradient: whole rows of G here, columns through T's zeros
  // (phase 1 never writes an empty column bin).
  for (int pp = 0; pp < np; ++pp) {
    for (int k = tid; k < bb; k += nt) {
      const int i = static_cast<int>(static_cast<uint32_t>(k) / ub);
      if (rlo[i] >= rhi[i]) o[pp * p.S + k] = 0;
    }
  }
  // T lies in shared memory: its indices fit 32 bits, as do every item count below (tile and T sized by the plan).
  for (int it = tid; it < np * TH * b; it += nt) {
    const int j = it - static_cast<int>(static_cast<uint32_t>(it) / ub) * b;
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
      for (int it = tid; it < np * th * nj; it += nt) {
        const int pr = static_cast<int>(static_cast<uint32_t>(it) / static_cast<uint32_t>(nj));  // pp * th + hl
        const int j = j0 + (it - pr * nj);
        const int wa = max(clo[j], w0), wb = min(chi[j], w0 + tw);
        if (wa >= wb) continue;  // an empty column bin
        const scalar_t* row = tile + pr * tw;  // column w at row[w - w0]
        acc_t s = 0;
        for (int w = wa; w < wb; ++w) {
          s += wcol(w, j) * static_cast<acc_t>(row[w - w0]);
        }
        const int pp = static_cast<int>(static_cast<uint32_t>(pr) / static_cast<uint32_t>(th));
        acc_t* d = T + (pp * TH + (pr - pp * th)) * b + j;
        *d = clo[j] >= w0 ? s : *d + s;  // the first tile of this column bin assigns, later ones add
      }
    }
    __syncthreads();
    // Phase 2: items (plane, row bin reaching this band, column bin), column bin fastest.
    const int i0 = first_above(rhi, b, h0);
    const int ni = first_above(rlo, b, h0 + th - 1) - i0;
    for (int it = tid; it < np * ni * b; it += nt) {
      const int q = static_cast<int>(static_cast<uint32_t>(it) / ub);
      const int j = it - q * b;
      const int pp = static_cast<int>(static_cast<uint32_t>(q) / static_cast<uint32_t>(ni));
      const int i = i0 + (q - pp * ni);
      const int ha = max(rlo[i], h0), hb = min(rhi[i], h0 + th);
      if (ha >= hb) continue;  // an empty row bin, zeroed above
      const acc_t* t = T + pp * TH * b + j;  // row h at t[(h - h0) * b]
      acc_t s = 0;
      for (int h = ha; h < hb; ++h) {
        s += wrow(h, i) * t[(h - h0) * b];
      }
      acc_t* d = o + pp * p.S + i * b + j;
      *d = rlo[i] >= h0 ? s : *d + s;  // the first band of this row bin assigns, later ones add (barrier-ordered)
    }
  }
}

// channels_last: grad_out (N, H, W, Ctot) in memory. One block per (n, level, chunk of tc = P level channels);
// thread (group, c) with c fastest takes VEC consecutive channels c .. c + VEC of a pixel (one 16-byte load when
// VEC > 1: C and R multiples of VEC and grad_out aligned, so every pixel's level channels are aligned runs), so
// every load of a pixel's tc channels is one coalesced run. Per band of TH rows, the groups take the (row, column
// bin) items of T round robin and read grad_out directly (a column bin's columns are contiguous pixels; only the one
// or two columns shared with a neighbour bin are read twice), then the (row bin, column bin) items of G.
// T[(hl * b + j) * tc + c] in shared memory. Every channel's sums run in the same order for any VEC.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kUbThreads, kMinBlocks)
    up_bwd_cl_kernel(const scalar_t* __restrict__ g, acc_t* __restrict__ out, const __grid_constant__ UpBwdParams p) {
  using Vec = AlignedVec<scalar_t, VEC>;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* T = reinterpret_cast<acc_t*>(smem + p.off_t);

  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int tc = p.P;
  const int tpp = tc / VEC;  // threads per pixel
  const int cl = (tid % tpp) * VEC;
  const int grp = tid / tpp;
  const int groups = nt / tpp;
  const UpBwdLevel<acc_t> lvl = up_bwd_level<acc_t>(p, smem, tid, nt);
  const int64_t n = lvl.n;
  const int l = lvl.l, b = lvl.b;
  const int64_t r = lvl.chunk * tc + cl;
  const bool valid = r < p.R;  // VEC > 1: R % VEC == 0, so all VEC channels exist
  const int H = static_cast<int>(p.H);
  const int TH = p.TH;
  const auto wcol = [&](int w, int j) { return lvl.wcol(p, w, j); };
  const auto wrow = [&](int h, int i) { return lvl.wrow(p, h, i); };
  const int* rlo = lvl.tab;
  const int* rhi = lvl.tab + b;
  const int* clo = lvl.tab + 2 * b;
  const int* chi = lvl.tab + 3 * b;
  __syncthreads();

  const int64_t S = p.S;
  acc_t* o = out + (n * p.R + r) * S + p.lv.offs[l];  // channel r + m at o + m * S; only dereferenced when valid
  const uint32_t ub = static_cast<uint32_t>(b);
  const int bb = b * b;  // <= 2^24
  if (valid) {
    for (int k = grp; k < bb; k += groups) {
      const int i = static_cast<int>(static_cast<uint32_t>(k) / ub);
      if (rlo[i] >= rhi[i]) {
#pragma unroll
        for (int m = 0; m < VEC; ++m) o[m * S + k] = 0;
      }
    }
  }
  // T lies in shared memory: its indices fit 32 bits, as do the item counts below.
  for (int it = tid; it < TH * b * tc; it += nt) {
    const int e = static_cast<int>(static_cast<uint32_t>(it) / static_cast<uint32_t>(tc));
    const int j = e - static_cast<int>(static_cast<uint32_t>(e) / ub) * b;
    if (clo[j] >= chi[j]) T[it] = 0;
  }

  const int64_t Ctot = p.Ctot;
  const scalar_t* gn = g + n * p.H * p.W * Ctot + p.C + l * p.R + r;  // pixel (h, w) at gn[(h * W + w) * Ctot]
  for (int h0 = 0; h0 < H; h0 += TH) {
    const int th = min(TH, H - h0);
    __syncthreads();  // zeros and tables written; the previous band's phase 2 is done with T
    for (int it = grp; it < th * b; it += groups) {
      const int hl = static_cast<int>(static_cast<uint32_t>(it) / ub);
      const int j = it - hl * b;
      const int wa = clo[j], wb = chi[j];
      if (wa >= wb) continue;  // an empty column bin
      acc_t s[VEC];
#pragma unroll
      for (int m = 0; m < VEC; ++m) s[m] = 0;
      if (valid) {
        const scalar_t* q = gn + (static_cast<int64_t>(h0 + hl) * p.W + wa) * Ctot;
        int w = wa;
        // Independent loads in flight before their multiply-adds: four scalars or two 16-byte vectors.
        constexpr int U = VEC > 1 ? 2 : 4;
        for (; w + U <= wb; w += U) {
          Vec e[U];
#pragma unroll
          for (int u = 0; u < U; ++u) e[u] = load_vec<scalar_t, VEC>(q + u * Ctot);
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const acc_t wt = wcol(w + u, j);
#pragma unroll
            for (int m = 0; m < VEC; ++m) s[m] += wt * static_cast<acc_t>(e[u].v[m]);
          }
          q += U * Ctot;
        }
        for (; w < wb; ++w) {
          const Vec e0 = load_vec<scalar_t, VEC>(q);
          const acc_t wt = wcol(w, j);
#pragma unroll
          for (int m = 0; m < VEC; ++m) s[m] += wt * static_cast<acc_t>(e0.v[m]);
          q += Ctot;
        }
      }
#pragma unroll
      for (int m = 0; m < VEC; ++m) T[it * tc + cl + m] = s[m];
    }
    __syncthreads();
    const int i0 = first_above(rhi, b, h0);
    const int ni = first_above(rlo, b, h0 + th - 1) - i0;
    for (int it = grp; it < ni * b; it += groups) {
      const int q = static_cast<int>(static_cast<uint32_t>(it) / ub);
      const int j = it - q * b;
      const int i = i0 + q;
      const int ha = max(rlo[i], h0), hb = min(rhi[i], h0 + th);
      if (ha >= hb) continue;  // an empty row bin, zeroed above
      const acc_t* t = T + j * tc + cl;  // row h at t[(h - h0) * b * tc]
      acc_t s[VEC];
#pragma unroll
      for (int m = 0; m < VEC; ++m) s[m] = 0;
      for (int h = ha; h < hb; ++h) {
        const acc_t wt = wrow(h, i);
        const acc_t* th_ = t + (h - h0) * b * tc;
#pragma unroll
        for (int m = 0; m < VEC; ++m) s[m] += wt * th_[m];
      }
      if (valid) {
        acc_t* d = o + i * b + j;
        const bool first = rlo[i] >= h0;
#pragma unroll
        for (int m = 0; m < VEC; ++m) d[m * S] = first ? s[m] : d[m * S] + s[m];
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
  // channels_last: 16-byte vectors of V level channels when every pixel's level channels start aligned.
  constexpr int V = 16 / sizeof(scalar_t);
  const bool vec = cl && aligned16(g.const_data_ptr()) && p.C % V == 0 && p.R % V == 0;
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
    // Fewer channels per block when there would be too few blocks, down to one 32-byte sector per pixel (and, for
    // 16-byte vectors, never below one vector: tc >= V, as R % V == 0 and 32 >= V make the doubling reach it).
    const int64_t sms = sm_count();
    while (tc * esz > 32 && N * L * ceil_div(p.R, tc) < 2 * sms) tc /= 2;
    const int64_t tc_min = vec ? V : 1;
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
    while (smem > kDefaultSmem && tc > tc_min) {
      tc /= 2;
      smem = layout(tc, rows_for(tc));
    }
    TORCH_CHECK(smem <= optin, op, ": bins up to ", maxb, " need ", smem,
                " bytes of shared memory per block, the device allows ", optin, " (use smaller bins)");
    p.P = static_cast<int>(tc);
    p.TH = static_cast<int>(rows_for(tc));
    p.TW = static_cast<int>(p.W);
  }
  // The tap table when it fits beside the plan (16 KiB at most, within the budget the plan already needs).
  const int64_t taps_b = align16((p.W + p.H) * static_cast<int64_t>(sizeof(TapEntry<acc_t>)));
  p.off_taps = static_cast<int>(align16(smem));
  p.taps = taps_b <= 16 * 1024 && p.off_taps + taps_b <= (smem <= kDefaultSmem ? kDefaultSmem : optin);
  if (p.taps) smem = p.off_taps + taps_b;
  for (int l = 0; l < p.lv.num; ++l) {
    p.sh[l] = static_cast<double>(linear_scale<acc_t>(p.lv.bins[l], p.H, p.align));
    p.sw[l] = static_cast<double>(linear_scale<acc_t>(p.lv.bins[l], p.W, p.align));
  }
  p.rblocks = ceil_div(p.R, p.P);
  const int64_t blocks = N * L * p.rblocks;
  TORCH_CHECK(blocks <= INT32_MAX, op, ": N * levels * R = ", N * L * p.R, " is too large for one launch");
  auto launch = [&](auto kernel) {
    allow_smem(kernel, smem);
    kernel<<<static_cast<unsigned>(blocks), kUbThreads, smem, stream>>>(g.const_data_ptr<scalar_t>(),
                                                                       out.mutable_data_ptr<acc_t>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (!cl) {
    launch(up_bwd_nchw_kernel<scalar_t, acc_t>);
  } else if (vec) {
    launch(up_bwd_cl_kernel<scalar_t, acc_t, V>);
  } else {
    launch(up_bwd_cl_kernel<scalar_t, acc_t, 1>);
  }
}

Tensor upsample_concat_backward_cuda(const Tensor& grad_in, int64_t in_channels, at::IntArrayRef bins,
                                     bool align_corners, bool x_last) {
  checks::upsample_concat_backward(grad_in, in_channels, bins);
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
  FastDiv wdiv;    // position / W (positions within a plane are int32: H * W <= INT32_MAX / 2)
  float rh, rw;    // 1 / H and 1 / W (float, host-computed): the estimates of pool_bins_of's divisions
  double rc;       // 1 / C: (n, c) of a block's first plane by div_est
};

// Bins of a level of b that contain index x of an extent n (pool_start <= x < pool_end): first = floor(x*b / n),
// last = floor(((x + 1) * b - 1) / n), packed as first | last << 16 (b <= kMaxBin). div_est: no division.
__device__ __forceinline__ uint32_t pool_bins_of(int x, int b, int64_t n, float rn) {
  const int64_t xb = static_cast<int64_t>(x) * b;
  const int64_t first = div_est(xb, n, rn);
  const int64_t last = div_est(xb + b - 1, n, rn);
  return static_cast<uint32_t>(first) | (static_cast<uint32_t>(last) << 16);
}

// pool_end(i, k, n) - pool_start(i, k, n) for n < 2^31, k <= 2^16, in 32-bit arithmetic.
__device__ __forceinline__ int pool_len(int i, int k, int64_t n) {
  return pool_end32(i, k, static_cast<int>(n)) - pool_start32(i, k, static_cast<int>(n));
}

// grad_pooled[idx] / kh_i / kw_j in acc_t (the forward's sum / kh / kw, transposed).
template <typename acc_t>
__device__ __forceinline__ acc_t pool_share(const PoolBwdParams& p, const void* gp, int64_t idx, int b, int i, int j) {
  const int kh = pool_len(i, b, p.H);
  const int kw = pool_len(j, b, p.W);
  return load_level<acc_t>(gp, p.gp_double, idx) / static_cast<acc_t>(kh) / static_cast<acc_t>(kw);
}

// The same, per use in the GENERIC kernels' element loops: float divisions there as __fdividef (2 ulp, no slow-path
// call, whose register saves spilled); float64 keeps the IEEE division. Staged q keeps pool_share's exact quotients.
template <typename acc_t>
__device__ __forceinline__ acc_t pool_share_fast(const PoolBwdParams& p, const void* gp, int64_t idx, int b, int i,
                                                 int j) {
  const acc_t kh = static_cast<acc_t>(pool_len(i, b, p.H));
  const acc_t kw = static_cast<acc_t>(pool_len(j, b, p.W));
  const acc_t v = load_level<acc_t>(gp, p.gp_double, idx);
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(acc_t) == 4) return __fdividef(__fdividef(v, kh), kw);
#endif
  return v / kh / kw;
}

// Fills the tables for the rows [h_lo, h_lo + nrows) a block's positions touch and every column:
// colr[l * W + w], rowr[l * rows + h - h_lo].
__device__ __forceinline__ void pool_bwd_tables(const PoolBwdParams& p, uint32_t* colr, uint32_t* rowr, int h_lo,
                                                int nrows, int tid, int nt) {
  const int W = static_cast<int>(p.W);
  for (int l = 0; l < p.lv.num; ++l) {
    const int b = static_cast<int>(p.lv.bins[l]);
    for (int w = tid; w < W; w += nt) colr[l * W + w] = pool_bins_of(w, b, p.W, p.rw);
    for (int hr = tid; hr < nrows; hr += nt) rowr[l * p.rows + hr] = pool_bins_of(h_lo + hr, b, p.H, p.rh);
  }
}

// Staged q rows: q[u * ustride + k * kstride] = grad_pooled[g0 + u * S + k] / kh / kw for u < nu units (planes or
// channels), k < S; S < 2^31 and nu * S within shared memory, so 32-bit indices and divisions.
template <typename acc_t>
__device__ __forceinline__ void pool_bwd_stage_q(const PoolBwdParams& p, const void* gp, int64_t g0, int nu,
                                                 acc_t* q, int ustride, int kstride, int tid, int nt) {
  const uint32_t S = static_cast<uint32_t>(p.S);
  const uint32_t items = static_cast<uint32_t>(nu) * S;
  for (uint32_t it = tid; it < items; it += nt) {
    const uint32_t u = it / S;
    const uint32_t k = it - u * S;
    const int l = level_of(p.lv.offs, p.lv.num, k);
    const uint32_t b = static_cast<uint32_t>(p.lv.bins[l]);
    const uint32_t kk = k - static_cast<uint32_t>(p.lv.offs[l]);
    const uint32_t i = kk / b;
    q[u * ustride + k * kstride] = pool_share<acc_t>(p, gp, g0 + it, static_cast<int>(b), static_cast<int>(i),
                                                     static_cast<int>(kk - i * b));
  }
}

// One 128-bit global store. store_vec's uint4 store (and __stcg) came out of this file's pyramid_pool_backward
// kernel as four 32-bit stores in the sm_90 SASS; the PTX vector store cannot be split.
__device__ __forceinline__ void store16(void* p, const uint4& u) {
#ifdef __CUDA_ARCH__
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(u.x), "r"(u.y), "r"(u.z), "r"(u.w) : "memory");
#else
  *reinterpret_cast<uint4*>(p) = u;
#endif
}

// NCHW: grad_out (N, C2, H, W) contiguous, out (N, C, H, W). One block per P whole planes or per chunk of E
// positions of one plane. Per plane (n, c and the int64 bases found once per plane, int32 positions within it), the
// out run is written as aligned 16-byte vectors, its unaligned head and tail element-wise (H*W need not be a multiple
// of 8: 90x90 planes start at every alignment); each vector's grad_out elements are one aligned 16-byte load, or two
// cut into one (shift16) when grad_out's plane has another alignment (C2 != C). Position e = h W + w: h by
// multiply-high once per vector, then w steps; the bins of (h, w) from the row and column tables (or, GENERIC, per
// use). Vectors never span two planes.
template <typename scalar_t, typename acc_t, bool GENERIC>
__global__ void __launch_bounds__(kPbThreads, kMinBlocks)
    pool_bwd_nchw_kernel(const void* __restrict__ gp, const scalar_t* __restrict__ go, scalar_t* __restrict__ out,
                         const __grid_constant__ PoolBwdParams p) {
  constexpr int V = 16 / sizeof(scalar_t);
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* q = reinterpret_cast<acc_t*>(smem);
  uint32_t* colr = reinterpret_cast<uint32_t*>(smem + p.off_col);
  uint32_t* rowr = reinterpret_cast<uint32_t*>(smem + p.off_row);
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int L = p.lv.num;
  const int64_t HW = p.H * p.W;
  const int64_t S = p.S;
  const int W = static_cast<int>(p.W);
  // GENERIC kernels read the plan's flags; the others are compiled for q and tables in shared memory.
  const bool stage_q = !GENERIC || p.stage_q;
  const bool tabs = !GENERIC || p.tabs;
  int64_t plane0;
  int pos0, pos1;
  int np;
  if (p.P > 1) {
    plane0 = static_cast<int64_t>(blockIdx.x) * p.P;
    np = static_cast<int>(min(static_cast<int64_t>(p.P), p.planes - plane0));
    pos0 = 0;
    pos1 = static_cast<int>(HW);
  } else {
    const uint32_t chunks = static_cast<uint32_t>(p.chunks);  // blocks = planes * chunks <= INT32_MAX
    const uint32_t pl = blockIdx.x / chunks;
    plane0 = pl;
    pos0 = static_cast<int>((blockIdx.x - pl * chunks) * static_cast<uint32_t>(p.E));
    pos1 = static_cast<int>(min(HW, static_cast<int64_t>(pos0) + p.E));
    np = 1;
  }
  if (stage_q) pool_bwd_stage_q<acc_t>(p, gp, plane0 * S, np, q, static_cast<int>(S), 1, tid, nt);
  const int h_lo = static_cast<int>(fast_div(p.wdiv, pos0));
  if (tabs) {
    pool_bwd_tables(p, colr, rowr, h_lo, static_cast<int>(fast_div(p.wdiv, pos1 - 1)) - h_lo + 1, tid, nt);
  }
  __syncthreads();

  // (n, c) of plane0, then stepped per plane: no division in the plane loop.
  int64_t n = div_est(plane0, p.C, p.rc);
  int64_t c = plane0 - n * p.C;
  for (int pp = 0; pp < np; ++pp, ++c) {
    if (c == p.C) {
      c = 0;
      ++n;
    }
    const int64_t plane = plane0 + pp;
    const scalar_t* g = go + (n * p.C2 + c) * HW;
    scalar_t* o = out + plane * HW;
    const acc_t* qp = q + pp * S;
    const int64_t gbase = plane * S;
    // grad_x at (h, w) given grad_out's value there.
    const auto value = [&](int h, int w, scalar_t gv) {
      acc_t s = 0;
      for (int l = 0; l < L; ++l) {
        const int b = static_cast<int>(p.lv.bins[l]);
        const int off = static_cast<int>(p.lv.offs[l]);
        const uint32_t rr = tabs ? rowr[l * p.rows + (h - h_lo)] : pool_bins_of(h, b, p.H, p.rh);
        const uint32_t cr = tabs ? colr[l * W + w] : pool_bins_of(w, b, p.W, p.rw);
        const int i1 = static_cast<int>(rr >> 16), j0 = static_cast<int>(cr & 0xFFFF), j1 = static_cast<int>(cr >> 16);
        for (int i = static_cast<int>(rr & 0xFFFF); i <= i1; ++i) {
          const int row = off + i * b;
          for (int j = j0; j <= j1; ++j) {
            s += stage_q ? qp[row + j] : pool_share_fast<acc_t>(p, gp, gbase + row + j, b, i, j);
          }
        }
      }
      return static_cast<scalar_t>(static_cast<acc_t>(gv) + s);
    };
    if constexpr (GENERIC) {
      // The fallback (tables or q not in shared memory: per-element bin searches and divisions bound it, not bytes):
      // one element per thread, coalesced scalar accesses, no vector unpacked into a per-element array.
      for (int e = pos0 + tid; e < pos1; e += nt) {
        const int h = static_cast<int>(fast_div(p.wdiv, e));
        o[e] = value(h, e - h * W, g[e]);
      }
      continue;
    }
    const int a = static_cast<int>(reinterpret_cast<uintptr_t>(o + pos0) & 15);
    const int head = min(((16 - a) & 15) / static_cast<int>(sizeof(scalar_t)), pos1 - pos0);
    if (tid < head) {
      const int e = pos0 + tid;
      const int h = static_cast<int>(fast_div(p.wdiv, e));
      o[e] = value(h, e - h * W, g[e]);
    }
    const int body0 = pos0 + head;
    const int nv = (pos1 - body0) / V;
    const int r = static_cast<int>(reinterpret_cast<uintptr_t>(g + body0) & 15);  // uniform over the plane
    const uint4* gs = reinterpret_cast<const uint4*>(reinterpret_cast<const unsigned char*>(g + body0) - r);
    for (int k = tid; k < nv; k += nt) {
      const int e = body0 + k * V;
      const uint4 graw = r == 0 ? __ldg(gs + k) : shift16(__ldg(gs + k), __ldg(gs + k + 1), r);
      AlignedVec<scalar_t, V> gv;
      memcpy(&gv, &graw, 16);
      int h = static_cast<int>(fast_div(p.wdiv, e));
      int w = e - h * W;
      AlignedVec<scalar_t, V> ov;
#pragma unroll
      for (int m = 0; m < V; ++m) {
        ov.v[m] = value(h, w, gv.v[m]);
        if (++w == W) {
          w = 0;
          ++h;
        }
      }
      uint4 ou;
      memcpy(&ou, &ov, 16);
      store16(o + e, ou);
    }
    for (int e = body0 + nv * V + tid; e < pos1; e += nt) {
      const int h = static_cast<int>(fast_div(p.wdiv, e));
      o[e] = value(h, e - h * W, g[e]);
    }
  }
}

// channels_last: grad_out (N, H, W, C2) and out (N, H, W, C) in memory. One block per (n, chunk of tc channels,
// chunk of E pixels); a thread takes VEC consecutive channels of one pixel (one 16-byte load and store), so the
// bin lookups of a pixel serve VEC channels. q[k * tc + c]: a bin's tc channels side by side.
template <typename scalar_t, typename acc_t, int VEC, bool GENERIC>
__global__ void __launch_bounds__(kPbThreads, kMinBlocks)
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
  // blocks = N * cchunks * chunks <= INT32_MAX: 32-bit divisions.
  const uint32_t chunks = static_cast<uint32_t>(p.chunks);
  const uint32_t per_n = static_cast<uint32_t>(p.cchunks) * chunks;
  const uint32_t n32 = blockIdx.x / per_n;
  const uint32_t rem = blockIdx.x - n32 * per_n;
  const uint32_t cb = rem / chunks;
  const int64_t n = n32;
  const int64_t c0 = static_cast<int64_t>(cb) * tc;
  const int nc = static_cast<int>(min(static_cast<int64_t>(tc), p.C - c0));
  const int pos0 = static_cast<int>((rem - cb * chunks) * static_cast<uint32_t>(p.E));  // H * W <= INT32_MAX / 2
  const int pos1 = static_cast<int>(min(HW, static_cast<int64_t>(pos0) + p.E));
  const int64_t gbase = (n * p.C + c0) * S;  // grad_pooled rows of this block's channels: one contiguous run
  if (stage_q) pool_bwd_stage_q<acc_t>(p, gp, gbase, nc, q, 1, tc, tid, nt);
  const int h_lo = static_cast<int>(fast_div(p.wdiv, pos0));
  if (tabs) {
    pool_bwd_tables(p, colr, rowr, h_lo, static_cast<int>(fast_div(p.wdiv, pos1 - 1)) - h_lo + 1, tid, nt);
  }
  __syncthreads();

  const int W = static_cast<int>(p.W);
  const int cv = nc / VEC;
  const int items = (pos1 - pos0) * cv;  // <= E * tc, about kPbChunk (E = kPbChunk / tc)
  for (int u = tid; u < items; u += nt) {
    const int px = static_cast<int>(static_cast<uint32_t>(u) / static_cast<uint32_t>(cv));
    const int c = (u - px * cv) * VEC;
    const int pos = pos0 + px;
    const int h = static_cast<int>(fast_div(p.wdiv, pos));
    const int w = pos - h * W;
    const AlignedVec<scalar_t, VEC> gv = load_vec<scalar_t, VEC>(go + (n * HW + pos) * p.C2 + c0 + c);
    acc_t s[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) s[k] = 0;
    for (int l = 0; l < L; ++l) {
      const int b = static_cast<int>(p.lv.bins[l]);
      const int off = static_cast<int>(p.lv.offs[l]);
      const uint32_t rr = tabs ? rowr[l * p.rows + (h - h_lo)] : pool_bins_of(h, b, p.H, p.rh);
      const uint32_t cr = tabs ? colr[l * W + w] : pool_bins_of(w, b, p.W, p.rw);
      const int i1 = static_cast<int>(rr >> 16), j0 = static_cast<int>(cr & 0xFFFF), j1 = static_cast<int>(cr >> 16);
      for (int i = static_cast<int>(rr & 0xFFFF); i <= i1; ++i) {
        const int row = off + i * b;
        for (int j = j0; j <= j1; ++j) {
          if (stage_q) {
            const acc_t* qk = q + static_cast<int64_t>(row + j) * tc + c;
#pragma unroll
            for (int k = 0; k < VEC; ++k) s[k] += qk[k];
          } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              s[k] += pool_share_fast<acc_t>(p, gp, gbase + static_cast<int64_t>(c + k) * S + row + j, b, i, j);
            }
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
  // channels_last: 16-byte vectors of channels when every pixel row is aligned (NCHW vectorizes at any size).
  const bool vec = cl && ptrs_aligned && p.C % V == 0 && p.C2 % V == 0;
  const int64_t vw = vec ? V : 1;
  const int64_t optin = smem_optin();
  TORCH_CHECK(HW <= INT32_MAX / 2, op, ": H * W = ", HW, " is too large (int32 positions within a plane)");
  p.wdiv = make_fastdiv(static_cast<uint32_t>(p.W));
  p.rh = 1.0f / static_cast<float>(p.H);
  p.rw = 1.0f / static_cast<float>(p.W);
  p.rc = 1.0 / static_cast<double>(p.C);

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
    const int64_t E1 = std::min<int64_t>(HW, kPbChunk);  // positions of a one-plane block
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
      launch(pool_bwd_nchw_kernel<scalar_t, acc_t, true>);
    } else {
      launch(pool_bwd_nchw_kernel<scalar_t, acc_t, false>);
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
  checks::pyramid_pool_backward(grad_pooled_in, grad_out_in, bins, x_offset);
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
  m.impl("upsample_concat_backward", &pspnet_fast::upsample_concat_backward_cuda);
  m.impl("pyramid_pool_backward", &pspnet_fast::pyramid_pool_backward_cuda);
}
