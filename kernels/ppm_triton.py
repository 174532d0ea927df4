"""Triton backend of the fused Pyramid Pooling Module.

Six ops with exactly the semantics of the C++ ops of the same base name (csrc/ops.cpp), registered with
``torch.library.triton_op`` so that torch.compile / Inductor see the kernels (``wrap_triton``):

    pspnet_fast::triton_pyramid_pool(x (N, C, H, W), bins)                         -> pooled (N, C, S)
    pspnet_fast::triton_ppm_reduce(pooled (N, C, S), weight (L, R, C), scale?, shift?, bins, relu)
                                                                                   -> levels (N, R, S)
    pspnet_fast::triton_upsample_concat(x (N, C, H, W), levels (N, R, S), bins, align_corners, x_last=False)
                                                                                   -> out (N, C + L*R, H, W)
                                                         ([x, levels...]; x_last: [levels..., x])
    pspnet_fast::triton_upsample_concat_backward(grad_out (N, C + L*R, H, W), C, bins, align_corners)
                                                                                   -> grad_levels (N, R, S)
    pspnet_fast::triton_pyramid_pool_backward(grad_pooled (N, C, S), grad_out (N, C' >= C, H, W), bins)
                                                                                   -> grad_x (N, C, H, W)
    pspnet_fast::triton_ppm_forward(x, weight (L, R, C), scale?, shift?, bins, relu, align_corners, x_last=False)
                                                                                   -> out (N, C + L*R, H, W)
                           (the eval forward, x read once: the pooling pass also writes x into its channels of out,
                            then ppm_reduce, then a pass writing only the level channels; the composition's values)

The backward ops are deterministic: every output element is reduced by the one program that owns it, in a fixed
order, without atomics.

S = sum_l b_l^2; level l's bin (i, j) sits at column off_l + i*b_l + j (off_l = sum_{k<l} b_k^2).

The kernels live by stage: triton_common (shared @triton.jit and host helpers, bins as constexprs), triton_pool,
triton_reduce, triton_upsample, triton_backward; each registers its op on import. This module imports them all (so
`from pspnet_fast.kernels import ppm_triton` registers the six ops), re-exports their names, registers
triton_ppm_forward and holds the public functions.
"""

from typing import List, Optional, Sequence

import torch

from pspnet_fast import _checks  # the ops' argument checks, shared with the C++ kernels and the fake kernels

# Re-exported under their old names: the stage modules' kernels, launchers and ops (tests and tools reach them here).
# Not wrap_triton: each stage module calls its own, so replacing ppm_triton.wrap_triton would change nothing.
from .triton_backward import (  # noqa: F401
    _pool_bwd_level_load, _pool_bwd_level_row, _pyramid_pool_backward_kernel, _triton_pyramid_pool_backward,
    _triton_upsample_concat_backward, _upsample_concat_backward_kernel)
from .triton_common import (  # noqa: F401
    _LEVEL_DTYPES, _POOL_DTYPES, MAX_LEVELS, _bins_meta, _check_bins, _div, _level_by_id, _linear_tap, _next_pow2,
    _pool_blocks, _register, _suggest_memory_format)
from .triton_pool import (  # noqa: F401
    _POOL_MAX_BLOCK_W, _aligned16, _launch_pool, _launch_wide_pool, _next_bound, _pool_level_store, _pool_level_tile,
    _pool_plan, _pool_rows, _pyramid_pool_kernel, _pyramid_pool_wide_kernel, _realign, _seg_level,
    _triton_pyramid_pool)
from .triton_reduce import _check_reduce, _launch_reduce, _ppm_reduce_kernel, _triton_ppm_reduce  # noqa: F401
from .triton_upsample import _launch_upsample, _triton_upsample_concat, _upsample_concat_kernel  # noqa: F401

__all__ = [
    "MAX_LEVELS",
    "pyramid_pool",
    "pyramid_pool_backward",
    "ppm_forward",
    "ppm_reduce",
    "upsample_concat",
    "upsample_concat_backward",
]


# ----------------------------------------------------------------------------------------------------------------
# ppm_forward: the eval forward, x read once
# ----------------------------------------------------------------------------------------------------------------


