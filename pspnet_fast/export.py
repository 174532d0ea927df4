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

so the ONNX graph holds only MatMul, Range, Shape, Cast, Mul/Div/Sub/Add, Floor, Min/Clip, Less/Equal/And, Concat,
Reshape, Relu, Conv: standard ops, written at opset 18 (the exporter's default), 15-17 through its converter.

How it reaches the graph, with nothing passed by the user:
- pspnet_fast's modules (PyramidPooling, PSPHead, the PPMs `pspnet_fast.patch()` installs) take the formulation
  while `torch.onnx.is_in_onnx_export()` (a three-line hook in their forward calls `ppm_forward` / `head_forward`
  here; not under Dynamo, which cannot trace the query), whatever backend they would run (the reference fallback
  included);
- the dispatcher ops themselves (`torch.ops.pspnet_fast.*`, e.g. in an ExportedProgram made by torch.export and
  handed to torch.onnx.export, or called directly by a user's module) get the formulation as their decomposition in
  `torch._decomp.decomposition_table`, which torch.onnx's dynamo exporter applies to every op it has no ONNX
  function for (`register_onnx_decompositions`, run when this module is imported). Nothing else reads those entries
  (torch.compile and torch.export's default decompositions select their own ops).

AOTInductor: `export_aoti` = torch.export (dynamic N, H, W) + `torch._inductor.aoti_compile_and_package`; the package
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
           "load_aoti", "check_onnx", "ExportError", "MIN_OPSET", "OLDEST_OPSET"]

MIN_OPSET = 18  # the opset torch.onnx's dynamo exporter writes its functions in (older ones by version conversion)
OLDEST_OPSET = 15  # the oldest torch.onnx 2.14 / onnxscript 0.7 convert this graph to (14 fails in onnx's converter)


class ExportError(RuntimeError):
    """An export that cannot give an exact graph: the message names the cause and the way out."""


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


KERNELS = ops.OpSet(pyramid_pool=pyramid_pool, ppm_reduce=ppm_reduce, upsample_concat=upsample_concat,
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
        from torch.onnx._internal.exporter import _flags
    except ImportError:  # a torch without the flag module: only the legacy exporter sets is_in_onnx_export
        return True
    return not _flags._is_onnx_exporting


def _check_exportable(module: torch.nn.Module, what: str) -> None:
    """Refuses what would not give an exact graph: the legacy (TorchScript) exporter and training mode."""
    if _legacy_exporting():
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
    from ._checks import check_feature_map
    from .head import _context_q, _folded_bn, _is_standard_cls, _split_weight  # lazily: head.py imports this module
    from .modules import PyramidPooling

    _check_exportable(cls, "the PSP head's cls")
    if not isinstance(ppm, PyramidPooling) or not _is_standard_cls(cls):
        return cls(ppm(x))
    _check_exportable(ppm, "the PSP head's ppm")
    check_feature_map(x, ppm.in_channels)
    conv, bn, act, drop, classifier = cls
    pooled = pyramid_pool(x, ppm.bins)
    levels = ppm._levels(KERNELS, pooled)  # (N, R, S), float32 (float64)
    wx, level_weight = _split_weight(conv.weight, ppm.in_channels, ppm.reduction_channels, x.dtype, levels.dtype)
    q = _context_q(ppm.bins, level_weight, levels)  # (N, O, 9, S)
    z = F.conv2d(x, wx, None, 1, 1)
    folded = _folded_bn(bn, q.dtype)
    if folded is not None:
        y = head_epilogue(z, q, ppm.bins, ppm.align_corners, folded[0], folded[1], True)
    else:  # a BatchNorm without running statistics: the module's own, as in eager
        y = act(bn(head_epilogue(z, q, ppm.bins, ppm.align_corners, None, None, False)))
    return classifier(drop(y))


# ----------------------------------------------------------------------------------------------------------------
# The dispatcher ops' decompositions for torch.onnx (an ExportedProgram holding torch.ops.pspnet_fast.*).
# ----------------------------------------------------------------------------------------------------------------
def _decomp_upsample_concat(x, levels, bins, align_corners, x_last=False):
    return upsample_concat(x, levels, bins, align_corners, x_last)


def _decomp_head_epilogue(z, q, bins, align_corners, scale, shift, relu):
    return head_epilogue(z, q, bins, align_corners, scale, shift, relu)


_DECOMPOSITIONS = {"pyramid_pool": pyramid_pool, "ppm_reduce": ppm_reduce, "upsample_concat": _decomp_upsample_concat,
                   "ppm_forward": ppm_forward_op, "head_epilogue": _decomp_head_epilogue}


def register_onnx_decompositions() -> list[str]:
    """Puts the formulation above in torch._decomp.decomposition_table for every eval op of the compiled extension,
    so that torch.onnx.export (dynamo) lowers an ExportedProgram holding them to standard ONNX ops. Idempotent;
    returns the op names registered ([] without the extension). torch.onnx reads that table for the ops it has no
    ONNX function for; torch.compile, torch.export's default decompositions and AOTInductor pick their ops by name
    and keep the fused ops."""
    if not _ext.load():
        return []
    table = torch._decomp.decomposition_table
    done = []
    for name, fn in _DECOMPOSITIONS.items():
        packet = getattr(torch.ops.pspnet_fast, name, None)
        if packet is None:
            continue
        table[packet.default] = fn
        done.append(name)
    return done


register_onnx_decompositions()


# ----------------------------------------------------------------------------------------------------------------
# Helpers: export_onnx (dynamic dims chosen, checked in onnxruntime), export_aoti / load_aoti.
# ----------------------------------------------------------------------------------------------------------------
def _as_args(example) -> tuple:
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def _dynamic_shapes(args: tuple, dynamic):
    """dynamic=True: N, H and W of every 4-D tensor input (dims 0, 2, 3) dynamic; False: static; anything else is
    torch.export's dynamic_shapes, passed through."""
    if dynamic is False or dynamic is None:
        return None
    if dynamic is not True:
        return dynamic
    d = torch.export.Dim.DYNAMIC
    return tuple({0: d, 2: d, 3: d} if isinstance(a, torch.Tensor) and a.dim() == 4 else None for a in args)


def _trace_example(args: tuple, dynamic) -> tuple:
    """With dynamic=True, the example with N, H and W of every 4-D input raised to at least 2: torch.export
    specializes a dimension of size 1 to the constant 1 (its 0/1 specialization), which would bake N = 1 or H = 1
    into the graph. The graph traced at 2 is the same function at every size."""
    if dynamic is not True:
        return args
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() == 4 and min(a.shape[0], a.shape[2], a.shape[3]) < 2:
            n, c, h, w = a.shape
            g = torch.Generator().manual_seed(0)
            a = torch.randn((max(n, 2), c, max(h, 2), max(w, 2)), generator=g).to(dtype=a.dtype, device=a.device)
        out.append(a)
    return tuple(out)


def _check_eval(model: torch.nn.Module, what: str) -> None:
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise ExportError(
            f"pspnet_fast.export.{what}: the model is in training mode ({', '.join(training[:4])}"
            f"{', ...' if len(training) > 4 else ''}): BatchNorm would use batch statistics and Dropout would drop. "
            "Call model.eval() before exporting.")


def _inexact_pools(model: torch.nn.Module) -> list[str]:
    """Qualified names of the adaptive average poolings (output other than 1x1) a forward of `model` may run outside
    pspnet_fast's fused modules (which hold their AdaptiveAvgPool2d but never call it): torch.onnx lowers those with
    indices baked at the export size."""
    from .head import PSPHead
    from .modules import PyramidPooling
    from .patching import PatchedPyramidPooling

    fused = (PyramidPooling, PatchedPyramidPooling, PSPHead)
    found = []

    def walk(m, prefix):
        for name, child in m.named_children():
            q = prefix + name
            if isinstance(child, fused):
                continue
            if isinstance(child, torch.nn.AdaptiveAvgPool2d):
                size = child.output_size
                size = (size, size) if not isinstance(size, (tuple, list)) else tuple(size)
                if any(s != 1 for s in size):
                    found.append(q)
            walk(child, q + ".")

    if isinstance(model, fused):
        return []
    if isinstance(model, torch.nn.AdaptiveAvgPool2d):
        return ["<root>"]
    walk(model, "")
    return found


def _check_opset(opset) -> None:
    if opset is not None and int(opset) < OLDEST_OPSET:
        raise ExportError(
            f"pspnet_fast.export.export_onnx: opset {opset} cannot hold the exact graph: its index arithmetic needs "
            f"Range, Clip with tensor bounds and GreaterOrEqual (opsets 11-12), and torch.onnx's version converter "
            f"reaches opset {OLDEST_OPSET} at the oldest (it writes opset {MIN_OPSET}). Pass opset={MIN_OPSET} or "
            "later, or None for the exporter's default.")


def _written_opset(path) -> int:
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten(o)]
    raise TypeError(f"cannot compare an output of type {type(out).__name__}")


def _unseen_example(args: tuple, dynamic) -> tuple:
    """The example with N + 1 and H, W changed to sizes it did not have (H + 3, W + 5: prime offsets, so bins that
    divided the example's size do not divide these)."""
    if dynamic is not True:
        return args
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() == 4:
            n, c, h, w = a.shape
            g = torch.Generator().manual_seed(0)
            out.append(torch.randn((n + 1, c, h + 3, w + 5), generator=g).to(dtype=a.dtype, device=a.device))
        else:
            out.append(a)
    return tuple(out)


def check_onnx(model: torch.nn.Module, path, inputs, rtol: float = 1e-4) -> float:
    """Runs the ONNX file at `path` in onnxruntime (CPU) on `inputs` (a tensor or tuple of tensors) and compares every
    output with the eager model's: returns the largest max|onnx - eager| / max|eager| and raises ExportError when it
    exceeds rtol."""
    import numpy as np
    import onnxruntime as ort

    args = _as_args(inputs)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, [a for a in args if isinstance(a, torch.Tensor)])}
    try:
        got = sess.run(None, feeds)
    except Exception as e:  # e.g. a size baked into a Reshape: the graph is not the model's function at these sizes
        raise ExportError(f"onnxruntime could not run {os.fspath(path)} at input shapes "
                          f"{[tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]}: {e}") from e
    with torch.no_grad():
        want = _flatten(model(*args))
    if len(got) != len(want):
        raise ExportError(f"the ONNX model has {len(got)} outputs, the eager model {len(want)}")
    worst = 0.0
    for g, w in zip(got, want):
        w = w.detach().cpu().double().numpy()
        if g.shape != w.shape:
            raise ExportError(f"ONNX output shape {g.shape} differs from the eager model's {w.shape}")
        scale = float(np.abs(w).max()) if w.size else 0.0
        err = float(np.abs(g.astype(np.float64) - w).max()) if w.size else 0.0
        worst = max(worst, err / scale if scale > 0 else err)
    if worst > rtol:
        raise ExportError(f"onnxruntime's output differs from the eager model's by {worst:.3g} of its max (> {rtol:g}) "
                          f"at input shapes {[tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]}")
    return worst


