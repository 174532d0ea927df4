"""Shapes of the ops' outputs and the fake (meta) kernels, so torch.compile and torch.export trace every op. Each
fake kernel runs its op's argument checker first (pspnet_fast._checks: the rules and messages of the C++ kernels), so
meta tensors and traced graphs raise what the real kernels raise."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _checks


def _offsets(bins: Sequence[int]) -> list[int]:
    offs, o = [], 0
    for b in bins:
        offs.append(o)
        o += b * b
    return offs


def total_bins(bins: Sequence[int]) -> int:
    return sum(b * b for b in bins)


def _pooled_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _out_memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format



def _fake_pyramid_pool(x, bins):
    _checks.check_pyramid_pool(x, bins)
    return x.new_empty((x.shape[0], x.shape[1], total_bins(bins)), dtype=_pooled_dtype(x.dtype))


def _fake_ppm_reduce(pooled, weight, scale, shift, bins, relu):
    _checks.check_ppm_reduce(pooled, weight, scale, shift, bins, relu)
    return pooled.new_empty((pooled.shape[0], weight.shape[1], pooled.shape[2]))


def _fake_upsample_concat(x, levels, bins, align_corners, x_last=False):
    _checks.check_upsample_concat(x, levels, bins, align_corners, x_last)
    n, c, h, w = x.shape
    return x.new_empty((n, c + len(bins) * levels.shape[1], h, w)).contiguous(memory_format=_out_memory_format(x))


def _fake_upsample_concat_backward(grad_out, in_channels, bins, align_corners, x_last=False):
    _checks.check_upsample_concat_backward(grad_out, in_channels, bins, align_corners, x_last)
    n, co = grad_out.shape[:2]
    return grad_out.new_empty((n, (co - in_channels) // len(bins), total_bins(bins)),
                              dtype=_pooled_dtype(grad_out.dtype))


def _fake_pyramid_pool_backward(grad_pooled, grad_out, bins, x_offset=0):
    _checks.check_pyramid_pool_backward(grad_pooled, grad_out, bins, x_offset)
    n, c = grad_pooled.shape[:2]
    h, w = grad_out.shape[2:]
    return grad_out.new_empty((n, c, h, w)).contiguous(memory_format=_out_memory_format(grad_out))


def _fake_ppm_forward(x, weight, scale, shift, bins, relu, align_corners, x_last=False):
    _checks.check_ppm_forward(x, weight, scale, shift, bins, relu, align_corners, x_last)
    n, c, h, w = x.shape
    return x.new_empty((n, c + len(bins) * weight.shape[1], h, w)).contiguous(memory_format=_out_memory_format(x))



def _fake_head_epilogue(z, q, bins, align_corners, scale, shift, relu):
    _checks.check_head_epilogue(z, q, bins, align_corners, scale, shift, relu)
    return z.new_empty(z.shape).contiguous(memory_format=_out_memory_format(z))


def _fake_head_context_backward(grad, bins, align_corners):
    _checks.check_head_context_backward(grad, bins, align_corners)
    return grad.new_empty((grad.shape[0], grad.shape[1], 9, total_bins(bins)), dtype=_pooled_dtype(grad.dtype))

