# Tests of the emulated CUDA forward ops (pyramid_pool, ppm_reduce, upsample_concat) against PyTorch references in
# float64 and against the repository's CPU kernels. Run after make_emu.py + build.py; --quick: a subset of the cases.
import itertools, math, os, random, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from emu_common import QUICK, load_cpu_ops, load_emu
E = load_emu()
CPU = load_cpu_ops()  # pspnet_fast._C's CPU kernels: a second reference

def offs(bins):
    o, r = 0, []
    for b in bins:
        r.append(o); o += b * b
    return r, o

def ref_pool(x, bins):
    xd = x.double()
    outs = [F.adaptive_avg_pool2d(xd, b).flatten(2) for b in bins]
    return torch.cat(outs, 2)

fails = 0
def check(name, got, want, rtol, atol):
    global fails
    ok = got.shape == want.shape and torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol, equal_nan=True)
    if not ok:
        fails += 1
        d = (got.double() - want.double()).abs()
        print("FAIL", name, tuple(got.shape), tuple(want.shape), "maxdiff", d.nan_to_num(1e9).max().item() if got.shape == want.shape else None)
    return ok

def make_x(N, C, H, W, dtype, layout):
    x = torch.randn(N, C, H, W, dtype=torch.float64).to(dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(N, C, H, W * 2, dtype=torch.float64).to(dtype)[..., ::2]
    elif layout == "offset":  # misaligned storage offset
        x = torch.randn(N * C * H * W + 1, dtype=torch.float64).to(dtype)[1:].view(N, C, H, W)
    return x

tol = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-13), torch.float16: (1e-5, 1e-6), torch.bfloat16: (1e-5, 1e-6)}

def test_pool(N, C, H, W, bins, dtype, layout):
    global fails
    x = make_x(N, C, H, W, dtype, layout)
    got = E.pyramid_pool(x, bins)
    want = ref_pool(x, bins)
    exp_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == exp_dtype, got.dtype
    r, a = tol[dtype]
    check(f"pool {N,C,H,W} {bins} {dtype} {layout}", got, want, r, a)
    got2 = E.pyramid_pool(x, bins)
    if not torch.equal(got, got2):
        fails += 1  # counted, so that the exit status shows it
        print("NONDETERMINISTIC pool", N, C, H, W, bins)

t0 = time.time()
shapes = [(1, 3, 1, 1), (2, 5, 7, 9), (1, 4, 64, 64), (1, 3, 97, 97), (2, 3, 2, 3), (1, 2, 60, 90), (1, 1, 100, 64),
          (1, 2, 13, 1), (1, 2, 1, 17)]
binsets = [(1, 2, 3, 6), (1,), (6, 3, 2, 1), (5, 8), (1, 2, 4, 8, 16)]
if QUICK:  # one degenerate, one odd-sized and one tall shape; the standard bins and a non-dividing pair
    shapes = [(1, 3, 1, 1), (2, 5, 7, 9), (1, 2, 60, 90)]
    binsets = [(1, 2, 3, 6), (5, 8)]
for (N, C, H, W) in shapes:
    for bins in binsets:
        for dtype in [torch.float32, torch.float64, torch.float16, torch.bfloat16]:
            for layout in ["nchw", "cl", "strided", "offset"]:
                if dtype in (torch.float16, torch.bfloat16) and bins != (1, 2, 3, 6):
                    continue
                if layout in ("strided", "offset") and dtype != torch.float32:
                    continue
                test_pool(N, C, H, W, bins, dtype, layout)
print("pool basic done", time.time() - t0, "fails", fails)
# column tiling, several row tiles, several planes per block, many channels in CL
test_pool(1, 1, 2, 5000, (1, 2, 3, 6), torch.float32, "nchw")
test_pool(2, 600, 3, 3, (1, 2, 3, 6), torch.float32, "nchw")
test_pool(2, 37, 5, 6, (1, 2, 3, 6), torch.float16, "cl")
test_pool(1, 3, 40, 40, (7, 11, 13), torch.float32, "cl")   # many natural segments
if not QUICK:
    test_pool(1, 1, 3, 2100, (1, 3, 7), torch.float64, "nchw")
    test_pool(1, 1, 2, 9000, (2, 5), torch.float16, "nchw")
    test_pool(1, 2, 150, 70, (1, 2, 3, 6), torch.float32, "nchw")
    test_pool(1, 1100, 2, 2, (1, 2), torch.float64, "nchw")
    test_pool(1, 40, 9, 11, (1, 2, 3, 6), torch.float32, "cl")
    test_pool(1, 9, 130, 40, (1, 2, 3, 6), torch.float64, "cl")
    test_pool(1, 3, 40, 40, (7, 11, 13), torch.float32, "nchw")
