"""Concatenation order of the fused PPM's output: x first (the authors', mmsegmentation) or x last
(segmentation_models_pytorch: [levels..., x]).

Forward: every backend's upsample_concat writes the x-last layout itself (`x_last=True`: CPU, CUDA and Triton
kernels); a backend whose op lacks the argument gets the x-first output rotated (exact, one extra copy). Backward
needs no kernel support: upsample_concat_backward reads the levels-only view grad_out[:, :L*R] with in_channels=0 and
pyramid_pool_backward the x view grad_out[:, L*R:] (CUDA, Triton); the CPU kernels take x_last / x_offset instead,
as they would copy non-contiguous views.
"""
from __future__ import annotations

import torch


def _has_x_last(op) -> bool:
    try:
        return any(a.name == "x_last" for a in op.default._schema.arguments)
    except Exception:
        return False


def native_x_last(kernels, x: torch.Tensor) -> bool:
    """Whether kernels.upsample_concat writes the x-last layout itself (its schema has x_last)."""
    return _has_x_last(kernels.upsample_concat)


def _cpu_ops(kernels, t: torch.Tensor) -> bool:
    """The dispatcher ops on CPU tensors: their adjoints take x_last / x_offset."""
    return t.device.type == "cpu" and kernels.upsample_concat_backward is torch.ops.pspnet_fast.upsample_concat_backward


def _rotate(t: torch.Tensor, k: int) -> torch.Tensor:
    """Channels [k:] then [:k], keeping channels_last inputs channels_last."""
    fmt = torch.channels_last if (t.dim() == 4 and not t.is_contiguous()
                                  and t.is_contiguous(memory_format=torch.channels_last)) else torch.contiguous_format
    return torch.cat([t[:, k:], t[:, :k]], 1).contiguous(memory_format=fmt)


def upsample_concat(kernels, x, levels, bins, align_corners, x_last=False):
    """(N, C + L*R, H, W): [x, levels...] or, with x_last, [levels..., x]."""
    if not x_last:
        return kernels.upsample_concat(x, levels, bins, align_corners)
    if native_x_last(kernels, x):
        return kernels.upsample_concat(x, levels, bins, align_corners, x_last=True)
    return _rotate(kernels.upsample_concat(x, levels, bins, align_corners), x.shape[1])


def upsample_concat_backward(kernels, grad_out, in_channels, bins, align_corners, x_last=False):
    """grad_levels (N, R, S) from grad_out in either layout."""
    if not x_last:
        return kernels.upsample_concat_backward(grad_out, in_channels, bins, align_corners)
    if _cpu_ops(kernels, grad_out):
        return kernels.upsample_concat_backward(grad_out, in_channels, bins, align_corners, x_last=True)
    return kernels.upsample_concat_backward(grad_out[:, :grad_out.shape[1] - in_channels], 0, bins, align_corners)


def pyramid_pool_backward(kernels, grad_pooled, grad_out, bins, x_last=False):
    """grad_x = grad_out's x channels + pool^T(grad_pooled), from grad_out in either layout."""
    if not x_last:
        return kernels.pyramid_pool_backward(grad_pooled, grad_out, bins)
    lr = grad_out.shape[1] - grad_pooled.shape[1]
    if _cpu_ops(kernels, grad_out):
        return kernels.pyramid_pool_backward(grad_pooled, grad_out, bins, x_offset=lr)
    return kernels.pyramid_pool_backward(grad_pooled, grad_out[:, lr:], bins)
