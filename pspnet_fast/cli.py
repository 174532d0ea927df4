"""The `pspnet-fast` command: `info` (what was built and why not), `bench` (the benchmark suite), `train` and `eval`
(the PSPNet authors' training recipe and test protocol; `--data synthetic` runs with no download), `convert`
(checkpoint keys to PSPNet's layout, pspnet_fast/interop/convert.py), `export` (ONNX or AOTInductor,
pspnet_fast/interop/export.py). The top layer: it uses every other one."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from . import __version__, ops
from .benchmarks import suite
from .interop import convert, export
from .models import load_checkpoint
from .ops import _ext
from .training import evaluate, train
from .training.builders import build_model


def _info(args) -> int:
    print(f"pspnet_fast {__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}; "
          f"devices: {torch.cuda.device_count() if torch.cuda.is_available() else 0})")
    try:
        import triton  # optional: the Triton backend

        print(f"triton {triton.__version__}" + (" (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1"
                                                 else ""))
    except Exception as e:
        print(f"triton: not importable ({type(e).__name__}: {e})")
    if _ext.load():
        print("compiled: C++ CPU kernels: yes")
        archs = _ext.cuda_archs()
        print("compiled: CUDA kernels: " + (f"yes (architectures {archs})" if archs else
                                              "no (built without CUDA: CPU-only torch, no nvcc, or "
                                              "PSPNET_FAST_SKIP_CUDA=1)"))
    else:
        print(f"compiled: no extension ({_ext.error()})")
    print("backends:")
    for name, st in ops.available_backends().items():
        print(f"  {name:<10} {'runs here' if st['available'] else 'unavailable: ' + st['reason']}")
    return 0


def _export(argv, prog="pspnet-fast export") -> int:
    """`pspnet-fast export CHECKPOINT OUT`: a PSPNet checkpoint (pspnet-fast train's, or convert's with --layers
    etc.) to an ONNX file (dynamic N, H, W; checked in onnxruntime) or an AOTInductor package (--aoti)."""
    p = argparse.ArgumentParser(prog=prog, description=_export.__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a checkpoint ({'state_dict': ...} or a state_dict; 'config' read if present)")
    p.add_argument("out", help="the .onnx file (or, with --aoti, the .pt2 package) to write")
    p.add_argument("--aoti", action="store_true", help="an AOTInductor package instead of ONNX (loading it needs "
                                                       "`import pspnet_fast` in the loading process)")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="example image size (default: the checkpoint's crop, else 473 473)")
    p.add_argument("--batch", type=int, default=1, help="example batch size (default 1)")
    p.add_argument("--static", action="store_true", help="fixed N, H, W (the example's) instead of dynamic")
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset (default: the exporter's; >= "
                                                           f"{export.OLDEST_OPSET})")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip running the result against the eager model (onnxruntime / the package)")
    p.add_argument("--num-classes", type=int, default=None, help="classes (default: the checkpoint's)")
    p.add_argument("--layers", type=int, default=None, help="backbone depth (default: the checkpoint's, else 50)")
    p.add_argument("--width", type=int, default=None, help="width for layers 18/34 (default: the checkpoint's)")
    p.add_argument("--no-ppm", dest="use_ppm", action="store_false", default=None, help="the model has no pyramid")
    args = p.parse_args(argv)
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    cfg = dict(ckpt.get("config", {})) if isinstance(ckpt, dict) else {}
    for key in ("layers", "width", "num_classes", "use_ppm"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if cfg.get("num_classes") is None:
        p.error("--num-classes is required: the checkpoint does not record it")
    model = build_model(cfg.get("layers", 50), cfg["num_classes"], cfg.get("width", 64), cfg.get("use_ppm", True))
    load_checkpoint(model, args.checkpoint)
    crop = args.size or cfg.get("crop") or (473, 473)
    crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
    example = torch.randn(args.batch, 3, crop[0], crop[-1])
    model.eval()
    if args.aoti:
        out = export.export_aoti(model, args.out, example, dynamic=not args.static, check=args.check)
    else:
        export.export_onnx(model, args.out, example, dynamic=not args.static, opset=args.opset, check=args.check,
                           input_names=["image"], output_names=["logits"])
        out = args.out
    print(f"wrote {out} ({'static' if args.static else 'dynamic N, H, W'}; example {tuple(example.shape)}"
          f"{'; checked against eager' if args.check else ''})")
    return 0


def main(argv=None) -> int:
    """Runs one subcommand. Expected errors (missing or bad files, bad arguments: ValueError, OSError) end in one
    `pspnet-fast CMD: error: ...` line on stderr and exit status 2, as argparse's own errors do; `--debug` anywhere
    in the arguments shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    cmd = argv[0] if argv else ""
    if cmd != "convert":  # convert has its own --debug
        argv = [a for a in argv if a != "--debug"]
    try:
        return _run(argv)
    except (ValueError, OSError) as e:
        if debug:
            raise
        text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())  # one line
        print(f"pspnet-fast{' ' + cmd if cmd else ''}: error: {text or type(e).__name__}", file=sys.stderr)
        return 2


def _run(argv) -> int:
    if argv and argv[0] == "bench":
        # The suite owns its arguments (`pspnet-fast bench --help` lists them).
        return suite.main(argv[1:], prog="pspnet-fast bench")
    if argv and argv[0] in ("train", "eval"):
        # Each owns its arguments (`pspnet-fast train --help`).
        return (train if argv[0] == "train" else evaluate).main(argv[1:], prog=f"pspnet-fast {argv[0]}")
    if argv and argv[0] == "export":
        return _export(argv[1:])
    if argv and argv[0] == "convert":
        return convert.main(argv[1:], prog="pspnet-fast convert")
    p = argparse.ArgumentParser(prog="pspnet-fast", description="Fused Pyramid Pooling Module and PSPNet head")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, compiled backends and why any is missing")
    sub.add_parser("bench", add_help=False,
                   help="the benchmark suite: reference eager vs torch.compile vs every fused backend, on the PPM, "
                        "its training step, the PSP head and PSPNet-50 (see pspnet-fast bench --help)")
    sub.add_parser("train", add_help=False,
                   help="train PSPNet (SGD, poly lr, aux loss; torchrun for many processes); --data synthetic "
                        "needs no download (see pspnet-fast train --help)")
    sub.add_parser("eval", add_help=False,
                   help="the authors' test protocol: sliding windows, flip, multi-scale; IoU table; colourized PNGs "
                        "(see pspnet-fast eval --help)")
    sub.add_parser("convert", add_help=False,
                   help="rewrite an authors' or mmsegmentation checkpoint to PSPNet's keys "
                        "(pspnet-fast convert --help)")
    sub.add_parser("export", add_help=False,
                   help="a PSPNet checkpoint to ONNX (exact at any N, H, W) or an AOTInductor package "
                        "(pspnet-fast export --help)")
    args = p.parse_args(argv)
    return _info(args)


if __name__ == "__main__":
    sys.exit(main())
