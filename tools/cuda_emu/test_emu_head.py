"""Emulates csrc/cuda/head_cuda.cu on the CPU and compares its two ops with pspnet_fast.reference.

Generates head_emu.cpp (the same rewrites as make_emu.py, plus a settable stand-in for the device's opt-in shared
memory limit, so that the smaller plans and the direct fallback kernels run on small shapes), builds it into
head_emu.so in PSPNET_FAST_EMU_DIR, then checks head_epilogue and head_context_backward against
pspnet_fast.reference.head_epilogue / head_context_backward evaluated in float64: shapes, bins, align_corners,
scale/shift, relu, N, O, dtypes, layouts, NaN in z, N = 0, large W, determinism and error messages.
Run: tools/cuda_emu/test_emu_head.py [--quick]   (Python with torch; no GPU, no compiled extension needed)
"""
import os, re, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from emu_common import QUICK, REPO

from head_emu import load_head_emu

E = load_head_emu()
import torch

sys.path.insert(0, REPO)
from pspnet_fast import reference as ref

torch.manual_seed(0)
fails = 0
ncases = 0
worst = {}


def record(key, err):
    worst[key] = max(worst.get(key, 0.0), err)


def fail(*a):
    global fails
    fails += 1
    print("FAIL", *a, flush=True)


TOL = {torch.float32: (2e-5, 1e-4), torch.float64: (1e-12, 1e-12), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (1.6e-2, 1.6e-2)}


