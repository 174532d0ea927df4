"""The functional API over a backend's op set: calls that pick the native op where the backend has it."""
from __future__ import annotations

from . import order
from .backends import OpSet


def ppm_forward(kernels: OpSet, x, weight, scale, shift, bins, relu, align_corners, x_last=False):
    """The eval forward (N, C + L*R, H, W): kernels.ppm_forward (x read once) where the backend has it, else the
    composition pyramid_pool -> ppm_reduce -> upsample_concat (x read twice; the same values)."""
    if kernels.ppm_forward is not None:
        return kernels.ppm_forward(x, weight, scale, shift, bins, relu, align_corners, x_last)
    pooled = kernels.pyramid_pool(x, bins)
    levels = kernels.ppm_reduce(pooled, weight, scale, shift, bins, relu)
    return order.upsample_concat(kernels, x, levels, bins, align_corners, x_last)

