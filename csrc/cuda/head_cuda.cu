// CUDA backend of the fused PSP head's two ops (schemas and contract in csrc/ops.cpp, truth in
// pspnet_fast/reference.py: head_context / head_epilogue / head_context_backward). No atomics: every output element
// is a fixed-order sum computed by the one thread that owns it, so results are bitwise reproducible run to run.
//
//   head_epilogue          z (N, O, H, W), q (N, O, 9, S) -> act((z + context(q)) * scale + shift)
//   head_context_backward  grad (N, O, H, W) -> grad_q (N, O, 9, S), context's adjoint
//
// context is separable. With Ah_l(ys, i) / Aw_l(xs, j) the bilinear resampling weights of level l (linear_tap:
// source taps i0, i1 with weights l0, l1) and the zero padding of the 3x3 taps folded in (ys = y + dy - 1 and
// xs = x + dx - 1 outside the image contribute nothing):
//   V_l[dx][y][j]  = sum_dy sum_i Ah_l(y + dy - 1, i) q[3 dy + dx][off_l + i b + j]          (vertical pass)
//   context(y, x)  = sum_l sum_dx sum_j Aw_l(x + dx - 1, j) V_l[dx][y][j]                      (horizontal pass)
// The K = 3 * sum(bins) rows k = 3 boff_l + dx b + j of V do not depend on W, so a block keeps V for a band of rows
// in shared memory whatever W is; each output then costs 3 L shared-memory loads (one 8- or 16-byte pair
// (V[j0], V[j1]) per level and dx) and 6 L multiply-adds, its column taps held in registers (NCHW) or read from a
// small table with broadcast loads (channels_last, where a warp's lanes are channels of one pixel). The backward runs
// the same two passes transposed: G_l[dx][y][j] = sum_x Aw_l(x + dx - 1, j) grad(y, x) per row (owner: one thread
// per (dx, j, y)), then grad_q[3 dy + dx][off_l + i b + j] = sum_y Ah_l(y + dy - 1, i) G_l[dx][y][j] (owner: one
// thread per output element, accumulated band after band in band order).
//
// Numerics: accumulation in float (double for double); the separable order rounds differently from the reference's
// per-level, per-tap bilinear sums (float32: a few ulps of the sum of |terms|). Non-finite q: a NaN behind a zero
// weight propagates as in PyTorch, but Inf times a zero weight gives NaN here where the reference's per-tap order
// may keep Inf. Where even the smallest shared-memory plan does not fit (enormous bins or W), DIRECT kernels compute
// every output element on its own from global memory: slow, but correct, bounded and deterministic.
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
#include "op_checks.h"  // checks, device queries, div_nn, level_of, tap_weight, tap_bound, stage_contiguous
#include "ppm_math.h"

namespace pspnet_fast {
namespace {

using at::Tensor;

constexpr int kHeadThreads = 256;              // block size of the staged backward kernel
// Most threads of a staged epilogue block (W = 90: 90 x 4 = 360), two blocks per SM in 80 registers (float).
constexpr int kEpiThreads = 384;
constexpr int kDirectThreads = 256;
constexpr int kMaxChunk = 32;                  // channels_last: channels per block (one warp's lanes)

// Per-level tables, passed by value in the kernel arguments.
// The PPM's level table (cuda_host.h): K = 3 * boff[num] rows of V / G, level l's from 3 * boff[l].
using HeadLevels = LevelTable;

struct HeadParams {
  HeadLevels lv;
  int64_t N, O, H, W, S, K;
  // Element (n, c, y, x) of z / out / grad at n * sN + c * sC + y * sH + x * sW (contiguous or channels_last).
  int64_t sN, sC, sH, sW;
  bool align;
  bool relu, affine;   // epilogue only
  bool stage_q;        // epilogue: q of the block's channels staged in shared memory (else read from global)
  bool stage_z;        // epilogue: each band of z staged in shared memory (many loads in flight; else per output)
  bool cl;             // epilogue: channels_last (else NCHW contiguous)
  bool cl_vec;         // epilogue, channels_last: z / out bands moved in 16-byte runs of a pixel's channels
  bool col_table;      // backward: column taps of every level in a shared-memory table (else computed per use)
  int OC;              // channels per block (1 for NCHW)
  int OCP;             // padded channel stride of staged q / staged grad (OC + 1 when OC > 1: no bank conflicts)
  int64_t cchunks;     // ceil(O / OC)
  int RB;              // rows per band
  int TX, TY;          // epilogue output phase: blockDim = OC * TX * TY, thread (c, tx, ty) with c fastest
  int oc_shift;        // epilogue: log2(OC) (OC is a power of two)
  int vsh;             // epilogue, cl_vec: log2(16-byte vectors per pixel chunk)
  float scf[2][kMaxLevels];   // epilogue: linear_scale of level l over H (0) and W (1), float and double
  double scd[2][kMaxLevels];
  int64_t off_v;       // dynamic shared memory byte offsets
  int64_t off_z;
  int64_t off_ctab;
  int64_t off_ktab;
  int64_t off_rtab;
  int64_t off_tab;
  int64_t off_col;
  int64_t GS;          // backward: row stride (elements) of the staged grad band
  int64_t total;       // direct kernels: number of output elements
  double rS, rO, rH, rW;  // direct kernels: 1 / S, 1 / O, 1 / H, 1 / W (fill_scales), for div_est
};

// channels_last epilogue: the column taps of level l at xs (entry l (W + 2) + xs + 1; xs = -1 and W are the zero
// row's): V row k of the left tap, the two weights. One 16-byte (float) shared-memory load, a broadcast to the warp.
template <typename T>
struct alignas(16) ColTap {
  T w0, w1;
  int k;
};

// Epilogue, per V row k (0..K): q column offset dx S + off_l of its level and dx, column taps j and j1, level (-1:
// the zero row K).
struct alignas(16) KRow {
  int qb, j, j1, l;
};

// Epilogue, per level and band row ys: q row offsets i0 b, i1 b (r0 < 0: ys outside the image; r1 < 0: a copy), the
// two weights.
template <typename T>
struct alignas(16) RowTap {
  int r0, r1;
  T l0, l1;
};

template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T a, b;  // (V[j], V[j1]) with j1 = j + (j < b - 1): the two column taps of one output in one load
};

HeadLevels make_head_levels(const char* op, at::IntArrayRef bins) { return make_levels(op, bins); }

// The most dynamic shared memory one block may opt in to on this device.
int64_t head_smem_optin() {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, current_device()));
  return v;
}

// Rows per band: at most rmax, the bands as even as their count allows (90 rows in 85 + 5 would run a second,
// nearly empty band; 45 + 45 costs the same shared memory and half the idle threads in the last one).
int64_t even_bands(int64_t H, int64_t rmax) {
  const int64_t bands = ceil_div(H, std::max<int64_t>(rmax, 1));
  return ceil_div(H, bands);
}

void fill_strides(HeadParams& p, const Tensor& t) {
  p.sN = t.stride(0);
  p.sC = t.stride(1);
  p.sH = t.stride(2);
  p.sW = t.stride(3);
}

// ------------------------------------------------------------------------------------------------------------------
// head_epilogue
// ------------------------------------------------------------------------------------------------------------------

// linear_tap with int indices: the same float operations in the same order (so the same taps and weights), without
// 64-bit integer arithmetic; the staged kernels' extents fit int (H, W checked, bins <= 2^16).
template <typename acc_t>
struct Tap32 {
  int i0, i1;
  acc_t l0, l1;
};

