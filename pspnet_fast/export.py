"""Deployment: exact ONNX export at any size (dynamic N, H, W) and AOTInductor packages.

ONNX. PyTorch's own ONNX lowering of `adaptive_avg_pool2d` bakes the export size into gather indices, so a PPM
exported with dynamic H and W is silently wrong at other sizes (pytorch/pytorch#42653, #64806), and the fused ops
have no ONNX translation at all. Here every op an eval graph of pspnet_fast can hold (pyramid_pool, ppm_reduce,
upsample_concat with x first or last, ppm_forward, head_epilogue) has an export-time formulation in plain torch ops
whose every index and weight is computed from the input's shape inside the graph:

    adaptive pooling to b x b  = P_H (b, H) @ x @ P_W(b, W)^T,  P[i, h] = [start_i <= h < end_i] / (end_i - start_i),
                                 start_i = floor(i H / b), end_i = ceil((i + 1) H / b)  (ATen's bins, overlaps and
                                 H < b included; integer arithmetic on Shape)
    bilinear b -> H            = U_H (H, b) @ level @ U_W (W, b)^T, U[y, i0(y)] += l0(y), U[y, i1(y)] += l1(y) with
                                 ATen's source index, clamps and lambdas for both align_corners modes (float32)
    the fused head's context   = per level, two products with the tap-shifted U matrices (no 9x upsampled copy)

so the ONNX graph holds only MatMul, Range, Cast, Mul/Div/Sub/Add, Floor, Min/Max, Less/Equal/Where, Concat,
Reshape, Relu, Conv: standard ops of every opset the exporter writes (18 and its default).

How it reaches the graph, with nothing passed by the user:
- pspnet_fast's modules (PyramidPooling, PSPHead, the PPMs `pspnet_fast.patch()` installs) take the formulation
  while `torch.onnx.is_in_onnx_export()` (a one-line hook in their forward calls `ppm_forward` / `head_forward`
  here), whatever backend they would run (the reference fallback included);
- the dispatcher ops themselves (`torch.ops.pspnet_fast.*`, e.g. in an ExportedProgram made by torch.export and
  handed to torch.onnx.export, or called directly by a user's module) get the formulation as their decomposition in
  `torch._decomp.decomposition_table`, which torch.onnx's dynamo exporter applies to every op it has no ONNX
  function for (`register_onnx_decompositions`, run when this module is imported). Nothing else reads those entries
  (torch.compile and torch.export's default decompositions select their own ops).

AOTInductor: `export_aoti` = torch.export (dynamic H, W) + `torch._inductor.aoti_compile_and_package`; the package
calls the fused ops through the dispatcher, so the loading process must have them registered (`import pspnet_fast`).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F

from . import _ext, ops

__all__ = ["pyramid_pool", "ppm_reduce", "upsample_concat", "ppm_forward_op", "head_epilogue", "head_context",
           "KERNELS", "ppm_forward", "head_forward", "register_onnx_decompositions", "export_onnx", "export_aoti",
           "load_aoti", "ExportError", "MIN_OPSET"]

MIN_OPSET = 18  # torch.onnx's dynamo exporter writes opset 18 and later (its torchlib functions are opset 18)


class ExportError(RuntimeError):
    """An export that cannot give an exact graph: the message names the cause and the way out."""


# ----------------------------------------------------------------------------------------------------------------
# Index matrices built from the (symbolic) size inside the graph.
# ----------------------------------------------------------------------------------------------------------------
def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pool_matrix(size, b: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(b, size): row i averages input positions [floor(i*size/b), ceil((i+1)*size/b)) (ATen's adaptive pooling)."""
    i = torch.arange(b, device=device)
    start = torch.div(i * size, b, rounding_mode="floor")
    end = torch.div((i + 1) * size + (b - 1), b, rounding_mode="floor")
    pos = torch.arange(size, device=device).unsqueeze(0)  # (1, size)
    inside = (pos >= start.unsqueeze(1)) & (pos < end.unsqueeze(1))  # (b, size)
    return inside.to(dtype) / (end - start).unsqueeze(1).to(dtype)


def _upsample_matrix(size, b: int, align_corners: bool, dtype: torch.dtype, device) -> torch.Tensor:
    """(size, b): row y holds the bilinear weights of output row y over the b input rows, as ATen's
    upsample_bilinear2d computes them (scale and source index in the accumulation type, src clamped at 0 without
    align_corners, i0 = min(floor(src), b - 1), lambda clamped to [0, 1], i1 = i0 + (i0 < b - 1))."""
    y = torch.arange(size, device=device).to(dtype)
    if align_corners:
        # (b - 1) / (size - 1); 0 for size 1 (only y = 0 exists then, and any finite scale gives src = 0).
        denom = torch.clamp(torch.arange(size, device=device)[-1:], min=1).to(dtype)  # size - 1, at least 1
        src = y * ((b - 1) / denom)
    else:
        scale = b / (torch.arange(size, device=device)[-1:] + 1).to(dtype)  # b / size
        src = torch.clamp(scale * (y + 0.5) - 0.5, min=0.0)
    i0 = torch.clamp(torch.floor(src), max=b - 1)
    l1 = torch.clamp(src - i0, 0.0, 1.0)
    l0 = 1.0 - l1
    i1 = i0 + (i0 < b - 1).to(dtype)
    cols = torch.arange(b, device=device).to(dtype).unsqueeze(0)  # (1, b)
    return (cols == i0.unsqueeze(1)).to(dtype) * l0.unsqueeze(1) + (cols == i1.unsqueeze(1)).to(dtype) * l1.unsqueeze(1)


