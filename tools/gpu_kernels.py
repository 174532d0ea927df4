"""Per-kernel GPU times from torch.profiler for the fused ops, with bytes moved and the fraction of a copy's bandwidth
measured in the same run (issue 12, item 7). Targets are recorded next to the figures, never asserted.

    python tools/gpu_kernels.py --json OUT.json                    # 8x2048x90x90, 8x2048x64x128 bf16, NCHW + CL
    python tools/gpu_kernels.py --device cpu --shape 1,64,9,9      # dry run on the CPU: the script's own logic

For each shape and layout (x: N x C x H x W, bins (1, 2, 3, 6), R = C / 4, head O = 512 as in PSPNet):
  copy                    y.copy_(x), the bandwidth probe: 2 |x| bytes
  pool                    pyramid_pool(x)                      |x| + |pooled|
  reduce                  ppm_reduce(pooled, W, scale, shift)  |pooled| + |W| + |levels|
  upsample                upsample_concat(x, levels)           |x| + |levels| + |out|
  ppm_forward             the eval forward (read-once op where the backend has it, else pool + reduce + upsample):
                          |x| + |out| (+ the small tensors)
  upsample_bwd            upsample_concat_backward(g_out)      |g_out's level channels| + |grad levels|
  pool_bwd                pyramid_pool_backward(g_pooled, g_out)   |g_out's x channels| + |g_pooled| + |grad x|
  head_epilogue           head_epilogue(z, q, scale, shift)    |z| + |q| + |out|      (z: N x O x H x W)
  head_ctx_bwd            head_context_backward(g)             |g| + |grad q|
  ref_eager, ref_compile  pspnet_fast.reference.PyramidPooling (eval) eager and torch.compile: all their kernels
Time per call = the sum of the device kernels (and memcpy/memset) that the profiler saw during `rounds` calls,
divided by `rounds`; GB/s = bytes / time; "of copy" = that over the copy's GB/s. On --device cpu the "kernels" are
the top-level profiler events (wall time of each op on the CPU), which exercises everything but the GPU numbers.
The JSON is rewritten after every measurement, so a run cut short by its time limit keeps what it measured.
"""
import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BINS = (1, 2, 3, 6)
TARGETS = {"pool": ("of_copy", 0.75), "upsample": ("of_copy", 0.75), "ppm_forward": ("of_copy", 1 / 1.3),
           "head_epilogue": ("of_copy", 0.60)}


def esize(dtype):
    return torch.empty((), dtype=dtype).element_size()


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def profile(fn, rounds, device):
    """{kernel name: microseconds per call}, the total per call, over `rounds` calls after two warm-up calls."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    for _ in range(2):
        fn()
    sync(device)
    acts = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with tprofile(activities=acts) as prof:
        for _ in range(rounds):
            fn()
        sync(device)
    per = {}
    for e in prof.events():
        if device == "cuda":
            if str(getattr(e, "device_type", "")).split(".")[-1] != "CUDA":
                continue
        elif e.cpu_parent is not None:
            continue
        dur = e.time_range.elapsed_us()
        per[e.name] = per.get(e.name, 0.0) + dur / rounds
    return per, sum(per.values())


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def short(name, n=70):
    return name if len(name) <= n else name[: n - 3] + "..."


class Recorder:
    def __init__(self, path, meta):
        self.path, self.doc = path, {"meta": meta, "rows": []}

    def add(self, row):
        self.doc["rows"].append(row)
        if self.path:
            tmp = self.path + ".part"
            with open(tmp, "w") as f:
                json.dump(self.doc, f, indent=1)
            os.replace(tmp, self.path)


def op_set_for(device):
    """The fused ops of the backend (pspnet_fast.ops.op_set) and whether ppm_forward is the backend's own op."""
    from pspnet_fast import ops as pops

    ks = pops.op_set(device)
    return ks, getattr(ks, "ppm_forward", None) is not None


TIMES = {}  # case tag -> {op: us}, for the ratios


