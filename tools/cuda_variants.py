"""Which CUDA kernel each op launches for the standard shapes, without a GPU, and what it should cost on an H200.

    python tools/cuda_variants.py                       # markdown table
    python tools/cuda_variants.py --json out.json --sass sass.json

For 8x2048x90x90 and 8x2048x64x128 bfloat16, NCHW and channels_last, it runs every CUDA op through the emulator
(tools/cuda_emu: the ops of csrc/cuda/*.cu compiled for the CPU, each launch logged by emu_prelude.h with the
kernel's name, grid, block and dynamic shared memory) on a reduced problem: N = 1 and fewer channels (PPM ops C = 256,
R = 64; head O = 32), the same H, W, dtype and layout. Assumption: the launchers choose a kernel variant from H, W,
dtype, layout and alignment, and from the channel count only through chunking (channels per block, at most 32 for
the head ops; the reduced C is at least every chunk), so the variant, block and shared memory are the full shape's;
the grid is the emulated one (4 SMs, 2 resident blocks each: the persistent kernels launch 8 blocks) and is not
reported as the H200's. With --sass (a sass_report.py --json of the build), each kernel's registers and main-loop
access widths join the row.

Predicted time, H200 (132 SMs, 1.98 GHz): the largest of
  t_mem   = bytes moved / 4.0 TB/s (the figure we use for a well-behaved copy on H200 HBM3e: ~83% of 4.8 TB/s peak;
            gpu_check.sh measures the real one in the same run)
  t_issue = thread instructions / (132 SMs x 4 schedulers x 32 lanes x 1.98e9)
  t_smem  = shared-memory wavefronts / (132 SMs x 1 wavefront (128 bytes) per cycle x 1.98e9), a warp access
            counted by its distinct bytes (a broadcast is one wavefront, 32 distinct 8-byte pairs are two)
the last two from per-element counts read off the kernels' inner loops (head ops only, stated below; the PPM kernels
are being rewritten elsewhere and get t_mem only, with their SASS access widths as the caveat); the bound is the
largest.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "cuda_emu"))
sys.path.insert(0, REPO)

BW = 4.0e12          # bytes/s: a copy's bandwidth on an H200 (assumed; measured by gpu_check.sh)
ISSUE = 132 * 4 * 32 * 1.98e9  # thread instructions per second, all SMs issuing every cycle
BINS = (1, 2, 3, 6)
SHAPES = [(8, 2048, 90, 90), (8, 2048, 64, 128)]
HEAD_O = 512         # PSPNet's bottleneck channels (the head ops' O at full size)

# Per element of the head kernels' hot loops (from their code; the SASS of those loops has this shape):
#  epilogue, register taps (L <= 4): 12 (level, dx) pairs: 12 LDS.64 + 24 FFMA, + ~10 (z from shared memory, convert,
#    affine, relu, store back, loop), + the vertical pass (~12 per output at 90x90: (K+1) rows x 3 dy x ~10 / W) and
#    the 16-byte copies in and out (~1): ~59 instructions. Shared memory per 32 outputs: NCHW 12 V pairs (the warp's
#    columns of one row share 2-3 pairs: one wavefront each) + 2 (z read and result written, 2 bytes a lane) = 14;
#    channels_last 24 (32 channels' distinct pairs: 256 bytes, two wavefronts each) + 2 = 26.
#  context backward: per grad element 3 dx x 2 taps x L levels column terms, each ~4 instructions (weight load,
#    value load, FFMA, loop), + staging (~3): ~99; shared memory: 24 terms x 2 loads (weight a broadcast, values of
#    consecutive rows or channels conflict free) per 32 elements = 48 wavefronts.
PER_ELEMENT = {  # (op, layout): (thread instructions, shared-memory wavefronts per 32 elements)
    ("head_epilogue", "nchw"): (59, 14), ("head_epilogue", "channels_last"): (59, 26),
    ("head_context_backward", "nchw"): (99, 48), ("head_context_backward", "channels_last"): (99, 48)}
SMEM = 132 * 1.98e9  # wavefronts per second


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def build_ppm_emulator():
    """The PPM ops' emulator (make_emu.py + build.py, the test build: ppm_emu.so, op library pspnet_emu) and a small
    library registering the launch log's ops (pspnet_emu_log). The log itself is the prelude's inline variable
    g_launch_log, a unique global symbol (nm: 'u') that the dynamic linker binds to one object for the whole process,
    so the small library reads what ppm_emu.so's launches wrote. The PPM kernels sit in anonymous namespaces: the log
    names them "?+0x<offset>" and symbol_table() resolves those from ppm_emu.so (nm)."""
    import emu_common
    from torch.utils.cpp_extension import load
    import torch

    for script in ("make_emu.py", "build.py"):  # unchanged sources: nothing is recompiled
        r = subprocess.run([sys.executable, os.path.join(HERE, "cuda_emu", script)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{script} failed: " + (r.stderr or r.stdout)[-500:])
    P = emu_common.load_emu()
    d = os.path.join(emu_common.EMU_DIR, "variants")
    os.makedirs(d, exist_ok=True)
    src = os.path.join(d, "emu_log.cpp")
    text = ('#include <torch/library.h>\n#include "emu_prelude.h"\n'
            'TORCH_LIBRARY(pspnet_emu_log, m) {\n  emu_launch_log_defs(m);\n}\n')
    if not os.path.exists(src) or open(src).read() != text:
        open(src, "w").write(text)
    load(name="emu_log", sources=[src], extra_include_paths=[os.path.join(REPO, "csrc"), emu_common.HERE],
         extra_cflags=["-O2", "-pthread", "-w"], extra_ldflags=["-pthread"], is_python_module=False,
         build_directory=d, verbose=False)
    torch.ops.load_library(os.path.join(d, "emu_log.so"))

    class Ops:  # the PPM ops, with the log ops beside them
        def __getattr__(self, name):
            if name.startswith("emu_launch_log"):
                return getattr(torch.ops.pspnet_emu_log, name)
            return getattr(P, name)

    return Ops(), emu_common.EMU_SO


def symbol_table(so):
    """{offset: short name} of the functions in a library (nm -C), for the launch log's "?+0x..." entries."""
    out = {}
    r = subprocess.run(["nm", "-C", "--defined-only", so], capture_output=True, text=True)
    for ln in r.stdout.splitlines():
        parts = ln.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tTwW":
            name = parts[2]
            name = re.sub(r"^void ", "", name)
            depth, cut = 0, len(name)
            for i, ch in enumerate(name):
                if ch == "<":
                    depth += 1
                elif ch == ">":
                    depth -= 1
                elif ch == "(" and depth == 0 and not name.startswith("(anonymous", i):
                    cut = i
                    break
            name = name[:cut]
            for ns in ("pspnet_fast::", "(anonymous namespace)::", "emu_visible::", "c10::"):
                name = name.replace(ns, "")
            out[int(parts[0], 16)] = name
    return out


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