template <typename acc_t>
__device__ __forceinline__ Tap32<acc_t> tap32(acc_t scale, int dst, int in, int out, bool align) {
  Tap32<acc_t> t;
  if (in == out) {  // a dimension that keeps its size is a copy (linear_tap's rule)
    t.i0 = t.i1 = dst;
    t.l0 = static_cast<acc_t>(1);
    t.l1 = static_cast<acc_t>(0);
    return t;
  }
  acc_t src;
  if (align) {
    src = scale * static_cast<acc_t>(dst);
  } else {
    src = fused_mul_add(scale, static_cast<acc_t>(dst) + static_cast<acc_t>(0.5), static_cast<acc_t>(-0.5));
    src = src < static_cast<acc_t>(0) ? static_cast<acc_t>(0) : src;
  }
  const int i0 = static_cast<int>(floor(src));
  t.i0 = i0 < in - 1 ? i0 : in - 1;
  acc_t l1 = src - static_cast<acc_t>(t.i0);
  l1 = l1 < static_cast<acc_t>(0) ? static_cast<acc_t>(0) : l1;
  l1 = l1 > static_cast<acc_t>(1) ? static_cast<acc_t>(1) : l1;
  t.l1 = l1;
  t.l0 = static_cast<acc_t>(1) - l1;
  t.i1 = t.i0 + (t.i0 < in - 1 ? 1 : 0);
  return t;
}

// The level's resampling scale (linear_scale, computed on the host in acc_t: no division on the device).
template <typename acc_t>
__device__ __forceinline__ acc_t level_scale(const HeadParams& p, int dim, int l) {
  if constexpr (sizeof(acc_t) == 8) {
    return p.scd[dim][l];
  } else {
    return p.scf[dim][l];
  }
}

// Copies n elements between global and shared memory (either way): 16-byte accesses when src and dst have the same
// address modulo 16 (the kernels place their shared buffers so), the unaligned head and tail element by element;
// element by element throughout otherwise.
template <typename T>
__device__ __forceinline__ void copy_run(const T* __restrict__ src, T* __restrict__ dst, int n, int tid, int nt) {
  constexpr int V = 16 / sizeof(T);
  const uintptr_t a = reinterpret_cast<uintptr_t>(src);
  if (((a ^ reinterpret_cast<uintptr_t>(dst)) & 15) != 0) {
    for (int i = tid; i < n; i += nt) dst[i] = src[i];
    return;
  }
  int head = static_cast<int>(((16 - (a & 15)) & 15) / sizeof(T));
  head = head < n ? head : n;
  const int nv = (n - head) / V;
  const uint4* vs = reinterpret_cast<const uint4*>(src + head);
  uint4* vd = reinterpret_cast<uint4*>(dst + head);
#pragma unroll 4
  for (int i = tid; i < nv; i += nt) vd[i] = vs[i];
  const int rest = n - nv * V;  // head elements, then the tail after the vectors
  for (int i = tid; i < rest; i += nt) {
    const int e = i < head ? i : nv * V + i;
    dst[e] = src[e];
  }
}