@_register("pspnet_fast::triton_ppm_forward")
def _triton_ppm_forward(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor],
                        shift: Optional[torch.Tensor], bins: List[int], relu: bool, align_corners: bool,
                        x_last: bool = False) -> torch.Tensor:
    _checks.check_ppm_forward(x, weight, scale, shift, bins, relu, align_corners, x_last)
    bins = _check_bins(bins, "ppm_forward")
    if x.dim() != 4:
        raise ValueError(f"ppm_forward: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _POOL_DTYPES:
        raise TypeError(f"ppm_forward: unsupported x dtype {x.dtype}")
    N, C, H, W = x.shape
    if H == 0 or W == 0:
        raise ValueError(f"ppm_forward: H and W must be non-zero, got {tuple(x.shape)}")
    L = len(bins)
    S = sum(b * b for b in bins)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    pooled = torch.empty((N, C, S), dtype=acc, device=x.device)
    _check_reduce(pooled, weight, scale, shift, bins, "ppm_forward")
    R = weight.shape[1]
    out = torch.empty((N, C + L * R, H, W), dtype=x.dtype, device=x.device,
                      memory_format=_suggest_memory_format(x))
    if out.numel() == 0:
        return out
    plan = _pool_plan(x, bins)
    if plan is None or L == 0:
        # Rows wider than one tile (or no levels): the composition, x read twice; the same values.
        if pooled.numel() > 0:
            _launch_wide_pool(x, bins, pooled)
        levels = _launch_reduce(pooled, weight, scale, shift, bins, relu)
        _launch_upsample(x, levels, bins, align_corners, x_last, out, copy_x=True)
        return out
    # x read once: the pooling pass also writes x into its channels of out; then only the level channels.
    _launch_pool(x, bins, plan, pooled if pooled.numel() > 0 else None, out, L * R if x_last else 0)
    levels = _launch_reduce(pooled, weight, scale, shift, bins, relu)
    _launch_upsample(x, levels, bins, align_corners, x_last, out, copy_x=False)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def pyramid_pool(x: torch.Tensor, bins: Sequence[int]) -> torch.Tensor:
    """Adaptive average pooling of x to every b x b grid in one pass over x.

    x: (N, C, H, W) float32/float64/float16/bfloat16, any strides (contiguous and channels_last are coalesced),
    on a device Triton runs on (CUDA; CPU under TRITON_INTERPRET=1). Returns (N, C, S) contiguous float32
    (float64 for float64 x), S = sum b^2, level l's bin (i, j) at column off_l + i*b_l + j.
    """
    return torch.ops.pspnet_fast.triton_pyramid_pool(x, list(bins))


def ppm_reduce(pooled: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor],
               shift: Optional[torch.Tensor], bins: Sequence[int], relu: bool) -> torch.Tensor:
    """Per-level 1x1 convolution of the pooled maps, optional affine (folded BatchNorm) and ReLU.

    pooled: (N, C, S) float32/float64; weight: (L, R, C) same dtype; scale, shift: (L, R) same dtype or both None.
    Returns (N, R, S) in pooled's dtype: v = sum_c weight[l, r, c] * pooled[n, c, off_l + k] (k < b_l^2),
    v = v * scale[l, r] + shift[l, r], then where(v < 0, 0, v) if relu (NaN passes through).
    """
    return torch.ops.pspnet_fast.triton_ppm_reduce(pooled, weight, scale, shift, list(bins), bool(relu))


def upsample_concat(x: torch.Tensor, levels: torch.Tensor, bins: Sequence[int], align_corners: bool,
                    x_last: bool = False) -> torch.Tensor:
    """cat([x] + [bilinear upsampling of each level to (H, W)], dim=1) in one pass; x_last: cat([levels..., x]).

    x: (N, C, H, W) float32/float64/float16/bfloat16, any strides; levels: (N, R, S) float32/float64 (the
    interpolation is computed in levels' dtype). Returns (N, C + L*R, H, W) in x's dtype and x's memory format
    (channels_last stays channels_last).
    """
    return torch.ops.pspnet_fast.triton_upsample_concat(x, levels, list(bins), bool(align_corners), bool(x_last))


def upsample_concat_backward(grad_out: torch.Tensor, in_channels: int, bins: Sequence[int],
                             align_corners: bool) -> torch.Tensor:
    """The adjoint of upsample_concat's level part: grad_levels[n, r, off_l + i*b + j] =
    sum_{h, w} A_h[h, i] * A_w[w, j] * grad_out[n, in_channels + l*R + r, h, w], with the forward's bilinear taps.

    grad_out: (N, in_channels + L*R, H, W) float32/float64/float16/bfloat16, any strides. Returns (N, R, S)
    contiguous float32 (float64 for float64 grad_out), accumulated in that type. Deterministic: each output bin is
    reduced by one program in a fixed order (no atomics).
    """
    return torch.ops.pspnet_fast.triton_upsample_concat_backward(grad_out, int(in_channels), list(bins),
                                                                 bool(align_corners))


def pyramid_pool_backward(grad_pooled: torch.Tensor, grad_out: torch.Tensor, bins: Sequence[int]) -> torch.Tensor:
    """grad_x = grad_out[:, :C] + the adjoint of pyramid_pool applied to grad_pooled.

    grad_pooled: (N, C, S) float32/float64; grad_out: (N, C', H, W) with C' >= C, any of the four dtypes and any
    strides. grad_x[n, c, h, w] = grad_out[n, c, h, w] + sum over levels and the bins (i, j) containing (h, w) of
    grad_pooled[n, c, off_l + i*b + j] / kh_i / kw_j, accumulated in float32 (float64 when either input is float64).
    Returns (N, C, H, W) in grad_out's dtype and memory format. A gather: one program per output element.
    """
    return torch.ops.pspnet_fast.triton_pyramid_pool_backward(grad_pooled, grad_out, list(bins))


def ppm_forward(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                bins: Sequence[int], relu: bool, align_corners: bool, x_last: bool = False) -> torch.Tensor:
    """The eval forward upsample_concat(x, ppm_reduce(pyramid_pool(x)), ...) with x read once (csrc/ops.cpp's
    ppm_forward contract): the pooling pass also copies x into its channels of the output, a second pass writes only
    the level channels. x: (N, C, H, W) float32/float64/float16/bfloat16, any strides, H, W >= 1; weight (L, R, C),
    scale, shift (L, R) or None, in float32 (float64 for float64 x). Returns (N, C + L*R, H, W) in x's dtype and
    memory format: [x, levels...], or [levels..., x] with x_last; the same values as the composition of the three
    ops. Rows wider than 505 elements (BLOCK_W > 512) take the composition (x read twice)."""
    return torch.ops.pspnet_fast.triton_ppm_forward(x, weight, scale, shift, list(bins), bool(relu),
                                                    bool(align_corners), bool(x_last))
