// Helpers shared by the CPU kernels (ppm_cpu.cpp, head_cpu.cpp): bins checks and per-level bilinear tap tables.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>

#include <cstdint>
#include <vector>

#include "ppm_math.h"

namespace pspnet_fast {
namespace cpu {

using at::Tensor;

inline int64_t total_bins(at::IntArrayRef bins) {
  int64_t s = 0;
  for (int64_t b : bins) s += b * b;
  return s;
}

inline void check_bins(at::IntArrayRef bins) {
  TORCH_CHECK(!bins.empty(), "pspnet_fast: bins must hold at least one level, got an empty list");
  TORCH_CHECK(static_cast<int64_t>(bins.size()) <= kMaxLevels, "pspnet_fast: at most ", kMaxLevels,
              " pyramid levels are supported, got ", bins.size());
  for (int64_t b : bins) TORCH_CHECK(b > 0, "pspnet_fast: every bin count must be positive, got ", bins);
}

// The accumulation (and pooled / level-map) dtype of an input dtype: float64 for float64, float32 otherwise.
inline at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A 4-d floating-point map with channels, H, W >= 1: name "x", channels "C" -> "expected x of shape (N, C, H, W)".
inline void check_map(const Tensor& t, const char* name, const char* channels) {
  TORCH_CHECK(t.dim() == 4, "pspnet_fast: expected ", name, " of shape (N, ", channels, ", H, W), got ", t.dim(),
              " dims ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "pspnet_fast: expected a floating-point ", name, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.size(1) > 0 && t.size(2) > 0 && t.size(3) > 0, "pspnet_fast: expected ", name, " with ", channels,
              ", H, W >= 1, got ", t.sizes());
}

inline bool is_channels_last(const Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

// Runs f(begin, end, worker) over [0, n) in chunks of `chunk`, handed out one at a time to the threads (an atomic
// counter) instead of one fixed share each: on a shared or noisy machine a thread that loses its core for a while
// no longer stalls the other at the join (a fixed half split waits for the slower thread). worker in [0, threads).
// Callers' results must not depend on which thread runs a chunk (each output is owned by one chunk).
template <typename F>
inline void dynamic_for(int64_t n, int64_t chunk, const F& f) {
  if (n <= 0) return;
  const int64_t nchunks = (n + chunk - 1) / chunk;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), nchunks);
  if (threads <= 1 || at::in_parallel_region()) {
    f(int64_t{0}, n, int64_t{0});
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t i = next.fetch_add(1); i < nchunks; i = next.fetch_add(1)) {
        f(i * chunk, std::min(n, (i + 1) * chunk), w);
      }
    }
  });
}

// Per-level bilinear taps of one output extent: index and weight tables, computed once per call.
template <typename acc_t>
struct Taps {
  std::vector<int64_t> i0, i1;
  std::vector<acc_t> l0, l1;
};

template <typename acc_t>
inline Taps<acc_t> make_taps(int64_t in, int64_t out, bool align_corners) {
  Taps<acc_t> t;
  const acc_t scale = linear_scale<acc_t>(in, out, align_corners);
  for (int64_t d = 0; d < out; ++d) {
    const LinearTap<acc_t> tap = linear_tap<acc_t>(scale, d, in, out, align_corners);
    t.i0.push_back(tap.i0);
    t.i1.push_back(tap.i1);
    t.l0.push_back(tap.l0);
    t.l1.push_back(tap.l1);
  }
  return t;
}

// Every level's row and column taps for an (H x W) output, and each level's first column in the (N, *, S) layout.
template <typename acc_t>
struct LevelTaps {
  std::vector<Taps<acc_t>> th, tw;
  std::vector<int64_t> offs;

  LevelTaps(at::IntArrayRef bins, int64_t H, int64_t W, bool align_corners) {
    int64_t off = 0;
    for (int64_t b : bins) {
      th.push_back(make_taps<acc_t>(b, H, align_corners));
      tw.push_back(make_taps<acc_t>(b, W, align_corners));
      offs.push_back(off);
      off += b * b;
    }
  }
};

}  // namespace cpu
}  // namespace pspnet_fast
