// CPU kernels of the fused PSP head: the context of the small level maps added to conv3x3(x; W_X), with BatchNorm
// and ReLU in the same pass (head_epilogue), and the context's adjoint (head_context_backward). Contract in
// csrc/ops.cpp, truth in pspnet_fast/reference.py (head_context).
//
// The context is separable. For level l (a b x b map per tap t = 3 * dy + dx) and an output (y, x), the taps that
// reach it are, along each axis, the <= 3 shifted source positions (y + dy - 1) inside the image, each with its two
// bilinear neighbours. So per (n, o) plane:
//   rows_l[dy][i][x] = sum over dx, valid xs = x + dx - 1 of  lw0(xs) q[t][i, j0(xs)] + lw1(xs) q[t][i, j1(xs)]
//   context(y, x)    = sum over l, dy, valid ys = y + dy - 1 of lh0(ys) rows_l[dy][i0(ys)][x] + lh1(ys) rows_l[dy][i1(ys)][x]
// i.e. at most 6 row terms per level and output row, each a contiguous axpy over x (vectorized). The backward runs
// the same two steps transposed, one task per plane in a fixed order: deterministic, no atomics.
//
// Kernels work on NCHW planes; a channels_last z (or grad) is transposed to NCHW first and the result back, two
// copies of the (N, O, H, W) map, small next to the convolution that produced it.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_common.h"
#include "op_checks.h"
#include "ppm_math.h"

namespace pspnet_fast {
namespace {
using namespace cpu;  // NOLINT: the shared helpers of cpu_common.h

// Where each level's rows_l[dy][i][:] live in one per-plane scratch of width W: level l starts at base[l] rows.
struct RowsLayout {
  std::vector<int64_t> base;  // first scratch row of level l; rows_l[dy][i] is scratch row base[l] + dy * b + i
  int64_t rows = 0;

  explicit RowsLayout(at::IntArrayRef bins) {
    for (int64_t b : bins) {
      base.push_back(rows);
      rows += 3 * b;
    }
  }
};

// For every output row y, the (scratch row, weight) terms of the context: CSR over y.
template <typename acc_t>
struct RowTerms {
  std::vector<int64_t> start, row;
  std::vector<acc_t> w;