def export_onnx(model: torch.nn.Module, path, example, dynamic=True, *, opset: int | None = None,
                check: bool = True, rtol: float = 1e-4, input_names=None, output_names=None, optimize: bool = True,
                verbose: bool = False):
    """Exports `model` (eval mode) to the ONNX file `path` with torch.onnx's dynamo exporter and returns the
    torch.onnx.ONNXProgram.

    example: a tensor or tuple of tensors (e.g. (1, 3, 473, 473) images or (1, C, H, W) features). dynamic: True makes
    N, H and W of every 4-D input dynamic (the graph is exact at every size: see this module's docstring; a size 1 in
    the example is traced at 2, as torch.export would bake a 1 into the graph), False
    keeps the example's sizes, anything else is passed as torch.export's dynamic_shapes. opset: None for the
    exporter's default; one older than OLDEST_OPSET, or one the exporter's converter does not reach (torch.onnx then
    writes MIN_OPSET), raises ExportError. check: runs the file in onnxruntime on the example and on an unseen size
    (N + 1, H + 3, W + 5 when dynamic) against the eager model and raises ExportError beyond rtol of the output's max
    (requires onnxruntime). Training-mode modules and the legacy exporter raise ExportError naming the fix."""
    _check_eval(model, "export_onnx")
    _check_opset(opset)
    pools = _inexact_pools(model) if dynamic is not False else []
    if pools:
        raise ExportError(
            f"pspnet_fast.export.export_onnx: {', '.join(pools[:4])}{', ...' if len(pools) > 4 else ''} "
            "(AdaptiveAvgPool2d) would be exported by PyTorch's lowering, whose indices are those of the example's "
            "size: wrong at other sizes. Call pspnet_fast.patch(model) first (it fuses the pyramid pooling modules "
            "it recognizes; names.skipped says why others were left), or export with dynamic=False.")
    args = _as_args(example)
    kw = {} if opset is None else {"opset_version": int(opset)}
    with torch.no_grad():
        program = torch.onnx.export(model, _trace_example(args, dynamic), dynamo=True,
                                    dynamic_shapes=_dynamic_shapes(args, dynamic),
                                    input_names=input_names, output_names=output_names, optimize=optimize,
                                    verbose=verbose, **kw)
    program.save(os.fspath(path))
    if opset is not None and _written_opset(path) != int(opset):
        raise ExportError(
            f"pspnet_fast.export.export_onnx: torch.onnx could not convert the graph to opset {opset} and wrote opset "
            f"{_written_opset(path)} to {os.fspath(path)} instead. Pass opset={MIN_OPSET} (or None), or an opset "
            f"between {OLDEST_OPSET} and {MIN_OPSET}.")
    if check:
        check_onnx(model, path, args, rtol)
        if dynamic is True:
            check_onnx(model, path, _unseen_example(args, dynamic), rtol)
    return program


