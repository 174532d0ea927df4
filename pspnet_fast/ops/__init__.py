"""The op layer: the fused ops' functional API, backend choice (with the reasons a backend cannot run), fake
kernels, autograd formulas and loading of the compiled extension. Depends on nothing in pspnet_fast but itself.

The ops (schemas in csrc/ops.cpp; S = sum of b*b over bins, level l at columns [off_l, off_l + b_l^2)):

    pyramid_pool(x (N, C, H, W), bins)                              -> (N, C, S) float32 (float64 for float64 x)
    ppm_reduce(pooled (N, C, S), weight (L, R, C), scale, shift, bins, relu) -> (N, R, S), pooled's dtype
    upsample_concat(x, levels (N, R, S), bins, align_corners)       -> (N, C + L*R, H, W), x's dtype and layout
    ppm_forward(x, weight, scale, shift, bins, relu, align_corners)  -> the three above composed, x read once

their adjoints (upsample_concat_backward, pyramid_pool_backward), and the fused head's two ops (head_epilogue,
head_context_backward; see pspnet_fast/nn/head.py). Modules:

    _ext.py        loads pspnet_fast._C once (without it every module falls back to the reference)
    backends.py    the backend registry: why_not, choose_backend, available_backends, OpSet, op_set
    fake.py        output shapes and the fake (meta) kernels
    autograd.py    autograd formulas, registered once per backend (ensure_registered)
    order.py       x first or x last ([levels..., x], segmentation_models_pytorch's order)
    functional.py  calls that pick a backend's native op where it has one (ppm_forward)
    decompositions.py  the ops in plain torch with shape-derived indices: what torch.onnx exports (exact, any size)
"""
from . import _ext, decompositions
from .autograd import ensure_registered
from .backends import (BACKENDS, OpSet, available_backends, check_backend_name, choose_backend, op_set, why_not)
from .fake import total_bins
from .functional import ppm_forward

__all__ = ["BACKENDS", "OpSet", "available_backends", "check_backend_name", "choose_backend", "ensure_registered",
           "op_set", "ppm_forward", "total_bins", "why_not"]

if _ext.load():
    ensure_registered("cpu")
