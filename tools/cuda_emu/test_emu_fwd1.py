# Tests of the emulated read-once forward (ppm_forward: the pooling pass that also copies x, cuBLAS-path reduce,
# levels-only upsampling) and of the 16-byte paths with peeled heads and tails (upsample_concat's tabled NCHW kernel,
# the x copy at every alignment, 90x90 planes whose H*W is not a multiple of 8), against PyTorch in float64 and
# against the composition upsample_concat(x, ppm_reduce(pyramid_pool(x))) of the same emulated ops, which ppm_forward
# must equal bit for bit. Run after make_emu.py + build.py; --quick: a subset of the cases.
import math, os, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from emu_common import QUICK, load_emu
E = load_emu()

def offs(bins):
    o, r = 0, []
    for b in bins:
        r.append(o); o += b * b
    return r, o

fails = 0
cases = 0
def check(name, got, want, rtol, atol):
    global fails
    ok = got.shape == want.shape and torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol, equal_nan=True)
    if not ok:
        fails += 1
        d = (got.double() - want.double()).abs() if got.shape == want.shape else None
        print("FAIL", name, tuple(got.shape), tuple(want.shape), "maxdiff",
              None if d is None else d.nan_to_num(1e9).max().item())
    return ok

def same(name, got, want, strides=True):
    global fails
    ok = got.shape == want.shape and got.dtype == want.dtype and torch.equal(got.isnan(), want.isnan()) \
        and torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0)) and (not strides or got.stride() == want.stride())
    if not ok:
        fails += 1
        print("NOT BIT-EQUAL", name, got.shape, want.shape, got.stride(), want.stride())
    return ok

def make_x(N, C, H, W, dtype, layout):
    x = torch.randn(N, C, H, W, dtype=torch.float64).to(dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(N, C, H, W * 2, dtype=torch.float64).to(dtype)[..., ::2]
    elif layout.startswith("offset"):  # storage offset of k elements: every alignment of x's first element
        k = int(layout[6:] or 1)
        x = torch.randn(N * C * H * W + k, dtype=torch.float64).to(dtype)[k:].view(N, C, H, W)
    return x

# Tolerances against the float64 reference, per output dtype (the output is rounded once to it).
TOL = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-11, 1e-11), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (1.6e-2, 1.6e-2)}

def ref_forward(x, weight, scale, shift, bins, relu, align, x_last):
    xd = x.double()
    N, C, H, W = x.shape
    parts = []
    for l, b in enumerate(bins):
        v = torch.einsum("rc,nchw->nrhw", weight[l].double(), F.adaptive_avg_pool2d(xd, b))
        if scale is not None:
            v = v * scale[l].double()[None, :, None, None] + shift[l].double()[None, :, None, None]
        if relu:
            v = torch.relu(v)
        parts.append(F.interpolate(v, size=(H, W), mode="bilinear", align_corners=align))
    return torch.cat(parts + [xd] if x_last else [xd] + parts, 1)

def test_forward(N, C, H, W, R, bins, dtype, layout, align, x_last, affine=True, relu=True):
    global cases
    cases += 1
    x = make_x(N, C, H, W, dtype, layout)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    L = len(bins)
    weight = torch.randn(L, R, C, dtype=pdt) / math.sqrt(C)
    scale = torch.rand(L, R, dtype=pdt) + 0.5 if affine else None
    shift = torch.randn(L, R, dtype=pdt) * 0.1 if affine else None
    got = E.ppm_forward(x, weight, scale, shift, bins, relu, align, x_last)
    comp = E.upsample_concat(x, E.ppm_reduce(E.pyramid_pool(x, bins), weight, scale, shift, bins, relu), bins, align,
                             x_last)
    name = f"fwd {N,C,H,W,R} {bins} {dtype} {layout} align={align} x_last={x_last} affine={affine} relu={relu}"
    same(name + " vs composition", got, comp)
    cl = layout == "cl" and not x.is_contiguous()
    if not (got.is_contiguous(memory_format=torch.channels_last) if cl else got.is_contiguous()):
        print("FAIL memory format", name); globals()["fails"] += 1
    r, a = TOL[dtype]
    check(name + " vs ref", got, ref_forward(x, weight, scale, shift, bins, relu, align, x_last).to(dtype), r, a)
    # The x channels are x itself, bit for bit.
    xs = got[:, L * R:] if x_last else got[:, :C]
    same(name + " x channels", xs, x, strides=False)

