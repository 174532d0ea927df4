"""Compile the Triton kernels for a GPU that is not here and report their global access widths.

    python -m pspnet_fast.kernels.ptx_report [--arch 90] [--shape 8,2048,90,90] [--dtype bfloat16] [--json]

Runs on a machine without a GPU: each op's launcher is called on meta tensors with `wrap_triton` replaced by a
recorder (the launch it would make: kernel, grid, arguments, meta-parameters), each argument is specialized as
Triton's launcher would (pointer alignment, integers divisible by 16, integers equal to 1 as constants; meta tensors
count as 16-byte aligned, like fresh CUDA allocations), and the kernel is compiled offline with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`. Per launch it reports the grid, the
meta-parameters chosen, the PTX global loads and stores by width (bits per thread and instruction), ptxas's
registers and spill bytes, and the SASS LDG/STG counts by width (cuobjdump from the triton wheel).

Static counts, not executed counts: an instruction in a loop body counts once. Cases: the ops of the eval forward
(pyramid_pool, ppm_reduce, upsample_concat, ppm_forward's kernels) and head_epilogue, contiguous and channels_last.
"""

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("ptx_report compiles kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

try:
    from triton._C.libtriton import native_specialize_impl  # noqa: E402
except ImportError:  # pragma: no cover - older Triton
    native_specialize_impl = None

from . import head_triton, ppm_triton, triton_backward, triton_pool, triton_reduce, triton_upsample  # noqa: E402

# The modules whose launchers call wrap_triton (each looks it up in its own globals): record() replaces it in each.
_LAUNCHING = (triton_pool, triton_reduce, triton_upsample, triton_backward, head_triton)

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


class _Recorder:
    """Stands in for wrap_triton: kernel[grid](*args, **kwargs) records the launch instead of running it."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        def at(grid):
            def launch(*args, **kwargs):
                self.launches.append((kernel, tuple(grid), args, kwargs))
            return launch

        class _K:
            def __getitem__(_, grid):
                return at(grid)

        return _K()


def _specialize(kernel, args, kwargs):
    """(signature, constexprs, attrs, options) as JITFunction.run would build them for these arguments."""
    names = [p.name for p in kernel.params]
    values = list(args) + [None] * (len(names) - len(args))
    options = {}
    for k, v in kwargs.items():
        if k in names:
            values[names.index(k)] = v
        else:
            options[k] = v
    signature, constexprs, attrs = {}, {}, {}
    for i, (p, v) in enumerate(zip(kernel.params, values)):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = v
            continue
        ty, key = native_specialize_impl(CUDABackend, v, False, not p.do_not_specialize,
                                         not p.do_not_specialize_on_alignment)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = key
        elif key:
            attrs[(i,)] = CUDABackend.parse_attr(key)
    return signature, constexprs, attrs, options


_WIDTH = re.compile(r"\b(ld|st)\.global(?:\.[a-z_]+)*?(?:\.v(\d))?\.(b|f|u|s)(\d+)\b")
_SASS = re.compile(r"\b(LDG|STG)\.E(?:\.[A-Z_]+)*?(?:\.(128|64|U16|S16|U8|S8))?(?:\.[A-Z_]+)*\b")


def _ptx_widths(ptx):
    out = collections.Counter()
    for m in _WIDTH.finditer(ptx):
        op, vec, _, bits = m.groups()
        out[f"{op}{int(vec or 1) * int(bits)}"] += 1
    return dict(sorted(out.items()))


def _sass_widths(cubin):
    exe = os.path.join(_BIN, "cuobjdump")
    if not os.path.exists(exe):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run([exe, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    except Exception:
        return None
    finally:
        os.unlink(f.name)
    out = collections.Counter()
    for m in _SASS.finditer(sass):
        op, w = m.groups()
        w = {"U16": "16", "S16": "16", "U8": "8", "S8": "8", None: "32"}.get(w, w)
        out[f"{op}{w}"] += 1
    return dict(sorted(out.items()))


def _ptxas_usage(ptx, arch):
    exe = os.path.join(_BIN, "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        r = subprocess.run([exe, f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v", f.name, "-o",
                            os.devnull], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    text = r.stderr + r.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.findall(r"(\d+) bytes spill (stores|loads)", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_bytes": sum(int(b) for b, _ in spill) if spill else 0}


def _res_usage(cubin):
    """REG and STACK (bytes of local memory a thread: spills and stack arrays) of the cubin, by cuobjdump."""
    exe = os.path.join(_BIN, "cuobjdump")
    if not os.path.exists(exe):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([exe, "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return {"stack_bytes": int(m.group(2))} if m else {}


def compile_launch(kernel, grid, args, kwargs, arch):
    signature, constexprs, attrs, options = _specialize(kernel, args, kwargs)
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    meta = {k: v for k, v in kwargs.items() if k.isupper() and not re.fullmatch(r"[BOK]\d|BP\d", k)}
    return {
        "kernel": kernel.fn.__name__,
        "grid": list(grid),
        "num_warps": options.get("num_warps", 4),
        "meta": meta,
        "ptx": _ptx_widths(ptx),
        "sass": _sass_widths(compiled.asm["cubin"]),
        **_ptxas_usage(ptx, arch),
        **_res_usage(compiled.asm["cubin"]),
    }


def record(fn, *args, **kwargs):
    rec = _Recorder()
    saved = [m.wrap_triton for m in _LAUNCHING]
    for m in _LAUNCHING:
        m.wrap_triton = rec
    try:
        fn(*args, **kwargs)
    finally:
        for m, w in zip(_LAUNCHING, saved):
            m.wrap_triton = w
    return rec.launches


def _impl(op):
    return getattr(op, "_init_fn", op)  # the Python function behind a triton_op


def cases(shape, dtype, bins=(1, 2, 3, 6), reduction=None, head_out=512):
    """(name, fn, args) of the launches to report: eval forward ops and head_epilogue, NCHW and channels_last."""
    N, C, H, W = shape
    R = reduction or C // len(bins)
    L, S = len(bins), sum(b * b for b in bins)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    meta = dict(device="meta")
    out = []
    for layout in ("nchw", "channels_last"):
        x = torch.empty(shape, dtype=dtype, **meta)
        z = torch.empty((N, head_out, H, W), dtype=dtype, **meta)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
            z = z.to(memory_format=torch.channels_last)
        pooled = torch.empty((N, C, S), dtype=acc, **meta)
        levels = torch.empty((N, R, S), dtype=acc, **meta)
        w = torch.empty((L, R, C), dtype=acc, **meta)
        sc = torch.empty((L, R), dtype=acc, **meta)
        q = torch.empty((N, head_out, 9, S), dtype=acc, **meta)
        hs = torch.empty((head_out,), dtype=acc, **meta)
        out += [
            (f"pyramid_pool {layout}", _impl(triton_pool._triton_pyramid_pool), (x, list(bins))),
            (f"ppm_reduce {layout}", _impl(triton_reduce._triton_ppm_reduce), (pooled, w, sc, sc, list(bins), True)),
            (f"upsample_concat {layout}", _impl(triton_upsample._triton_upsample_concat),
             (x, levels, list(bins), True, False)),
            (f"ppm_forward {layout}", _impl(getattr(ppm_triton, "_triton_ppm_forward", None)),
             (x, w, sc, sc, list(bins), True, True, False)),
            (f"head_epilogue {layout}", _impl(head_triton._triton_head_epilogue),
             (z, q, list(bins), True, hs, hs, True)),
        ]
    return out


def report(shape, dtype, arch=90, ops=None):
    rows = []
    for name, fn, args in cases(shape, dtype):
        if fn is None or (ops and not any(o in name for o in ops)):
            continue
        for kernel, grid, a, kw in record(fn, *args):
            r = compile_launch(kernel, grid, a, kw, arch)
            r["op"] = name
            rows.append(r)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--shape", action="append", help="N,C,H,W (repeatable); default 8,2048,90,90 and 8,2048,64,128")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--ops", nargs="*", help="report only the cases whose name contains one of these")
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(",")) for s in (args.shape or ["8,2048,90,90", "8,2048,64,128"])]
    dtype = getattr(torch, args.dtype)
    allrows = []
    for shape in shapes:
        rows = report(shape, dtype, args.arch, args.ops)
        for r in rows:
            r["shape"] = list(shape)
        allrows += rows
        if not args.json:
            print(f"\n{args.dtype} {shape}, sm_{args.arch} (static instruction counts; widths in bits per thread)")
            for r in rows:
                meta = " ".join(f"{k}={v}" for k, v in r["meta"].items())
                print(f"  {r['op']:<26} {r['kernel']:<26} grid={r['grid']} warps={r['num_warps']} "
                      f"regs={r['registers']} spill={r['spill_bytes']}B stack={r.get('stack_bytes')}B\n      ptx {r['ptx']}\n      sass {r['sass']}"
                      f"\n      {meta}")
    if args.json:
        print(json.dumps(allrows, indent=1, default=str))


if __name__ == "__main__":
    main()
