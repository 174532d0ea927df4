// CPU kernels of the fused Pyramid Pooling Module: at::parallel_for over independent output blocks, inner loops
// over contiguous memory that the compiler vectorizes. Contiguous (NCHW) and channels_last (NHWC) inputs are read in
// place; other strides are made contiguous first, except in ppm_forward (x read once: non-dense planes are gathered
// one at a time).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "op_checks.h"
#include "ppm_math.h"

namespace pspnet_fast {
namespace {
using namespace cpu;  // NOLINT: the shared helpers of cpu_common.h

using at::Tensor;

// The column (or row) segments cut by every level's bin boundaries along one extent n: each input index belongs to
// exactly one segment, so one pass adds every element once, and each bin (possibly overlapping its neighbours) is a
// contiguous run of segments.
struct Segments {
  std::vector<int64_t> bounds;    // segment k covers [bounds[k], bounds[k + 1])
  std::vector<int64_t> of_index;  // n entries: the segment of each input index
  std::vector<int64_t> bin_first, bin_last;  // per (level, bin): the segments [first, last) the bin covers
  std::vector<int64_t> bin_count;            // per (level, bin): end - start, the number of input indices

  int64_t size() const { return static_cast<int64_t>(bounds.size()) - 1; }
};

Segments make_segments(at::IntArrayRef bins, int64_t n) {
  Segments s;
  for (int64_t b : bins) {
    for (int64_t i = 0; i < b; ++i) {
      s.bounds.push_back(pool_start(i, b, n));
      s.bounds.push_back(pool_end(i, b, n));
    }
  }
  std::sort(s.bounds.begin(), s.bounds.end());
  s.bounds.erase(std::unique(s.bounds.begin(), s.bounds.end()), s.bounds.end());
  s.of_index.resize(n);
  for (int64_t k = 0; k + 1 < static_cast<int64_t>(s.bounds.size()); ++k) {
    for (int64_t i = s.bounds[k]; i < s.bounds[k + 1]; ++i) s.of_index[i] = k;
  }
  auto seg_at = [&](int64_t bound) {
    return static_cast<int64_t>(std::lower_bound(s.bounds.begin(), s.bounds.end(), bound) - s.bounds.begin());
  };
  for (int64_t b : bins) {
    for (int64_t i = 0; i < b; ++i) {
      const int64_t start = pool_start(i, b, n), end = pool_end(i, b, n);
      s.bin_first.push_back(seg_at(start));
      s.bin_last.push_back(seg_at(end));
      s.bin_count.push_back(end - start);
    }
  }
  return s;
}

// Planes per dynamic_for chunk: ~256K values (1 MB of float32), at least one plane; 2048 planes of 60 x 60 are 28
// chunks.
inline int64_t plane_chunk(int64_t plane_size) { return std::max<int64_t>(1, (int64_t{1} << 18) / plane_size); }

// A small cache of large output buffers. The PPM output (N x 2C x H x W: 59 MB for one 2048 x 60 x 60 map) is larger
// than glibc's mmap threshold, so every fresh allocation is new pages that the kernel zero-fills on first touch:
// ~13 ms on the 2-core CI machine, twice the time of writing the output itself. Buffers freed by the caller come
// back here and the next call of the same size reuses them. Bounded by PSPNET_FAST_CPU_CACHE_MB (default 512; 0 turns
// the cache off); only buffers of at least 4 MB are cached.
class OutputCache {
 public:
  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();  // never destroyed: tensors may outlive static destruction
    return *cache;
  }

  at::Tensor empty(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options) {
    int64_t numel = 1;
    for (int64_t s : sizes) numel *= s;
    const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
    if (nbytes < kMinBytes || limit_ == 0) return at::empty_strided(sizes, strides, options);
    void* ptr = take(nbytes);
    if (ptr == nullptr) {
      ptr = std::aligned_alloc(64, (nbytes + 63) / 64 * 64);
      TORCH_CHECK(ptr != nullptr, "pspnet_fast: out of memory allocating ", nbytes, " bytes");
    }
    return at::from_blob(ptr, sizes, strides, [this, nbytes](void* p) { give_back(p, nbytes); }, options);
  }

 private:
  static constexpr size_t kMinBytes = size_t(4) << 20;

  OutputCache() {
    const char* env = std::getenv("PSPNET_FAST_CPU_CACHE_MB");
    limit_ = (env != nullptr ? static_cast<size_t>(std::strtoull(env, nullptr, 10)) : size_t(512)) << 20;
  }

  void* take(size_t nbytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < free_.size(); ++i) {
      if (free_[i].first == nbytes) {
        void* p = free_[i].second;
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
        cached_ -= nbytes;
        return p;
      }
    }
    return nullptr;
  }

  void give_back(void* p, size_t nbytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    // Oldest buffers leave first when the bound would be exceeded.
    while (!free_.empty() && cached_ + nbytes > limit_) {
      std::free(free_.front().second);
      cached_ -= free_.front().first;
      free_.erase(free_.begin());
    }
    if (cached_ + nbytes > limit_) {
      std::free(p);
      return;
    }
    free_.emplace_back(nbytes, p);
    cached_ += nbytes;
  }

  std::mutex mutex_;
  std::vector<std::pair<size_t, void*>> free_;
  size_t cached_ = 0;
  size_t limit_ = 0;
};

// Combine the (segment row, segment col) sums of one (n, c) into every level's bin means.
// seg: nsh x nsw sums, row-major; out: S means at stride out_stride.
template <typename acc_t>
void finish_bins(const acc_t* seg, int64_t nsw, const Segments& sh, const Segments& sw, at::IntArrayRef bins,
                 acc_t* out, int64_t out_stride) {
  int64_t p = 0, base = 0;
  for (int64_t b : bins) {
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t j = 0; j < b; ++j, ++p) {
        acc_t sum = 0;
        for (int64_t u = sh.bin_first[base + i]; u < sh.bin_last[base + i]; ++u) {
          for (int64_t v = sw.bin_first[base + j]; v < sw.bin_last[base + j]; ++v) sum += seg[u * nsw + v];
        }
        // ATen divides the bin sum by its height, then by its width.
        out[p * out_stride] = sum / static_cast<acc_t>(sh.bin_count[base + i]) / static_cast<acc_t>(sw.bin_count[base + j]);
      }
    }
    base += b;
  }
}

// The segment sums of one contiguous (H x W) plane px, then its S bin means into out (stride 1). Rows of one row
// segment are added into a W-wide column sum (a contiguous, vectorized add), which is cut into column segments when
// the row segment ends; rows_done(h0, h1) is called then, while rows [h0, h1) are in cache (ppm_forward stores them
// into its output there). seg (nsh * nsw) and colsum (W) are the caller's scratch.
struct NoRows {
  void operator()(int64_t, int64_t) const {}
};

template <typename scalar_t, typename acc_t, typename RowsFn = NoRows>
inline void pool_plane(const scalar_t* px, int64_t W, at::IntArrayRef bins, const Segments& sh, const Segments& sw,
                       acc_t* seg, acc_t* colsum, acc_t* out, const RowsFn& rows_done = RowsFn()) {
  const int64_t nsh = sh.size(), nsw = sw.size();
  for (int64_t u = 0; u < nsh; ++u) {
    acc_t* cs = colsum;
    const scalar_t* row = px + sh.bounds[u] * W;
#pragma omp simd
    for (int64_t w = 0; w < W; ++w) cs[w] = static_cast<acc_t>(row[w]);
    for (int64_t h = sh.bounds[u] + 1; h < sh.bounds[u + 1]; ++h) {
      row = px + h * W;
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) cs[w] += static_cast<acc_t>(row[w]);
    }
    for (int64_t v = 0; v < nsw; ++v) {
      acc_t t = 0;
      for (int64_t w = sw.bounds[v]; w < sw.bounds[v + 1]; ++w) t += cs[w];
      seg[u * nsw + v] = t;
    }
    rows_done(sh.bounds[u], sh.bounds[u + 1]);
  }
  finish_bins<acc_t>(seg, nsw, sh, sw, bins, out, 1);
}

