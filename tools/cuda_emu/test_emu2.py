# Edge cases of the emulated forward ops: opt-in shared memory above 48 KiB, the clear errors for too many segments or
# levels, larger channels_last pools, upsample stride loops, ppm_reduce with several K rounds. Already small (about
# 10 s), so quick mode runs all of it.
import os, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from emu_common import load_cpu_ops, load_emu
E = load_emu()
CPU = load_cpu_ops()
def ref(x, bins): return torch.cat([F.adaptive_avg_pool2d(x.double(), b).flatten(2) for b in bins], 2)
fails = 0
def chk(name, g, w, r, a):
    global fails
    ok = torch.allclose(g.double(), w.double(), rtol=r, atol=a, equal_nan=True)
    if not ok:
        fails += 1; print("FAIL", name, (g.double() - w.double()).abs().max().item())
t0 = time.time()
# opt-in shared memory: many segments
for cl in [False, True]:
    for dt in [torch.float32, torch.float64]:
        x = torch.randn(1, 3, 100, 100, dtype=dt)
        if cl: x = x.contiguous(memory_format=torch.channels_last)
        bins = [7, 11, 13, 17, 19]
        g = E.pyramid_pool(x, bins)
        chk(f"optin cl={cl} {dt}", g, ref(x, bins), 1e-5 if dt == torch.float32 else 1e-12, 1e-6 if dt == torch.float32 else 1e-13)
        print("stats", E.emu_stats())
# too many segments -> clear error
try:
    E.pyramid_pool(torch.randn(1, 1, 600, 600), [100, 99, 97])
    print("NO ERROR for too many segments"); fails += 1
except (RuntimeError, ValueError, TypeError) as e:  # the shared checker raises ValueError/TypeError
    print("expected error:", str(e).splitlines()[0][:200])
try:
    E.pyramid_pool(torch.randn(1, 1, 6, 6), list(range(1, 18)))
    print("NO ERROR for too many levels"); fails += 1
except (RuntimeError, ValueError, TypeError) as e:  # the shared checker raises ValueError/TypeError
    print("expected error:", str(e).splitlines()[0][:200])
# bigger CL pool and upsample stride loops
x = torch.randn(2, 20, 45, 33).contiguous(memory_format=torch.channels_last)
chk("cl pool big", E.pyramid_pool(x, [1, 2, 3, 6]), ref(x, [1, 2, 3, 6]), 1e-5, 1e-6)
xh = x.half()
chk("cl pool big half", E.pyramid_pool(xh, [1, 2, 3, 6]), ref(xh, [1, 2, 3, 6]), 1e-5, 1e-6)
for cl in [False, True]:
    for dt in [torch.float32, torch.float16]:
        x = torch.randn(2, 8, 40, 40, dtype=dt)
        if cl: x = x.contiguous(memory_format=torch.channels_last)
        lv = torch.randn(2, 16, 50)
        for al in [False, True]:
            g = E.upsample_concat(x, lv, [1, 2, 3, 6], al); c = CPU.upsample_concat(x, lv, [1, 2, 3, 6], al)
            if not torch.equal(g, c):
                fails += 1; print("FAIL up big", cl, dt, al, (g.double() - c.double()).abs().max().item())
            assert g.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
# reduce with larger C (several K rounds, partial last round) and R not multiple of 32
p = torch.randn(3, 517, 50); w = torch.randn(4, 45, 517) / 20; sc = torch.randn(4, 45); sh = torch.randn(4, 45)
g = E.ppm_reduce(p, w, sc, sh, [1, 2, 3, 6], True); c = CPU.ppm_reduce(p, w, sc, sh, [1, 2, 3, 6], True)
chk("reduce big", g, c, 1e-5, 1e-5)
print("done", time.time() - t0, "fails", fails, E.emu_stats())
sys.exit(1 if fails else 0)
