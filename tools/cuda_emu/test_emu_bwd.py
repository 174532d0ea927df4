# Tests of the emulated CUDA backward ops (upsample_concat_backward, pyramid_pool_backward) against PyTorch autograd
# in float64. Run after make_emu.py + build.py; --quick (or PSPNET_FAST_EMU_QUICK=1): a subset of the cases.
import os, sys, time
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from emu_common import QUICK, load_emu

E = load_emu()

fails = 0
ncases = 0


def offs(bins):
    o, r = 0, []
    for b in bins:
        r.append(o)
        o += b * b
    return r, o


def check(name, got, want, rtol, atol):
    global fails
    ok = got.shape == want.shape and torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol,
                                                     equal_nan=True)
    if not ok:
        fails += 1
        d = (got.double() - want.double()).abs().nan_to_num(1e9).max().item() if got.shape == want.shape else None
        print("FAIL", name, tuple(got.shape), tuple(want.shape), "maxdiff", d, flush=True)
    return ok


def layout_of(t, layout):
    if layout == "cl":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # neither layout: the op makes it contiguous
        big = torch.empty(*t.shape[:3], t.shape[3] * 2, dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "offset":  # contiguous but 16-byte misaligned storage
        flat = torch.empty(t.numel() + 1, dtype=t.dtype)
        v = flat[1:].view(t.shape)
        v.copy_(t)
        return v
    if layout == "cl_offset":
        flat = torch.empty(t.numel() + 1, dtype=t.dtype)
        N, C, H, W = t.shape
        v = flat[1:].view(N, H, W, C).permute(0, 3, 1, 2)
        v.copy_(t)
        return v
    return t.contiguous()


def expect_format(name, got, inp):
    global fails
    cl = (not inp.is_contiguous()) and inp.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if cl else torch.contiguous_format
    if not got.is_contiguous(memory_format=fmt):
        fails += 1
        print("FAIL format", name, got.stride(), flush=True)


tol_up = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12), torch.float16: (1e-5, 1e-5),
          torch.bfloat16: (1e-5, 1e-5)}
tol_pool = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12), torch.float16: (1e-3, 1e-3),
            torch.bfloat16: (8e-3, 8e-3)}


# ---------------- upsample_concat_backward
def ref_up_bwd(g, C, bins, align):
    N, Ctot, H, W = g.shape
    L = len(bins)
    R = (Ctot - C) // L
    parts = []
    for l, b in enumerate(bins):
        lv = torch.zeros(N, R, b, b, dtype=torch.float64, requires_grad=True)
        out = F.interpolate(lv, size=(H, W), mode="bilinear", align_corners=align)
        gl = g[:, C + l * R:C + (l + 1) * R].double()
        (gr,) = torch.autograd.grad(out, lv, gl)
        parts.append(gr.reshape(N, R, b * b))
    return torch.cat(parts, 2)


def test_up_bwd(N, C, R, H, W, bins, dtype, layout, align):
    global ncases
    ncases += 1
    Ctot = C + len(bins) * R
    g = layout_of(torch.randn(N, Ctot, H, W, dtype=torch.float64).to(dtype), layout)
    got = E.upsample_concat_backward(g, C, list(bins), align)
    want = ref_up_bwd(g, C, bins, align)
    name = f"up_bwd N={N} C={C} R={R} {H}x{W} {bins} {dtype} {layout} align={align}"
    exp = torch.float64 if dtype == torch.float64 else torch.float32
    if got.dtype != exp or not got.is_contiguous():
        global fails
        fails += 1
        print("FAIL dtype/contiguity", name, got.dtype, got.stride(), flush=True)
    r, a = tol_up[dtype]
    check(name, got, want, r, a)
    got2 = E.upsample_concat_backward(g, C, list(bins), align)
    if not torch.equal(got, got2):
        fails += 1
        print("FAIL nondeterministic", name, flush=True)


# ---------------- pyramid_pool_backward
def ref_pool_bwd(gp, go, bins):
    N, C, S = gp.shape
    H, W = go.shape[2], go.shape[3]
    o, _ = offs(bins)
    want = go[:, :C].double().clone()
    for l, b in enumerate(bins):
        x = torch.zeros(N, C, H, W, dtype=torch.float64, requires_grad=True)
        y = F.adaptive_avg_pool2d(x, b)
        (gx,) = torch.autograd.grad(y, x, gp[:, :, o[l]:o[l] + b * b].double().reshape(N, C, b, b))
        want += gx
    return want