def launches(E, fn, symbols=None):
    E.emu_launch_log_clear()
    fn()
    out = []
    for ln in E.emu_launch_log():
        m = re.match(r"(.*) grid=(\S+) block=(\S+) smem=(\d+)$", ln)
        if not m:
            out.append({"kernel": ln})
            continue
        name = m.group(1)
        if name.startswith("?+0x") and symbols:
            name = symbols.get(int(name[4:], 16), name)
        out.append({"kernel": name, "grid": m.group(2), "block": m.group(3).split(",")[0], "smem": int(m.group(4))})
    return out


def run(shapes, dtype, layouts, sass):
    import torch

    rows = []
    H_ops = __import__("head_emu").load_head_emu(verbose=False)
    symbols = None
    try:
        P, so = build_ppm_emulator()
        symbols = symbol_table(so)
    except Exception as e:  # the head rows still come
        log(f"PPM emulator unavailable ({type(e).__name__}: {str(e)[:300]}); head ops only")
        P = None
    es = torch.empty((), dtype=dtype).element_size()
    for shape in shapes:
        N, C, H, W = shape
        L, R, S = len(BINS), C // 4, sum(b * b for b in BINS)
        for layout in layouts:
            mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            torch.manual_seed(0)
            # Full-size byte counts (what the GPU moves), reduced tensors (what the emulator runs).
            full = {
                "pyramid_pool": N * C * H * W * es + N * C * S * 4,
                "ppm_reduce": N * C * S * 4 + L * R * C * 4 + N * R * S * 4,
                "upsample_concat": N * C * H * W * es + N * R * S * 4 + N * (C + L * R) * H * W * es,
                "upsample_concat_backward": N * L * R * H * W * es + N * R * S * 4,
                "pyramid_pool_backward": 2 * N * C * H * W * es + N * C * S * 4,
                "head_epilogue": 2 * N * HEAD_O * H * W * es + N * HEAD_O * 9 * S * 4,
                "head_context_backward": N * HEAD_O * H * W * es + N * HEAD_O * 9 * S * 4,
            }
            elements = {"head_epilogue": N * HEAD_O * H * W, "head_context_backward": N * HEAD_O * H * W}
            calls = []
            if P is not None:
                c, r = 256, 64
                x = torch.randn(1, c, H, W).to(dtype).contiguous(memory_format=mf)
                w = torch.randn(L, r, c) / c ** 0.5
                sc, sh = torch.rand(L, r) + 0.5, torch.randn(L, r)
                pooled = P.pyramid_pool(x, list(BINS))
                lv = P.ppm_reduce(pooled, w, sc, sh, list(BINS), True)
                out = P.upsample_concat(x, lv, list(BINS), True)
                calls += [
                    ("pyramid_pool", lambda: P.pyramid_pool(x, list(BINS))),
                    ("ppm_reduce", lambda: P.ppm_reduce(pooled, w, sc, sh, list(BINS), True)),
                    ("upsample_concat", lambda: P.upsample_concat(x, lv, list(BINS), True)),
                    ("upsample_concat_backward", lambda: P.upsample_concat_backward(out, c, list(BINS), True)),
                    ("pyramid_pool_backward", lambda: P.pyramid_pool_backward(pooled, out, list(BINS), 0)),
                ]
                if hasattr(torch.ops.pspnet_emu, "ppm_forward"):
                    full["ppm_forward"] = N * C * H * W * es + N * (C + L * R) * H * W * es
                    calls.append(("ppm_forward", lambda: P.ppm_forward(x, w, sc, sh, list(BINS), True, True)))
            o = 32
            z = torch.randn(1, o, H, W).to(dtype).contiguous(memory_format=mf)
            q = torch.randn(1, o, 9, S)
            hs, hb = torch.rand(o) + 0.5, torch.randn(o)
            calls += [
                ("head_epilogue", lambda: H_ops.head_epilogue(z, q, list(BINS), True, hs, hb, True)),
                ("head_context_backward", lambda: H_ops.head_context_backward(z, list(BINS), True)),
            ]
            E_of = {name: (H_ops if name.startswith("head") else P) for name, _ in calls}
            for name, fn in calls:
                t0 = time.time()
                ls = launches(E_of[name], fn, symbols)
                t_mem = full[name] / BW * 1e6
                ipe, wpe = PER_ELEMENT.get((name, layout), (None, None))
                t_issue = elements[name] * ipe / ISSUE * 1e6 if ipe else None
                t_smem = elements[name] / 32 * wpe / SMEM * 1e6 if wpe else None
                for k in ls:
                    s = sass.get(k["kernel"]) if sass else None
                    if s:
                        k["regs"] = s.get("regs")
                        k["ldg_loop"] = s.get("ldg_loop")
                        k["stg_loop"] = s.get("stg_loop")
                row = {"shape": "x".join(map(str, shape)), "dtype": str(dtype)[6:], "layout": layout, "op": name,
                       "launches": ls, "bytes": full[name], "t_mem_us": round(t_mem, 1),
                       "t_issue_us": None if t_issue is None else round(t_issue, 1),
                       "t_smem_us": None if t_smem is None else round(t_smem, 1),
                       "issue_per_element": ipe, "smem_wavefronts_per_32": wpe,
                       "bound": max([("memory", t_mem), ("issue", t_issue or 0), ("shared memory", t_smem or 0)],
                                    key=lambda kv: kv[1])[0],
                       "predicted_us": round(max(t_mem, t_issue or 0, t_smem or 0), 1),
                       "emulated_s": round(time.time() - t0, 1)}
                row["of_copy"] = round(t_mem / row["predicted_us"], 2)
                rows.append(row)
                log(f"{row['shape']} {layout} {name}: {[k['kernel'] for k in ls]} ({row['emulated_s']}s)")
    return rows