template <typename scalar_t>
void pyramid_pool_nchw(const Tensor& x, at::IntArrayRef bins, const Segments& sh, const Segments& sw, Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), S = out.size(2);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  acc_t* op = out.mutable_data_ptr<acc_t>();
  // One task per (n, c) plane, read once, row by row.
  dynamic_for(N * C, plane_chunk(H * W), [&](int64_t begin, int64_t end, int64_t) {
    std::vector<acc_t> seg(sh.size() * sw.size());
    std::vector<acc_t> colsum(W);
    for (int64_t plane = begin; plane < end; ++plane) {
      pool_plane<scalar_t, acc_t>(xp + plane * H * W, W, bins, sh, sw, seg.data(), colsum.data(), op + plane * S);
    }
  });
}

// Channel blocks for the channels_last pooling: as long as the (nsh * nsw * CB) accumulators allow within ~256 KB
// (L2), so long contiguous runs of each pixel's channels stream well, at least 16 channels so the adds vectorize, and
// at least as many blocks over the batch as there are threads (2048 channels at N = 1 were one block of 1808 and one
// of 240: one thread did 88% of the work). Each channel's sum runs in the same order whatever the block.
inline int64_t nhwc_channel_block(int64_t N, int64_t C, int64_t nseg) {
  const int64_t cb_max = std::max<int64_t>(16, (65536 / nseg) / 16 * 16);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t nblocks = std::max<int64_t>((C + cb_max - 1) / cb_max, (threads + N - 1) / N);
  const int64_t cb = ((C + nblocks - 1) / nblocks + 15) / 16 * 16;
  return std::min<int64_t>(C, std::min(cb, cb_max));
}

// Pools channels_last x (N, H, W, C in memory) into out (N, C, S). copy.pixel(n, h, w, c0, src, cb) is called with
// each pixel's run of cb channels right after they are added (ppm_forward stores them into its output there: x is
// read from memory once), copy.finish() at the end of each thread's tasks; pyramid_pool passes NoCopy.
struct NoCopy {
  template <typename scalar_t>
  void pixel(int64_t, int64_t, int64_t, int64_t, const scalar_t*, int64_t) const {}
  void finish() const {}
};

template <typename scalar_t, typename CopyFn>
void pyramid_pool_nhwc(const Tensor& x, at::IntArrayRef bins, const Segments& sh, const Segments& sw, Tensor& out,
                       const CopyFn& copy) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), S = out.size(2);
  const int64_t nsh = sh.size(), nsw = sw.size();
  const int64_t CB = nhwc_channel_block(N, C, nsh * nsw);
  const int64_t nblocks = (C + CB - 1) / CB;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  acc_t* op = out.mutable_data_ptr<acc_t>();
  at::parallel_for(0, N * nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> seg(nsh * nsw * CB);
    std::vector<acc_t> one(nsh * nsw);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / nblocks, c0 = (task % nblocks) * CB, cb = std::min(CB, C - c0);
      std::fill(seg.begin(), seg.end(), acc_t(0));
      // x[n, h, w, c0:c0+cb] is contiguous: add it into its (row segment, column segment) accumulator.
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* row = xp + ((n * H + h) * W) * C + c0;
        acc_t* srow = seg.data() + sh.of_index[h] * nsw * CB;
        for (int64_t w = 0; w < W; ++w) {
          acc_t* acc = srow + sw.of_index[w] * CB;
          const scalar_t* px = row + w * C;
#pragma omp simd
          for (int64_t c = 0; c < cb; ++c) acc[c] += static_cast<acc_t>(px[c]);
          copy.pixel(n, h, w, c0, px, cb);
        }
      }
      for (int64_t c = 0; c < cb; ++c) {
        for (int64_t k = 0; k < nsh * nsw; ++k) one[k] = seg[k * CB + c];
        finish_bins<acc_t>(one.data(), nsw, sh, sw, bins, op + (n * C + c0 + c) * S, 1);
      }
    }
    copy.finish();
  });
}

Tensor pyramid_pool_cpu(const Tensor& x_in, at::IntArrayRef bins) {
  checks::pyramid_pool(x_in, bins);
  check_map(x_in, "x", "C");
  check_bins(bins);
  TORCH_CHECK(x_in.device().is_cpu(), "pspnet_fast: pyramid_pool_cpu expects a CPU tensor, got ", x_in.device());
  const bool cl = is_channels_last(x_in);
  const Tensor x = cl ? x_in : x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto acc_type = acc_type_of(x.scalar_type());
  Tensor out = at::empty({N, C, total_bins(bins)}, x.options().dtype(acc_type));
  if (N == 0) return out;
  const Segments sh = make_segments(bins, H), sw = make_segments(bins, W);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pyramid_pool_cpu", [&] {
    if (cl) {
      pyramid_pool_nhwc<scalar_t>(x, bins, sh, sw, out, NoCopy());
    } else {
      pyramid_pool_nchw<scalar_t>(x, bins, sh, sw, out);
    }
  });
  return out;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define PSP_X86_SMALL_GEMM 1
#include <immintrin.h>

constexpr int64_t kSmallGemmCols = 36;  // most columns of the hand-written GEMM (see use_small_gemm)
constexpr int kSmallGemmRows = 4;

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// Whether a float32 level GEMM (R x C) @ (C x cols), cols = N * b^2, runs the hand-written kernel rather than at::mm
// (MKL in this torch build). Measured at R = 512, C = 2048 (the PSPNet PPM), weights from DRAM (ten weight sets
// rotated), time of torch.mm / time of ppm_reduce with the hand-written kernel (packed columns), 2-core AMD EPYC,
// torch 2.14.1, three runs (benchmarks/results/cpu-reduce-gemm.txt):
//   2 threads: cols 1: 1.07-1.35   2: 3.3-3.8   4: 2.4-3.1   8: 2.3-2.8   9: 3.8-4.6   18: 1.2-1.7   36: 0.97-1.22
//              72: 0.87-0.93 (ppm_reduce runs at::mm there: its own overhead)
//   1 thread:  cols 1: 0.91   2: 4.11   4: 3.20   8: 3.67   9: 4.81   18: 1.43   36: 1.30   72: 1.03
// So the hand-written kernel runs 1..36 columns (at 1 column MKL's GEMV wins by 9% on one thread, loses on two, the
// default), at::mm the rest. float64 always runs at::mm (no hand-written kernel).
constexpr int64_t kSmallGemmMinCols = 1;
bool use_small_gemm(int64_t cols) {
  return cols >= kSmallGemmMinCols && cols <= kSmallGemmCols && cpu_has_avx2_fma();
}

// Channels per block of the packed columns (see pack_small_gemm_cols): a block's RB W rows (RB x 512 floats = 8 KB)
// stay in L1 while every column group reads them.
constexpr int64_t kSmallGemmBlock = 512;

// The K columns (C values each) of one level, packed for small_gemm_rows_avx2: channel blocks [c0, c0 + n) of the
// first C8 = C / 8 * 8 channels (n = min(kSmallGemmBlock, C8 - c0)), each stored as K contiguous runs of n values at
// PB + c0 * K (run k at PB + c0 * K + k * n), then the C - C8 tail channels as K runs of C - C8 at PB + C8 * K.
// Packed, a block's columns are one contiguous stream. Unpacked (K rows of C floats, 8 KB apart at C = 2048) every
// column started in the same L1 sets as the W rows (4 KB aliasing on an 8-way 32 KB L1), which evicted the W block the
// column groups share: level 6 of the PSPNet PPM ran 1.5x faster packed (one thread, 64-byte aligned buffers).
// col(k, c) gives column k's value at channel c.
template <typename ColFn>
void pack_small_gemm_cols(float* PB, int64_t C, int64_t K, const ColFn& col) {
  auto pack = [&](int64_t c0, int64_t c1) {  // channels [c0, c1): K runs of c1 - c0 values at PB + c0 * K
    for (int64_t k = 0; k < K; ++k) {
      float* run = PB + c0 * K + k * (c1 - c0);
      for (int64_t c = c0; c < c1; ++c) run[c - c0] = col(k, c);
    }
  };
  const int64_t C8 = C / 8 * 8;
  for (int64_t c0 = 0; c0 < C8; c0 += kSmallGemmBlock) pack(c0, std::min(C8, c0 + kSmallGemmBlock));
  if (C8 < C) pack(C8, C);
}