def test_pool_bwd(N, C, extra, H, W, bins, dtype, layout, gp_dtype=None):
    global ncases, fails
    ncases += 1
    _, S = offs(bins)
    gp_dtype = gp_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    gp = torch.randn(N, C, S, dtype=gp_dtype)
    go = layout_of(torch.randn(N, C + extra, H, W, dtype=torch.float64).to(dtype), layout)
    got = E.pyramid_pool_backward(gp, go, list(bins))
    want = ref_pool_bwd(gp, go, bins)
    name = f"pool_bwd N={N} C={C}+{extra} {H}x{W} {bins} {dtype} {layout} gp={gp_dtype}"
    if got.dtype != dtype:
        fails += 1
        print("FAIL dtype", name, got.dtype, flush=True)
    expect_format(name, got, go)
    r, a = tol_pool[dtype]
    check(name, got, want, r, a)
    got2 = E.pyramid_pool_backward(gp, go, list(bins))
    if not torch.equal(got, got2):
        fails += 1
        print("FAIL nondeterministic", name, flush=True)


t0 = time.time()
torch.manual_seed(0)
HWs = [(1, 1), (2, 2), (5, 5), (13, 13), (60, 60), (1, 13), (13, 1), (2, 60), (60, 5), (5, 13), (13, 60)]
binsets = [(1, 2, 3, 6), (1, 3, 6, 8), (6,)]
dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
if QUICK:  # one wide, non-square size that still gets every dtype; the standard bins and a single large bin
    HWs = [(13, 60)]
    binsets = [(1, 2, 3, 6), (6,)]
for (H, W) in HWs:
    for bins in binsets:
        for dtype in dtypes:
            half = dtype in (torch.float16, torch.bfloat16)
            if half and bins != (1, 2, 3, 6) and (H, W) not in [(5, 5), (13, 60), (60, 60)]:
                continue
            for layout in ["nchw", "cl"]:
                big = H * W >= 3600
                N = 1 if big else 3
                aligns = [False, True] if not half else [(H + W) % 2 == 0]
                for align in aligns:
                    test_up_bwd(N, 3, 5 if not big else 3, H, W, bins, dtype, layout, align)
                test_pool_bwd(N, 4, 3, H, W, bins, dtype, layout)
    print(f"grid {H}x{W} done {time.time() - t0:.0f}s cases {ncases} fails {fails}", flush=True)

# N = 0, other layouts (made contiguous), misaligned storage (scalar paths), grad_pooled dtype != acc dtype
for layout in ["nchw", "cl", "strided", "offset", "cl_offset"]:
    test_up_bwd(0, 3, 2, 5, 7, (1, 2, 3, 6), torch.float32, layout, False)
    test_pool_bwd(0, 4, 1, 5, 7, (1, 2, 3, 6), torch.float32, layout)
    for dtype in [torch.float32, torch.float16] if QUICK else [torch.float32, torch.float16, torch.float64]:
        test_up_bwd(2, 3, 4, 8, 12, (1, 2, 3, 6), dtype, layout, True)
        test_pool_bwd(2, 8, 8, 8, 12, (1, 2, 3, 6), dtype, layout)
test_pool_bwd(2, 8, 0, 6, 10, (1, 2, 3, 6), torch.float32, "cl", gp_dtype=torch.float64)
test_pool_bwd(2, 8, 0, 6, 10, (1, 2, 3, 6), torch.float64, "nchw", gp_dtype=torch.float32)
test_pool_bwd(1, 5, 2, 6, 10, (1, 2, 3, 6), torch.bfloat16, "cl")  # C % 8 != 0: scalar channels_last path
print(f"layouts done {time.time() - t0:.0f}s cases {ncases} fails {fails}", flush=True)