// z, out: element (n, c, y, x) at n sN + c sC + y sH + x sW; q (N, O, 9, S), scale / shift (O) contiguous, acc_t.
// Persistent blocks (grid from the occupancy calculator) loop over items (n, chunk of OC channels). Once per block:
// the table of V rows (ktab: level, dx, column taps j / j1 of row k) and, with more than 4 levels, the column taps of
// every level and column (ctab); with up to 4 levels each thread keeps its column's 12 taps in registers instead.
// Per item the block stages its channels' q (qs[(t S + s) OCP + c]), then per band of RB rows: the row taps of the
// band (rtab, per level and row y0 - 1 .. y0 + RB), (0) the band of z copied into shared memory (zs[(yl W + x) OC +
// c], memory order; 16-byte loads: NCHW one contiguous run placed at out's address modulo 16, channels_last 16-byte
// runs of a pixel's channels when they align), (1) V[(k RB + yl) OC + c] = (V_k(y), V_k1(y)) pairs, (2) every
// thread (c, tx, ty) adds the context to its outputs in shared memory, in place of z: the columns x = tx + m TX, the
// rows yl = ty + m' TY, one shared-memory pair per level and dx (NCHW: a broadcast across the warp's columns of one
// row; channels_last: the warp's 32 channels of one pixel, 256 distinct bytes), (3) the band copied out with 16-byte
// stores. No division and no 64-bit arithmetic per element: carried counters for the V items, int offsets within a
// band, one 64-bit base per band.
// Launch bounds: two blocks per SM in 80 registers for the float register-tap kernel; one for fp64 and for the table
// kernel (more than 4 levels: rare), which would spill under 80 registers on sm_80.
template <typename scalar_t, typename acc_t, bool REG_TAPS>
__global__ void __launch_bounds__(kEpiThreads, (sizeof(acc_t) == 8 || !REG_TAPS) ? 1 : 2)
    head_epilogue_kernel(const scalar_t* __restrict__ z, const acc_t* __restrict__ q, const acc_t* __restrict__ scale,
                         const acc_t* __restrict__ shift, scalar_t* __restrict__ out,
                         const __grid_constant__ HeadParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* qs = reinterpret_cast<acc_t*>(smem);
  Pair<acc_t>* V = reinterpret_cast<Pair<acc_t>*>(smem + p.off_v);
  scalar_t* zs = reinterpret_cast<scalar_t*>(smem + p.off_z);
  ColTap<acc_t>* ctab = reinterpret_cast<ColTap<acc_t>*>(smem + p.off_ctab);
  KRow* ktab = reinterpret_cast<KRow*>(smem + p.off_ktab);
  RowTap<acc_t>* rtab = reinterpret_cast<RowTap<acc_t>*>(smem + p.off_rtab);

  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int L = p.lv.num;
  const int OC = p.OC, OCP = p.OCP, RB = p.RB, RT = p.RB + 2;
  const int S = static_cast<int>(p.S), H = static_cast<int>(p.H), W = static_cast<int>(p.W);
  const int K = static_cast<int>(p.K);
  const int qplane = 9 * S;
  const bool align = p.align;

  // Tables that depend only on the bins, H and W: once per block.
  for (int k = tid; k <= K; k += nt) {
    KRow e{0, 0, 0, -1};  // row K: the zero row (column taps outside the image point there)
    if (k < K) {
      int l = 0;
      while (l + 1 < L && k >= 3 * static_cast<int>(p.lv.boff[l + 1])) ++l;
      const int b = static_cast<int>(p.lv.bins[l]);
      const int kk = k - 3 * static_cast<int>(p.lv.boff[l]);
      const int dx = kk / b;
      const int j = kk - dx * b;
      e.qb = dx * S + static_cast<int>(p.lv.offs[l]);
      e.j = j;
      e.j1 = (j < b - 1 && b != W) ? j + 1 : j;  // the right column tap, as linear_tap picks it (none for a copy)
      e.l = l;
    }
    ktab[k] = e;
  }
  if (!REG_TAPS) {
    const int W2 = W + 2;
    for (int it = tid; it < L * W2; it += nt) {
      const int l = it / W2;
      const int xs = it - l * W2 - 1;
      const int b = static_cast<int>(p.lv.bins[l]);
      ColTap<acc_t> e;
      if (xs >= 0 && xs < W) {
        const Tap32<acc_t> tw = tap32<acc_t>(level_scale<acc_t>(p, 1, l), xs, b, W, align);
        e.w0 = tw.l0;
        e.w1 = tw.l1;
        e.k = 3 * static_cast<int>(p.lv.boff[l]) + tw.i0;  // + dx * b at the use
      } else {
        e.w0 = e.w1 = 0;
        e.k = -1;  // the zero row K at the use
      }
      ctab[it] = e;
    }
  }

  // Output phase geometry: thread (c, tx, ty), c fastest; nt = OC TX TY, OC a power of two.
  const int c = tid & (OC - 1);
  const int txy = tid >> p.oc_shift;
  const int tx = txy % p.TX;
  const int ty = txy / p.TX;
  // Column taps in registers (L <= 4): per (level, dx) the V entry at yl = 0 (left tap; the zero row K when xs is
  // outside the image) and the two weights; computed once when a thread has one column (W <= TX), else per column.
  constexpr int NT = REG_TAPS ? 12 : 1;
  int cj[NT];
  acc_t cw0[NT], cw1[NT];
  auto col_taps = [&](int x) {
#pragma unroll
    for (int l = 0; l < (REG_TAPS ? 4 : 0); ++l) {
      const int b = l < L ? static_cast<int>(p.lv.bins[l]) : 1;
      const acc_t sw = l < L ? level_scale<acc_t>(p, 1, l) : static_cast<acc_t>(0);
#pragma unroll
      for (int dx = 0; dx < 3; ++dx) {
        const int xs = x + dx - 1;
        if (l < L && xs >= 0 && xs < W) {
          const Tap32<acc_t> tw = tap32<acc_t>(sw, xs, b, W, align);
          // The pair at tw.i0 holds (V[tw.i0], V[tw.i1]): the same rule picks j1 in the vertical pass.
          cj[3 * l + dx] = (3 * static_cast<int>(p.lv.boff[l]) + dx * b + tw.i0) * RB * OC + c;
          cw0[3 * l + dx] = tw.l0;
          cw1[3 * l + dx] = tw.l1;
        } else {
          cj[3 * l + dx] = K * RB * OC + c;
          cw0[3 * l + dx] = cw1[3 * l + dx] = 0;
        }
      }
    }
  };
  const bool one_col = W <= p.TX;
  if (REG_TAPS && one_col) col_taps(tx);

  int rtab_y0 = -1;
  const int items = static_cast<int>(p.N * p.cchunks);  // < 2^31 (the launcher checks)
  const int cchunks = static_cast<int>(p.cchunks);
  for (int item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t n = item / cchunks;  // once per item
    const int64_t c0 = static_cast<int64_t>(item - static_cast<int>(n) * cchunks) * OC;
    const int oc = static_cast<int>(min(static_cast<int64_t>(OC), p.O - c0));  // channels that exist
    const acc_t* qn = q + (n * p.O + c0) * qplane;  // channel c0 + cc: qn[cc * 9S + t * S + s]
    const bool active = c < oc && ty < p.TY;
    const acc_t sc = (active && p.affine) ? scale[c0 + c] : static_cast<acc_t>(1);
    const acc_t sf = (active && p.affine) ? shift[c0 + c] : static_cast<acc_t>(0);
    __syncthreads();  // tables written; the previous item's readers of qs and zs are done
    if (p.stage_q) {
      // Global reads in memory order (coalesced), shared writes at stride OCP (odd when OC > 1: no bank conflicts).
      for (int cc = 0; cc < OC; ++cc) {
        for (int ts = tid; ts < qplane; ts += nt) {
          qs[ts * OCP + cc] = cc < oc ? qn[cc * qplane + ts] : static_cast<acc_t>(0);
        }
      }
    }
    for (int y0 = 0; y0 < H; y0 += RB) {
      const int rb = min(RB, H - y0);
      if (y0 != rtab_y0) {  // the same for every thread of the block
        __syncthreads();    // the previous band's readers of rtab are done
        // Row taps of rows ys = y0 - 1 .. y0 + RB (entry l RT + ys - y0 + 1); r0 < 0: outside the image (the zero
        // padding: no term), r1 < 0: the level keeps H's size (a copy, one term, as ATen's CPU kernel).
        for (int it = tid; it < L * RT; it += nt) {
          const int l = it / RT;
          const int ys = y0 - 1 + (it - l * RT);
          RowTap<acc_t> e{-1, -1, 0, 0};
          if (ys >= 0 && ys < H) {
            const int b = static_cast<int>(p.lv.bins[l]);
            const Tap32<acc_t> th = tap32<acc_t>(level_scale<acc_t>(p, 0, l), ys, b, H, align);
            e.r0 = th.i0 * b;
            e.r1 = b == H ? -1 : th.i1 * b;
            e.l0 = th.l0;
            e.l1 = th.l1;
          }
          rtab[it] = e;
        }
        rtab_y0 = y0;
      }
      __syncthreads();  // q staged, rtab written, the previous band copied out
      // (0) The band of z, read once, in memory order, many loads in flight.
      scalar_t* zb = zs;
      int64_t gbase = 0;  // element offset of the band's first (pixel, channel) in z and out
      if (p.stage_z) {
        if (OC == 1 && !p.cl) {  // NCHW: rows y0 .. y0 + rb of one plane, contiguous
          gbase = n * p.sN + c0 * p.sC + static_cast<int64_t>(y0) * W;
          zb = zs + (reinterpret_cast<uintptr_t>(out + gbase) & 15) / sizeof(scalar_t);  // out's address mod 16
          copy_run(z + gbase, zb, rb * W, tid, nt);
        } else {  // channels_last: per pixel a run of oc channels, pixel pix of the band at gbase + pix sW
          gbase = n * p.sN + static_cast<int64_t>(y0) * p.sH + c0;
          if (p.cl_vec) {  // whole chunks of 16-byte runs: vector v = (pixel v >> vsh, part v & (2^vsh - 1))
            constexpr int VE = 16 / sizeof(scalar_t);
            const int nv = (rb * W) << p.vsh;
            const int vm = (1 << p.vsh) - 1;
            uint4* zv = reinterpret_cast<uint4*>(zs);
#pragma unroll 4
            for (int v = tid; v < nv; v += nt) {
              zv[v] = *reinterpret_cast<const uint4*>(z + gbase + static_cast<int64_t>(v >> p.vsh) * p.sW +
                                                      (v & vm) * VE);
            }
          } else {
            const int band = (rb * W) << p.oc_shift;
            for (int it = tid; it < band; it += nt) {
              const int cc = it & (OC - 1);
              zs[it] = cc < oc ? z[gbase + static_cast<int64_t>(it >> p.oc_shift) * p.sW + cc] : static_cast<scalar_t>(0);
            }
          }
        }
      }
      // (1) Vertical pass: items r = k rb + yl of channel c (nt is a multiple of OC), counters carried, no division.
      {
        const int rows = (K + 1) * rb;
        const int r0 = tid >> p.oc_shift;
        const int step = nt >> p.oc_shift;
        const int dk = step / rb, dyl = step - dk * rb;  // once per band
        int k = r0 / rb, yl = r0 - k * rb;
        for (int r = r0; r < rows; r += step) {
          const KRow kr = ktab[k];
          acc_t v0 = 0, v1 = 0;
          if (kr.l >= 0 && c < oc) {
            const RowTap<acc_t>* rt = rtab + kr.l * RT + yl;  // rows ys = y - 1, y, y + 1 of this level
#pragma unroll
            for (int dy = 0; dy < 3; ++dy) {
              const RowTap<acc_t> th = rt[dy];
              if (th.r0 < 0) continue;
              const int base = 3 * dy * S + kr.qb;  // (3 dy + dx) S + off_l
              const int e00 = base + th.r0 + kr.j, e01 = base + th.r0 + kr.j1;
              acc_t a00, a01;
              if (p.stage_q) {
                a00 = qs[e00 * OCP + c];
                a01 = qs[e01 * OCP + c];
              } else {
                a00 = qn[c * qplane + e00];
                a01 = qn[c * qplane + e01];
              }
              if (th.r1 < 0) {
                v0 += th.l0 * a00;
                v1 += th.l0 * a01;
              } else {
                const int e10 = base + th.r1 + kr.j, e11 = base + th.r1 + kr.j1;
                acc_t a10, a11;
                if (p.stage_q) {
                  a10 = qs[e10 * OCP + c];
                  a11 = qs[e11 * OCP + c];
                } else {
                  a10 = qn[c * qplane + e10];
                  a11 = qn[c * qplane + e11];
                }
                v0 += th.l0 * a00 + th.l1 * a10;
                v1 += th.l0 * a01 + th.l1 * a11;
              }
            }
          }
          V[(k * RB + yl) * OC + c] = Pair<acc_t>{v0, v1};
          yl += dyl;
          k += dk;
          if (yl >= rb) {
            yl -= rb;
            ++k;
          }
        }
      }
      __syncthreads();
      // (2) Horizontal pass and the epilogue, in place of z in shared memory (or straight to out without a z band).
      auto emit = [&](int yl, int x, acc_t ctx) {
        const int zi = ((yl * W + x) << p.oc_shift) + c;
        int64_t ge = 0;
        if (!p.stage_z) ge = n * p.sN + (c0 + c) * p.sC + static_cast<int64_t>(y0 + yl) * p.sH + x * p.sW;
        const scalar_t zv = p.stage_z ? zb[zi] : z[ge];
        acc_t v = static_cast<acc_t>(zv) + ctx;
        if (p.affine) v = v * sc + sf;
        if (p.relu) v = relu_nan(v);
        if (p.stage_z) {
          zb[zi] = static_cast<scalar_t>(v);
        } else {
          out[ge] = static_cast<scalar_t>(v);
        }
      };
      if (active) {
        if constexpr (REG_TAPS) {
          for (int x = tx; x < W; x += p.TX) {
            if (!one_col) col_taps(x);
            for (int yl = ty; yl < rb; yl += p.TY) {
              acc_t ctx = 0;
#pragma unroll
              for (int t = 0; t < 12; ++t) {
                if (t < 3 * L) {
                  const Pair<acc_t> v = V[cj[t] + yl * OC];  // shared-memory indices fit int (the plan checks)
                  ctx = fused_mul_add(cw0[t], v.a, ctx);
                  ctx = fused_mul_add(cw1[t], v.b, ctx);
                }
              }
              emit(yl, x, ctx);
            }
          }
        } else {
          // Column taps from the table; channels_last: the warp's lanes are channels of one pixel (broadcasts).
          const int W2 = W + 2;
          for (int x = tx; x < W; x += p.TX) {
            for (int yl = ty; yl < rb; yl += p.TY) {
              acc_t ctx = 0;
              for (int l = 0; l < L; ++l) {
                const int b = static_cast<int>(p.lv.bins[l]);
#pragma unroll
                for (int dx = 0; dx < 3; ++dx) {
                  const ColTap<acc_t> e = ctab[l * W2 + x + dx];  // xs + 1 = x + dx
                  const int k = e.k < 0 ? K : e.k + dx * b;
                  const Pair<acc_t> v = V[(k * RB + yl) * OC + c];
                  ctx = fused_mul_add(e.w0, v.a, ctx);
                  ctx = fused_mul_add(e.w1, v.b, ctx);
                }
              }
              emit(yl, x, ctx);
            }
          }
        }
      }
      // (3) The band out, 16-byte stores where the layout allows.
      if (p.stage_z) {
        __syncthreads();
        if (OC == 1 && !p.cl) {
          copy_run(static_cast<const scalar_t*>(zb), out + gbase, rb * W, tid, nt);
        } else if (p.cl_vec) {
          constexpr int VE = 16 / sizeof(scalar_t);
          const int nv = (rb * W) << p.vsh;
          const int vm = (1 << p.vsh) - 1;
          const uint4* zv = reinterpret_cast<const uint4*>(zs);
#pragma unroll 4
          for (int v = tid; v < nv; v += nt) {
            *reinterpret_cast<uint4*>(out + gbase + static_cast<int64_t>(v >> p.vsh) * p.sW + (v & vm) * VE) = zv[v];
          }
        } else {
          const int band = (rb * W) << p.oc_shift;
          for (int it = tid; it < band; it += nt) {
            const int cc = it & (OC - 1);
            if (cc < oc) out[gbase + static_cast<int64_t>(it >> p.oc_shift) * p.sW + cc] = zs[it];
          }
        }
      }
    }
  }
}

