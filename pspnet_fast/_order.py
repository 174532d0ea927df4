"""Concatenation order of the fused PPM's output: x first (the authors', mmsegmentation) or x last
(segmentation_models_pytorch: [levels..., x]).

upsample_concat and its adjoints write x first. A backend whose ops take `x_last` (the dispatcher ops on CPU tensors,
see csrc/ops.cpp) writes the x-last layout in the same single pass; any other backend (CUDA, Triton) writes x first and
the channels are rotated afterwards: exact, one extra copy of the output (and of grad_out in backward).
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _schema_has_x_last() -> bool:
    try:
        args = torch.ops.pspnet_fast.upsample_concat.default._schema.arguments
    except Exception:
        return False
    return any(a.name == "x_last" for a in args)


def native_x_last(kernels, x: torch.Tensor) -> bool:
    """Whether `kernels` write the x-last layout themselves for x (the CPU kernels of the compiled extension)."""
    return (x.device.type == "cpu" and _schema_has_x_last()
            and kernels.upsample_concat is torch.ops.pspnet_fast.upsample_concat)


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


def to_x_first(kernels, grad_out, in_channels, x_last=False):
    """grad_out in the layout the backend's adjoint ops read: unchanged when x first or when they take x_last."""
    if not x_last or native_x_last(kernels, grad_out):
        return grad_out
    return _rotate(grad_out, grad_out.shape[1] - in_channels)


def upsample_concat_backward(kernels, grad_out, in_channels, bins, align_corners, x_last=False):
    if x_last and native_x_last(kernels, grad_out):
        return kernels.upsample_concat_backward(grad_out, in_channels, bins, align_corners, x_last=True)
    return kernels.upsample_concat_backward(to_x_first(kernels, grad_out, in_channels, x_last), in_channels, bins,
                                            align_corners)


def pyramid_pool_backward(kernels, grad_pooled, grad_out, bins, x_last=False):
    """grad_x = grad_out's x channels + pool^T(grad_pooled)."""
    if x_last and native_x_last(kernels, grad_out):
        c = grad_pooled.shape[1]
        return kernels.pyramid_pool_backward(grad_pooled, grad_out, bins, x_offset=grad_out.shape[1] - c)
    return kernels.pyramid_pool_backward(grad_pooled, to_x_first(kernels, grad_out, grad_pooled.shape[1], x_last),
                                         bins)