def widths(d):
    return " ".join(f"{w}:{n}" for w, n in sorted((int(a), b) for a, b in d.items())) if d else "-"


def markdown(rows):
    out = ["| shape | layout | op | kernel launched | block | dyn smem | regs | loop LDG / STG widths (bits:count) | "
           "MB | t_mem us | t_issue us | t_smem us | predicted us | of copy | bound |",
           "|" + " --- |" * 15]
    for r in rows:
        for i, k in enumerate(r["launches"] or [{"kernel": "(none)"}]):
            first = i == 0
            ws = f"{widths(k.get('ldg_loop'))} / {widths(k.get('stg_loop'))}" if "ldg_loop" in k else "-"
            out.append(
                f"| {r['shape'] if first else ''} | {r['layout'] if first else ''} | {r['op'] if first else ''} | "
                f"`{k['kernel']}` | {k.get('block', '')} | {k.get('smem', '')} | {k.get('regs', '-')} | {ws} | "
                + (f"{r['bytes'] / 1e6:.1f} | {r['t_mem_us']} | {r['t_issue_us'] or '-'} | {r['t_smem_us'] or '-'} | "
                   f"{r['predicted_us']} | {r['of_copy']:.0%} | {r['bound']} |" if first else "| | | | | | |"))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", help="N,C,H,W (repeat); default 8,2048,90,90 and 8,2048,64,128")
    ap.add_argument("--layout", action="append", choices=["nchw", "channels_last"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--sass", metavar="JSON", help="sass_report.py --json output: registers and loop widths")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--from-json", metavar="FILE", help="re-render a saved --json run (e.g. with a new --sass)")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    shapes = [tuple(int(v) for v in s.split(",")) for s in a.shape] if a.shape else SHAPES
    sass = None
    if a.sass:
        sass = {}
        for r in json.load(open(a.sass)):
            if r.get("arch") == "sm_90":
                sass[r["kernel"]] = r
    if a.from_json:
        rows = json.load(open(a.from_json))["rows"]
        for r in rows:
            for k in r["launches"]:
                s = sass.get(k["kernel"]) if sass else None
                if s:
                    k.update(regs=s.get("regs"), ldg_loop=s.get("ldg_loop"), stg_loop=s.get("stg_loop"))
    else:
        rows = run(shapes, getattr(torch, a.dtype), a.layout or ["nchw", "channels_last"], sass)
    print(markdown(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"bandwidth_Bps": BW, "issue_per_s": ISSUE, "smem_wavefronts_per_s": SMEM, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