// Y[r, k] = sum_c W[r, c] * PT[k, c] (W: R x C, PT: K x C packed by pack_small_gemm_cols, K <= kSmallGemmCols) for
// RB rows at once. Per channel block, KN columns at a time run with RB * KN accumulators in registers (each 8-channel
// load of W feeds KN FMAs, each load of PT feeds RB), kept in `acc` between blocks. So W is read from memory once and
// from L1 K / KN times, PT from L2 once per RB rows. Every (r, k) is summed the same way (8-lane partial sums over c
// in order, a fixed horizontal sum, then the C % 8 tail), whatever the blocking: a row's values do not depend on RB,
// KN, the block size or the thread split.
template <int RB, int KN>
__attribute__((target("avx2,fma"))) inline void small_gemm_step(const float* w, const float* pt, __m256* acc,
                                                                 int64_t n, int64_t C) {
  __m256 a[RB][KN];
  for (int i = 0; i < RB; ++i) {
    for (int j = 0; j < KN; ++j) a[i][j] = acc[i * kSmallGemmCols + j];
  }
  for (int64_t c = 0; c < n; c += 8) {
    __m256 wv[RB];
    for (int i = 0; i < RB; ++i) wv[i] = _mm256_loadu_ps(w + i * C + c);
    for (int j = 0; j < KN; ++j) {
      const __m256 pv = _mm256_loadu_ps(pt + j * n + c);
      for (int i = 0; i < RB; ++i) a[i][j] = _mm256_fmadd_ps(wv[i], pv, a[i][j]);
    }
  }
  for (int i = 0; i < RB; ++i) {
    for (int j = 0; j < KN; ++j) acc[i * kSmallGemmCols + j] = a[i][j];
  }
}

template <int RB>
__attribute__((target("avx2,fma"))) void small_gemm_rowblock(const float* w, const float* PB, float* y, int64_t C,
                                                             int64_t K) {
  constexpr int KN = RB == 1 ? 8 : 12 / RB;
  __m256 acc[RB * kSmallGemmCols];  // acc[i * kSmallGemmCols + k]: row i, column k
  for (int i = 0; i < RB; ++i) {
    for (int64_t k = 0; k < K; ++k) acc[i * kSmallGemmCols + k] = _mm256_setzero_ps();
  }
  const int64_t C8 = C / 8 * 8;
  for (int64_t c0 = 0; c0 < C8; c0 += kSmallGemmBlock) {
    const int64_t n = std::min(C8, c0 + kSmallGemmBlock) - c0;
    const float* pb = PB + c0 * K;
    const float* wb = w + c0;
    int64_t k0 = 0;
    for (; k0 + KN <= K; k0 += KN) small_gemm_step<RB, KN>(wb, pb + k0 * n, acc + k0, n, C);
    const float* pt = pb + k0 * n;
    switch (K - k0) {
      case 7: small_gemm_step<RB, 7 < KN ? 7 : 1>(wb, pt, acc + k0, n, C); break;
      case 6: small_gemm_step<RB, 6 < KN ? 6 : 1>(wb, pt, acc + k0, n, C); break;
      case 5: small_gemm_step<RB, 5 < KN ? 5 : 1>(wb, pt, acc + k0, n, C); break;
      case 4: small_gemm_step<RB, 4 < KN ? 4 : 1>(wb, pt, acc + k0, n, C); break;
      case 3: small_gemm_step<RB, 3 < KN ? 3 : 1>(wb, pt, acc + k0, n, C); break;
      case 2: small_gemm_step<RB, 2 < KN ? 2 : 1>(wb, pt, acc + k0, n, C); break;
      case 1: small_gemm_step<RB, 1>(wb, pt, acc + k0, n, C); break;
      default: break;
    }
  }
  const float* tail = PB + C8 * K;  // K runs of C - C8
  for (int i = 0; i < RB; ++i) {
    for (int64_t k = 0; k < K; ++k) {
      const __m256 v = acc[i * kSmallGemmCols + k];
      __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
      lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
      lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
      float sum = _mm_cvtss_f32(lo);
      for (int64_t t = C8; t < C; ++t) {
        sum = _mm_cvtss_f32(
            _mm_fmadd_ss(_mm_set_ss(w[i * C + t]), _mm_set_ss(tail[k * (C - C8) + t - C8]), _mm_set_ss(sum)));
      }
      y[i * K + k] = sum;
    }
  }
}

__attribute__((target("avx2,fma"))) void small_gemm_rows_avx2(const float* W, const float* PB, float* Y, int64_t r0,
                                                              int64_t r1, int64_t C, int64_t K) {
  constexpr int RB = kSmallGemmRows;
  int64_t r = r0;
  for (; r + RB <= r1; r += RB) small_gemm_rowblock<RB>(W + r * C, PB, Y + r * K, C, K);
  for (; r < r1; ++r) small_gemm_rowblock<1>(W + r * C, PB, Y + r * K, C, K);
}

// Copies n bytes to dst with non-temporal stores: an output far larger than the caches is written without first
// reading each destination line (write-allocate), which halves the write traffic. The caller fences (_mm_sfence)
// before other threads may read dst.
__attribute__((target("avx2"))) void stream_store_bytes(char* dst, const char* src, int64_t n) {
  const int64_t head = std::min<int64_t>(n, (32 - static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst) & 31)) & 31);
  std::memcpy(dst, src, head);
  int64_t i = head;
  for (; i + 32 <= n; i += 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
  }
  std::memcpy(dst + i, src + i, n - i);
}

void stream_fence() { _mm_sfence(); }
#else
#define PSP_X86_SMALL_GEMM 0
#endif

// Outputs at least this large are written with streaming stores where the CPU allows.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

// Writes n values from src (already in the output type) to dst, streaming when `stream`.
template <typename scalar_t>
inline void store_block(scalar_t* dst, const scalar_t* src, int64_t n, bool stream) {
#if PSP_X86_SMALL_GEMM
  if (stream) {
    stream_store_bytes(reinterpret_cast<char*>(dst), reinterpret_cast<const char*>(src), n * sizeof(scalar_t));
    return;
  }
#endif
  (void)stream;
  std::memcpy(dst, src, n * sizeof(scalar_t));
}

inline void store_fence(bool stream) {
#if PSP_X86_SMALL_GEMM
  if (stream) stream_fence();
#else
  (void)stream;
#endif
}

inline bool use_streaming(const at::Tensor& out) {
#if PSP_X86_SMALL_GEMM
  return out.nbytes() >= static_cast<size_t>(kStreamBytes) && __builtin_cpu_supports("avx2");
#else
  (void)out;
  return false;
#endif
}

// a @ b in their own dtype. mm_out, not mm: under torch.autocast the functional mm would run in the autocast dtype.
Tensor mm_no_autocast(const Tensor& a, const Tensor& b) {
  Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  at::mm_out(out, a, b);
  return out;
}

