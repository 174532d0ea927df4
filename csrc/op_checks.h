// One argument checker per op, called first thing by every backend's kernel (CPU: cpu/*.cpp, CUDA: cuda/*.cu).
// The same rules and the same message text as pspnet_fast/_checks.py (the fake kernels and the Triton ops), and the
// same Python exception: TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE -> TypeError. So CPU, CUDA, Triton and
// meta raise the same error for the same input.
//
// Bounds, far above any real pyramid: at most kCheckMaxLevels levels, each bin count b in [1, kCheckMaxBin] and
// S = sum of b * b <= kCheckMaxTotalBins, so b * b, S, b * H (H < 2^31) and the int32 column indices of the CUDA
// kernels never overflow. Channel ranges are compared without forming x_offset + C (which can wrap in int64).
// Devices: every tensor must be on the device of the op's first map (x, z, grad_out or grad), meta included.
//
// Header-only, at::Tensor / TORCH_CHECK-level code (compiles in .cu files as host code).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <string>

namespace pspnet_fast {
namespace checks {

using at::Tensor;

constexpr int64_t kCheckMaxLevels = 16;
constexpr int64_t kCheckMaxBin = int64_t{1} << 12;
constexpr int64_t kCheckMaxTotalBins = int64_t{1} << 24;

// torch's Python name of a dtype ("torch.float32"), as str(dtype) prints it in the Python checker's messages.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline bool is_acc_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// S = sum of b * b for valid bins.
inline int64_t check_bins(const char* op, at::IntArrayRef bins) {
  TORCH_CHECK_VALUE(!bins.empty(), "pspnet_fast.", op, ": bins must hold at least one level, got an empty list");
  TORCH_CHECK_VALUE(static_cast<int64_t>(bins.size()) <= kCheckMaxLevels, "pspnet_fast.", op, ": at most ",
                    kCheckMaxLevels, " pyramid levels are supported, got ", bins.size());
  int64_t s = 0;
  for (int64_t b : bins) {
    TORCH_CHECK_VALUE(b >= 1 && b <= kCheckMaxBin, "pspnet_fast.", op, ": bins must be positive ints of at most ",
                      kCheckMaxBin, ", got ", bins);
    s += b * b;  // <= 16 * 2^24: no overflow
  }
  TORCH_CHECK_VALUE(s <= kCheckMaxTotalBins, "pspnet_fast.", op, ": the sum of b*b over bins must be at most ",
                    kCheckMaxTotalBins, ", got ", s, " for bins ", bins);
  return s;
}

inline void check_map(const char* op, const Tensor& t, const char* name, const char* channels) {
  TORCH_CHECK_VALUE(t.dim() == 4, "pspnet_fast.", op, ": ", name, " must be of shape (N, ", channels,
                    ", H, W), got ", t.dim(), " dims ", t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, "pspnet_fast.",
                   op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", dtype_name(st));
  TORCH_CHECK_VALUE(t.size(1) >= 1 && t.size(2) >= 1 && t.size(3) >= 1, "pspnet_fast.", op, ": ", name, " must have ",
                    channels, ", H, W >= 1, got shape ", t.sizes());
}

inline void check_device(const char* op, const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "pspnet_fast.", op, ": ", name, " must be on ", ref_name,
                    "'s device ", ref.device(), ", got ", t.device());
}

inline void check_affine(const char* op, const c10::optional<Tensor>& scale, const c10::optional<Tensor>& shift,
                         at::IntArrayRef shape, at::ScalarType dtype, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(scale.has_value() == shift.has_value(), "pspnet_fast.", op,
                    ": scale and shift come together (both or neither)");
  if (!scale.has_value()) return;
  std::string want = "(";
  for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
  want += shape.size() == 1 ? ",)" : ")";
  const char* names[2] = {"scale", "shift"};
  const Tensor* ts[2] = {&*scale, &*shift};
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK_VALUE(ts[i]->sizes() == shape, "pspnet_fast.", op, ": ", names[i], " must be of shape ", want,
                      ", got ", ts[i]->sizes());
    TORCH_CHECK_TYPE(ts[i]->scalar_type() == dtype, "pspnet_fast.", op, ": ", names[i], " must be ",
                     dtype_name(dtype), ", got ", dtype_name(ts[i]->scalar_type()));
    check_device(op, *ts[i], names[i], ref, ref_name);
  }
}

inline void check_reduce_weight(const char* op, const Tensor& weight, int64_t levels, int64_t c,
                                at::ScalarType dtype, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(weight.dim() == 3 && weight.size(0) == levels && weight.size(2) == c, "pspnet_fast.", op,
                    ": weight must be of shape (L, R, C) = (", levels, ", R, ", c, "), got ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == dtype, "pspnet_fast.", op, ": weight must be ", dtype_name(dtype),
                   ", got ", dtype_name(weight.scalar_type()));
  check_device(op, weight, "weight", ref, ref_name);
}

inline void check_levels(const char* op, const Tensor& x, const Tensor& levels, int64_t s) {
  TORCH_CHECK_VALUE(levels.dim() == 3 && levels.size(0) == x.size(0) && levels.size(2) == s, "pspnet_fast.", op,
                    ": levels must be of shape (N, R, S) = (", x.size(0), ", R, ", s, "), got ", levels.sizes());
  TORCH_CHECK_TYPE(is_acc_dtype(levels.scalar_type()), "pspnet_fast.", op,
                   ": levels must be float32 or float64, got ", dtype_name(levels.scalar_type()));
  check_device(op, levels, "levels", x, "x");
}

// ---------------------------------------------------------------------------------------------------------------
// The ops (schemas in csrc/ops.cpp).
// ---------------------------------------------------------------------------------------------------------------
inline void pyramid_pool(const Tensor& x, at::IntArrayRef bins) {
  const char* op = "pyramid_pool";
  check_bins(op, bins);
  check_map(op, x, "x", "C");
}

inline void ppm_reduce(const Tensor& pooled, const Tensor& weight, const c10::optional<Tensor>& scale,
                       const c10::optional<Tensor>& shift, at::IntArrayRef bins) {
  const char* op = "ppm_reduce";
  const int64_t s = check_bins(op, bins);
  TORCH_CHECK_VALUE(pooled.dim() == 3 && pooled.size(2) == s, "pspnet_fast.", op, ": pooled must be of shape (N, C, ",
                    s, ") for bins ", bins, ", got ", pooled.sizes());
  TORCH_CHECK_TYPE(is_acc_dtype(pooled.scalar_type()), "pspnet_fast.", op,
                   ": pooled must be float32 or float64, got ", dtype_name(pooled.scalar_type()));
  const int64_t L = static_cast<int64_t>(bins.size());
  check_reduce_weight(op, weight, L, pooled.size(1), pooled.scalar_type(), pooled, "pooled");
  check_affine(op, scale, shift, {L, weight.size(1)}, pooled.scalar_type(), pooled, "pooled");
}

inline void upsample_concat(const Tensor& x, const Tensor& levels, at::IntArrayRef bins) {
  const char* op = "upsample_concat";
  const int64_t s = check_bins(op, bins);
  check_map(op, x, "x", "C");
  check_levels(op, x, levels, s);
}

inline void ppm_forward(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& scale,
                        const c10::optional<Tensor>& shift, at::IntArrayRef bins) {
  const char* op = "ppm_forward";
  check_bins(op, bins);
  check_map(op, x, "x", "C");
  const auto acc = acc_dtype(x.scalar_type());
  const int64_t L = static_cast<int64_t>(bins.size());
  check_reduce_weight(op, weight, L, x.size(1), acc, x, "x");
  check_affine(op, scale, shift, {L, weight.size(1)}, acc, x, "x");
}

inline void upsample_concat_backward(const Tensor& grad_out, int64_t in_channels, at::IntArrayRef bins) {
  const char* op = "upsample_concat_backward";
  check_bins(op, bins);
  check_map(op, grad_out, "grad_out", "C + L*R");
  const int64_t co = grad_out.size(1), L = static_cast<int64_t>(bins.size());
  TORCH_CHECK_VALUE(in_channels >= 0 && in_channels < co && (co - in_channels) % L == 0, "pspnet_fast.", op,
                    ": grad_out has ", co, " channels, not in_channels = ", in_channels,
                    " plus a positive multiple of the ", L, " levels of bins ", bins);
}

inline void pyramid_pool_backward(const Tensor& grad_pooled, const Tensor& grad_out, at::IntArrayRef bins,
                                  int64_t x_offset) {
  const char* op = "pyramid_pool_backward";
  const int64_t s = check_bins(op, bins);
  check_map(op, grad_out, "grad_out", "C'");
  const int64_t n = grad_out.size(0), co = grad_out.size(1);
  TORCH_CHECK_VALUE(grad_pooled.dim() == 3 && grad_pooled.size(0) == n && grad_pooled.size(2) == s &&
                        grad_pooled.size(1) <= co,
                    "pspnet_fast.", op, ": grad_pooled must be of shape (N, C, S) = (", n, ", C <= ", co, ", ", s,
                    "), got ", grad_pooled.sizes());
  TORCH_CHECK_TYPE(is_acc_dtype(grad_pooled.scalar_type()), "pspnet_fast.", op,
                   ": grad_pooled must be float32 or float64, got ", dtype_name(grad_pooled.scalar_type()));
  check_device(op, grad_pooled, "grad_pooled", grad_out, "grad_out");
  const int64_t room = co - grad_pooled.size(1);  // >= 0: compared without forming x_offset + C
  TORCH_CHECK_VALUE(x_offset >= 0 && x_offset <= room, "pspnet_fast.", op, ": x_offset must be in [0, ", room,
                    "] (grad_out's ", co, " channels minus grad_pooled's ", grad_pooled.size(1), "), got ", x_offset);
}

inline void head_epilogue(const Tensor& z, const Tensor& q, at::IntArrayRef bins, const c10::optional<Tensor>& scale,
                          const c10::optional<Tensor>& shift) {
  const char* op = "head_epilogue";
  const int64_t s = check_bins(op, bins);
  check_map(op, z, "z", "O");
  const int64_t n = z.size(0), o = z.size(1);
  TORCH_CHECK_VALUE(q.dim() == 4 && q.size(0) == n && q.size(1) == o && q.size(2) == 9 && q.size(3) == s,
                    "pspnet_fast.", op, ": q must be of shape (N, O, 9, S) = (", n, ", ", o, ", 9, ", s, "), got ",
                    q.sizes());
  const auto acc = acc_dtype(z.scalar_type());
  TORCH_CHECK_TYPE(q.scalar_type() == acc, "pspnet_fast.", op, ": q must be ", dtype_name(acc), " for ",
                   dtype_name(z.scalar_type()), " z, got ", dtype_name(q.scalar_type()));
  check_device(op, q, "q", z, "z");
  check_affine(op, scale, shift, {o}, acc, z, "z");
}

inline void head_context_backward(const Tensor& grad, at::IntArrayRef bins) {
  const char* op = "head_context_backward";
  check_bins(op, bins);
  check_map(op, grad, "grad", "O");
}

}  // namespace checks
}  // namespace pspnet_fast