def run_case(shape, dtype, layout, device, rounds, rec, head_o, phase="fused"):
    """phase "fused": every op of the table but torch.compile; "compile": the compiled reference alone (run after
    every case's fused phase, so that compile time cannot crowd out the kernels' figures)."""
    from pspnet_fast import ops as pops
    from pspnet_fast.reference import PyramidPooling as RefPPM

    n, c, h, w = shape
    L, R = len(BINS), c // 4
    S = sum(b * b for b in BINS)
    mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=mf)
    weight = (torch.randn(L, R, c, generator=g) / c ** 0.5).to(device=device, dtype=acc)
    scale = (torch.rand(L, R, generator=g) + 0.5).to(device=device, dtype=acc)
    shift = torch.randn(L, R, generator=g).to(device=device, dtype=acc)
    ks, own_forward = op_set_for(device)
    bins = list(BINS)
    pooled = ks.pyramid_pool(x, bins)
    levels = ks.ppm_reduce(pooled, weight, scale, shift, bins, True)
    out = ks.upsample_concat(x, levels, bins, True)
    g_out = torch.randn(out.shape, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=mf)
    g_pooled = torch.randn(pooled.shape, generator=g).to(device=device, dtype=pooled.dtype)
    O = head_o
    z = torch.randn(n, O, h, w, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=mf)
    q = torch.randn(n, O, 9, S, generator=g).to(device=device, dtype=acc)
    hs = (torch.rand(O, generator=g) + 0.5).to(device=device, dtype=acc)
    hb = torch.randn(O, generator=g).to(device=device, dtype=acc)
    gz = torch.randn(z.shape, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=mf)
    gq = pops_head_ctx(ks, gz)
    xb, ob, es = nbytes(x), nbytes(out), esize(dtype)
    level_ch = n * L * R * h * w * es
    y = torch.empty_like(x)
    cases = [
        ("copy", lambda: y.copy_(x), 2 * xb),
        ("pool", lambda: ks.pyramid_pool(x, bins), xb + nbytes(pooled)),
        ("reduce", lambda: ks.ppm_reduce(pooled, weight, scale, shift, bins, True),
         nbytes(pooled, weight, scale, shift, levels)),
        ("upsample", lambda: ks.upsample_concat(x, levels, bins, True), xb + nbytes(levels) + ob),
        ("ppm_forward", lambda: pops.ppm_forward(ks, x, weight, scale, shift, bins, True, True),
         xb + ob + nbytes(weight, scale, shift)),
        ("upsample_bwd", lambda: ks.upsample_concat_backward(g_out, c, bins, True), level_ch + nbytes(levels)),
        ("pool_bwd", lambda: ks.pyramid_pool_backward(g_pooled, g_out, bins, 0), 2 * xb + nbytes(g_pooled)),
    ]
    if getattr(ks, "head_epilogue", None) is not None:
        cases.append(("head_epilogue", lambda: ks.head_epilogue(z, q, bins, True, hs, hb, True),
                      2 * nbytes(z) + nbytes(q, hs, hb)))
    if gq is not None:
        cases.append(("head_ctx_bwd", lambda: ks.head_context_backward(gz, bins, True), nbytes(gz) + nbytes(gq)))
    torch.manual_seed(0)
    ref = RefPPM(c).eval().to(device=device, dtype=dtype)
    if layout == "channels_last":
        ref = ref.to(memory_format=torch.channels_last)

    def eager():
        with torch.no_grad():
            return ref(x)

    cases.append(("ref_eager", eager, xb + ob))
    compiled = None
    if phase == "compile":
        compiled = torch.compile(ref)

        def comp():
            with torch.no_grad():
                return compiled(x)

        cases = [cases[0], ("ref_compile", comp, xb + ob)]  # the copy again: this phase's own bandwidth probe
    tag = f"{'x'.join(map(str, shape))} {str(dtype)[6:]} {layout}"
    copy_bw = None
    times = TIMES.setdefault(tag, {})
    for name, fn, by in cases:
        t0 = time.time()
        try:
            if name == "ref_compile":
                with torch.no_grad():
                    compiled(x)  # compile outside the timed rounds
            per, tot = profile(fn, rounds, device)
        except Exception as e:  # a missing op or a failing kernel is a result too
            print(f"{tag:28s} {name:14s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
            rec.add({"case": tag, "op": name, "error": f"{type(e).__name__}: {e}"[:2000]})
            continue
        gbs = by / tot / 1e3 if tot > 0 else 0.0
        if name == "copy":
            copy_bw = gbs
        frac = gbs / copy_bw if copy_bw else None
        if name != "copy" or "copy" not in times:
            times[name] = tot
        row = {"case": tag, "shape": list(shape), "dtype": str(dtype)[6:], "layout": layout, "op": name,
               "us": round(tot, 2), "bytes": by, "GBps": round(gbs, 1),
               "of_copy": None if frac is None else round(frac, 3),
               "kernels": {short(k, 200): round(v, 2) for k, v in sorted(per.items(), key=lambda kv: -kv[1])},
               "wall_s": round(time.time() - t0, 1)}
        if name == "ppm_forward":
            row["read_once_op"] = own_forward
        if name in TARGETS and frac is not None:
            key, want = TARGETS[name]
            row["target"] = f"{key} >= {want:.2f}"
            row["target_met"] = frac >= want
        rec.add(row)
        ks_txt = "; ".join(f"{short(k, 48)} {v:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:3])
        print(f"{tag:28s} {name:14s} {tot:10.1f} us {by / 1e6:9.1f} MB {gbs:8.1f} GB/s"
              f" {'' if frac is None else f'{100 * frac:5.1f}% of copy'}  [{ks_txt}]", flush=True)
    # Ratios of item 7: the fused eval forward against eager, compile and the read-X-once + write-once floor.
    if "ppm_forward" in times and copy_bw and (phase == "fused" or "ref_compile" in times):
        f = times["ppm_forward"]
        floor_us = (xb + ob) / copy_bw / 1e3
        ratios = {"case": tag, "op": "ratios", "phase": phase, "floor_us": round(floor_us, 2),
                  "forward_over_floor": round(f / floor_us, 3), "target_forward_over_floor": "<= 1.3"}
        if "ref_eager" in times:
            ratios["eager_over_forward"] = round(times["ref_eager"] / f, 3)
            ratios["target_eager_over_forward"] = ">= 3"
        if "ref_compile" in times:
            ratios["compile_over_forward"] = round(times["ref_compile"] / f, 3)
            ratios["target_compile_over_forward"] = ">= 1.5"
        rec.add(ratios)
        print(f"{tag:28s} ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()
                                                 if k not in ("case", "op") and not k.startswith("target")),
              flush=True)


def pops_head_ctx(ks, gz):
    fn = getattr(ks, "head_context_backward", None)
    if fn is None:
        return None
    try:
        return fn(gz, list(BINS), True)
    except Exception:
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shape", action="append", help="N,C,H,W (repeat); default 8,2048,90,90 and 8,2048,64,128")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layout", action="append", choices=["nchw", "channels_last"], help="default both")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--head-channels", type=int, default=512, help="O of the head ops (PSPNet's bottleneck: 512)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --device cpu for a dry run)")
    from pspnet_fast import _ext

    if not _ext.load():
        sys.exit(f"pspnet_fast._C not loaded: {_ext.error()}")
    dtype = getattr(torch, a.dtype)
    shapes = [tuple(int(v) for v in s.split(",")) for s in (a.shape or ["8,2048,90,90", "8,2048,64,128"])]
    meta = {"torch": torch.__version__, "python": platform.python_version(), "device": a.device,
            "gpu": torch.cuda.get_device_name() if a.device == "cuda" else platform.processor(),
            "build_info": list(torch.ops.pspnet_fast.build_info()), "rounds": a.rounds,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "targets": {k: f"{v[0]} >= {v[1]:.2f}"
                                                                    for k, v in TARGETS.items()}}
    print(json.dumps(meta), flush=True)
    rec = Recorder(a.json, meta)
    layouts = a.layout or ["nchw", "channels_last"]
    for phase in ["fused"] + ([] if a.no_compile else ["compile"]):
        for shape in shapes:
            for layout in layouts:
                run_case(shape, dtype, layout, a.device, a.rounds, rec, a.head_channels, phase)
    return 0


if __name__ == "__main__":
    sys.exit(main())