// The arguments of ppm_reduce next to pooled (N, C, S) of dtype pooled_type: weight (L, R, C) with L = len(bins),
// scale and shift (L, R) or neither, all of pooled's dtype (float32 or float64).
void check_reduce_args(int64_t C, int64_t S, at::ScalarType pooled_type, const Tensor& weight,
                       const c10::optional<Tensor>& scale, const c10::optional<Tensor>& shift, at::IntArrayRef bins) {
  TORCH_CHECK(weight.dim() == 3, "pspnet_fast: expected weight of shape (L, R, C), got ", weight.sizes());
  const int64_t L = weight.size(0), R = weight.size(1);
  TORCH_CHECK(L == static_cast<int64_t>(bins.size()) && weight.size(2) == C,
              "pspnet_fast: expected weight of shape (", bins.size(), ", R, ", C, "), got ", weight.sizes());
  TORCH_CHECK(S == total_bins(bins), "pspnet_fast: expected pooled with ", total_bins(bins), " bins, got ", S);
  TORCH_CHECK(pooled_type == weight.scalar_type() && (pooled_type == at::kFloat || pooled_type == at::kDouble),
              "pspnet_fast: expected float32 or float64 pooled and weight of one dtype, got ", pooled_type, " and ",
              weight.scalar_type());
  TORCH_CHECK(scale.has_value() == shift.has_value(), "pspnet_fast: scale and shift come together");
  if (scale.has_value()) {
    TORCH_CHECK(scale->sizes() == at::IntArrayRef({L, R}) && shift->sizes() == at::IntArrayRef({L, R}) &&
                    scale->scalar_type() == pooled_type && shift->scalar_type() == pooled_type,
                "pspnet_fast: expected scale and shift of shape (", L, ", ", R, ") and dtype ", pooled_type,
                ", got ", scale->sizes(), " ", scale->scalar_type(), " and ", shift->sizes(), " ",
                shift->scalar_type());
  }
}

struct NoLevelRows {
  static constexpr bool active = false;
  void operator()(int64_t, int64_t, int64_t) const {}
};

// All levels' 1x1 convolutions on the pooled maps: level l is one GEMM (R x C) @ (C x N*b_l^2) through the
// platform's BLAS or the hand-written kernel, then the folded-BatchNorm epilogue (scale, shift) and ReLU in one pass
// over the small result. rows_done(l, r0, r1) (when RowsFn::active) is called inside the parallel region once rows
// [r0, r1) of level l are in `out`, by the thread that owns those rows (ppm_forward upsamples them there, while the
// other thread may be computing: one parallel region for the hand-written GEMM and the level pass).
template <typename RowsFn = NoLevelRows>
Tensor ppm_reduce_impl(const Tensor& pooled, const Tensor& weight, const c10::optional<Tensor>& scale,
                       const c10::optional<Tensor>& shift, at::IntArrayRef bins, bool relu,
                       const RowsFn& rows_done = RowsFn(), const Tensor* into = nullptr) {
  checks::ppm_reduce(pooled, weight, scale, shift, bins);
  check_bins(bins);
  TORCH_CHECK(pooled.dim() == 3, "pspnet_fast: expected pooled of shape (N, C, S), got ", pooled.sizes());
  check_reduce_args(pooled.size(1), pooled.size(2), pooled.scalar_type(), weight, scale, shift, bins);
  const int64_t N = pooled.size(0), C = pooled.size(1), S = pooled.size(2);
  const int64_t L = weight.size(0), R = weight.size(1);
  // into: a contiguous (N, R, S) tensor of pooled's dtype for the result (the caller's, already checked)
  Tensor out = into != nullptr ? *into : at::empty({N, R, S}, pooled.options());
  if (N == 0) return out;
  const Tensor p = pooled.contiguous();
  const Tensor wt = weight.contiguous();
  const Tensor scale_c = scale.has_value() ? scale->contiguous() : Tensor();
  const Tensor shift_c = scale.has_value() ? shift->contiguous() : Tensor();
  std::vector<int64_t> offs;
  for (int64_t l = 0, off = 0; l < L; off += bins[l] * bins[l], ++l) offs.push_back(off);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "ppm_reduce_cpu", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    // Rows [r0, r1) of level l from its GEMM result y (R, N * s) into out, through the folded BatchNorm and ReLU.
    auto epilogue = [&](int64_t l, const scalar_t* y, int64_t r0, int64_t r1) {
      const int64_t s = bins[l] * bins[l], off = offs[l];
      const scalar_t* sc = scale_c.defined() ? scale_c.const_data_ptr<scalar_t>() + l * R : nullptr;
      const scalar_t* sf = shift_c.defined() ? shift_c.const_data_ptr<scalar_t>() + l * R : nullptr;
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t n = 0; n < N; ++n) {
          for (int64_t k = 0; k < s; ++k) {
            scalar_t v = y[r * N * s + n * s + k];
            if (sc) v = v * sc[r] + sf[r];
            if (relu) v = relu_nan(v);
            o[(n * R + r) * S + off + k] = v;
          }
        }
      }
    };
    // (N, C, s) -> (C, N * s): one GEMM per level for all images.
    auto level_cols = [&](int64_t l) {
      return p.narrow(2, offs[l], bins[l] * bins[l]).permute({1, 0, 2}).reshape({C, N * bins[l] * bins[l]});
    };
    std::vector<int64_t> small;  // levels for the hand-written GEMM
    for (int64_t l = 0; l < L; ++l) {
#if PSP_X86_SMALL_GEMM
      if (std::is_same_v<scalar_t, float> && use_small_gemm(N * bins[l] * bins[l])) {
        small.push_back(l);
        continue;
      }
#endif
      const Tensor y = mm_no_autocast(wt.select(0, l), level_cols(l));  // (R, N * s)
      // Serial below ~32K values (a fork-join costs more than the loop; on a shared machine, much more).
      const int64_t grain = std::max<int64_t>(64, 32768 / (N * bins[l] * bins[l]));
      at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) { epilogue(l, y.const_data_ptr<scalar_t>(), r0, r1); });
    }
    // Every hand-written level (and, with rows_done, every level's follow-up) in one parallel region (one
    // fork-join, not two per level): each task runs its rows of every such level, then their epilogue, while the
    // rows' results are in cache.
    std::vector<Tensor> pts, ys;
    std::vector<int64_t> slot(L, -1);  // level -> its index in small (-1: at::mm, done above)
#if PSP_X86_SMALL_GEMM
    for (int64_t l : small) {
      const int64_t s = bins[l] * bins[l];
      slot[l] = static_cast<int64_t>(pts.size());
      pts.push_back(at::empty({N * s * C}, out.options()));  // the level's N * s columns, packed
      const scalar_t* pp = p.const_data_ptr<scalar_t>() + offs[l];
      // column k = (image n, bin j) at channel c: pooled[n, c, offs[l] + j]
      pack_small_gemm_cols(reinterpret_cast<float*>(pts.back().mutable_data_ptr<scalar_t>()), C, N * s,
                           [&](int64_t k, int64_t c) { return static_cast<float>(pp[((k / s) * C + c) * S + k % s]); });
      ys.push_back(at::empty({R, N * s}, out.options()));
    }
#endif
    if (small.empty() && !RowsFn::active) return;
    // Chunks of 16 rows, handed out dynamically. Odd threads take the levels in reverse order: the levels of few
    // columns are bound by reading W, those of many by FMAs, so one thread computes while the other streams. (Each
    // row's values depend neither on the order nor on the chunk.)
    dynamic_for(R, 16, [&](int64_t r0, int64_t r1, int64_t worker) {
      const bool reverse = worker % 2 == 1;
      for (int64_t t = 0; t < L; ++t) {
        const int64_t l = reverse ? L - 1 - t : t;
#if PSP_X86_SMALL_GEMM
        if (slot[l] >= 0) {
          // (float: scalar_t is float here; the casts only let the float64 instantiation compile)
          scalar_t* y = ys[slot[l]].mutable_data_ptr<scalar_t>();
          small_gemm_rows_avx2(reinterpret_cast<const float*>(wt.const_data_ptr<scalar_t>()) + l * R * C,
                               reinterpret_cast<const float*>(pts[slot[l]].const_data_ptr<scalar_t>()),
                               reinterpret_cast<float*>(y), r0, r1, C, N * bins[l] * bins[l]);
          epilogue(l, y, r0, r1);
        }
#endif
        rows_done(l, r0, r1);
      }
    });
  });
  return out;
}