print("pool big done", time.time() - t0, "fails", fails)

# NaN propagation in pooling
x = torch.randn(1, 2, 8, 8); x[0, 0, 3, 4] = float("nan")
for xx in (x, x.contiguous(memory_format=torch.channels_last)):
    g = E.pyramid_pool(xx, [1, 2, 3, 6]); w = ref_pool(xx, [1, 2, 3, 6])
    check("pool nan", g, w, 1e-5, 1e-6)

# ---------------- ppm_reduce
def ref_reduce(pooled, weight, scale, shift, bins, relu):
    o, S = offs(bins)
    out = torch.empty(pooled.shape[0], weight.shape[1], S, dtype=torch.float64)
    for l, b in enumerate(bins):
        seg = pooled.double()[:, :, o[l]:o[l] + b * b]
        v = torch.einsum("rc,nck->nrk", weight[l].double(), seg)
        if scale is not None:
            v = v * scale[l].double()[None, :, None] + shift[l].double()[None, :, None]
        if relu:
            v = torch.relu(v)
        out[:, :, o[l]:o[l] + b * b] = v
    return out

def test_reduce(N, C, R, bins, dtype, affine, relu):
    _, S = offs(bins)
    pooled = torch.randn(N, C, S, dtype=dtype)
    weight = torch.randn(len(bins), R, C, dtype=dtype) / math.sqrt(max(C, 1))
    scale = torch.randn(len(bins), R, dtype=dtype) if affine else None
    shift = torch.randn(len(bins), R, dtype=dtype) if affine else None
    got = E.ppm_reduce(pooled, weight, scale, shift, bins, relu)
    want = ref_reduce(pooled, weight, scale, shift, bins, relu)
    assert got.dtype == dtype
    r, a = (1e-5, 1e-5) if dtype == torch.float32 else (1e-12, 1e-12)
    check(f"reduce {N,C,R} {bins} {dtype} {affine} {relu}", got, want, r, a)
    cpu = CPU.ppm_reduce(pooled, weight, scale, shift, bins, relu)
    check(f"reduce-vs-cpu {N,C,R} {bins} {dtype}", got, cpu, r, a)

for (N, C, R) in [(2, 7, 5), (3, 130, 33)] if QUICK else [(1, 1, 1), (2, 7, 5), (3, 130, 33), (2, 64, 64), (1, 300, 70), (5, 33, 31)]:
    for bins in [(1, 2, 3, 6), (7, 2)] if QUICK else [(1, 2, 3, 6), (1,), (7, 2)]:
        for dtype in [torch.float32, torch.float64]:
            for affine, relu in [(False, False), (True, True)]:
                test_reduce(N, C, R, bins, dtype, affine, relu)
pooled = torch.randn(2, 10, 50); pooled[1, 3, 7] = float("nan")
w = torch.randn(4, 3, 10)
g = E.ppm_reduce(pooled, w, None, None, [1, 2, 3, 6], True)
check("reduce nan", g, ref_reduce(pooled, w, None, None, [1, 2, 3, 6], True), 1e-5, 1e-5)
print("reduce done", time.time() - t0, "fails", fails)

# ---------------- upsample_concat
def ref_up(x, levels, bins, align):
    o, S = offs(bins)
    N, C, H, W = x.shape
    R = levels.shape[1]
    parts = [x]
    for l, b in enumerate(bins):
        m = levels[:, :, o[l]:o[l] + b * b].reshape(N, R, b, b)
        parts.append(F.interpolate(m, size=(H, W), mode="bilinear", align_corners=align).to(x.dtype))
    return torch.cat(parts, 1)

def test_up(N, C, H, W, R, bins, dtype, layout, align, ldtype=None):
    x = make_x(N, C, H, W, dtype, layout)
    _, S = offs(bins)
    ldtype = ldtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    levels = torch.randn(N, R, S, dtype=ldtype)
    got = E.upsample_concat(x, levels, bins, align)
    cpu = CPU.upsample_concat(x, levels, bins, align)
    want_cl = (layout == "cl") and not x.is_contiguous()
    assert got.is_contiguous(memory_format=torch.channels_last) if want_cl else got.is_contiguous(), "memory format"
    assert got.dtype == dtype
    name = f"up {N,C,H,W,R} {bins} {dtype} {layout} {align} {ldtype}"
    # vs the CPU backend: same math, expect (near) bit equality
    ok = check(name + " vs cpu", got, cpu, 2e-6 if dtype == torch.float32 else (1e-14 if dtype == torch.float64 else 1e-2), 1e-6 if dtype != torch.float64 else 1e-14)
    if ok and not torch.equal(got, cpu):
        d = (got.double() - cpu.double()).abs().max().item()
        print("  (not bit-equal to cpu)", name, d)
    want = ref_up(x.double(), levels.double(), bins, align)
    r, a = (1e-5, 1e-5) if dtype == torch.float32 else ((1e-12, 1e-12) if dtype == torch.float64 else (1e-2, 1e-2))
    check(name + " vs ref", got, want, r, a)

