"""Device check of the CUDA head ops (csrc/cuda/head_cuda.cu) on a machine with a GPU, about a minute:

    python tools/check_head_cuda.py            # after building the extension with CUDA

1. correctness: torch.ops.pspnet_fast.head_epilogue / head_context_backward on CUDA against pspnet_fast.reference in
   float64 on the CPU, over small shapes (bins, sizes, align_corners, scale/shift, relu, dtypes, layouts, NaN in z);
2. determinism: head_context_backward bitwise equal over repeated runs at the benchmark shape;
3. timing at N=8, O=512, 90x90 and 64x128, bins (1, 2, 3, 6), bfloat16, NCHW and channels_last: median of CUDA-event
   timings with the bytes each op must move and the resulting GB/s, next to the reference on the same GPU (about 20 s
   in all: gpu_check.sh gives this script 45 s).
Exit status 1 when a comparison fails.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pspnet_fast import _ext, reference as ref  # noqa: E402

if not torch.cuda.is_available():
    sys.exit("no CUDA device")
if not _ext.load():
    sys.exit(f"pspnet_fast._C not loaded: {_ext.error()}")
ops = torch.ops.pspnet_fast
print("build_info:", ops.build_info(), "device:", torch.cuda.get_device_name())
dev = "cuda"
fails = 0
TOL = {torch.float32: (2e-5, 1e-4), torch.float64: (1e-12, 1e-12), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (1.6e-2, 1.6e-2)}


def check(bins, H, W, align, N, O, dtype, cl, affine, relu, nan=False, misaligned=False):
    global fails
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    S = sum(b * b for b in bins)
    z = torch.randn(N, O, H, W).to(dtype)
    if nan:
        z.view(-1)[::7] = float("nan")
    q = torch.randn(N, O, 9, S, dtype=acc)
    sc = torch.rand(O, dtype=acc) + 0.5 if affine else None
    sh = torch.randn(O, dtype=acc) if affine else None
    mf = torch.channels_last if cl else torch.contiguous_format
    zd = z.to(dev).contiguous(memory_format=mf)
    if misaligned:  # one element past a 16-byte boundary: the kernels' unaligned paths
        flat = torch.empty(zd.numel() + 1, device=dev, dtype=dtype)
        zd = flat[1:].view(zd.shape).copy_(zd)
    got = ops.head_epilogue(zd, q.to(dev), list(bins), align, None if sc is None else sc.to(dev),
                            None if sh is None else sh.to(dev), relu).cpu()
    want = ref.head_epilogue(z.double(), q.double(), bins, align, None if sc is None else sc.double(),
                             None if sh is None else sh.double(), relu).to(dtype)
    rtol, atol = TOL[dtype]
    ok = torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol, equal_nan=True)
    g = torch.randn(N, O, H, W).to(dtype)
    gq = ops.head_context_backward(g.to(dev).contiguous(memory_format=mf), list(bins), align).cpu()
    want_b = ref.head_context_backward(g.double(), bins, align)
    scale_ = ref.head_context_backward(g.double().abs(), bins, align)
    rtol_b = 1e-12 if dtype == torch.float64 else 2e-5
    ok_b = bool(((gq.double() - want_b).abs() <= rtol_b * (1 + 4 * scale_)).all())
    if not (ok and ok_b):
        fails += 1
        print("FAIL", bins, H, W, align, N, O, dtype, "cl" if cl else "nchw", affine, relu, nan,
              "fwd", ok, "bwd", ok_b, flush=True)


cases = 0
for bins in [(1, 2, 3, 6), (1, 3, 6, 8), (2,), tuple(range(1, 17))]:
    for (H, W) in [(1, 1), (3, 3), (13, 13), (5, 9), (9, 5), (60, 7)]:
        for align in (False, True):
            i = cases
            dtype = [torch.float32, torch.float64, torch.bfloat16, torch.float16][i % 4]
            check(bins, H, W, align, 1 + i % 2, [5, 33, 1, 64][(i // 2) % 4], dtype, (i // 4) % 2 == 1,
                  i % 3 != 1, i % 2 == 0, nan=i % 5 == 0)
            cases += 1
check((1, 2), 2, 70000, True, 1, 1, torch.float32, False, True, True)  # very large W: fallback paths
cases += 1
# Issue 12 shapes at small O: 8100-element planes (every other one 8 bytes off 16), channels_last 16-byte pixel
# runs (O = 16) and not (O = 5), misaligned z, W = 9000.
for H, W, O, cl, mis in [(90, 90, 5, False, False), (90, 90, 16, True, False), (90, 90, 5, True, False),
                         (64, 128, 3, False, True), (90, 90, 7, False, True), (2, 9000, 3, False, False),
                         (1, 9000, 8, True, False)]:
    for dtype in (torch.bfloat16, torch.float32):
        check((1, 2, 3, 6), H, W, True, 2, O, dtype, cl, True, True, misaligned=mis)
        cases += 1
print(f"correctness: {cases} cases, {fails} failures", flush=True)


def bench(fn, reps=50):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    ts.sort()
    return ts[len(ts) // 2], ts[len(ts) // 10], ts[(9 * len(ts)) // 10]


N, O, bins = 8, 512, (1, 2, 3, 6)
S = sum(b * b for b in bins)
for (H, W), cl in [(hw, c) for hw in [(90, 90), (64, 128)] for c in (False, True)]:
    mf = torch.channels_last if cl else torch.contiguous_format
    z = torch.randn(N, O, H, W, device=dev, dtype=torch.bfloat16).contiguous(memory_format=mf)
    q = torch.randn(N, O, 9, S, device=dev)
    sc, sh = torch.rand(O, device=dev), torch.randn(O, device=dev)
    g = torch.randn_like(z)
    gq0 = ops.head_context_backward(g, list(bins), True)
    for _ in range(5):
        if not torch.equal(gq0, ops.head_context_backward(g, list(bins), True)):
            fails += 1
            print("FAIL: head_context_backward not deterministic", "cl" if cl else "nchw")
            break
    by_fwd = 2 * z.numel() * 2 + q.numel() * 4
    by_bwd = g.numel() * 2 + q.numel() * 4
    rows = [
        ("head_epilogue cuda", lambda: ops.head_epilogue(z, q, list(bins), True, sc, sh, True), by_fwd),
        ("head_epilogue reference", lambda: ref.head_epilogue(z, q, bins, True, sc, sh, True), by_fwd),
        ("head_context_backward cuda", lambda: ops.head_context_backward(g, list(bins), True), by_bwd),
        ("head_context_backward reference", lambda: ref.head_context_backward(g, bins, True), by_bwd),
    ]
    for name, fn, by in rows:
        med, lo, hi = bench(fn, 10 if "reference" in name else 50)
        print(f"{H}x{W} {'channels_last' if cl else 'nchw':13s} {name:32s} median {med:9.1f} us  (p10 {lo:.1f}, p90 {hi:.1f})"
              f"  {by / med / 1e3:7.1f} GB/s of {by / 1e6:.1f} MB", flush=True)
print(f"done: {fails} failures")
sys.exit(1 if fails else 0)