Tensor ppm_reduce_cpu(const Tensor& pooled, const Tensor& weight, const c10::optional<Tensor>& scale,
                      const c10::optional<Tensor>& shift, at::IntArrayRef bins, bool relu) {
  return ppm_reduce_impl(pooled, weight, scale, shift, bins, relu);
}

// The NCHW output planes of upsample_concat: plane(n, c) writes out[n, c] (a copy of x's plane for the channels of
// x, else the level map interpolated into a plane-sized scratch, cache-resident, then stored in one sweep).
template <typename scalar_t, typename lvl_t>
struct NchwPlanes {
  using scalar_type = scalar_t;
  using acc_t = at::opmath_type<scalar_t>;
  int64_t C, H, W, R, S, CO, HW, x0, l0;
  at::IntArrayRef bins;
  LevelTaps<acc_t> lt;
  const scalar_t* xp;
  const lvl_t* yp;
  scalar_t* op;
  bool stream;

  // write_x false: x's data is not read (ppm_forward has written x's planes in its pooling pass).
  NchwPlanes(const Tensor& x, const Tensor& levels, at::IntArrayRef bins_, bool align_corners, bool x_last,
             Tensor& out, bool write_x)
      : C(x.size(1)), H(x.size(2)), W(x.size(3)), R(levels.size(1)), S(levels.size(2)),
        CO(C + static_cast<int64_t>(bins_.size()) * R), HW(H * W),
        x0(x_last ? static_cast<int64_t>(bins_.size()) * R : 0), l0(x_last ? 0 : C),  // first channel of x, levels
        bins(bins_), lt(bins_, H, W, align_corners), xp(write_x ? x.const_data_ptr<scalar_t>() : nullptr),
        yp(levels.const_data_ptr<lvl_t>()), op(out.mutable_data_ptr<scalar_t>()), stream(use_streaming(out)) {}

  // rows: the (b x W) level map interpolated along W (ATen's inner bracket); plane_buf: HW values. Both scratch.
  void plane(int64_t n, int64_t c, std::vector<acc_t>& rows, std::vector<scalar_t>& plane_buf) const {
    scalar_t* dst = op + (n * CO + c) * HW;
    if (c >= x0 && c < x0 + C) {
      store_block(dst, xp + (n * C + c - x0) * HW, HW, stream);
      return;
    }
    const int64_t l = (c - l0) / R, r = (c - l0) % R, b = bins[l];
    const lvl_t* map = yp + (n * R + r) * S + lt.offs[l];
    const Taps<acc_t>& hh = lt.th[l];
    const Taps<acc_t>& ww = lt.tw[l];
    rows.resize(b * W);
    plane_buf.resize(HW);
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t w = 0; w < W; ++w) {
        rows[i * W + w] = ww.l0[w] * static_cast<acc_t>(map[i * b + ww.i0[w]]) +
                          ww.l1[w] * static_cast<acc_t>(map[i * b + ww.i1[w]]);
      }
    }
    for (int64_t h = 0; h < H; ++h) {
      const acc_t* r0 = rows.data() + hh.i0[h] * W;
      const acc_t* r1 = rows.data() + hh.i1[h] * W;
      const acc_t a = hh.l0[h], bb = hh.l1[h];
      scalar_t* d = plane_buf.data() + h * W;
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) d[w] = static_cast<scalar_t>(a * r0[w] + bb * r1[w]);
    }
    store_block(dst, plane_buf.data(), HW, stream);
  }
};

// write_x false: only the level planes are written (see NchwPlanes).
template <typename scalar_t, typename lvl_t>
void upsample_concat_nchw(const Tensor& x, const Tensor& levels, at::IntArrayRef bins, bool align_corners,
                          bool x_last, Tensor& out, bool write_x = true) {
  const NchwPlanes<scalar_t, lvl_t> pl(x, levels, bins, align_corners, x_last, out, write_x);
  const int64_t N = x.size(0);
  // One task per output plane (n, c'): every plane of the output, or only the level planes.
  const int64_t planes = write_x ? pl.CO : pl.CO - pl.C;  // per image
  dynamic_for(N * planes, plane_chunk(pl.HW), [&](int64_t begin, int64_t end, int64_t) {
    std::vector<at::opmath_type<scalar_t>> rows;
    std::vector<scalar_t> plane_buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / planes, c = write_x ? task % planes : pl.l0 + task % planes;
      pl.plane(n, c, rows, plane_buf);
    }
    store_fence(pl.stream);
  });
}

// write_x false: only each pixel's L*R level channels are written (as in upsample_concat_nchw).
template <typename scalar_t, typename lvl_t>
void upsample_concat_nhwc(const Tensor& x, const Tensor& levels, at::IntArrayRef bins, bool align_corners,
                          bool x_last, Tensor& out, bool write_x = true) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t R = levels.size(1), S = levels.size(2), L = bins.size(), CO = C + L * R;
  const LevelTaps<acc_t> lt(bins, H, W, align_corners);
  const std::vector<Taps<acc_t>>& th = lt.th;
  const std::vector<Taps<acc_t>>& tw = lt.tw;
  const std::vector<int64_t>& offs = lt.offs;
  // (N, R, S) -> (N, S, R) in the accumulation type so the R channels of one bin are contiguous, as the output's.
  const Tensor yt = levels.to(c10::CppTypeToScalarType<acc_t>::value).transpose(1, 2).contiguous();
  const acc_t* yp = yt.const_data_ptr<acc_t>();
  const scalar_t* xp = write_x ? x.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const bool stream = use_streaming(out);
  const int64_t x0 = x_last ? L * R : 0, l0 = x_last ? 0 : C;  // first channel of x and of the levels in out
  // One task per output row (n, h): each pixel's C + L*R channels are assembled in a cache-resident scratch (x's C
  // channels, then every level's R interpolated channels) and stored in one sweep.
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> pix(CO);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / H, h = row % H;
      for (int64_t w = 0; w < W; ++w) {
        if (write_x) std::memcpy(pix.data() + x0, xp + ((n * H + h) * W + w) * C, C * sizeof(scalar_t));
        for (int64_t l = 0; l < L; ++l) {
          const int64_t b = bins[l];
          const acc_t* base = yp + (n * S + offs[l]) * R;
          const acc_t* v00 = base + (th[l].i0[h] * b + tw[l].i0[w]) * R;
          const acc_t* v01 = base + (th[l].i0[h] * b + tw[l].i1[w]) * R;
          const acc_t* v10 = base + (th[l].i1[h] * b + tw[l].i0[w]) * R;
          const acc_t* v11 = base + (th[l].i1[h] * b + tw[l].i1[w]) * R;
          const acc_t lh0 = th[l].l0[h], lh1 = th[l].l1[h], lw0 = tw[l].l0[w], lw1 = tw[l].l1[w];
          scalar_t* d = pix.data() + l0 + l * R;
#pragma omp simd
          for (int64_t r = 0; r < R; ++r) {
            d[r] = static_cast<scalar_t>(lh0 * (lw0 * v00[r] + lw1 * v01[r]) + lh1 * (lw0 * v10[r] + lw1 * v11[r]));
          }
        }
        if (write_x) {
          store_block(op + ((n * H + h) * W + w) * CO, pix.data(), CO, stream);
        } else {
          store_block(op + ((n * H + h) * W + w) * CO + l0, pix.data() + l0, L * R, stream);
        }
      }
    }
    store_fence(stream);
  });
}

