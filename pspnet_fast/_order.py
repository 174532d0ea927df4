"""Concatenation order of the fused PPM's output: x first (the authors', mmsegmentation) or x last
(segmentation_models_pytorch: [levels..., x]).

Forward: the CPU kernels (csrc/cpu) and the Triton kernel write the x-last layout themselves
(`upsample_concat(..., x_last=True)`); the CUDA kernels write x first and the channels are rotated afterwards: exact,
one extra copy of the output. Backward needs no kernel support: upsample_concat_backward reads the levels-only view
grad_out[:, :L*R] with in_channels=0 and pyramid_pool_backward reads the x view grad_out[:, L*R:] (the CPU kernels
take x_last / x_offset instead, as they copy non-contiguous views).
"""
from __future__ import annotations

import torch


def _has_x_last(op) -> bool:
    try:
        return any(a.name == "x_last" for a in op.default._schema.arguments)
    except Exception:
        return False


def native_x_last(kernels, x: torch.Tensor) -> bool:
    """Whether kernels.upsample_concat writes the x-last layout for x itself (CPU kernels, Triton), not CUDA."""
    if not _has_x_last(kernels.upsample_concat):
        return False
    return x.device.type == "cpu" or kernels.upsample_concat is not torch.ops.pspnet_fast.upsample_concat


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
