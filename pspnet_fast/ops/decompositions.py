"""The export-time formulation of the eval ops: plain torch ops whose every index and weight is computed from the
input's shape inside the graph, so that torch.onnx writes an exact graph of standard ONNX ops at every N, H, W (see
pspnet_fast/interop/export.py for the why and the helpers). `KERNELS` is that formulation as an op set the modules
run while `torch.onnx.is_in_onnx_export()`; `onnx_decompositions()` (a context manager) makes it the dispatcher
ops' decomposition for torch.onnx while it is active.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Sequence

import torch
import torch.nn.functional as F

from . import _ext
from .backends import OpSet

__all__ = ["pyramid_pool", "ppm_reduce", "upsample_concat", "ppm_forward_op", "head_epilogue", "head_context",
           "KERNELS", "ExportError", "check_exportable", "ppm_module_forward", "onnx_exporting",
           "onnx_decompositions"]


class ExportError(RuntimeError):
    """An export that cannot give an exact graph: the message names the cause and the way out."""


def onnx_exporting() -> bool:
    """torch.onnx.export is tracing the caller: the legacy exporter, or the dynamo exporter whichever capture
    strategy it tries (torch.export non-strict, strict through Dynamo, torch.jit.trace)."""
    if torch.compiler.is_dynamo_compiling():
        return _dynamo_onnx_exporting()  # constant at trace time: Dynamo cannot trace is_in_onnx_export
    return torch.onnx.is_in_onnx_export() or _dynamo_onnx_exporting()


@torch.compiler.assume_constant_result
def _dynamo_onnx_exporting() -> bool:
    # The dynamo exporter's private flag, read only if its module is loaded (an export that runs has loaded it).
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    return bool(getattr(flags, "_is_onnx_exporting", False))


# ----------------------------------------------------------------------------------------------------------------
# Index matrices built from the (symbolic) size inside the graph.
# ----------------------------------------------------------------------------------------------------------------
def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_column(bins: Sequence[int], dtype, device):
    """(K,) constants, K = sum of bins: each column's level size b and its index j within the level."""
    # Factory calls, not torch.tensor(list): a lifted constant tensor breaks the functional re-trace torch.onnx runs
    # on an ExportedProgram's decompositions (aten.detach_ in the graph).
    b = torch.cat([torch.full((bb,), bb, dtype=dtype, device=device) for bb in bins])
    j = torch.cat([torch.arange(bb, device=device).to(dtype) for bb in bins])
    return b, j