Tensor upsample_concat_cpu(const Tensor& x_in, const Tensor& levels_in, at::IntArrayRef bins, bool align_corners,
                           bool x_last) {
  checks::upsample_concat(x_in, levels_in, bins);
  check_map(x_in, "x", "C");
  check_bins(bins);
  TORCH_CHECK(levels_in.dim() == 3 && levels_in.size(0) == x_in.size(0) && levels_in.size(2) == total_bins(bins),
              "pspnet_fast: expected levels of shape (", x_in.size(0), ", R, ", total_bins(bins), "), got ",
              levels_in.sizes());
  TORCH_CHECK(levels_in.scalar_type() == at::kFloat || levels_in.scalar_type() == at::kDouble,
              "pspnet_fast: expected float32 or float64 levels, got ", levels_in.scalar_type());
  const bool cl = is_channels_last(x_in);
  const Tensor x = cl ? x_in : x_in.contiguous();
  const Tensor levels = levels_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t CO = C + static_cast<int64_t>(bins.size()) * levels.size(1);
  const std::vector<int64_t> out_strides =
      cl ? std::vector<int64_t>{CO * H * W, 1, W * CO, CO} : std::vector<int64_t>{CO * H * W, H * W, W, 1};
  Tensor out = OutputCache::get().empty({N, CO, H, W}, out_strides, x.options());
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upsample_concat_cpu", [&] {
    using scalar_x = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(levels.scalar_type(), "upsample_concat_cpu_levels", [&] {
      if (cl) {
        upsample_concat_nhwc<scalar_x, scalar_t>(x, levels, bins, align_corners, x_last, out);
      } else {
        upsample_concat_nchw<scalar_x, scalar_t>(x, levels, bins, align_corners, x_last, out);
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// The eval forward with x read once: pass 1 pools x and stores it into its channels of out while it is in cache;
// then ppm_reduce (the op's own code: the levels are the composition's, bit for bit); pass 2 writes only the level
// channels (upsample_concat's code with write_x false).
// ---------------------------------------------------------------------------------------------------------------

// Pass 1, NCHW out: one task per (n, c) plane of x, at any strides. A contiguous plane is pooled in place and each row
// segment stored into out's plane x0 + c right after it is added (from L1/L2, streaming); other strides are gathered
// into a contiguous plane first (x is still read from memory once), so the pooled values are pyramid_pool's on
// x.contiguous().
template <typename scalar_t>
void pool_copy_nchw(const Tensor& x, at::IntArrayRef bins, const Segments& sh, const Segments& sw, Tensor& pooled,
                    Tensor& out, int64_t x0) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), S = pooled.size(2), CO = out.size(1);
  const int64_t HW = H * W;
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const bool dense = (H == 1 || sH == W) && (W == 1 || sW == 1);  // every plane contiguous
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  acc_t* pp = pooled.mutable_data_ptr<acc_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const bool stream = use_streaming(out);
  dynamic_for(N * C, plane_chunk(HW), [&](int64_t begin, int64_t end, int64_t) {
    std::vector<acc_t> seg(sh.size() * sw.size()), colsum(W);
    std::vector<scalar_t> buf(dense ? 0 : HW);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / C, c = plane % C;
      const scalar_t* src = xp + n * sN + c * sC;
      scalar_t* dst = op + (n * CO + x0 + c) * HW;
      if (dense) {
        pool_plane<scalar_t, acc_t>(src, W, bins, sh, sw, seg.data(), colsum.data(), pp + plane * S,
                                    [&](int64_t h0, int64_t h1) {
                                      store_block(dst + h0 * W, src + h0 * W, (h1 - h0) * W, stream);
                                    });
        continue;
      }
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* row = src + h * sH;
        scalar_t* b = buf.data() + h * W;
        if (sW == 1) {
          std::memcpy(b, row, W * sizeof(scalar_t));
        } else {
          for (int64_t w = 0; w < W; ++w) b[w] = row[w * sW];
        }
      }
      pool_plane<scalar_t, acc_t>(buf.data(), W, bins, sh, sw, seg.data(), colsum.data(), pp + plane * S);
      store_block(dst, buf.data(), HW, stream);
    }
    store_fence(stream);
  });
}

// Pass 1, channels_last: pyramid_pool_nhwc, storing each pixel's run of channels into out (N, H, W, CO) at channel
// x0 + c0 as soon as it is added.
template <typename scalar_t>
struct StreamCopy {
  scalar_t* op;
  int64_t H, W, CO, x0;
  bool stream;
  void pixel(int64_t n, int64_t h, int64_t w, int64_t c0, const scalar_t* src, int64_t cb) const {
    store_block(op + ((n * H + h) * W + w) * CO + x0 + c0, src, cb, stream);
  }
  void finish() const { store_fence(stream); }
};

// ppm_forward's NCHW level pass as ppm_reduce_impl's rows_done: the planes (n, level l, row r) of every image n.
template <typename Planes>
struct LevelRowsHook {
  static constexpr bool active = true;
  const Planes* pl;
  int64_t N;
  void operator()(int64_t l, int64_t r0, int64_t r1) const {
    std::vector<typename Planes::acc_t> rows;
    std::vector<typename Planes::scalar_type> plane_buf;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t r = r0; r < r1; ++r) pl->plane(n, pl->l0 + l * pl->R + r, rows, plane_buf);
    }
    store_fence(pl->stream);
  }
};