# b > H, W: empty bins (no tap reaches them), many pooling bins per pixel
for (H, W) in [(2, 3), (5, 5)] if QUICK else [(1, 1), (2, 3), (5, 5), (3, 7)]:
    for bins in [(16,), (1, 12, 5)] if QUICK else [(16,), (8, 3), (1, 12, 5)]:
        for layout in ["nchw", "cl"]:
            for align in [False, True]:
                test_up_bwd(2, 2, 3, H, W, bins, torch.float32, layout, align)
            test_pool_bwd(2, 3, 2, H, W, bins, torch.float32, layout)
            test_pool_bwd(1, 3, 2, H, W, bins, torch.float64, layout)
print(f"big bins done {time.time() - t0:.0f}s cases {ncases} fails {fails}", flush=True)

# channels_last 16-byte vectors of level channels (C and R multiples of 16 / element size), 90x90 bfloat16 among
# them, an R above one channel chunk, and the misaligned storage that falls back to the scalar kernel
for dtype, C, R in [(torch.bfloat16, 8, 8), (torch.float16, 16, 24), (torch.float32, 4, 12), (torch.float64, 2, 6)]:
    test_up_bwd(1, C, R, 13, 10, (1, 2, 3, 6), dtype, "cl", dtype != torch.float32)
test_up_bwd(1, 8, 8, 90, 90, (1, 2, 3, 6), torch.bfloat16, "cl", False)
test_up_bwd(1, 8, 40, 7, 9, (1, 3), torch.bfloat16, "cl", True)
test_up_bwd(1, 8, 8, 7, 9, (1, 2, 3, 6), torch.bfloat16, "cl_offset", False)
# pyramid_pool_backward's GENERIC kernels: per-element bin ranges (tables too big: W = 3100) and per-use shares (q
# too big: bins (250,)), NCHW and channels_last
test_pool_bwd(1, 1, 0, 1, 3100, (1, 2, 3, 6), torch.float32, "nchw")
test_pool_bwd(1, 8, 0, 1, 3100, (1, 2, 3, 6), torch.float32, "cl")
# (float64: a float32 output element here sums 2500 shares in order, ~1e-4 from the float64 reference)
test_pool_bwd(1, 2, 1, 5, 5, (250,), torch.float64, "nchw")
test_pool_bwd(1, 8, 0, 4, 6, (250,), torch.float16, "cl")
print(f"vec + generic done {time.time() - t0:.0f}s cases {ncases} fails {fails}", flush=True)

if QUICK:  # one case each of several bands with a partial channel chunk, and of opt-in shared memory
    test_up_bwd(1, 3, 40, 60, 5, (1, 3, 6, 8), torch.float32, "cl", False)
    test_pool_bwd(1, 2, 1, 5, 5, (125,), torch.float64, "nchw")
    print(f"quick big done {time.time() - t0:.0f}s cases {ncases} fails {fails} stats {list(E.emu_stats())}", flush=True)