def _pool_matrix(size, bins: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    """(K, size), K = sum of bins, level after level: row i of level b averages input positions
    [floor(i*size/b), ceil((i+1)*size/b)) (ATen's adaptive pooling; integer arithmetic on the graph's size)."""
    b, i = _per_column(bins, torch.int64, device)
    start = torch.div(i * size, b, rounding_mode="floor")
    end = torch.div((i + 1) * size + b - 1, b, rounding_mode="floor")
    pos = torch.arange(size, device=device)
    inside = (pos >= start.unsqueeze(1)) & (pos < end.unsqueeze(1))  # (K, size)
    return inside.to(dtype) / (end - start).unsqueeze(1).to(dtype)


def _upsample_matrix(size, bins: Sequence[int], align_corners: bool, dtype: torch.dtype, device,
                     taps: bool = False) -> torch.Tensor:
    """(size, K), K = sum of bins: row y holds the bilinear weights of output row y over each level's b input rows
    (level after level), as ATen's upsample_bilinear2d computes them: scale and source index in the accumulation
    type, src clamped at 0 without align_corners, i0 = min(floor(src), b - 1), lambda clamped to [0, 1],
    i1 = i0 + (i0 < b - 1). taps: (3, size, K), tap d reading row y + d - 1, zero outside [0, size) (the 3x3 conv's
    zero padding)."""
    b, j = _per_column(bins, dtype, device)
    pos = torch.arange(size, device=device)
    last = pos[-1:].to(dtype)  # (1,): size - 1, from the graph's size
    y = pos.to(dtype)
    if taps:
        y = y.unsqueeze(0) + (torch.arange(3, device=device) - 1).to(dtype).unsqueeze(1)  # (3, size): y + d - 1
    y = y.unsqueeze(-1)  # (..., size, 1)
    if align_corners:
        # (b - 1) / (size - 1); for size 1 only y = 0 is kept, which any finite scale maps to src 0.
        src = ((b - 1) / torch.clamp(last, min=1.0)) * y
    else:
        src = torch.clamp((b / (last + 1)) * (y + 0.5) - 0.5, min=0.0)
    i0 = torch.minimum(torch.floor(src), b - 1)
    l1 = torch.clamp(src - i0, 0.0, 1.0)
    i1 = i0 + (i0 < b - 1).to(dtype)
    u = (j == i0).to(dtype) * (1.0 - l1) + (j == i1).to(dtype) * l1
    if taps:
        u = u * ((y >= 0) & (y <= last)).to(dtype)
    return u


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
    pw = _pool_matrix(w, bins, acc, x.device)  # (sum b, W)
    ph = _pool_matrix(h, bins, acc, x.device)  # (sum b, H)
    t = torch.matmul(xa, pw.t())  # (N, C, H, sum b)
    parts, o = [], 0
    for b in bins:
        parts.append(torch.matmul(ph[o:o + b], t[..., o:o + b]).reshape(n, c, b * b))  # (N, C, b, b) row-major
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
    uh = _upsample_matrix(h, bins, align_corners, levels.dtype, levels.device)  # (H, sum b)
    uw = _upsample_matrix(w, bins, align_corners, levels.dtype, levels.device)  # (W, sum b)
    out, o = [], 0
    for b, off in zip(bins, _offsets(bins)):
        lv = levels[:, :, off:off + b * b].reshape(n, r, b, b)
        out.append(torch.matmul(uh[:, o:o + b], torch.matmul(lv, uw[:, o:o + b].t())))  # (N, R, H, W)
        o += b
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
    ah = _upsample_matrix(h, bins, align_corners, q.dtype, q.device, taps=True)  # (3, H, sum b)
    bw = _upsample_matrix(w, bins, align_corners, q.dtype, q.device, taps=True)  # (3, W, sum b)
    rows, mats, c = [], [], 0
    for b, off in zip(bins, _offsets(bins)):
        ql = q[:, :, :, off:off + b * b].reshape(n, o, 3, 3, b, b)  # (N, O, dy, dx, i, j)
        ql = ql.permute(0, 1, 2, 4, 3, 5).reshape(n, o, 3 * b, 3 * b)  # rows (dy, i), columns (dx, j)
        bl = bw[:, :, c:c + b].permute(1, 0, 2).reshape(-1, 3 * b)  # (W, 3 b): columns (dx, j)
        rows.append(torch.matmul(ql, bl.t()))  # (N, O, 3 b, W)
        mats.append(ah[:, :, c:c + b].permute(1, 0, 2).reshape(-1, 3 * b))  # (H, 3 b): columns (dy, i)
        c += b
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


KERNELS = OpSet(pyramid_pool=pyramid_pool, ppm_reduce=ppm_reduce, upsample_concat=upsample_concat,
                upsample_concat_backward=None, pyramid_pool_backward=None, ppm_forward=ppm_forward_op,
                head_epilogue=head_epilogue, head_context_backward=None)


# ----------------------------------------------------------------------------------------------------------------
# What the modules run while torch.onnx exports them (their hooks call these).
# ----------------------------------------------------------------------------------------------------------------
def _legacy_exporting() -> bool:
    """torch.onnx.export(..., dynamo=False) is tracing (is_in_onnx_export() without the dynamo exporter's flag)."""
    if not torch.onnx.is_in_onnx_export():
        return False
    try:
        from torch.onnx._internal.exporter import _flags  # private; imported only while an export runs
    except ImportError:  # a torch without the flag module: only the legacy exporter sets is_in_onnx_export
        return True
    return not _flags._is_onnx_exporting


def check_exportable(module: torch.nn.Module, what: str) -> None:
    """Refuses what would not give an exact graph: the legacy (TorchScript) exporter and training mode."""
    if _legacy_exporting():
        raise ExportError(
            f"pspnet_fast: {what} cannot be exported by the legacy TorchScript ONNX exporter (torch.onnx.export(..., "
            "dynamo=False)): it traces one fixed size and has no translation for the fused ops. Export with "
            "torch.onnx.export(model, args, dynamo=True, dynamic_shapes=...) or pspnet_fast.interop.export.export_onnx(model, "
            "path, example), which write an exact graph with dynamic N, H and W.")
    training = [name or type(module).__name__ for name, m in module.named_modules()
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
    if training or module.training:
        raise ExportError(
            f"pspnet_fast: {what} is in training mode ({'BatchNorm ' + ', '.join(training) if training else 'training'}"
            " would use batch statistics, and Dropout would drop): an exported graph is an inference graph. Call "
            "model.eval() before exporting.")


def ppm_module_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A fused PPM's (pspnet_fast.PyramidPooling or pspnet_fast.patch's PatchedPyramidPooling) eval forward in the
    export formulation: (N, C, H, W) -> (N, C + L*R, H, W), exact at every size, for any backend the module names."""
    check_exportable(module, type(module).__name__)
    if getattr(module, "reduction_channels", 0) is None:  # a patched PPM with per-level reductions
        return module._per_level_forward(KERNELS, x)
    levels = module._levels(KERNELS, pyramid_pool(x, module.bins))
    return upsample_concat(x, levels, module.bins, module.align_corners, getattr(module, "x_last", False))


# ----------------------------------------------------------------------------------------------------------------
# The dispatcher ops' decompositions for torch.onnx (an ExportedProgram holding torch.ops.pspnet_fast.*).
# ----------------------------------------------------------------------------------------------------------------
def _decomp_upsample_concat(x, levels, bins, align_corners, x_last=False):
    return upsample_concat(x, levels, bins, align_corners, x_last)


def _decomp_head_epilogue(z, q, bins, align_corners, scale, shift, relu):
    return head_epilogue(z, q, bins, align_corners, scale, shift, relu)


_DECOMPOSITIONS = {"pyramid_pool": pyramid_pool, "ppm_reduce": ppm_reduce, "upsample_concat": _decomp_upsample_concat,
                   "ppm_forward": ppm_forward_op, "head_epilogue": _decomp_head_epilogue}


@contextlib.contextmanager
def onnx_decompositions():
    """While active, the formulation above is the decomposition (torch._decomp.decomposition_table) of every eval op
    of the compiled extension, so that torch.onnx.export (dynamo) of an ExportedProgram holding
    torch.ops.pspnet_fast.* lowers them to standard ONNX ops (torch.onnx reads that table for the ops it has no ONNX
    function for). Yields the op names registered ([] without the extension); removes exactly those on exit.

    Not registered for good: AOTInductor / torch.compile refuse a custom op that has a global decomposition and a
    fallback when the environment variable CI is set (torch._inductor.lowering.make_fallback). Modules need none of
    this: pspnet_fast's modules take the formulation themselves while torch.onnx exports them."""
    added = []
    if _ext.load():
        table = torch._decomp.decomposition_table
        for name, fn in _DECOMPOSITIONS.items():
            packet = getattr(torch.ops.pspnet_fast, name, None)
            if packet is not None and packet.default not in table:
                table[packet.default] = fn
                added.append((name, packet.default))
    try:
        yield [name for name, _ in added]
    finally:
        for _, op in added:
            torch._decomp.decomposition_table.pop(op, None)