Tensor ppm_forward_cpu(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& scale,
                       const c10::optional<Tensor>& shift, at::IntArrayRef bins, bool relu, bool align_corners,
                       bool x_last) {
  checks::ppm_forward(x, weight, scale, shift, bins);
  check_map(x, "x", "C");
  check_bins(bins);
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && (!scale.has_value() || scale->device().is_cpu()) &&
                  (!shift.has_value() || shift->device().is_cpu()),
              "pspnet_fast: ppm_forward_cpu expects CPU tensors, got x on ", x.device(), " and weight on ",
              weight.device());
  const auto acc_type = acc_type_of(x.scalar_type());
  const int64_t S = total_bins(bins);
  check_reduce_args(x.size(1), S, acc_type, weight, scale, shift, bins);
  // An eval op without an autograd formula: the ATen calls inside (ppm_reduce's mm_out) run below autograd even when
  // the caller's weights require grad.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool cl = is_channels_last(x);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t L = static_cast<int64_t>(bins.size()), R = weight.size(1), CO = C + L * R;
  const std::vector<int64_t> out_strides =
      cl ? std::vector<int64_t>{CO * H * W, 1, W * CO, CO} : std::vector<int64_t>{CO * H * W, H * W, W, 1};
  Tensor out = OutputCache::get().empty({N, CO, H, W}, out_strides, x.options());
  if (N == 0) return out;
  Tensor pooled = at::empty({N, C, S}, x.options().dtype(acc_type));
  const Segments sh = make_segments(bins, H), sw = make_segments(bins, W);
  const int64_t x0 = x_last ? L * R : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ppm_forward_cpu_pool", [&] {
    if (cl) {
      const StreamCopy<scalar_t> copy{out.mutable_data_ptr<scalar_t>(), H, W, CO, x0, use_streaming(out)};
      pyramid_pool_nhwc<scalar_t>(x, bins, sh, sw, pooled, copy);
    } else {
      pool_copy_nchw<scalar_t>(x, bins, sh, sw, pooled, out, x0);
    }
  });
  if (cl) {
    const Tensor levels = ppm_reduce_cpu(pooled, weight, scale, shift, bins, relu);  // (N, R, S), acc_type
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ppm_forward_cpu_levels", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      upsample_concat_nhwc<scalar_t, acc_t>(x, levels, bins, align_corners, x_last, out, /*write_x=*/false);
    });
    return out;
  }
  // NCHW: each level plane (n, level l, row r) needs only row r of level l, so the reduce's threads upsample their
  // rows of each level as soon as those are computed (LevelRowsHook), in the reduce's own parallel region: one
  // fork-join fewer, and one thread's FMAs overlap the other's streaming stores. The levels, and so every output
  // value, are the composition's bit for bit.
  Tensor levels = at::empty({N, R, S}, x.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ppm_forward_cpu_levels", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const NchwPlanes<scalar_t, acc_t> pl(x, levels, bins, align_corners, x_last, out, /*write_x=*/false);
    const LevelRowsHook<NchwPlanes<scalar_t, acc_t>> hook{&pl, N};
    ppm_reduce_impl(pooled, weight, scale, shift, bins, relu, hook, &levels);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Backward: the adjoints of upsample_concat (levels part) and pyramid_pool. Each output value is reduced by the one
// task that owns it, in a fixed order: deterministic, no atomics.
// ---------------------------------------------------------------------------------------------------------------

// The transpose of one extent's taps: for each bin j, the contiguous run of output indices whose taps reach j
// (taps are monotone in the output index) and the weight of each (both taps summed when they coincide).
template <typename acc_t>
struct AdjointRuns {
  std::vector<int64_t> start, len, woff;
  std::vector<acc_t> wts;
};

template <typename acc_t>
AdjointRuns<acc_t> make_adjoint_runs(const Taps<acc_t>& t, int64_t b) {
  AdjointRuns<acc_t> a;
  const int64_t n = static_cast<int64_t>(t.i0.size());
  for (int64_t j = 0; j < b; ++j) {
    int64_t lo = n, hi = -1;
    for (int64_t d = 0; d < n; ++d) {
      if (t.i0[d] == j || t.i1[d] == j) {
        lo = std::min(lo, d);
        hi = std::max(hi, d);
      }
    }
    a.start.push_back(hi < 0 ? 0 : lo);
    a.len.push_back(hi < 0 ? 0 : hi - lo + 1);
    a.woff.push_back(static_cast<int64_t>(a.wts.size()));
    for (int64_t d = lo; d <= hi; ++d) {
      a.wts.push_back((t.i0[d] == j ? t.l0[d] : acc_t(0)) + (t.i1[d] == j ? t.l1[d] : acc_t(0)));
    }
  }
  return a;
}

// sum_k w[k] * static_cast<acc_t>(v[k]) with 8 interleaved partial sums combined in a fixed order: vectorizable,
// and the same rounding on every call whatever the pointers' alignment (bitwise-deterministic backward).
template <typename acc_t, typename scalar_t>
inline acc_t dot_fixed(const acc_t* w, const scalar_t* v, int64_t n) {
  acc_t p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    for (int q = 0; q < 8; ++q) p[q] += w[k + q] * static_cast<acc_t>(v[k + q]);
  }
  for (; k < n; ++k) p[k & 7] += w[k] * static_cast<acc_t>(v[k]);
  return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

// grad_levels[n, r, bin(i, j)] = sum_{h, w} Ah[h, i] Aw[w, j] g[h, w] for one (H x W) plane g, as a gather:
// T (H x b), T[h][j] = the run of row h that reaches column bin j, weighted; then G[i][j] = the run of rows of T that
// reaches row bin i, weighted.
template <typename scalar_t, typename acc_t>
void upsample_adjoint_plane(const scalar_t* g, int64_t H, int64_t W, int64_t b, const AdjointRuns<acc_t>& ah,
                            const AdjointRuns<acc_t>& aw, std::vector<acc_t>& t, acc_t* out) {
  t.resize(b * H);  // column-major T: t[j * H + h], so the second pass reads runs of h contiguously
  for (int64_t h = 0; h < H; ++h) {
    const scalar_t* row = g + h * W;
    for (int64_t j = 0; j < b; ++j) {
      t[j * H + h] = dot_fixed<acc_t, scalar_t>(aw.wts.data() + aw.woff[j], row + aw.start[j], aw.len[j]);
    }
  }
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t j = 0; j < b; ++j) {
      out[i * b + j] = dot_fixed<acc_t, acc_t>(ah.wts.data() + ah.woff[i], t.data() + j * H + ah.start[i], ah.len[i]);
    }
  }
}

Tensor upsample_concat_backward_cpu(const Tensor& grad_in, int64_t C, at::IntArrayRef bins, bool align_corners,
                                    bool x_last) {
  checks::upsample_concat_backward(grad_in, C, bins);
  check_map(grad_in, "x", "C");
  check_bins(bins);
  const int64_t L = bins.size(), CO = grad_in.size(1);
  TORCH_CHECK(C >= 0 && CO > C && (CO - C) % L == 0,
              "pspnet_fast: expected grad_out with in_channels + len(bins) * R channels (in_channels ", C, ", ", L,
              " levels), got ", CO);
  const int64_t N = grad_in.size(0), H = grad_in.size(2), W = grad_in.size(3), R = (CO - C) / L;
  const int64_t S = total_bins(bins);
  const int64_t l0 = x_last ? 0 : C;  // first level channel of grad_out
  const bool cl = is_channels_last(grad_in);
  const Tensor g = cl ? grad_in : grad_in.contiguous();
  const auto acc_type = acc_type_of(g.scalar_type());
  Tensor out = at::empty({N, R, S}, g.options().dtype(acc_type));
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "upsample_concat_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LevelTaps<acc_t> lt(bins, H, W, align_corners);
    const std::vector<Taps<acc_t>>& th = lt.th;
    const std::vector<Taps<acc_t>>& tw = lt.tw;
    const std::vector<int64_t>& offs = lt.offs;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    acc_t* op = out.mutable_data_ptr<acc_t>();
    if (!cl) {
      std::vector<AdjointRuns<acc_t>> ah, aw;
      for (int64_t l = 0; l < L; ++l) {
        ah.push_back(make_adjoint_runs<acc_t>(th[l], bins[l]));
        aw.push_back(make_adjoint_runs<acc_t>(tw[l], bins[l]));
      }
      // One task per level plane (n, l, r): the plane is read once.
      at::parallel_for(0, N * L * R, std::max<int64_t>(1, 16384 / (H * W)), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> t;
        for (int64_t task = begin; task < end; ++task) {
          const int64_t n = task / (L * R), l = (task / R) % L, r = task % R;
          const scalar_t* plane = gp + (n * CO + l0 + l * R + r) * H * W;
          upsample_adjoint_plane<scalar_t, acc_t>(plane, H, W, bins[l], ah[l], aw[l], t, op + (n * R + r) * S + offs[l]);
        }
      });
      return;
    }
    // channels_last: one task per (n, level, block of channels); every pixel's RB channels are contiguous and are
    // accumulated as vectors into the (up to 4) bins its taps reach.
    const int64_t RB = std::min<int64_t>(R, 64), nrb = (R + RB - 1) / RB;
    at::parallel_for(0, N * L * nrb, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc, trow;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / (L * nrb), l = (task / nrb) % L, r0 = (task % nrb) * RB, rb = std::min(RB, R - r0);
        const int64_t b = bins[l];
        acc.assign(b * b * RB, acc_t(0));
        trow.assign(b * RB, acc_t(0));
        for (int64_t h = 0; h < H; ++h) {
          std::fill(trow.begin(), trow.end(), acc_t(0));
          for (int64_t w = 0; w < W; ++w) {
            const scalar_t* px = gp + ((n * H + h) * W + w) * CO + l0 + l * R + r0;
            acc_t* t0 = trow.data() + tw[l].i0[w] * RB;
            acc_t* t1 = trow.data() + tw[l].i1[w] * RB;
            const acc_t a = tw[l].l0[w], bb = tw[l].l1[w];
            for (int64_t r = 0; r < rb; ++r) t0[r] += a * static_cast<acc_t>(px[r]);
            for (int64_t r = 0; r < rb; ++r) t1[r] += bb * static_cast<acc_t>(px[r]);
          }
          acc_t* a0 = acc.data() + th[l].i0[h] * b * RB;
          acc_t* a1 = acc.data() + th[l].i1[h] * b * RB;
          const acc_t a = th[l].l0[h], bb = th[l].l1[h];
          for (int64_t k = 0; k < b * RB; ++k) a0[k] += a * trow[k];
          for (int64_t k = 0; k < b * RB; ++k) a1[k] += bb * trow[k];
        }
        for (int64_t r = 0; r < rb; ++r) {
          acc_t* o = op + (n * R + r0 + r) * S + offs[l];
          for (int64_t k = 0; k < b * b; ++k) o[k] = acc[k * RB + r];
        }
      }
    });
  });
  return out;
}

// For one extent n and one level b: the bins containing each index (a contiguous run [first, last]) and each
// bin's size.
struct BinRuns {
  std::vector<int64_t> first, last;  // per index
  std::vector<int64_t> count;
};