else:
    # NCHW: several bands of rows (phase 2 adds across bands), column tiles (W beyond one tile)
    test_up_bwd(1, 2, 2, 150, 70, (1, 2, 3, 6), torch.float32, "nchw", False)
    test_up_bwd(1, 2, 1, 150, 70, (1, 3, 6, 8), torch.float16, "nchw", True)
    test_up_bwd(1, 1, 1, 3, 5000, (1, 2, 3, 6), torch.float32, "nchw", False)
    test_up_bwd(1, 1, 1, 2, 4500, (2, 7), torch.float64, "nchw", True)
    # channels_last: several bands, R above one 32-channel chunk (partial last chunk)
    test_up_bwd(1, 3, 40, 60, 5, (1, 3, 6, 8), torch.float32, "cl", False)
    test_up_bwd(1, 3, 37, 70, 4, (1, 2, 3, 6), torch.float64, "cl", True)
    # NCHW with several planes per block (N * L * R > 1024)
    test_up_bwd(1, 2, 300, 3, 4, (1, 2, 3, 6), torch.float32, "nchw", False)
    test_up_bwd(1, 1, 1100, 2, 2, (3,), torch.float16, "nchw", True)
    print(f"up big done {time.time() - t0:.0f}s cases {ncases} fails {fails}", flush=True)
    # pooling: several planes per block (N * C > 1024), several chunks per plane, tables too big (per-element bin
    # ranges), q too big for shared memory (per-use division)
    test_pool_bwd(1, 1101, 2, 2, 2, (1, 2), torch.float32, "nchw")
    test_pool_bwd(1, 1030, 0, 3, 5, (1, 2, 3, 6), torch.float16, "nchw")
    test_pool_bwd(1, 2, 1, 100, 90, (1, 2, 3, 6), torch.float32, "nchw")
    test_pool_bwd(1, 2, 1, 90, 101, (1, 3, 6, 8), torch.bfloat16, "nchw")
    test_pool_bwd(1, 70, 2, 20, 20, (1, 2, 3, 6), torch.float32, "cl")
    test_pool_bwd(1, 1, 0, 1, 3100, (1, 2, 3, 6), torch.float32, "nchw")
    test_pool_bwd(1, 8, 0, 1, 3100, (1, 2, 3, 6), torch.float32, "cl")
    test_pool_bwd(1, 2, 1, 5, 5, (250,), torch.float32, "nchw")
    test_pool_bwd(1, 8, 0, 4, 6, (250,), torch.float16, "cl")
    test_up_bwd(1, 1, 2, 5, 5, (250,), torch.float32, "nchw", False)
    test_up_bwd(1, 1, 2, 5, 5, (250,), torch.float32, "cl", True)
    print(f"pool big done {time.time() - t0:.0f}s cases {ncases} fails {fails}", flush=True)
    # above the default 48 KiB of shared memory (opt-in): q of 15625 bins; range tables of b = 3000
    test_pool_bwd(1, 2, 1, 5, 5, (125,), torch.float64, "nchw")
    test_pool_bwd(1, 8, 0, 5, 4, (125,), torch.float64, "cl")
    test_up_bwd(1, 1, 1, 5, 4, (3000,), torch.float64, "nchw", False)
    test_up_bwd(1, 1, 1, 4, 5, (3000,), torch.float64, "cl", True)
    print(f"opt-in done {time.time() - t0:.0f}s cases {ncases} fails {fails} stats {list(E.emu_stats())}", flush=True)

# errors
def expect_error(name, fn, needle):
    global fails
    try:
        fn()
    except (RuntimeError, ValueError, TypeError) as e:  # the shared checker raises ValueError/TypeError
        msg = str(e).splitlines()[0]
        if needle not in msg:
            fails += 1
            print("FAIL wrong error", name, msg[:200])
        else:
            print("expected error:", msg[:160])
        return
    fails += 1
    print("FAIL no error", name)


g = torch.randn(2, 3 + 4 * 2, 5, 5)
expect_error("up divisible", lambda: E.upsample_concat_backward(g, 4, [1, 2, 3, 6], False), "positive multiple")
expect_error("up in_channels", lambda: E.upsample_concat_backward(g, 11, [1, 2, 3, 6], False), "in_channels")
expect_error("up levels", lambda: E.upsample_concat_backward(torch.randn(1, 18, 4, 4), 1, list(range(1, 18)), False),
             "at most")
expect_error("up dtype", lambda: E.upsample_concat_backward(g.int(), 3, [1, 2, 3, 6], False), "must be float32")
expect_error("up dims", lambda: E.upsample_concat_backward(g[0], 3, [1, 2, 3, 6], False), "shape")
expect_error("pool S", lambda: E.pyramid_pool_backward(torch.randn(2, 3, 49), g, [1, 2, 3, 6]), "grad_pooled must be of shape")
expect_error("pool C", lambda: E.pyramid_pool_backward(torch.randn(2, 12, 50), g, [1, 2, 3, 6]), "C <= 11")
expect_error("pool gp dtype", lambda: E.pyramid_pool_backward(torch.randn(2, 3, 50).half(), g, [1, 2, 3, 6]),
             "float32 or float64")
expect_error("up smem", lambda: E.upsample_concat_backward(torch.randn(1, 2, 3, 3, dtype=torch.float64), 1, [20000],
                                                            False), "at most 4096")  # the shared bin bound first
expect_error("pool bins", lambda: E.pyramid_pool_backward(torch.randn(2, 3, 50), g, [1, 2, 0, 6]), "positive ints")

print(f"all done {time.time() - t0:.0f}s cases {ncases} fails {fails} stats {list(E.emu_stats())}", flush=True)
sys.exit(1 if fails else 0)