// Fallback: one thread per output element (grid-stride, in the output's memory order), q read from global memory,
// each level and tap through linear_tap / bilinear in ATen's order, summed in the reference's order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kDirectThreads)
    head_epilogue_direct_kernel(const scalar_t* __restrict__ z, const acc_t* __restrict__ q,
                                const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                                scalar_t* __restrict__ out, const __grid_constant__ HeadParams p) {
  const int64_t H = p.H, W = p.W, O = p.O, S = p.S;
  const bool cl = p.sC == 1 && O > 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < p.total; e += stride) {
    // div_est with the host's reciprocals: no 64-bit division (whose subroutine call is a slow path per element).
    int64_t n, c, y, x;
    if (cl) {  // memory order (n, y, x, c)
      int64_t r = div_est(e, O, p.rO);
      c = e - r * O;
      const int64_t r2 = div_est(r, W, p.rW);
      x = r - r2 * W;
      n = div_est(r2, H, p.rH);
      y = r2 - n * H;
    } else {  // memory order (n, c, y, x)
      int64_t r = div_est(e, W, p.rW);
      x = e - r * W;
      const int64_t r2 = div_est(r, H, p.rH);
      y = r - r2 * H;
      n = div_est(r2, O, p.rO);
      c = r2 - n * O;
    }
    const acc_t* qc = q + (n * O + c) * 9 * S;
    acc_t ctx = 0;
    for (int l = 0; l < p.lv.num; ++l) {
      const int64_t b = p.lv.bins[l];
      const acc_t sh = level_scale<acc_t>(p, 0, l);
      const acc_t sw = level_scale<acc_t>(p, 1, l);
      for (int t = 0; t < 9; ++t) {
        const int64_t ys = y + t / 3 - 1, xs = x + t % 3 - 1;
        if (ys < 0 || ys >= H || xs < 0 || xs >= W) continue;
        const LinearTap<acc_t> th = linear_tap<acc_t>(sh, ys, b, H, p.align);
        const LinearTap<acc_t> tw = linear_tap<acc_t>(sw, xs, b, W, p.align);
        const acc_t* m = qc + t * S + p.lv.offs[l];
        ctx += bilinear<acc_t>(th.l0, th.l1, tw.l0, tw.l1, m[th.i0 * b + tw.i0], m[th.i0 * b + tw.i1],
                               m[th.i1 * b + tw.i0], m[th.i1 * b + tw.i1]);
      }
    }
    const int64_t off = n * p.sN + c * p.sC + y * p.sH + x * p.sW;
    acc_t v = static_cast<acc_t>(z[off]) + ctx;
    if (p.affine) v = v * scale[c] + shift[c];
    if (p.relu) v = relu_nan(v);
    out[off] = static_cast<scalar_t>(v);
  }
}

