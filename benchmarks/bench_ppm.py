"""PPM forward (eval) benchmark: reference eager vs torch.compile(reference) vs every fused backend vs a copy.

All providers run on the same input in one process, interleaved round by round so that machine noise hits them
alike. Each row: median and spread (min-max of the rounds) in ms, speed-ups over eager and over torch.compile, the
fraction of the memory roofline (bytes the fused op must move: read x once, write the output once; over the copy
bandwidth measured in this same run) and the max abs error against the eager reference in this same run.

    python -m pspnet_fast.benchmarks.bench_ppm --shape 1,2048,60,60
    pspnet-fast bench --quick
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHAPES = ["1,2048,60,60"]
QUICK_SHAPES = ["1,256,13,13"]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def machine_info(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "machine": torch.cuda.get_device_name() if device == "cuda" else f"{cpu} ({os.cpu_count()} cpus)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                        text=True, timeout=10).stdout.strip() or None
    except Exception:
        info["commit"] = None
    return info


def time_rounds(fns: dict, device: str, rounds: int, warmup: int, progress=None) -> dict:
    """Median and spread per provider; providers interleaved within each round."""
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        _sync(device)
        if progress:
            progress(f"  warmed up {name}")
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: (statistics.median(t), min(t), max(t)) for name, t in times.items()}


def tolerance(dtype: torch.dtype, ref_max: float) -> float:
    """The forward tests' tolerance for float32/float64; for half types the benchmark's looser bound."""
    if dtype == torch.float64:
        return 1e-12 * ref_max
    if dtype == torch.float32:
        return 1e-5 * ref_max + 1e-6
    return 2e-2 * ref_max


def run(shape, dtype_name="float32", device="cpu", channels_last=False, rounds=15, warmup=3, compile_ref=True,
        progress=print) -> list[dict]:
    import pspnet_fast
    from pspnet_fast import ops
    from pspnet_fast.reference import PyramidPooling as RefPPM

    dtype = DTYPES[dtype_name]
    n, c, h, w = shape
    torch.manual_seed(0)
    ref = RefPPM(c).to(device=device, dtype=dtype).eval()
    for m in ref.modules():  # non-trivial BatchNorm statistics so the fold is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(n, c, h, w, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)

    providers = {"reference": lambda: ref(x)}
    if compile_ref:
        compiled = torch.compile(ref)
        providers["torch.compile"] = lambda: compiled(x)
    for name in ("cpu", "cuda", "triton"):
        if ops.why_not(name, x) is None:
            fused = pspnet_fast.PyramidPooling.from_reference(ref, backend=name).eval()
            providers[f"fused-{name}"] = (lambda f: (lambda: f(x)))(fused)
        else:
            progress(f"  fused-{name}: skipped ({ops.why_not(name, x)})")
    out_elems = n * (c + 4 * (c // 4)) * h * w
    providers["copy"] = lambda: torch.cat([x, x], 1)  # reads x, writes an output of the fused op's size

    with torch.no_grad():
        expect = ref(x).double()
        errs = {}
        for name, fn in providers.items():
            if name == "copy":
                continue
            progress(f"  checking {name} ...")
            errs[name] = (fn().double() - expect).abs().max().item()
        stats = time_rounds(providers, device, rounds, warmup, progress)
    ref_max = expect.abs().max().item()
    copy_ms = stats["copy"][0]
    copy_bytes = x.numel() * x.element_size() * 4  # cat reads x twice and writes it twice
    bandwidth = copy_bytes / (copy_ms * 1e-3)
    must_move = (x.numel() + out_elems) * x.element_size()
    info = machine_info(device)
    rows = []
    for name, (med, lo, hi) in stats.items():
        err = errs.get(name)
        rows.append({
            "workload": "ppm_forward_eval",
            "shape": list(shape),
            "dtype": dtype_name,
            "device": device,
            "channels_last": channels_last,
            "provider": name,
            "median_ms": med,
            "min_ms": lo,
            "max_ms": hi,
            "speedup_vs_eager": stats["reference"][0] / med,
            "speedup_vs_compile": stats["torch.compile"][0] / med if "torch.compile" in stats else None,
            "roofline_fraction": (must_move / bandwidth) / (med * 1e-3),
            "max_abs_err": err,
            "wrong": bool(err is not None and err > tolerance(dtype, ref_max)),
            **info,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'workload':<18} {'shape':<16} {'dtype':<9} {'provider':<14} {'median ms':>10} {'spread ms':>17} " \
           f"{'vs eager':>9} {'vs compile':>10} {'roofline':>9} {'max err':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        vc = f"{r['speedup_vs_compile']:.2f}x" if r["speedup_vs_compile"] else "-"
        err = "-" if r["max_abs_err"] is None else f"{r['max_abs_err']:.1e}" + (" WRONG" if r["wrong"] else "")
        shape = "x".join(map(str, r["shape"])) + (" CL" if r["channels_last"] else "")
        lines.append(
            f"{r['workload']:<18} {shape:<16} {r['dtype']:<9} {r['provider']:<14} {r['median_ms']:>10.2f} "
            f"{r['min_ms']:>8.2f}-{r['max_ms']:<8.2f} {r['speedup_vs_eager']:>8.2f}x {vc:>10} "
            f"{r['roofline_fraction']:>9.2f} {err:>9}")
    return "\n".join(lines)


def parse_shape(s: str) -> tuple[int, int, int, int]:
    parts = s.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"--shape expects N,C,H,W (four ints), got {s!r}")
    shape = tuple(int(p) for p in parts)
    if shape[1] < 4 or shape[1] % 4 or min(shape[2:]) < 1:
        raise argparse.ArgumentTypeError(f"--shape needs C a positive multiple of 4 and H, W >= 1, got {s!r}")
    return shape


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", action="append", type=parse_shape,
                   help="N,C,H,W; repeat for several (default: 1,2048,60,60, the 473x473 crop)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) provider")
    p.add_argument("--quick", action="store_true", help="small sizes, a few seconds, for smoke runs")
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    shapes = args.shape or [parse_shape(s) for s in (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)]
    rounds, warmup = (5, 1) if args.quick else (args.rounds, args.warmup)
    rows = []
    for shape in shapes:
        print(f"PPM forward, eval, {'x'.join(map(str, shape))} {args.dtype} on {args.device}"
              + (" channels_last" if args.channels_last else ""), file=sys.stderr, flush=True)
        rows += run(shape, args.dtype, args.device, args.channels_last, rounds, warmup, not args.no_compile,
                    progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(rows))
    info = {k: rows[0][k] for k in ("machine", "torch", "triton", "commit", "threads")} if rows else {}
    print("  " + ", ".join(f"{k}={v}" for k, v in info.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any(r["wrong"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