def test_up(N, C, H, W, R, bins, dtype, layout, align, x_last=False):
    global cases
    cases += 1
    x = make_x(N, C, H, W, dtype, layout)
    _, S = offs(bins)
    levels = torch.randn(N, R, S, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    got = E.upsample_concat(x, levels, bins, align, x_last)
    o, _ = offs(bins)
    parts = []
    for l, b in enumerate(bins):
        m = levels.double()[:, :, o[l]:o[l] + b * b].reshape(N, R, b, b)
        parts.append(F.interpolate(m, size=(H, W), mode="bilinear", align_corners=align))
    want = torch.cat(parts + [x.double()] if x_last else [x.double()] + parts, 1).to(dtype)
    r, a = TOL[dtype]
    name = f"up {N,C,H,W,R} {bins} {dtype} {layout} align={align} x_last={x_last}"
    check(name, got, want, r, a)
    xs = got[:, len(bins) * R:] if x_last else got[:, :C]
    same(name + " x channels", xs, x, strides=False)

t0 = time.time()
B = (1, 2, 3, 6)
ALL = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# 90x90 bfloat16 at small C (8100-element planes: every plane starts at a different alignment, head and tail peeled),
# odd C and R (level and x runs whose starts drift in alignment), both orders, both layouts.
for C in [3, 5, 16]:
    for layout in ["nchw", "cl"]:
        test_forward(1 if QUICK else 2, C, 90, 90, 3 if C != 16 else 8, B, torch.bfloat16, layout, False, C == 5)
        if not QUICK:
            test_up(2, C, 90, 90, 3, B, torch.bfloat16, layout, True, C == 3)
print("90x90 done", round(time.time() - t0), "cases", cases, "fails", fails, flush=True)
# Shapes that break naive kernels: 1x1, H or W smaller than the bins, sizes bins don't divide, non-square, W < 8
# (a vector wraps several rows), N = 1 and 2; every dtype; NCHW, channels_last, strided and misaligned views.
shapes = [(1, 3, 1, 1), (2, 5, 7, 9), (1, 4, 2, 3), (1, 6, 13, 5), (2, 7, 4, 17)]
Rs = [1, 3, 8]
layouts = ["nchw", "cl", "strided", "offset1", "offset3"]
if QUICK:  # a 1x1 map and an odd-sized batch of 2; R = 3 (level runs drift in alignment, x last)
    shapes, Rs, layouts = [(1, 3, 1, 1), (2, 5, 7, 9)], [3], ["nchw", "cl", "offset3"]
for (N, C, H, W) in shapes:
    for R in Rs:
        for dtype in ALL:
            for layout in layouts:
                if layout not in ("nchw", "cl") and dtype not in (torch.float32, torch.bfloat16):
                    continue
                align, x_last = (R + C) % 2 == 0, R == 3
                test_forward(N, C, H, W, R, B, dtype, layout, align, x_last, affine=R != 1, relu=R != 8)
                if not QUICK or dtype == torch.bfloat16:
                    test_up(N, C, H, W, R, B, dtype, layout, not align, not x_last)
print("shapes done", round(time.time() - t0), "cases", cases, "fails", fails, flush=True)
# Other bins: non-dividing, a level bigger than the map, one level; several planes per pooling block (small planes,
# many channels) with planes of two images in one block; a chunked level plane (H*W > one block's chunk).
test_forward(2, 300, 3, 3, 3, B, torch.bfloat16, "offset3", False, True)
test_up(1, 2, 130, 130, 1, (1, 3), torch.bfloat16, "offset1", False)
test_forward(1, 16, 6, 7, 8, B, torch.float16, "cl", True, True)   # channels_last, 16-byte level stores
if not QUICK:
    test_forward(2, 600, 3, 3, 2, B, torch.float32, "nchw", True, False)
    test_forward(1, 3, 9, 7, 4, (5, 8), torch.float16, "nchw", False, False)
    test_forward(1, 3, 9, 7, 2, (2,), torch.float32, "cl", True, True)
    test_forward(1, 2, 130, 130, 1, (1, 3), torch.bfloat16, "nchw", True, False)
    test_up(1, 2, 1, 20000, 1, (2,), torch.float32, "nchw", True)   # W too wide for the tables: generic kernel
    test_forward(1, 2, 1, 20000, 1, (2,), torch.float32, "nchw", True, True)
    test_up(1, 3, 5, 6, 2, (70, 3), torch.float32, "nchw", True)     # b * W table over the limit: generic kernel
    test_forward(2, 3, 5, 6, 2, (70, 3), torch.float64, "cl", False, False)
# NaN in x propagates to its pooled levels and is copied.
x = torch.randn(1, 3, 8, 8); x[0, 1, 2, 5] = float("nan")
w = torch.randn(4, 2, 3)
for xx in (x, x.contiguous(memory_format=torch.channels_last)):
    g = E.ppm_forward(xx, w, None, None, B, False, True, False)
    c = E.upsample_concat(xx, E.ppm_reduce(E.pyramid_pool(xx, B), w, None, None, B, False), B, True, False)
    same("fwd nan", g, c)
# N = 0 (the weight still checked), and errors.
out0 = E.ppm_forward(torch.randn(0, 3, 4, 4), torch.randn(2, 4, 3), None, None, [1, 2], True, False, False)
assert out0.shape == (0, 11, 4, 4), out0.shape
for bad, msg in [((torch.randn(1, 3, 4, 4), torch.randn(2, 4, 5)), "weight must be of shape"),
                 ((torch.randn(1, 3, 4, 4), torch.randn(2, 4, 3, dtype=torch.float64)), "weight must be torch.float32"),
                 ((torch.randn(1, 3, 4, 4), torch.randn(4, 3)), "weight must be of shape")]:
    try:
        E.ppm_forward(*bad, None, None, [1, 2], True, False, False)
        print("FAIL no error for", msg); fails += 1
    except (RuntimeError, ValueError, TypeError) as e:  # the shared checker raises ValueError/TypeError
        if msg not in str(e):
            print("FAIL wrong error", e); fails += 1
print("fwd1 done", round(time.time() - t0), "s, cases", cases, "fails", fails, "stats", E.emu_stats())
sys.exit(1 if fails else 0)