// Picks OC, RB and what to stage so that shared memory fits: first under the default 48 KiB (more resident blocks),
// then up to the opt-in limit; z bands are given up last (large W), q before them, and channels_last halves its
// channel chunk before giving up either. Returns the bytes, or -1 when no staged plan fits (the direct kernel runs).
// Layout: qs | ktab | ctab (table path only) | rtab | V | zs (+ 16 bytes: the NCHW band sits at out's address mod 16).
int64_t plan_epilogue(HeadParams& p, bool cl, bool reg_taps, int64_t asz, int64_t esz, int64_t optin) {
  int64_t oc0 = 1;
  if (cl) {
    while (oc0 < p.O && oc0 < kMaxChunk) oc0 *= 2;
  }
  const int64_t L = p.lv.num;
  const int64_t tap_sz = asz == 8 ? sizeof(ColTap<double>) : sizeof(ColTap<float>);
  const int64_t rt_sz = asz == 8 ? sizeof(RowTap<double>) : sizeof(RowTap<float>);
  const int64_t ctab_b = reg_taps ? 0 : align16(L * (p.W + 2) * tap_sz);
  const int64_t ktab_b = align16((p.K + 1) * static_cast<int64_t>(sizeof(KRow)));
  // The kernel indexes q, V and the band with int.
  if (9 * p.S * kMaxChunk > std::numeric_limits<int32_t>::max() / 2 || (p.K + 1) * p.H > (int64_t{1} << 28)) return -1;
  for (const int64_t budget : {std::min(kDefaultSmem, optin), optin}) {
    for (const bool stage_z : {true, false}) {
      for (const bool stage_q : {true, false}) {
        for (int64_t oc = oc0; oc >= 1; oc /= 2) {
          const int64_t ocp = oc > 1 ? oc + 1 : 1;
          const int64_t q_b = stage_q ? align16(9 * p.S * ocp * asz) : 0;
          const int64_t fixed = q_b + ktab_b + ctab_b;
          const int64_t v_row = (p.K + 1) * oc * 2 * asz;  // V rows 0..K, K the zero row
          const int64_t z_row = stage_z ? p.W * oc * esz : 0;
          const int64_t per_row = v_row + z_row + L * rt_sz;
          const int64_t extra = 2 * L * rt_sz + 64;  // rtab's two extra rows, alignment, the band's 16-byte shift
          if (fixed + per_row + extra > budget) continue;
          const int64_t rb = even_bands(p.H, (budget - fixed - extra) / per_row);
          if (rb * (v_row + z_row) > std::numeric_limits<int32_t>::max() / 2) continue;
          p.stage_q = stage_q;
          p.stage_z = stage_z;
          p.OC = static_cast<int>(oc);
          p.OCP = static_cast<int>(ocp);
          p.RB = static_cast<int>(rb);
          p.off_ktab = q_b;
          p.off_ctab = p.off_ktab + ktab_b;
          p.off_rtab = p.off_ctab + ctab_b;
          p.off_v = p.off_rtab + align16(L * (rb + 2) * rt_sz);
          p.off_z = align16(p.off_v + rb * v_row);
          const int64_t tx = std::min<int64_t>(p.W, kEpiThreads / oc);
          p.TX = static_cast<int>(tx);
          p.TY = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rb, kEpiThreads / (oc * tx))));
          return p.off_z + rb * z_row + (stage_z ? 16 : 0);
        }
      }
    }
  }
  return -1;
}

// The levels' resampling scales over H and W (linear_scale in float and in double: the kernels read them, no division
// on the device).
void fill_scales(HeadParams& p) {
  for (int l = 0; l < p.lv.num; ++l) {
    p.scf[0][l] = linear_scale<float>(p.lv.bins[l], p.H, p.align);
    p.scf[1][l] = linear_scale<float>(p.lv.bins[l], p.W, p.align);
    p.scd[0][l] = linear_scale<double>(p.lv.bins[l], p.H, p.align);
    p.scd[1][l] = linear_scale<double>(p.lv.bins[l], p.W, p.align);
  }
  p.rS = 1.0 / static_cast<double>(std::max<int64_t>(p.S, 1));
  p.rO = 1.0 / static_cast<double>(std::max<int64_t>(p.O, 1));
  p.rH = 1.0 / static_cast<double>(std::max<int64_t>(p.H, 1));
  p.rW = 1.0 / static_cast<double>(std::max<int64_t>(p.W, 1));
}