def _shifted(m: torch.Tensor) -> torch.Tensor:
    """(3, size, b) from (size, b): tap d reads row y + d - 1 (zero outside), the 3x3 conv's zero padding."""
    z = m.new_zeros((1, m.shape[1]))
    return torch.stack([torch.cat([z, m[:-1]], 0), m, torch.cat([m[1:], z], 0)])


def _offsets(bins):
    offs, o = [], 0
    for b in bins:
        offs.append(o)
        o += b * b
    return offs


# ----------------------------------------------------------------------------------------------------------------
# The ops, in export-friendly torch (same schemas and dtypes as csrc/ops.cpp).
# ----------------------------------------------------------------------------------------------------------------
def pyramid_pool(x: torch.Tensor, bins: Sequence[int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, S) in float32 (float64 for float64 x): one product over W for every level at once
    (x read once), then per level a (b, H) product."""
    bins = [int(b) for b in bins]
    acc = _acc(x.dtype)
    n, c, h, w = x.shape
    xa = x.to(acc)
    pw = torch.cat([_pool_matrix(w, b, acc, x.device) for b in bins], 0)  # (sum b, W)
    t = torch.matmul(xa, pw.t())  # (N, C, H, sum b)
    parts, o = [], 0
    for b in bins:
        ph = _pool_matrix(h, b, acc, x.device)  # (b, H)
        parts.append(torch.matmul(ph, t[..., o:o + b]).reshape(n, c, b * b))  # (N, C, b, b) row-major
        o += b
    return torch.cat(parts, 2)


def ppm_reduce(pooled, weight, scale, shift, bins, relu):
    """pooled (N, C, S), weight (L, R, C) -> (N, R, S): per level W_l @ P_l, then * scale + shift, ReLU."""
    bins = [int(b) for b in bins]
    parts = []
    for l, (b, off) in enumerate(zip(bins, _offsets(bins))):
        y = torch.matmul(weight[l].to(pooled.dtype), pooled[:, :, off:off + b * b])  # (N, R, b*b)
        if scale is not None:
            y = y * scale[l].to(pooled.dtype).view(1, -1, 1) + shift[l].to(pooled.dtype).view(1, -1, 1)
        parts.append(y)
    out = torch.cat(parts, 2)
    return torch.relu(out) if relu else out


def _upsample_levels(levels, bins, size, align_corners):
    """levels (N, R, S) -> [(N, R, H, W) per level] in levels' dtype."""
    h, w = size
    n, r = levels.shape[:2]
    out = []
    for b, off in zip(bins, _offsets(bins)):
        lv = levels[:, :, off:off + b * b].reshape(n, r, b, b)
        uh = _upsample_matrix(h, b, align_corners, levels.dtype, levels.device)  # (H, b)
        uw = _upsample_matrix(w, b, align_corners, levels.dtype, levels.device)  # (W, b)
        out.append(torch.matmul(uh, torch.matmul(lv, uw.t())))  # (N, R, H, W)
    return out


def upsample_concat(x, levels, bins, align_corners, x_last=False):
    """(N, C + L*R, H, W) in x's dtype: [x, up(levels)...], or [up(levels)..., x] with x_last."""
    bins = [int(b) for b in bins]
    ups = [u.to(x.dtype) for u in _upsample_levels(levels, bins, x.shape[-2:], align_corners)]
    return torch.cat(ups + [x] if x_last else [x] + ups, 1)


def ppm_forward_op(x, weight, scale, shift, bins, relu, align_corners, x_last=False):
    """The ppm_forward op: upsample_concat(x, ppm_reduce(pyramid_pool(x))) (the same values)."""
    levels = ppm_reduce(pyramid_pool(x, bins), weight, scale, shift, bins, relu)
    return upsample_concat(x, levels, bins, align_corners, x_last)


def head_context(q: torch.Tensor, bins, size, align_corners: bool) -> torch.Tensor:
    """context(q) (N, O, H, W) from q (N, O, 9, S) (pspnet_fast.reference.head_context): per level, with A_dy =
    U_H shifted by dy - 1 and B_dx = U_W shifted by dx - 1 (zero rows outside the image),
    sum_t A_dy q_t B_dx^T = [A_0 A_1 A_2] @ (q arranged (3 b, 3 b)) @ [B_0 B_1 B_2]^T: two products per level."""
    bins = [int(b) for b in bins]
    h, w = size
    n, o = q.shape[:2]
    rows, mats = [], []
    for b, off in zip(bins, _offsets(bins)):
        ql = q[:, :, :, off:off + b * b].reshape(n, o, 3, 3, b, b)  # (N, O, dy, dx, i, j)
        ql = ql.permute(0, 1, 2, 4, 3, 5).reshape(n, o, 3 * b, 3 * b)  # rows (dy, i), columns (dx, j)
        bw = _shifted(_upsample_matrix(w, b, align_corners, q.dtype, q.device))  # (3, W, b)
        bw = bw.permute(1, 0, 2).reshape(-1, 3 * b)  # (W, 3 b): columns (dx, j)
        rows.append(torch.matmul(ql, bw.t()))  # (N, O, 3 b, W)
        ah = _shifted(_upsample_matrix(h, b, align_corners, q.dtype, q.device))  # (3, H, b)
        mats.append(ah.permute(1, 0, 2).reshape(-1, 3 * b))  # (H, 3 b): columns (dy, i)
    return torch.matmul(torch.cat(mats, 1), torch.cat(rows, 2))  # (N, O, H, W)


def head_epilogue(z, q, bins, align_corners, scale=None, shift=None, relu=False):
    """act((z + context(q)) * scale + shift) in float32 (float64 for float64 z), returned in z's dtype."""
    acc = _acc(z.dtype)
    v = z.to(acc) + head_context(q.to(acc), bins, z.shape[-2:], align_corners)
    if scale is not None:
        v = v * scale.to(acc).view(1, -1, 1, 1) + shift.to(acc).view(1, -1, 1, 1)
    if relu:
        v = torch.relu(v)
    return v.to(z.dtype)


KERNELS = ops.OpSet(pyramid_pool=pyramid_pool, ppm_reduce=ppm_reduce, upsample_concat=upsample_concat,
                    upsample_concat_backward=None, pyramid_pool_backward=None, ppm_forward=ppm_forward_op,
                    head_epilogue=head_epilogue, head_context_backward=None)


# ----------------------------------------------------------------------------------------------------------------
# What the modules run while torch.onnx exports them (their one-line hooks call these).
# ----------------------------------------------------------------------------------------------------------------
def _check_exportable(module: torch.nn.Module, what: str) -> None:
    """Refuses what would not give an exact graph: the legacy (TorchScript) exporter and training mode."""
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    if GLOBALS.in_onnx_export:
        raise ExportError(
            f"pspnet_fast: {what} cannot be exported by the legacy TorchScript ONNX exporter (torch.onnx.export(..., "
            "dynamo=False)): it traces one fixed size and has no translation for the fused ops. Export with "
            "torch.onnx.export(model, args, dynamo=True, dynamic_shapes=...) or pspnet_fast.export.export_onnx(model, "
            "path, example), which write an exact graph with dynamic N, H and W.")
    training = [name or type(module).__name__ for name, m in module.named_modules()
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
    if training or module.training:
        raise ExportError(
            f"pspnet_fast: {what} is in training mode ({'BatchNorm ' + ', '.join(training) if training else 'training'}"
            " would use batch statistics, and Dropout would drop): an exported graph is an inference graph. Call "
            "model.eval() before exporting.")


def ppm_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A fused PPM's (pspnet_fast.PyramidPooling or pspnet_fast.patch's PatchedPyramidPooling) eval forward in the
    export formulation: (N, C, H, W) -> (N, C + L*R, H, W), exact at every size, for any backend the module names."""
    _check_exportable(module, type(module).__name__)
    if getattr(module, "reduction_channels", 0) is None:  # a patched PPM with per-level reductions
        return module._per_level_forward(KERNELS, x)
    levels = module._levels(KERNELS, pyramid_pool(x, module.bins))
    return upsample_concat(x, levels, module.bins, module.align_corners, getattr(module, "x_last", False))


def head_forward(x: torch.Tensor, ppm: torch.nn.Module, cls: torch.nn.Sequential) -> torch.Tensor:
    """The fused PSP head's eval forward in the export formulation: conv3x3(x; W_X) over x's C channels plus the
    levels' context (two small products per level), folded BatchNorm and ReLU, then cls[3:] (dropout, classifier)."""
    from .head import _context_q, _folded_bn, _is_standard_cls, _split_weight  # noqa: WPS433 (head imports us lazily)
    from .modules import PyramidPooling

    _check_exportable(cls, "the PSP head's cls")
    if not isinstance(ppm, PyramidPooling) or not _is_standard_cls(cls):
        return cls(ppm(x))
    _check_exportable(ppm, "the PSP head's ppm")
    conv, bn, act, drop, classifier = cls
    pooled = pyramid_pool(x, ppm.bins)
    levels = ppm._levels(KERNELS, pooled)  # (N, R, S), float32 (float64)
    wx, level_weight = _split_weight(conv.weight, ppm.in_channels, ppm.reduction_channels, x.dtype, levels.dtype)
    q = _context_q(ppm.bins, level_weight, levels)  # (N, O, 9, S)
    z = F.conv2d(x, wx, None, 1, 1)
    folded = _folded_bn(bn, q.dtype)
    y = head_epilogue(z, q, ppm.bins, ppm.align_corners, folded[0], folded[1], True)
    return classifier(drop(y))