BinRuns make_bin_runs(int64_t b, int64_t n) {
  BinRuns br;
  br.first.assign(n, b);
  br.last.assign(n, -1);
  for (int64_t i = 0; i < b; ++i) {
    const int64_t s = pool_start(i, b, n), e = pool_end(i, b, n);
    br.count.push_back(e - s);
    for (int64_t k = s; k < e; ++k) {
      br.first[k] = std::min(br.first[k], i);
      br.last[k] = std::max(br.last[k], i);
    }
  }
  return br;
}

// grad_x = grad_out[:, :C] + sum_l pool_l^T grad_pooled_l, gathered per output element.
Tensor pyramid_pool_backward_cpu(const Tensor& grad_pooled_in, const Tensor& grad_in, at::IntArrayRef bins,
                                 int64_t x_offset) {
  checks::pyramid_pool_backward(grad_pooled_in, grad_in, bins, x_offset);
  check_map(grad_in, "x", "C");
  check_bins(bins);
  TORCH_CHECK(grad_pooled_in.dim() == 3 && grad_pooled_in.size(0) == grad_in.size(0) &&
                  grad_pooled_in.size(1) <= grad_in.size(1) && grad_pooled_in.size(2) == total_bins(bins),
              "pspnet_fast: expected grad_pooled of shape (", grad_in.size(0), ", C <= ", grad_in.size(1), ", ",
              total_bins(bins), "), got ", grad_pooled_in.sizes());
  TORCH_CHECK(grad_pooled_in.scalar_type() == at::kFloat || grad_pooled_in.scalar_type() == at::kDouble,
              "pspnet_fast: expected float32 or float64 grad_pooled, got ", grad_pooled_in.scalar_type());
  const bool cl = is_channels_last(grad_in);
  const Tensor g = cl ? grad_in : grad_in.contiguous();
  const int64_t N = g.size(0), CO = g.size(1), H = g.size(2), W = g.size(3), C = grad_pooled_in.size(1);
  const int64_t S = grad_pooled_in.size(2), L = bins.size();
  TORCH_CHECK(x_offset >= 0 && x_offset + C <= CO, "pspnet_fast: x_offset ", x_offset, " with ", C,
              " channels of x does not fit grad_out's ", CO, " channels");
  const std::vector<int64_t> out_strides =
      cl ? std::vector<int64_t>{C * H * W, 1, W * C, C} : std::vector<int64_t>{C * H * W, H * W, W, 1};
  Tensor out = OutputCache::get().empty({N, C, H, W}, out_strides, g.options());
  if (N == 0) return out;
  std::vector<BinRuns> rh, rw;
  std::vector<int64_t> offs;
  int64_t off = 0;
  for (int64_t b : bins) {
    rh.push_back(make_bin_runs(b, H));
    rw.push_back(make_bin_runs(b, W));
    offs.push_back(off);
    off += b * b;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "pyramid_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor gp = grad_pooled_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* gpp = gp.const_data_ptr<acc_t>();
    const scalar_t* gop = g.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    if (!cl) {
      const Segments segh = make_segments(bins, H);
      const int64_t nsh = segh.size();
      // One task per (n, c) plane: E_l (b x W) spreads each bin's gradient / kh / kw over its columns, then each row
      // adds the E_l rows of the bins containing it (vectorized over w).
      at::parallel_for(0, N * C, std::max<int64_t>(1, 16384 / (H * W)), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> e, sg(S), rowacc(W);
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t n = plane / C, c = plane % C;
          const acc_t* gl = gpp + plane * S;
          const scalar_t* src = gop + (n * CO + x_offset + c) * H * W;
          scalar_t* dst = op + plane * H * W;
          // Each bin's gradient / kh / kw (as the forward divides its sum), then E for every level, (sum b) x W.
          for (int64_t l = 0; l < L; ++l) {
            const int64_t b = bins[l];
            for (int64_t k = 0; k < b * b; ++k) {
              sg[offs[l] + k] = gl[offs[l] + k] / static_cast<acc_t>(rh[l].count[k / b]) /
                                static_cast<acc_t>(rw[l].count[k % b]);
            }
          }
          e.clear();
          for (int64_t l = 0; l < L; ++l) {
            const int64_t b = bins[l];
            for (int64_t i = 0; i < b; ++i) {
              const acc_t* srow = sg.data() + offs[l] + i * b;
              for (int64_t w = 0; w < W; ++w) {
                acc_t v = 0;
                for (int64_t j = rw[l].first[w]; j <= rw[l].last[w]; ++j) v += srow[j];
                e.push_back(v);
              }
            }
          }
          // Rows of one row segment lie in the same bins of every level: their spread is one shared W-vector.
          for (int64_t u = 0; u < nsh; ++u) {
            const int64_t h_rep = segh.bounds[u];
            std::fill(rowacc.begin(), rowacc.end(), acc_t(0));
            int64_t base = 0;
            for (int64_t l = 0; l < L; ++l) {
              for (int64_t i = rh[l].first[h_rep]; i <= rh[l].last[h_rep]; ++i) {
                const acc_t* er = e.data() + (base + i) * W;
                for (int64_t w = 0; w < W; ++w) rowacc[w] += er[w];
              }
              base += bins[l];
            }
            for (int64_t h = segh.bounds[u]; h < segh.bounds[u + 1]; ++h) {
              const scalar_t* s_row = src + h * W;
              scalar_t* d_row = dst + h * W;
              for (int64_t w = 0; w < W; ++w) d_row[w] = static_cast<scalar_t>(static_cast<acc_t>(s_row[w]) + rowacc[w]);
            }
          }
        }
      });
      return;
    }
    // channels_last: one task per (n, h) row; the scaled bin gradients are laid out (N, S, C) so each pixel's C
    // channels gather contiguous vectors.
    std::vector<acc_t> scaled(static_cast<size_t>(N) * S * C);
    at::parallel_for(0, N * S, 16, [&](int64_t begin, int64_t end) {
      for (int64_t ns = begin; ns < end; ++ns) {
        const int64_t n = ns / S, p = ns % S;
        int64_t l = 0;
        while (l + 1 < L && offs[l + 1] <= p) ++l;
        const int64_t b = bins[l], i = (p - offs[l]) / b, j = (p - offs[l]) % b;
        for (int64_t c = 0; c < C; ++c) {
          scaled[(n * S + p) * C + c] =
              gpp[(n * C + c) * S + p] / static_cast<acc_t>(rh[l].count[i]) / static_cast<acc_t>(rw[l].count[j]);
        }
      }
    });
    at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(C);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / H, h = row % H;
        for (int64_t w = 0; w < W; ++w) {
          const scalar_t* src = gop + ((n * H + h) * W + w) * CO + x_offset;
          for (int64_t c = 0; c < C; ++c) acc[c] = static_cast<acc_t>(src[c]);
          for (int64_t l = 0; l < L; ++l) {
            const int64_t b = bins[l];
            for (int64_t i = rh[l].first[h]; i <= rh[l].last[h]; ++i) {
              for (int64_t j = rw[l].first[w]; j <= rw[l].last[w]; ++j) {
                const acc_t* v = scaled.data() + (n * S + offs[l] + i * b + j) * C;
                for (int64_t c = 0; c < C; ++c) acc[c] += v[c];
              }
            }
          }
          scalar_t* dst = op + ((n * H + h) * W + w) * C;
          for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pspnet_fast, CPU, m) {
  m.impl("pyramid_pool", &pyramid_pool_cpu);
  m.impl("ppm_reduce", &ppm_reduce_cpu);
  m.impl("upsample_concat", &upsample_concat_cpu);
  m.impl("upsample_concat_backward", &upsample_concat_backward_cpu);
  m.impl("pyramid_pool_backward", &pyramid_pool_backward_cpu);
  m.impl("ppm_forward", &ppm_forward_cpu);
}

}  // namespace pspnet_fast
