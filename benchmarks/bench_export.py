"""Exported-model benchmarks: `ppm-onnx` (the PPM) and `head-onnx` (the PSP head), eval, in onnxruntime on the CPU.

Providers on the same input in one run: the reference eager and torch.compile of it, the fused module eager
(fused-cpu), and onnxruntime (CPUExecutionProvider, as many intra-op threads as torch uses) on
- reference-onnx: the reference module exported by torch.onnx (dynamo) at the input's static size (the only way it
  is right: exported with dynamic H, W it is wrong at other sizes, issue 15);
- fused-onnx: the fused module exported with dynamic N, H and W (pspnet_fast.interop.export), exact at every size;
- fused-onnx-static: the same export at the input's static size (its pooling and interpolation matrices become
  constants).
The exports happen once per case, before timing (tens of seconds each at C = 2048). float32 on the CPU only.

    python -m pspnet_fast.benchmarks.bench_export --shape 1,2048,60,60
    python -m pspnet_fast.benchmarks.bench_export --workload head-onnx --shape 1,2048,60,60 --no-compile
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch

from pspnet_fast.nn import PSPHead as FusedHead
from pspnet_fast.nn import PyramidPooling as FusedPPM
from pspnet_fast.reference import PSPHead, PyramidPooling

from .common import Case, Workload, build_case, randomize_bn
from .runner import run

NUM_CLASSES = 150  # ADE20K, as bench_head


def _ort_provider(path: str, x: torch.Tensor):
    import onnxruntime as ort  # optional dependency (the [export] extra)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    feed = {name: x.detach().numpy()}
    return lambda: [torch.from_numpy(sess.run(None, feed)[0])]


def _export(module: torch.nn.Module, x: torch.Tensor, path: str, dynamic: bool) -> None:
    d = torch.export.Dim.DYNAMIC
    with torch.no_grad():
        prog = torch.onnx.export(module, (x,), dynamo=True, verbose=False,
                                 dynamic_shapes=({0: d, 2: d, 3: d},) if dynamic else None)
    prog.save(path)


def _add_onnx(case: Case, ref: torch.nn.Module, fused: torch.nn.Module, x: torch.Tensor) -> Case:
    why = None
    if case.device != "cpu" or case.dtype != "float32" or case.channels_last:
        why = "ONNX rows are float32, contiguous, CPU"
    else:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as e:
            why = f"{e.name} is not installed (pip install .[export])"
    names = ("reference-onnx", "fused-onnx", "fused-onnx-static")
    if why is not None:
        case.skipped.update({n: why for n in names})
        return case
    tmp = tempfile.mkdtemp(prefix="pspnet_fast_bench_onnx_")
    for name, module, dynamic in (("reference-onnx", ref, False), ("fused-onnx", fused, True),
                                  ("fused-onnx-static", fused, False)):
        path = os.path.join(tmp, name + ".onnx")
        try:
            _export(module, x, path, dynamic)
        except Exception as e:  # reported in the table's skipped lines, the other rows still run
            case.skipped[name] = f"export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            continue
        case.providers[name] = _ort_provider(path, x)
    return case


def _build(kind: str, shape, dtype, device, channels_last=False, compile_ref=True) -> Case:
    n, c, h, w = shape
    torch.manual_seed(0)
    if kind == "ppm":
        ref = PyramidPooling(c)
        randomize_bn(ref)
        make, out_shape = FusedPPM.from_reference, (n, ref.out_channels, h, w)
    else:
        ref = PSPHead(c, NUM_CLASSES, dropout=0.0)
        randomize_bn(ref.ppm)
        make, out_shape = FusedHead.from_reference, (n, NUM_CLASSES, h, w)
    x = torch.randn(n, c, h, w)
    case = build_case(f"{kind}-onnx", shape, dtype, device, channels_last, ref,
                      lambda backend, r: make(r, backend=backend), x, out_shape, False, compile_ref,
                      deep=kind == "head")
    ref = ref.eval()
    return _add_onnx(case, ref, make(ref).eval(), x)


def build_ppm(shape, dtype, device, channels_last=False, compile_ref=True) -> Case:
    """x (N, C, H, W) -> (N, 2C, H, W), bins (1, 2, 3, 6), align_corners=True, as bench_ppm's `ppm`."""
    return _build("ppm", shape, dtype, device, channels_last, compile_ref)


def build_head(shape, dtype, device, channels_last=False, compile_ref=True) -> Case:
    """x (N, C, H, W) -> logits (N, 150, H, W), as bench_head's `head` (dropout 0)."""
    return _build("head", shape, dtype, device, channels_last, compile_ref)


WORKLOADS = [
    Workload("ppm-onnx", build_ppm, train=False, rounds=9, warmup=2, quick_shape=(1, 256, 13, 13),
             about="PPM forward, eval: onnxruntime on the fused export (dynamic and static) vs the reference's "
                   "static export vs eager", cost_s=(0, 40)),
    Workload("head-onnx", build_head, train=False, rounds=5, warmup=1, quick_shape=(1, 256, 13, 13),
             about="PSP head forward, eval: onnxruntime on the fused export (dynamic and static) vs the "
                   "reference's static export vs eager", cost_s=(0, 150)),
]


def main(argv=None) -> int:
    return run(argv, {w.name: w for w in WORKLOADS}, "python -m pspnet_fast.benchmarks.bench_export", __doc__)


if __name__ == "__main__":
    sys.exit(main())