  RowTerms(at::IntArrayRef bins, const LevelTaps<acc_t>& lt, const RowsLayout& lay, int64_t H) {
    for (int64_t y = 0; y < H; ++y) {
      start.push_back(static_cast<int64_t>(row.size()));
      for (size_t l = 0; l < bins.size(); ++l) {
        const Taps<acc_t>& th = lt.th[l];
        for (int64_t dy = 0; dy < 3; ++dy) {
          const int64_t ys = y + dy - 1;
          if (ys < 0 || ys >= H) continue;
          const int64_t r = lay.base[l] + dy * bins[l];
          row.push_back(r + th.i0[ys]);
          w.push_back(th.l0[ys]);
          row.push_back(r + th.i1[ys]);
          w.push_back(th.l1[ys]);
        }
      }
    }
    start.push_back(static_cast<int64_t>(row.size()));
  }
};

// rows = sum over dx of the shifted, W-interpolated level rows of one plane's q (9 x S).
template <typename acc_t>
void horizontal_rows(const acc_t* qp, int64_t S, at::IntArrayRef bins, const LevelTaps<acc_t>& lt,
                     const RowsLayout& lay, int64_t W, acc_t* rows) {
  std::fill(rows, rows + lay.rows * W, acc_t(0));
  for (size_t l = 0; l < bins.size(); ++l) {
    const int64_t b = bins[l];
    const Taps<acc_t>& tw = lt.tw[l];
    for (int64_t dy = 0; dy < 3; ++dy) {
      for (int64_t i = 0; i < b; ++i) {
        acc_t* dst = rows + (lay.base[l] + dy * b + i) * W;
        for (int64_t dx = 0; dx < 3; ++dx) {
          const acc_t* src = qp + (dy * 3 + dx) * S + lt.offs[l] + i * b;
          // x + dx - 1 in [0, W)
          const int64_t x0 = std::max<int64_t>(0, 1 - dx), x1 = std::min<int64_t>(W, W + 1 - dx);
          for (int64_t x = x0; x < x1; ++x) {
            const int64_t xs = x + dx - 1;
            dst[x] += tw.l0[xs] * src[tw.i0[xs]] + tw.l1[xs] * src[tw.i1[xs]];
          }
        }
      }
    }
  }
}

template <typename scalar_t>
void head_epilogue_kernel(const Tensor& z, const Tensor& q, at::IntArrayRef bins, bool align_corners,
                          const Tensor& scale, const Tensor& shift, bool relu, Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = z.size(0), O = z.size(1), H = z.size(2), W = z.size(3), S = q.size(3);
  const LevelTaps<acc_t> lt(bins, H, W, align_corners);
  const RowsLayout lay(bins);
  const RowTerms<acc_t> terms(bins, lt, lay, H);
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const acc_t* qp = q.const_data_ptr<acc_t>();
  const acc_t* sp = scale.defined() ? scale.const_data_ptr<acc_t>() : nullptr;
  const acc_t* hp = shift.defined() ? shift.const_data_ptr<acc_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t HW = H * W;
  at::parallel_for(0, N * O, std::max<int64_t>(1, 16384 / HW), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> rows(lay.rows * W), acc(W);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t o = plane % O;
      horizontal_rows(qp + plane * 9 * S, S, bins, lt, lay, W, rows.data());
      const acc_t a = sp ? sp[o] : acc_t(1), c = hp ? hp[o] : acc_t(0);
      const scalar_t* zrow = zp + plane * HW;
      scalar_t* orow = op + plane * HW;
      for (int64_t y = 0; y < H; ++y, zrow += W, orow += W) {
        acc_t* s = acc.data();
        for (int64_t x = 0; x < W; ++x) s[x] = static_cast<acc_t>(zrow[x]);
        for (int64_t k = terms.start[y]; k < terms.start[y + 1]; ++k) {
          const acc_t w = terms.w[k];
          const acc_t* r = rows.data() + terms.row[k] * W;
#pragma omp simd
          for (int64_t x = 0; x < W; ++x) s[x] += w * r[x];
        }
        if (sp) {
          for (int64_t x = 0; x < W; ++x) s[x] = s[x] * a + c;
        }
        if (relu) {
          for (int64_t x = 0; x < W; ++x) s[x] = relu_nan(s[x]);
        }
        for (int64_t x = 0; x < W; ++x) orow[x] = static_cast<scalar_t>(s[x]);
      }
    }
  });
}

template <typename scalar_t>
void head_context_backward_kernel(const Tensor& g, at::IntArrayRef bins, bool align_corners, Tensor& gq) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = g.size(0), O = g.size(1), H = g.size(2), W = g.size(3), S = gq.size(3);
  const LevelTaps<acc_t> lt(bins, H, W, align_corners);
  const RowsLayout lay(bins);
  const RowTerms<acc_t> terms(bins, lt, lay, H);
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  acc_t* qp = gq.mutable_data_ptr<acc_t>();
  const int64_t HW = H * W;
  at::parallel_for(0, N * O, std::max<int64_t>(1, 16384 / HW), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> rows(lay.rows * W), grow(W);
    for (int64_t plane = begin; plane < end; ++plane) {
      // Transposed vertical step: every output row adds its gradient into the scratch rows its terms read.
      std::fill(rows.begin(), rows.end(), acc_t(0));
      const scalar_t* src = gp + plane * HW;
      for (int64_t y = 0; y < H; ++y, src += W) {
        for (int64_t x = 0; x < W; ++x) grow[x] = static_cast<acc_t>(src[x]);
        for (int64_t k = terms.start[y]; k < terms.start[y + 1]; ++k) {
          const acc_t w = terms.w[k];
          acc_t* r = rows.data() + terms.row[k] * W;
#pragma omp simd
          for (int64_t x = 0; x < W; ++x) r[x] += w * grow[x];
        }
      }
      // Transposed horizontal step: each scratch row spreads back onto its level's bins, per dx.
      acc_t* dq = qp + plane * 9 * S;
      std::fill(dq, dq + 9 * S, acc_t(0));
      for (size_t l = 0; l < bins.size(); ++l) {
        const int64_t b = bins[l];
        const Taps<acc_t>& tw = lt.tw[l];
        for (int64_t dy = 0; dy < 3; ++dy) {
          for (int64_t i = 0; i < b; ++i) {
            const acc_t* r = rows.data() + (lay.base[l] + dy * b + i) * W;
            for (int64_t dx = 0; dx < 3; ++dx) {
              acc_t* d = dq + (dy * 3 + dx) * S + lt.offs[l] + i * b;
              const int64_t x0 = std::max<int64_t>(0, 1 - dx), x1 = std::min<int64_t>(W, W + 1 - dx);
              for (int64_t x = x0; x < x1; ++x) {
                const int64_t xs = x + dx - 1;
                d[tw.i0[xs]] += tw.l0[xs] * r[x];
                d[tw.i1[xs]] += tw.l1[xs] * r[x];
              }
            }
          }
        }
      }
    }
  });
}

