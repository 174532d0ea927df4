// Host entry points shared between the PPM sources of csrc/cuda (each file registers its own ops; ppm_forward in
// ppm_pool.cu composes the others' launchers). Plain C++: the .cpp files of the CUDA build include it too.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "cuda_host.h"

namespace pspnet_fast {

// The op ppm_reduce (ppm_reduce.cpp): levels (N, R, S) = act(scale * (weight_l @ pooled_l) + shift) per level.
at::Tensor ppm_reduce_cuda(const at::Tensor& pooled, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                           const std::optional<at::Tensor>& shift, at::IntArrayRef bins, bool relu);

// ppm_reduce's epilogue (ppm_reduce_epilogue.cu), in place on out (N, R, S) contiguous: out = out * scale[l, r] +
// shift[l, r] (when scale is defined; scale, shift (L, R) contiguous, out's dtype), then ReLU (NaN kept) when relu.
void reduce_epilogue_cuda(at::Tensor& out, const at::Tensor& scale, const at::Tensor& shift, const LevelTable& lv,
                          bool relu);

// The level channels of upsample_concat (ppm_upsample.cu) written into out (N, C + L*R, H, W), which the caller
// allocated in the layout upsample_concat would (NCHW contiguous or channels_last); the x channels are left alone.
void upsample_levels_into(const at::Tensor& levels, at::Tensor& out, int64_t C, at::IntArrayRef bins,
                          bool align_corners, bool x_last);

}  // namespace pspnet_fast