def layout_of(t, layout):
    if layout == "cl":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "misaligned":  # contiguous, one element past a 16-byte boundary (z and out differ modulo 16)
        flat = torch.empty(t.numel() + 1, dtype=t.dtype)
        v = flat[1:].view(t.shape)
        v.copy_(t)
        return v
    if layout == "strided":
        big = torch.empty(*t.shape[:3], t.shape[3] * 2, dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    return t.contiguous()


def compare(name, got, want, dtype, key):
    rtol, atol = TOL[dtype]
    if got.shape != want.shape or got.dtype != (want.dtype if dtype != torch.float64 else torch.float64):
        pass
    g, w = got.double(), want.double()
    if got.shape != want.shape:
        fail(name, "shape", tuple(got.shape), tuple(want.shape))
        return
    if not torch.equal(torch.isnan(g), torch.isnan(w)):
        fail(name, "NaN pattern differs", int(torch.isnan(g).sum()), int(torch.isnan(w).sum()))
        return
    m = ~torch.isnan(w)
    err = (g[m] - w[m]).abs()
    lim = atol + rtol * w[m].abs()
    e = (err / lim).max().item() if err.numel() else 0.0
    record(key, err.max().item() if err.numel() else 0.0)
    if e > 1:
        fail(name, "max abs err", err.max().item(), "ratio to tol", e)


def run_case(bins, H, W, align, N, O, dtype, layout, affine, relu, nan=False, check_det=True):
    global ncases
    ncases += 1
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    S = sum(b * b for b in bins)
    z = torch.randn(N, O, H, W).to(dtype)
    if nan and z.numel():
        z.view(-1)[:: max(1, z.numel() // 3)] = float("nan")
    z = layout_of(z, layout)
    q = torch.randn(N, O, 9, S, dtype=acc)
    sc = torch.rand(O, dtype=acc) + 0.5 if affine else None
    sh = torch.randn(O, dtype=acc) if affine else None
    name = f"bins={bins} {H}x{W} align={align} N={N} O={O} {str(dtype)[6:]} {layout} affine={affine} relu={relu}" \
           f"{' nan' if nan else ''}"
    # forward: emulated kernel vs the reference evaluated in float64, then rounded to z's dtype
    if O == 0:  # refused on every backend by the shared argument checker (csrc/op_checks.h), as on the CPU
        for what, call in (("epilogue", lambda: E.head_epilogue(z, q, list(bins), align, sc, sh, relu)),
                           ("backward", lambda: E.head_context_backward(z, list(bins), align))):
            try:
                call()
                fail("O = 0 accepted", what, name)
            except ValueError as e:
                if "O, H, W >= 1" not in str(e):
                    fail("O = 0 message", what, str(e)[:120])
        return
    got = E.head_epilogue(z, q, list(bins), align, sc, sh, relu)
    want = ref.head_epilogue(z.double(), q.double(), bins, align, None if sc is None else sc.double(),
                             None if sh is None else sh.double(), relu).to(dtype)
    compare("epilogue " + name, got, want, dtype, ("fwd", str(dtype)))
    if got.dtype != dtype:
        fail("epilogue dtype", name, got.dtype)
    cl = (not z.is_contiguous()) and z.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if cl else torch.contiguous_format
    if not got.is_contiguous(memory_format=fmt):
        fail("epilogue memory format", name, got.stride())
    # backward: grad in the same dtype / layout; reference = autograd in float64
    g = layout_of(torch.randn(N, O, H, W).to(dtype), layout)
    gq = E.head_context_backward(g, list(bins), align)
    want_b = ref.head_context_backward(g.double(), bins, align)
    if gq.dtype != acc or not gq.is_contiguous():
        fail("backward dtype/format", name, gq.dtype, gq.stride())
    btol = TOL[torch.float64] if dtype == torch.float64 else TOL[torch.float32]
    rtol, atol = btol
    if gq.shape != want_b.shape:
        fail("backward shape", name, tuple(gq.shape), tuple(want_b.shape))
    else:
        # sums of up to 9 * H * W terms: tolerance scaled by the sum of |terms| (the float64 adjoint of |grad|)
        scale_ = ref.head_context_backward(g.double().abs(), bins, align)
        err = (gq.double() - want_b).abs()
        lim = atol + rtol * scale_ * 4
        record(("bwd", str(dtype)), err.max().item() if err.numel() else 0.0)
        if err.numel() and (err > lim).any():
            fail("backward " + name, "max abs err", err.max().item())
    if check_det and gq.numel():
        gq2 = E.head_context_backward(g, list(bins), align)
        if not torch.equal(gq, gq2):
            fail("backward not deterministic", name)


def smem_seen():
    return E.emu_stats()[1]


BINS = [(1, 2, 3, 6), (1, 3, 6, 8), (2,)]
SIZES = [(1, 1), (2, 2), (3, 3), (13, 13), (5, 9), (9, 5), (1, 7), (6, 2)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = ["nchw", "cl", "strided"]

start = time.time()
import itertools, random

rng = random.Random(1)
for optin, label in [(227 * 1024, "full"), (3000, "small-smem"), (0, "direct")]:
    if QUICK and label != "full":
        continue
    E.emu_set_optin(optin)
    E.emu_reset()
    cases = list(itertools.product(BINS, SIZES, [False, True]))
    if label != "full":
        cases = rng.sample(cases, 16)
    for i, (bins, (H, W), align) in enumerate(cases):
        if QUICK and i % 3:
            continue
        dtype = DTYPES[i % 4]
        layout = LAYOUTS[(i // 4) % 3]
        N = 1 + (i % 2)
        O = [5, 3, 33, 1][(i // 2) % 4]
        run_case(bins, H, W, align, N, O, dtype, layout, affine=bool(i % 3 != 1), relu=bool(i % 2 == 0),
                 nan=(i % 5 == 0))
    print(f"[{label}] optin={optin}: {ncases} cases so far, max smem seen {smem_seen()}, {fails} failures, "
          f"{time.time() - start:.0f}s", flush=True)

E.emu_set_optin(227 * 1024)
# Explicit cases: every dtype in both layouts on the target bins, N = 0, O = 0, large W (the backward drops its
# column table, then falls back to the direct kernel), many levels, a tall map (several row bands).
for dtype in DTYPES:
    for layout in ["nchw", "cl"]:
        run_case((1, 2, 3, 6), 7, 6, True, 2, 40, dtype, layout, affine=True, relu=True, nan=True)
        run_case((1, 2, 3, 6), 6, 7, False, 1, 33, dtype, layout, affine=False, relu=False)
run_case((1, 2, 3, 6), 5, 4, True, 0, 3, torch.float32, "nchw", True, True)
run_case((1, 2, 3, 6), 5, 4, True, 2, 0, torch.float32, "nchw", True, True)
run_case((1, 2, 3, 6), 5, 4, False, 0, 3, torch.bfloat16, "cl", False, True)
E.emu_reset()
run_case((1, 2), 2, 9000, True, 1, 1, torch.float32, "nchw", True, False)  # column table does not fit
print("large W 9000 (no column table): max smem", smem_seen(), flush=True)
E.emu_reset()
run_case((1, 2), 1, 60000, False, 1, 1, torch.float32, "nchw", False, False)  # one grad row > 227 KiB: direct
print("large W 60000 (backward direct): max smem", smem_seen(), flush=True)
run_case(tuple(range(1, 17)), 5, 6, True, 1, 2, torch.float32, "nchw", True, True)  # 16 levels (LMAX 16 kernel)
run_case((1, 2, 3, 6, 8), 4, 3, False, 1, 3, torch.float64, "cl", True, False)  # 5 levels
# Issue 12 shapes at small O: 90x90 bfloat16 (8100-element planes, so every other plane starts 8 bytes past a 16-byte
# boundary: the peeled heads and tails), odd O, 64x128, channels_last with 16-byte pixel runs (O = 16: 32 bytes a
# pixel) and without (O = 5), a misaligned z, W = 9000; more items than the emulated grid's 8 persistent blocks. The
# launch log must name the variant each layout takes.
def variant_of(log, prefix):
    return [ln for ln in log if ln.startswith(prefix)]


E.emu_launch_log_clear()
run_case((1, 2, 3, 6), 90, 90, True, 2, 5, torch.bfloat16, "nchw", True, True, check_det=False)
if not variant_of(E.emu_launch_log(), "head_epilogue_kernel<BFloat16, float, true> grid=8,1,1 block=360,"):
    fail("90x90 bf16 NCHW: expected the register-tap kernel, 8 blocks of 360 threads, got", E.emu_launch_log())
E.emu_launch_log_clear()
run_case((1, 2, 3, 6), 90, 90, False, 1, 16, torch.bfloat16, "cl", True, True, check_det=False)
if not variant_of(E.emu_launch_log(), "head_epilogue_kernel<BFloat16, float, true> grid=1,1,1 block=384,"):
    fail("90x90 bf16 channels_last: expected the register-tap kernel, one 16-channel chunk, got", E.emu_launch_log())
E.emu_launch_log_clear()
run_case((1, 2, 3, 6, 8), 9, 10, True, 1, 16, torch.bfloat16, "cl", True, True, check_det=False)
if not variant_of(E.emu_launch_log(), "head_epilogue_kernel<BFloat16, float, false>"):
    fail("5 levels: expected the table kernel, got", E.emu_launch_log())
run_case((1, 2, 3, 6), 64, 128, True, 1, 3, torch.bfloat16, "nchw", True, True, check_det=False)
run_case((1, 2, 3, 6), 64, 128, False, 1, 8, torch.bfloat16, "cl", False, True, check_det=False)
run_case((1, 2, 3, 6), 9, 90, True, 3, 5, torch.float16, "cl", True, False)
run_case((1, 2, 3, 6), 9, 90, False, 2, 7, torch.bfloat16, "misaligned", True, True)
run_case((1, 2, 3, 6), 7, 9, True, 2, 33, torch.float32, "misaligned", True, False)
run_case((1, 2, 3, 6), 2, 9000, True, 1, 3, torch.bfloat16, "nchw", True, True, check_det=False)
run_case((1, 2, 3, 6), 1, 9000, False, 1, 8, torch.bfloat16, "cl", True, True, check_det=False)
print("issue 12 shapes:", ncases, "cases so far,", fails, "failures", flush=True)

E.emu_set_optin(6000)
E.emu_reset()
run_case((1, 2, 3, 6), 60, 3, True, 1, 2, torch.float32, "nchw", True, True)  # several row bands
run_case((1, 2, 3, 6), 60, 3, False, 1, 5, torch.float64, "cl", True, True)
print("tall maps under 6000 B: max smem", smem_seen(), flush=True)
E.emu_set_optin(227 * 1024)

# NaN in q: the NaN pattern of float32 outputs must be PyTorch's (a NaN behind a zero bilinear weight propagates, as
# in F.interpolate's float32 CPU kernel; its float64 kernel differs, see ppm_math.h), staged and direct kernels alike.
for optin in (227 * 1024, 0):
    E.emu_set_optin(optin)
    for bins, (H, W), align in itertools.product([(1, 2, 3, 6), (2,), (3,)], [(3, 3), (5, 9), (6, 6)], [False, True]):
        if QUICK and (H, W) == (3, 3):
            continue
        ncases += 1
        S = sum(b * b for b in bins)
        z = torch.randn(1, 3, H, W)
        q = torch.randn(1, 3, 9, S)
        q.view(-1)[::11] = float("nan")
        compare(f"NaN in q, optin {optin}, bins={bins} {H}x{W} align={align}",
                E.head_epilogue(z, q, list(bins), align, None, None, False),
                ref.head_epilogue(z.double(), q.double(), bins, align).float(), torch.float32, ("fwd", "torch.float32"))
E.emu_set_optin(227 * 1024)

# Errors.
def _raised(fn):
    try:
        fn()
    except Exception as e:  # ValueError / TypeError from the shared checker, RuntimeError from the launchers
        return e
    return None


def expect_error(fn, what):
    """fn (calling E.<op>) must raise, and exactly what the CPU op (torch.ops.pspnet_fast.<op>) raises for the same
    arguments: one argument checker for every backend (csrc/op_checks.h). `what` names the case."""
    global E
    got = _raised(fn)
    emu, E = E, torch.ops.pspnet_fast
    try:
        want = _raised(fn)
    finally:
        E = emu
    if got is None:
        fail("no error:", what)
    elif want is None or type(got) is not type(want) or str(got).splitlines()[0] != str(want).splitlines()[0]:
        fail("error differs from the CPU op's:", what, "got", type(got).__name__, str(got).splitlines()[0][:160],
             "CPU:", type(want).__name__, str(want).splitlines()[0][:160] if want is not None else None)


z = torch.randn(1, 3, 4, 4)
q = torch.randn(1, 3, 9, 50)
expect_error(lambda: E.head_epilogue(z[0], q, [1, 2, 3, 6], True, None, None, False), r"z of shape \(N, O, H, W\)")
expect_error(lambda: E.head_epilogue(z, q[..., :49], [1, 2, 3, 6], True, None, None, False),
             r"expected q of shape \(1, 3, 9, 50\)")
expect_error(lambda: E.head_epilogue(z, q.double(), [1, 2, 3, 6], True, None, None, False),
             r"expected q of dtype Float for z of dtype Float, got Double")
expect_error(lambda: E.head_epilogue(z.int(), q, [1, 2, 3, 6], True, None, None, False), r"dtype float32")
expect_error(lambda: E.head_epilogue(z, q, [1, 2, 3, 6], True, torch.ones(3), None, False), "come together")
expect_error(lambda: E.head_epilogue(z, q, [1, 2, 3, 6], True, torch.ones(4), torch.ones(4), False),
             r"scale of shape \(3\)")
expect_error(lambda: E.head_epilogue(z, q, [1, 2, 3, 6], True, torch.ones(3, dtype=torch.int32), torch.ones(3),
                                     False), "scale of dtype float32 or float64")
expect_error(lambda: E.head_epilogue(z, q, [1] * 17, True, None, None, False), "at most 16 pyramid levels")
expect_error(lambda: E.head_epilogue(z, q, [], True, None, None, False), "at least one level")
expect_error(lambda: E.head_epilogue(z, q, [0], True, None, None, False), "bin count")
expect_error(lambda: E.head_epilogue(z.to("meta"), q, [1, 2, 3, 6], True, None, None, False),
             "expected z on a CUDA device")
expect_error(lambda: E.head_epilogue(z, q.to("meta"), [1, 2, 3, 6], True, None, None, False), "expected q on")
expect_error(lambda: E.head_context_backward(z[0], [1, 2], True), r"grad of shape \(N, O, H, W\)")
expect_error(lambda: E.head_context_backward(z.int(), [1, 2], True), "dtype float32")
expect_error(lambda: E.head_context_backward(z, [1] * 17, True), "at most 16 pyramid levels")
expect_error(lambda: E.head_context_backward(torch.randn(1, 2, 0, 3), [1], True), "H, W >= 1")

print("worst absolute errors:", {f"{k[0]} {k[1][6:]}": f"{v:.3g}" for k, v in sorted(worst.items())})
print(f"head emulator: {ncases} cases, {fails} failures, {time.time() - start:.0f}s", flush=True)
sys.exit(1 if fails else 0)