Tensor head_epilogue_cpu(const Tensor& z_in, const Tensor& q_in, at::IntArrayRef bins, bool align_corners,
                         const c10::optional<Tensor>& scale_in, const c10::optional<Tensor>& shift_in, bool relu) {
  checks::head_epilogue(z_in, q_in, bins, scale_in, shift_in);
  check_map(z_in, "z", "O");
  check_bins(bins);
  const int64_t N = z_in.size(0), O = z_in.size(1), S = total_bins(bins);
  const at::ScalarType acc = acc_type_of(z_in.scalar_type());
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(0) == N && q_in.size(1) == O && q_in.size(2) == 9 && q_in.size(3) == S,
              "pspnet_fast: expected q of shape (", N, ", ", O, ", 9, ", S, ") for z ", z_in.sizes(), " and bins ",
              bins, ", got ", q_in.sizes());
  TORCH_CHECK(q_in.scalar_type() == acc, "pspnet_fast: expected q of dtype ", acc, " for z of dtype ",
              z_in.scalar_type(), ", got ", q_in.scalar_type());
  TORCH_CHECK(q_in.device() == z_in.device(), "pspnet_fast: expected q on ", z_in.device(), ", got ", q_in.device());
  const bool has_scale = scale_in.has_value() && scale_in->defined();
  const bool has_shift = shift_in.has_value() && shift_in->defined();
  TORCH_CHECK(has_scale == has_shift, "pspnet_fast: head_epilogue takes scale and shift together or neither");
  Tensor scale, shift;
  if (has_scale) {
    for (const Tensor* t : {&*scale_in, &*shift_in}) {
      TORCH_CHECK(t->dim() == 1 && t->size(0) == O, "pspnet_fast: expected scale and shift of shape (", O,
                  "), got ", t->sizes());
      TORCH_CHECK(t->scalar_type() == acc, "pspnet_fast: expected scale and shift of dtype ", acc, ", got ",
                  t->scalar_type());
      TORCH_CHECK(t->device() == z_in.device(), "pspnet_fast: expected scale and shift on ", z_in.device(),
                  ", got ", t->device());
    }
    scale = scale_in->contiguous();
    shift = shift_in->contiguous();
  }
  const bool cl = is_channels_last(z_in);
  const Tensor z = z_in.contiguous();
  const Tensor q = q_in.contiguous();
  Tensor out = at::empty(z.sizes(), z.options());
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "head_epilogue_cpu", [&] {
      head_epilogue_kernel<scalar_t>(z, q, bins, align_corners, scale, shift, relu, out);
    });
  }
  return cl ? out.contiguous(at::MemoryFormat::ChannelsLast) : out;
}

Tensor head_context_backward_cpu(const Tensor& grad_in, at::IntArrayRef bins, bool align_corners) {
  checks::head_context_backward(grad_in, bins);
  check_map(grad_in, "grad", "O");
  check_bins(bins);
  const Tensor g = grad_in.contiguous();
  const int64_t N = g.size(0), O = g.size(1);
  Tensor gq = at::empty({N, O, 9, total_bins(bins)}, g.options().dtype(acc_type_of(g.scalar_type())));
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "head_context_backward_cpu", [&] {
      head_context_backward_kernel<scalar_t>(g, bins, align_corners, gq);
    });
  }
  return gq;
}

}  // namespace

TORCH_LIBRARY_IMPL(pspnet_fast, CPU, m) {
  m.impl("head_epilogue", &head_epilogue_cpu);
  m.impl("head_context_backward", &head_context_backward_cpu);
}

}  // namespace pspnet_fast