def export_aoti(model: torch.nn.Module, path, example, dynamic=True, *, check: bool = True, rtol: float = 1e-4,
                inductor_configs: dict | None = None) -> str:
    """Compiles `model` (eval mode) with AOTInductor into the package `path` (.pt2) and returns its path.

    torch.export with N, H, W of every 4-D input dynamic (dynamic=True; False: static; else torch.export's
    dynamic_shapes), then torch._inductor.aoti_compile_and_package. The package calls the fused ops
    (torch.ops.pspnet_fast.*) through the dispatcher and does not contain them: the process that loads it must have
    registered them (`import pspnet_fast`, then `load_aoti(path)` or torch._inductor.aoti_load_package(path));
    without, loading fails ("RuntimeError: Could not find schema for pspnet_fast::pyramid_pool"). check: loads the package here and compares it with the
    eager model on the example and on an unseen size."""
    _check_eval(model, "export_aoti")
    args = _as_args(example)
    with torch.no_grad():
        ep = torch.export.export(model, _trace_example(args, dynamic),
                                 dynamic_shapes=_dynamic_shapes(args, dynamic))
        out = torch._inductor.aoti_compile_and_package(ep, package_path=os.fspath(path),
                                                       inductor_configs=inductor_configs)
    if check:
        runner = load_aoti(out)
        for a in (args, _unseen_example(args, dynamic)):
            with torch.no_grad():
                got, want = _flatten(runner(*a)), _flatten(model(*a))
            for g, w in zip(got, want):
                scale = w.abs().max().item() if w.numel() else 0.0
                err = (g.double() - w.double()).abs().max().item() if w.numel() else 0.0
                if err > rtol * max(scale, 1e-30):
                    raise ExportError(f"the AOTInductor package differs from the eager model by {err:.3g} "
                                      f"(max {scale:.3g}) at {[tuple(t.shape) for t in a]}")
    return out


def load_aoti(path):
    """The callable of an AOTInductor package made by export_aoti, with pspnet_fast's ops registered in this
    process (imports pspnet_fast._C; raises ExportError when the extension is not loadable)."""
    if not _ext.load():
        raise ExportError(f"pspnet_fast's compiled ops are not loadable here ({_ext.error()}): an AOTInductor package "
                          "of a fused model calls them and cannot run without them. Build the extension "
                          "(pip install --no-build-isolation -e .).")
    ops.ensure_registered("cpu")
    return torch._inductor.aoti_load_package(os.fspath(path))
