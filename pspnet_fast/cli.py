"""The `pspnet-fast` command: `info` (what was built and why not), `bench` (the benchmark suite), `train` and `eval`
(the PSPNet authors' training recipe and test protocol; `--data synthetic` runs with no download), `convert`
(checkpoint keys to PSPNet's layout, pspnet_fast/interop/convert.py). The top layer: it uses every other one."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from . import __version__, ops
from .benchmarks import suite
from .interop import convert
from .ops import _ext
from .training import evaluate, train


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
    args = p.parse_args(argv)
    return _info(args)


if __name__ == "__main__":
    sys.exit(main())