up_shapes = [(1, 3, 1, 1), (2, 5, 7, 9), (1, 4, 8, 8), (1, 8, 6, 12), (2, 3, 13, 5), (1, 16, 3, 3)]
up_bins, up_Rs = [(1, 2, 3, 6), (1,), (7, 2)], [1, 3, 40]
if QUICK:  # an odd-sized batch of 2 and a wide shape (the only one that reaches R = 40, several channel chunks)
    up_shapes, up_bins, up_Rs = [(2, 5, 7, 9), (1, 8, 6, 12)], [(1, 2, 3, 6), (7, 2)], [3, 40]
for (N, C, H, W) in up_shapes:
    for bins in up_bins:
        for R in up_Rs:
            for dtype in [torch.float32, torch.float64, torch.float16, torch.bfloat16]:
                for layout in ["nchw", "cl", "strided", "offset"]:
                    if layout in ("strided", "offset") and dtype != torch.float32:
                        continue
                    if R == 40 and (dtype != torch.float32 or N * H > 8):
                        continue
                    for align in [False, True]:
                        test_up(N, C, H, W, R, bins, dtype, layout, align)
test_up(1, 8, 6, 8, 3, (1, 2, 3, 6), torch.float32, "cl", True, torch.float64)
test_up(1, 8, 6, 8, 3, (1, 2, 3, 6), torch.float64, "nchw", False, torch.float32)
test_up(1, 4, 3, 5, 2, (70, 3), torch.float32, "cl", False)   # b > stage limit: direct gathers
test_up(1, 4, 3, 5, 2, (70, 3), torch.float32, "nchw", True)
# x_last ([levels..., x], segmentation_models_pytorch's order): the x-first result rotated, and the CPU kernels'.
# Vectorized channels_last copies (C, L*R, Ctot multiples of the vector width) and scalar ones; NCHW.
for (N, C, H, W, R, bins, dtype) in [(2, 8, 6, 8, 2, (1, 2, 3, 6), torch.float32),
                                     (1, 5, 7, 9, 3, (1, 2), torch.float32), (1, 8, 5, 4, 2, (1, 2, 3, 6), torch.float16),
                                     (2, 3, 4, 6, 2, (2, 3), torch.float64)]:
    for layout in ["nchw", "cl"]:
        x = make_x(N, C, H, W, dtype, layout)
        lv = torch.randn(N, R, offs(bins)[1], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        for align in [False, True]:
            g = E.upsample_concat(x, lv, bins, align, True)
            first = E.upsample_concat(x, lv, bins, align)
            name = f"up x_last {N,C,H,W,R} {bins} {dtype} {layout} {align}"
            check(name + " vs rotated", g, torch.cat([first[:, C:], first[:, :C]], 1), 0, 0)
            r = 1e-14 if dtype == torch.float64 else (2e-6 if dtype == torch.float32 else 1e-2)
            check(name + " vs cpu", g, CPU.upsample_concat(x, lv, bins, align, True), r, r)
            assert g.is_contiguous(memory_format=torch.channels_last) if layout == "cl" else g.is_contiguous(), name
# NaN in a level map
x = torch.randn(1, 2, 6, 6); lv = torch.randn(1, 3, 50); lv[0, 1, 14] = float("nan")
for xx in (x, x.contiguous(memory_format=torch.channels_last)):
    g = E.upsample_concat(xx, lv, [1, 2, 3, 6], True)
    c = CPU.upsample_concat(xx, lv, [1, 2, 3, 6], True)
    check("up nan", g, c, 1e-6, 1e-6)
    assert torch.equal(g.isnan(), c.isnan()), "nan pattern"
# N = 0
assert E.pyramid_pool(torch.randn(0, 3, 4, 4), [1, 2]).shape == (0, 3, 5)
assert E.upsample_concat(torch.randn(0, 3, 4, 4), torch.randn(0, 2, 5), [1, 2], False).shape == (0, 7, 4, 4)
assert E.ppm_reduce(torch.randn(0, 3, 5), torch.randn(2, 4, 3), None, None, [1, 2], False).shape == (0, 4, 5)
print("all done", time.time() - t0, "fails", fails, "stats", E.emu_stats())
sys.exit(1 if fails else 0)
