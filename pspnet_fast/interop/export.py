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
  while `torch.onnx.is_in_onnx_export()` (a hook in their forward runs the formulation in
  `pspnet_fast.ops.decompositions`; not under Dynamo, which cannot trace the query), whatever backend they would
  run (the reference fallback included);
- the dispatcher ops themselves (`torch.ops.pspnet_fast.*`, e.g. in an ExportedProgram made by torch.export and
  handed to torch.onnx.export, or called directly by a user's module) get the formulation as their decomposition in
  `torch._decomp.decomposition_table`, which torch.onnx's dynamo exporter applies to every op it has no ONNX
  function for, while `pspnet_fast.ops.decompositions.onnx_decompositions()` is active (`export_onnx` enters it;
  a user exporting an ExportedProgram wraps `torch.onnx.export(ep)` in it). It is not registered for good:
  Inductor refuses a custom op with a global decomposition when the environment variable CI is set.

AOTInductor: `export_aoti` = torch.export (dynamic N, H, W) + `torch._inductor.aoti_compile_and_package`; the package
calls the fused ops through the dispatcher, so the loading process must have them registered (`import pspnet_fast`).
"""
from __future__ import annotations

import os

import torch

from .. import ops
from ..nn import PSPHead, PyramidPooling
from ..ops import _ext, decompositions
from ..ops.decompositions import ExportError
from .patching import PatchedPyramidPooling

__all__ = ["export_onnx", "export_aoti", "load_aoti", "check_onnx", "ExportError", "MIN_OPSET", "OLDEST_OPSET"]

MIN_OPSET = 18  # the opset torch.onnx's dynamo exporter writes its functions in (older ones by version conversion)
OLDEST_OPSET = 15  # the oldest torch.onnx 2.14 / onnxscript 0.7 convert this graph to (14 fails in onnx's converter)


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
    import onnx  # optional dependency (the [export] extra)

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
    import numpy as np  # with onnxruntime below: only this check needs them
    import onnxruntime as ort  # optional dependency (the [export] extra)

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
    with torch.no_grad(), decompositions.onnx_decompositions():
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