int log2_exact(int64_t v) {
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

template <typename scalar_t>
void launch_epilogue(const Tensor& z, const Tensor& q, const Tensor& scale, const Tensor& shift, Tensor& out,
                     HeadParams& p, bool cl) {
  using acc_t = at::opmath_type<scalar_t>;
  const char* op = "head_epilogue";
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const acc_t* qp = q.const_data_ptr<acc_t>();
  const acc_t* scp = p.affine ? scale.const_data_ptr<acc_t>() : nullptr;
  const acc_t* shp = p.affine ? shift.const_data_ptr<acc_t>() : nullptr;
  scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
  // Column taps in registers whenever L <= 4 (channels_last too: a thread's column x stays for all rows of a band, so
  // its 12 taps are computed once per column instead of read from the table for every output).
  const bool reg_taps = p.lv.num <= 4;
  const int64_t esz = sizeof(scalar_t);
  const int64_t smem = plan_epilogue(p, cl, reg_taps, sizeof(acc_t), esz, head_smem_optin());
  if (smem < 0) {
    p.total = p.N * p.O * p.H * p.W;
    fill_scales(p);
    const int64_t blocks = std::min<int64_t>(ceil_div(p.total, kDirectThreads), int64_t{1} << 20);
    auto direct = head_epilogue_direct_kernel<scalar_t, acc_t>;
    direct<<<static_cast<unsigned>(blocks), kDirectThreads, 0, stream>>>(zp, qp, scp, shp, op_, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  p.cchunks = ceil_div(p.O, p.OC);
  p.cl = cl;
  p.oc_shift = log2_exact(p.OC);
  // channels_last 16-byte runs: every chunk full, each pixel's chunk a whole number of 16-byte vectors, aligned.
  p.cl_vec = cl && p.stage_z && (p.OC * esz) % 16 == 0 && p.O % p.OC == 0 && (p.O * esz) % 16 == 0 &&
             aligned16(zp) && aligned16(op_);
  p.vsh = p.cl_vec ? log2_exact(p.OC * esz / 16) : 0;
  fill_scales(p);
  const int64_t items = p.N * p.cchunks;
  TORCH_CHECK(items <= std::numeric_limits<int32_t>::max(), op, ": N * ceil(O / ", p.OC, ") = ", items,
              " work items is too many for one launch");
  const int threads = p.OC * p.TX * p.TY;
  auto kernel = reg_taps ? head_epilogue_kernel<scalar_t, acc_t, true> : head_epilogue_kernel<scalar_t, acc_t, false>;
  allow_smem(kernel, smem);
  // Persistent blocks: as many as can be resident at once (each builds its tables once), looping over the items.
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, static_cast<size_t>(smem)));
  const int64_t blocks = std::min<int64_t>(items, static_cast<int64_t>(std::max(per_sm, 1)) * sm_count());
  kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(zp, qp, scp, shp, op_, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor head_epilogue_cuda(const Tensor& z_in, const Tensor& q_in, at::IntArrayRef bins, bool align_corners,
                          const std::optional<Tensor>& scale, const std::optional<Tensor>& shift, bool relu) {
  checks::head_epilogue(z_in, q_in, bins, scale, shift);
  const char* op = "head_epilogue";
  check_map(op, z_in, "z");
  const HeadLevels lv = make_head_levels(op, bins);
  const int64_t N = z_in.size(0), O = z_in.size(1), H = z_in.size(2), W = z_in.size(3);
  const int64_t S = lv.offs[lv.num];
  TORCH_CHECK(q_in.is_cuda() && q_in.device() == z_in.device(), op, ": expected q on ", z_in.device(),
              " (z's device), got ", q_in.device());
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(0) == N && q_in.size(1) == O && q_in.size(2) == 9 && q_in.size(3) == S,
              op, ": expected q of shape (", N, ", ", O, ", 9, ", S, ") for z of shape ", z_in.sizes(), " and bins ",
              bins, ", got ", q_in.sizes());
  const auto acc_type = z_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(q_in.scalar_type() == acc_type, op, ": expected q of dtype ", acc_type, " for z of dtype ",
              z_in.scalar_type(), ", got ", q_in.scalar_type());
  TORCH_CHECK(scale.has_value() == shift.has_value(), op, ": scale and shift come together, got ",
              scale.has_value() ? "scale without shift" : "shift without scale");
  const bool affine = scale.has_value();
  Tensor scale_c, shift_c;
  if (affine) {
    for (const Tensor* t : {&*scale, &*shift}) {
      const char* name = t == &*scale ? "scale" : "shift";
      TORCH_CHECK(t->is_cuda() && t->device() == z_in.device(), op, ": expected ", name, " on ", z_in.device(),
                  " (z's device), got ", t->device());
      TORCH_CHECK(t->dim() == 1 && t->size(0) == O, op, ": expected ", name, " of shape (", O, "), got ",
                  t->sizes());
      TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, op, ": expected ", name,
                  " of dtype float32 or float64, got ", t->scalar_type());
    }
    scale_c = scale->to(acc_type).contiguous();
    shift_c = shift->to(acc_type).contiguous();
  }
  const c10::cuda::CUDAGuard guard(z_in.device());
  const bool cl = use_channels_last(z_in);
  Tensor out = at::empty({N, O, H, W}, z_in.options(), cl ? at::MemoryFormat::ChannelsLast
                                                          : at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  const Tensor z = cl ? z_in : z_in.contiguous();
  const Tensor q = q_in.contiguous();

  HeadParams p{};
  p.lv = lv;
  p.N = N;
  p.O = O;
  p.H = H;
  p.W = W;
  p.S = S;
  p.K = 3 * lv.boff[lv.num];
  fill_strides(p, out);  // z has out's strides: both contiguous in the same memory format
  p.align = align_corners;
  p.relu = relu;
  p.affine = affine;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "head_epilogue_cuda",
                                  [&] { launch_epilogue<scalar_t>(z, q, scale_c, shift_c, out, p, cl); });
  return out;
}

// ------------------------------------------------------------------------------------------------------------------
// head_context_backward
// ------------------------------------------------------------------------------------------------------------------

// grad: element (n, c, y, x) at n sN + c sC + y sH + x sW (contiguous or channels_last); out (N, O, 9, S) contiguous.
// Persistent blocks (grid from the occupancy calculator) loop over items (n, chunk of OC channels); the tables that
// depend only on the bins, H and W are built once per block: tab (rlo | rhi | clo | cmid | chi, sum(bins) ints each:
// the destination ranges whose taps reach each source row / column of each level) and an optional column table (per
// level and column xs: its weight on its left tap and on its right tap), without which the weights are computed per
// use. Per item and band of RB rows: the band of grad (gs[yl GS + x OCP + c], in acc_t; read with 16-byte loads: NCHW
// one contiguous run, channels_last 16-byte runs of a pixel's channels when they align) and G[(k RB + yl) OC + c]:
//   (1) G items (c, yl, k), c fastest: sum over the columns x whose tap xs = x + dx - 1 reaches j, in x order;
//   (2) output items (c, t, s): sum over the band's rows whose tap ys = y + dy - 1 reaches i, in y order; the first
//       band assigns, later bands add (the same thread owns the same items in every band: a fixed order).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kHeadThreads)
    head_bwd_kernel(const scalar_t* __restrict__ g, acc_t* __restrict__ out, const __grid_constant__ HeadParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  int* tab = reinterpret_cast<int*>(smem + p.off_tab);
  acc_t* gs = reinterpret_cast<acc_t*>(smem);
  acc_t* G = reinterpret_cast<acc_t*>(smem + p.off_v);
  // Column table, entry l W + xs: colA = the weight of column xs on its left tap i0 (l0, plus l1 when i1 == i0),
  // colB = its weight on the right tap i1 (l1).
  acc_t* colA = reinterpret_cast<acc_t*>(smem + p.off_col);
  acc_t* colB = colA + p.lv.num * p.W;

  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int L = p.lv.num;
  const int OC = p.OC, OCP = p.OCP, RB = p.RB;
  const int S = static_cast<int>(p.S), H = static_cast<int>(p.H), W = static_cast<int>(p.W);
  const int GS = static_cast<int>(p.GS);
  const int sumb = static_cast<int>(p.lv.boff[L]);
  const int qplane = 9 * S;

  // Per source row i (column j) of every level, the destinations whose taps reach it: rows [rlo, rhi), columns
  // [clo, chi), of which [clo, cmid) reach j as their right tap only (i0 = j - 1) and [cmid, chi) as their left tap.
  for (int it = tid; it < 5 * sumb; it += nt) {
    const int part = it / sumb;  // 0 rlo, 1 rhi, 2 clo, 3 cmid, 4 chi
    const int bi = it - part * sumb;
    const int l = level_of(p.lv.boff, L, bi);
    const int64_t b = p.lv.bins[l];
    const int64_t i = bi - p.lv.boff[l];
    const int64_t ext = part >= 2 ? W : H;
    const acc_t sc = level_scale<acc_t>(p, part >= 2 ? 1 : 0, l);
    int64_t v;
    if (part == 3) {
      v = i == 0 ? 0 : tap_bound<acc_t>(sc, i - 1, b, ext, p.align, true);  // first xs with i0 >= j
    } else {
      v = tap_bound<acc_t>(sc, i, b, ext, p.align, part == 1 || part == 4);
    }
    tab[it] = static_cast<int>(v);
  }
  if (p.col_table) {
    for (int it = tid; it < L * W; it += nt) {
      const int l = it / W;
      const int64_t xs = it - l * W;
      const int64_t b = p.lv.bins[l];
      const LinearTap<acc_t> tw = linear_tap<acc_t>(level_scale<acc_t>(p, 1, l), xs, b, W, p.align);
      colA[it] = tw.i1 == tw.i0 ? tw.l0 + tw.l1 : tw.l0;  // tap_weight's sum when the taps coincide
      colB[it] = tw.l1;
    }
  }
  const int* rlo = tab;
  const int* rhi = tab + sumb;
  const int* clo = tab + 2 * sumb;
  const int* cmid = tab + 3 * sumb;
  const int* chi = tab + 4 * sumb;

  const int items = static_cast<int>(p.N * p.cchunks);  // < 2^31 (the launcher checks)
  const int cchunks = static_cast<int>(p.cchunks);
  for (int item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t n = item / cchunks;
    const int64_t c0 = static_cast<int64_t>(item - static_cast<int>(n) * cchunks) * OC;
    const int oc = static_cast<int>(min(static_cast<int64_t>(OC), p.O - c0));
    acc_t* on = out + (n * p.O + c0) * qplane;  // channel c0 + c: on[c * 9S + t * S + s]

    for (int y0 = 0; y0 < H; y0 += RB) {
      const int rb = min(RB, H - y0);
      __syncthreads();  // tables written; the previous band's readers are done with gs and G
      // Stage the band of grad, converted to acc_t; reads in memory order of the layout, 16 bytes where possible.
      if (!p.cl) {  // NCHW: rows y0 .. y0 + rb of one plane, contiguous; element e at (e / W, e % W)
        const scalar_t* src = g + n * p.sN + c0 * p.sC + static_cast<int64_t>(y0) * W;
        const int cnt = rb * W;
        constexpr int VE = 16 / sizeof(scalar_t);
        int head = static_cast<int>(((16 - (reinterpret_cast<uintptr_t>(src) & 15)) & 15) / sizeof(scalar_t));
        head = head < cnt ? head : cnt;
        const int nv = (cnt - head) / VE;
        for (int v = tid; v < nv; v += nt) {  // one division per 16 bytes
          scalar_t e[VE];
          const uint4 u = *reinterpret_cast<const uint4*>(src + head + v * VE);
          memcpy(e, &u, 16);
          const int e0 = head + v * VE;
          int yl = e0 / W, x = e0 - (e0 / W) * W;
#pragma unroll
          for (int k = 0; k < VE; ++k) {
            gs[yl * GS + x] = static_cast<acc_t>(e[k]);
            if (++x == W) {
              x = 0;
              ++yl;
            }
          }
        }
        for (int i = tid; i < cnt - nv * VE; i += nt) {  // the head, then the tail after the vectors
          const int e = i < head ? i : nv * VE + i;
          const int yl = e / W;
          gs[yl * GS + (e - yl * W)] = static_cast<acc_t>(src[e]);
        }
      } else {  // channels_last: pixel pix of the band at gbase + pix sW, its oc channels contiguous
        const int64_t gbase = n * p.sN + static_cast<int64_t>(y0) * p.sH + c0;
        if (p.cl_vec) {
          constexpr int VE = 16 / sizeof(scalar_t);
          const int nv = (rb * W) << p.vsh;
          const int vm = (1 << p.vsh) - 1;
          for (int v = tid; v < nv; v += nt) {
            const int pix = v >> p.vsh;
            scalar_t e[VE];
            const uint4 u = *reinterpret_cast<const uint4*>(g + gbase + static_cast<int64_t>(pix) * p.sW + (v & vm) * VE);
            memcpy(e, &u, 16);
            const int yl = pix / W;
            acc_t* d = gs + yl * GS + (pix - yl * W) * OCP + (v & vm) * VE;
#pragma unroll
            for (int k = 0; k < VE; ++k) d[k] = static_cast<acc_t>(e[k]);
          }
        } else {
          const int band = (rb * W) << p.oc_shift;
          for (int it = tid; it < band; it += nt) {
            const int pix = it >> p.oc_shift;
            const int c = it & (OC - 1);
            const int yl = pix / W;
            gs[yl * GS + (pix - yl * W) * OCP + c] =
                c < oc ? static_cast<acc_t>(g[gbase + static_cast<int64_t>(pix) * p.sW + c]) : static_cast<acc_t>(0);
          }
        }
      }
      __syncthreads();
      // (1) Horizontal adjoint.
      const int gitems = static_cast<int>(p.K) * rb * OC;
      for (int it = tid; it < gitems; it += nt) {
        const int r = it >> p.oc_shift;
        const int cc = it & (OC - 1);
        const int k = r / rb;
        const int yl = r - k * rb;
        const int l = level_of(p.lv.boff, L, k / 3);
        const int b = static_cast<int>(p.lv.bins[l]);
        const int kk = k - 3 * static_cast<int>(p.lv.boff[l]);
        const int dx = kk / b;
        const int j = kk - dx * b;
        const int bj = static_cast<int>(p.lv.boff[l]) + j;
        // Columns x with xs = x + dx - 1 in [clo, chi) and x in [0, W), in x order.
        const int xa = max(clo[bj] + 1 - dx, 0);
        const int xb = min(chi[bj] + 1 - dx, W);
        const acc_t* row = gs + yl * GS + cc;
        acc_t s = 0;
        if (p.col_table) {
          // Right-tap columns first (weight colB), then left-tap ones (colA).
          const int xm = min(max(cmid[bj] + 1 - dx, xa), xb);
          const int e0 = l * W + dx - 1;  // column x's entry: e0 + x >= 0
          for (int x = xa; x < xm; ++x) s = fused_mul_add(colB[e0 + x], row[x * OCP], s);
          for (int x = xm; x < xb; ++x) s = fused_mul_add(colA[e0 + x], row[x * OCP], s);
        } else {
          const acc_t sw = level_scale<acc_t>(p, 1, l);
          for (int x = xa; x < xb; ++x) {
            s += tap_weight<acc_t>(sw, x + dx - 1, j, b, W, p.align) * row[x * OCP];
          }
        }
        G[(k * RB + yl) * OC + cc] = s;
      }
      __syncthreads();
      // (2) Vertical adjoint into the outputs.
      const int outs = qplane * OC;
      for (int it = tid; it < outs; it += nt) {
        const int ts = it >> p.oc_shift;  // channel fastest: conflict-free reads of G
        const int cc = it & (OC - 1);
        if (cc >= oc) continue;
        const int t = ts / S;
        const int sidx = ts - t * S;
        const int l = level_of(p.lv.offs, L, sidx);
        const int b = static_cast<int>(p.lv.bins[l]);
        const int si = sidx - static_cast<int>(p.lv.offs[l]);
        const int i = si / b;
        const int j = si - i * b;
        const int dy = t / 3;
        const int dx = t - 3 * dy;
        const int bi = static_cast<int>(p.lv.boff[l]) + i;
        // Rows y of this band with ys = y + dy - 1 in [rlo, rhi).
        const int ya = max(rlo[bi] + 1 - dy, y0);
        const int yb = min(rhi[bi] + 1 - dy, y0 + rb);
        const int k = 3 * static_cast<int>(p.lv.boff[l]) + dx * b + j;
        const acc_t sh = level_scale<acc_t>(p, 0, l);
        acc_t s = 0;
        for (int y = ya; y < yb; ++y) {
          s += tap_weight<acc_t>(sh, y + dy - 1, i, b, H, p.align) * G[(k * RB + (y - y0)) * OC + cc];
        }
        acc_t* d = on + cc * qplane + ts;
        if (y0 == 0) {
          *d = s;
        } else if (ya < yb) {
          *d += s;
        }
      }
    }
  }
}

// Fallback: one thread per output element (n, c, t, s), grad read from global memory; rows and columns reaching
// (i, j) found by binary search; the sum runs row by row (a row's columns first), a fixed order.
// An explicit 128-register limit (2 blocks per SM): under ptxas's own target (64) it spilled 8-16 bytes.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kDirectThreads, 2)
    head_bwd_direct_kernel(const scalar_t* __restrict__ g, acc_t* __restrict__ out,
                           const __grid_constant__ HeadParams p) {
  const int64_t H = p.H, W = p.W, S = p.S;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < p.total; e += stride) {
    // div_est (host reciprocals, no 64-bit division: its subroutine call spilled), the constant 9 by multiply-high,
    // and within a level (si < b^2 <= 2^24) 32 bits.
    int64_t r = div_est(e, S, p.rS);
    const int64_t sidx = e - r * S;
    const int64_t r9 = r / 9;
    const int64_t t = r - r9 * 9;
    const int64_t n = div_est(r9, p.O, p.rO);
    const int64_t c = r9 - n * p.O;
    const int l = level_of(p.lv.offs, p.lv.num, sidx);
    const int64_t b = p.lv.bins[l];
    const uint32_t si = static_cast<uint32_t>(sidx - p.lv.offs[l]);
    const int64_t i = si / static_cast<uint32_t>(b), j = si - i * b;
    const int64_t dy = t / 3, dx = t - 3 * (t / 3);
    const acc_t sh = level_scale<acc_t>(p, 0, l);
    const acc_t sw = level_scale<acc_t>(p, 1, l);
    const int64_t ya = max(tap_bound<acc_t>(sh, i, b, H, p.align, false) + 1 - dy, int64_t{0});
    const int64_t yb = min(tap_bound<acc_t>(sh, i, b, H, p.align, true) + 1 - dy, H);
    const int64_t xa = max(tap_bound<acc_t>(sw, j, b, W, p.align, false) + 1 - dx, int64_t{0});
    const int64_t xb = min(tap_bound<acc_t>(sw, j, b, W, p.align, true) + 1 - dx, W);
    const scalar_t* gp = g + n * p.sN + c * p.sC;
    acc_t s = 0;
    for (int64_t y = ya; y < yb; ++y) {
      acc_t rs = 0;
      for (int64_t x = xa; x < xb; ++x) {
        rs += tap_weight<acc_t>(sw, x + dx - 1, j, b, W, p.align) * static_cast<acc_t>(gp[y * p.sH + x * p.sW]);
      }
      s += tap_weight<acc_t>(sh, y + dy - 1, i, b, H, p.align) * rs;
    }
    out[e] = s;
  }
}

// Picks OC, RB and the column table: under 48 KiB first, then up to the opt-in limit; -1 when nothing fits.
int64_t plan_backward(HeadParams& p, bool cl, int64_t asz, int64_t optin) {
  int64_t oc0 = 1;
  if (cl) {
    while (oc0 < p.O && oc0 < kMaxChunk) oc0 *= 2;
  }
  const int64_t L = p.lv.num;
  const int64_t tab_b = align16(5 * p.lv.boff[L] * 4);
  const int64_t col_b = align16(2 * L * p.W * asz);
  for (const int64_t budget : {std::min(kDefaultSmem, optin), optin}) {
    for (const bool col : {true, false}) {
      for (int64_t oc = oc0; oc >= 1; oc /= 2) {
        const int64_t ocp = oc > 1 ? oc + 1 : 1;
        const int64_t fixed = tab_b + (col ? col_b : 0);
        // Per row of a band: the staged grad row and the K entries of G.
        const int64_t gs_stride = oc > 1 ? p.W * ocp : (p.W | 1);  // odd: rows of a warp's items in distinct banks
        const int64_t per_row_gs = gs_stride * asz;
        const int64_t per_row_g = p.K * oc * asz;
        const int64_t need1 = fixed + align16(per_row_gs) + align16(per_row_g);
        if (need1 > budget) continue;
        const int64_t rmax = std::max<int64_t>(1, (budget - fixed - 32) / (per_row_gs + per_row_g));
        const int64_t rb = even_bands(p.H, rmax);
        p.col_table = col;
        p.GS = gs_stride;
        p.OC = static_cast<int>(oc);
        p.OCP = static_cast<int>(ocp);
        p.RB = static_cast<int>(rb);
        p.off_v = align16(rb * per_row_gs);
        p.off_tab = p.off_v + align16(rb * per_row_g);
        p.off_col = p.off_tab + tab_b;
        return p.off_col + (col ? col_b : 0);
      }
    }
  }
  return -1;
}

template <typename scalar_t>
void launch_backward(const Tensor& g, Tensor& out, HeadParams& p, bool cl) {
  using acc_t = at::opmath_type<scalar_t>;
  const char* op = "head_context_backward";
  const auto stream = c10::cuda::getCurrentCUDAStream();
  fill_scales(p);
  const int64_t smem = plan_backward(p, cl, sizeof(acc_t), head_smem_optin());
  if (smem < 0) {
    p.total = p.N * p.O * 9 * p.S;
    const int64_t blocks = std::min<int64_t>(ceil_div(p.total, kDirectThreads), int64_t{1} << 20);
    auto direct = head_bwd_direct_kernel<scalar_t, acc_t>;
    direct<<<static_cast<unsigned>(blocks), kDirectThreads, 0, stream>>>(g.const_data_ptr<scalar_t>(),
                                                                        out.mutable_data_ptr<acc_t>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  p.cchunks = ceil_div(p.O, p.OC);
  const int64_t items = p.N * p.cchunks;
  TORCH_CHECK(items <= std::numeric_limits<int32_t>::max(), op, ": N * ceil(O / ", p.OC, ") = ", items,
              " work items is too many for one launch");
  const int64_t esz = sizeof(scalar_t);
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  p.cl = cl;
  p.oc_shift = log2_exact(p.OC);
  p.cl_vec = cl && (p.OC * esz) % 16 == 0 && p.O % p.OC == 0 && (p.O * esz) % 16 == 0 && aligned16(gp);
  p.vsh = p.cl_vec ? log2_exact(p.OC * esz / 16) : 0;
  auto kernel = head_bwd_kernel<scalar_t, acc_t>;
  allow_smem(kernel, smem);
  // Persistent blocks: as many as can be resident at once (each builds its tables once), looping over the items.
  int per_sm = 0;
  C10_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kHeadThreads, static_cast<size_t>(smem)));
  const int64_t blocks = std::min<int64_t>(items, static_cast<int64_t>(std::max(per_sm, 1)) * sm_count());
  kernel<<<static_cast<unsigned>(blocks), kHeadThreads, smem, stream>>>(gp, out.mutable_data_ptr<acc_t>(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor head_context_backward_cuda(const Tensor& grad_in, at::IntArrayRef bins, bool align_corners) {
  checks::head_context_backward(grad_in, bins);
  const char* op = "head_context_backward";
  check_map(op, grad_in, "grad");
  const HeadLevels lv = make_head_levels(op, bins);
  const int64_t N = grad_in.size(0), O = grad_in.size(1), H = grad_in.size(2), W = grad_in.size(3);
  const int64_t S = lv.offs[lv.num];
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const auto out_type = grad_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor out = at::empty({N, O, 9, S}, grad_in.options().dtype(out_type));
  if (out.numel() == 0) return out;
  const bool cl = use_channels_last(grad_in);
  const Tensor g = cl ? grad_in : grad_in.contiguous();

  HeadParams p{};
  p.lv = lv;
  p.N = N;
  p.O = O;
  p.H = H;
  p.W = W;
  p.S = S;
  p.K = 3 * lv.boff[lv.num];
  fill_strides(p, g);
  p.align = align_corners;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "head_context_backward_cuda",
                                  [&] { launch_backward<scalar_t>(g, out, p, cl); });
  return out;
}

}  // namespace
}  // namespace pspnet_fast

TORCH_LIBRARY_IMPL(pspnet_fast, CUDA, m) {
  m.impl("head_epilogue", &pspnet_fast::head_epilogue_cuda);
  m.impl("head_context_backward", &pspnet_fast::head_context_backward_cuda);
}
