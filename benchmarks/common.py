"""What every benchmark script shares: shapes, providers, timing, error check, peak memory, machine info, table, JSON.

A workload script (bench_ppm.py, bench_head.py, bench_pspnet.py) only builds a `Case`: the inputs, one callable per
provider on those same inputs, the bytes the workload must move, and (for half types) a float64 oracle. `measure`
does the rest, identically for every workload:

1. each provider's first call is checked against the reference eager provider in this same run (and, for float16 /
   bfloat16, against the float64 oracle); the first call of torch.compile is where it compiles;
2. warm-up calls, then `rounds` rounds in which every provider (and a plain copy, and for the PPM's eval the floor:
   x read once and the output written once) runs once, in a fixed order, so that machine noise (another process on
   a shared CPU, GPU clocks) hits all providers alike; median and min-max;
3. one more call per provider under the peak-memory probe (outside the timed rounds: the probe itself perturbs the
   allocator and the page cache).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence

import torch

from pspnet_fast import ops

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
FUSED_BACKENDS = ("cpu", "cuda", "triton")
JSON_KEYS = ("workload", "shape", "dtype", "device", "provider", "median_ms", "speedup_vs_eager", "speedup_vs_compile",
             "roofline_fraction", "peak_mem_bytes", "max_abs_err", "machine", "versions", "commit")


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------
def parse_shape(s: str) -> tuple[int, int, int, int]:
    """'N,C,H,W' -> (N, C, H, W): the backbone feature map every workload is sized by (argparse type)."""
    parts = [p.strip() for p in s.split(",")]
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected N,C,H,W (four non-negative integers), got {s!r}")
    shape = tuple(int(p) for p in parts)
    if shape[0] < 1 or shape[1] < 4 or shape[1] % 4 or min(shape[2:]) < 1:
        raise argparse.ArgumentTypeError(
            f"N,C,H,W needs N >= 1, C a positive multiple of 4 (the 4 pyramid levels each reduce to C/4 channels) and "
            f"H, W >= 1, got {s!r}")
    return shape


def fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


# ----------------------------------------------------------------------------------------------------------------
# Machine, versions, commit
# ----------------------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str | None:
    """Short hash of the checkout the benchmarks run from, '+dirty' when tracked files differ from it; None when
    the package is not in a git checkout (a wheel install)."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:
        return None


def machine_info(device: str) -> dict:
    """machine (GPU name, or CPU model and core count), versions (torch, triton, python, cuda), commit, threads."""
    try:
        import triton  # optional: only its version is recorded

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    if device == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        machine = f"{_cpu_model()} ({os.cpu_count()} cpus)"
    return {
        "machine": machine,
        "versions": {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
                     "cuda": torch.version.cuda},
        "commit": _commit(),
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------------------------------
# A workload on one shape: the providers and what they are checked and measured against
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    """One workload at one shape. Every provider runs on the same input tensors and returns the tensors compared
    (the output, and x.grad in training) as a list, in `output_names` order."""

    workload: str
    shape: tuple[int, ...]            # shown in the row: the feature map (N, C, H, W), or the image for pspnet
    dtype: str
    device: str
    channels_last: bool
    providers: dict[str, Callable[[], list[torch.Tensor]]]
    output_names: list[str]
    must_move_bytes: int              # see must_move_bytes(); the roofline's numerator
    deep: bool                        # gradients or convolutions after the PPM: the looser float tolerance
    oracle: Callable[[], list[torch.Tensor]] | None = None  # float64 truth (run for half types, or on disagreement)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # provider -> why it does not run here
    floor: Callable[[], list[torch.Tensor]] | None = None  # read x once, write the output once (see _floor_probe)
    extra: dict = dataclasses.field(default_factory=dict)  # more JSON fields (e.g. the feature shape of pspnet)


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def must_move_bytes(x_bytes: int, params_bytes: int, out_bytes: int, train: bool) -> int:
    """Bytes any implementation must move through memory for one call (the memory roofline's numerator).

    Inference: read the input and every parameter once, write the output once; intermediates (pooled maps, the
    PPM output inside the head, backbone activations) are not counted, an ideal fusion keeps them on chip.
    Training step, out.backward(g) (the gradient of (out * g).sum()): the forward's bytes, then the backward reads
    dL/dout (= g, out-sized) and writes x.grad and every parameter's grad once:
        2 * x + 2 * params + 2 * out.
    BatchNorm statistics and running buffers are a few KB and not counted."""
    if not train:
        return x_bytes + params_bytes + out_bytes
    return 2 * x_bytes + 2 * params_bytes + 2 * out_bytes


def eval_call(module: torch.nn.Module, owner: torch.nn.Module, x: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
    """Inference call: [module(x)] under no_grad (`owner` unused; the signature is train_call's)."""

    def call():
        with torch.no_grad():
            return [module(x)]

    return call


def train_call(module: torch.nn.Module, owner: torch.nn.Module, x: torch.Tensor,
               g: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
    """Training step on x (requires_grad) with a fixed g shaped like the output: out = module(x);
    out.backward(g), the gradient of (out * g).sum() without materializing out * g (two more full-size passes that
    would be timed as part of every provider). Returns [out, x.grad].

    x.grad and the parameters' grads are reset to None first, so every call does the same work (no accumulation into
    the last call's grads). `owner` holds the parameters (the eager module when `module` is its torch.compile
    wrapper)."""

    def call():
        x.grad = None
        owner.zero_grad(set_to_none=True)
        out = module(x)
        out.backward(g)
        return [out.detach(), x.grad]

    return call


def add_providers(providers: dict, skipped: dict, ref: torch.nn.Module, make_fused: Callable[[str], torch.nn.Module],
                  make_call: Callable[..., Callable], inputs: Sequence[torch.Tensor], compile_ref: bool) -> None:
    """Fills `providers` in the table's order: reference (eager), torch.compile(reference), fused-<backend> for every
    backend that runs inputs[0]. make_call(module_called, module_owning_params, *inputs) -> the provider's callable
    (eval_call or train_call); make_fused(backend) -> the fused module carrying ref's weights."""
    x = inputs[0]

    providers["reference"] = make_call(ref, ref, *inputs)
    if compile_ref:
        # dynamic=False: every case compiles for its own static shape, as a user's fixed-size model would; without
        # it the second shape of the same module class would be compiled with dynamic sizes (slower kernels).
        compiled = torch.compile(ref, dynamic=False)
        providers["torch.compile"] = make_call(compiled, ref, *inputs)
    for name in FUSED_BACKENDS:
        why = ops.why_not(name, x)
        if why is None and name == "triton" and x.device.type != "cuda":
            # TRITON_INTERPRET=1 makes Triton run CPU tensors in its interpreter: a correctness tool, not something
            # to time (and minutes per call at these sizes).
            why = "Triton on CPU tensors runs in its interpreter, which is not benchmarked"
        label = f"fused-{name}"
        if why is None:
            fused = make_fused(name)
            providers[label] = make_call(fused, fused, *inputs)
        else:
            skipped[label] = why


@dataclasses.dataclass(frozen=True)
class Workload:
    """A thing measured. build(shape, dtype, device, channels_last, compile_ref) -> Case; shape is the backbone
    feature map (N, C, H, W). train: a training step (needs N >= 2: BatchNorm in training has a single value per
    channel on the 1x1 pyramid level at N = 1 and refuses it). rounds/warmup: defaults sized to the cost of a call."""

    name: str
    build: Callable[..., Case]
    train: bool
    rounds: int
    warmup: int  # untimed calls after the checked first call (0 where a call takes seconds: the first one warms)
    quick_shape: tuple[int, int, int, int]
    about: str
    # The suite's default run: these shapes (empty: left out by default; the 473 size when asked for by name).
    default_shapes: tuple = ()
    # Seconds per case on the 2-core CPU reference machine, default options: (compile, the rest at the 473 size; the
    # rest scales with N*H*W). Only for estimating a left-out case whose workload did not run in this run.
    cost_s: tuple[float, float] = (0.0, 0.0)
    label: Callable[[tuple], str] | None = None  # the case's name in the log (default "NAME NxCxHxW")
    fixed_channels: int | None = None  # C of the feature shape when the workload fixes it (a whole model's backbone)


C = 2048  # ResNet-50 layer4's channels: every published PSPNet size
# Backbone feature sizes of the published settings: 473x473 crops, 713x713 crops, Cityscapes 512x1024.
SIZES = {"473x473": (60, 60), "713x713": (90, 90), "cityscapes": (64, 128)}


def feature_shape(train: bool, hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(N, C, H, W) at a published size: N = 2 for training workloads (BatchNorm in training refuses the single
    value per channel of the 1x1 pyramid level at N = 1), else 1."""
    return (2 if train else 1, C, *hw)


def randomize_bn(module: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial BatchNorm statistics and affine parameters (a fresh BatchNorm is the identity in eval), so the
    fused path's BatchNorm fold is exercised. Applied to the PPM only: rescaling every BatchNorm of a ResNet-50 would
    let its activations grow past float16's range."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0), (m.weight, 0.5, 1.5),
                                  (m.bias, -0.5, 0.5)):
                    t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo)


def build_case(workload: str, shape: tuple[int, ...], dtype_name: str, device: str, channels_last: bool,
               ref: torch.nn.Module, make_fused: Callable[[str, torch.nn.Module], torch.nn.Module], x: torch.Tensor,
               out_shape: tuple[int, ...], train: bool, compile_ref: bool, deep: bool,
               extra: dict | None = None) -> Case:
    """The Case for module `ref` (float32 on the CPU as built; moved here to device/dtype/layout, put in train or eval
    mode) on input x (moved likewise). make_fused(backend, ref) -> the fused module with ref's weights (moved and
    moded like ref here). out_shape: the module's output shape, for g and the must-move bytes."""
    dtype = DTYPES[dtype_name]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref = ref.to(device=device, dtype=dtype, memory_format=fmt).train(train)
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(train)
    inputs = [x]
    if train:
        gen = torch.Generator().manual_seed(2)
        g = torch.randn(out_shape, generator=gen).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
        inputs.append(g)
    make_call = train_call if train else eval_call
    providers, skipped = {}, {}
    add_providers(providers, skipped, ref,
                  lambda b: make_fused(b, ref).to(device=device, dtype=dtype, memory_format=fmt).train(train),
                  make_call, inputs, compile_ref)
    out_bytes = torch.Size(out_shape).numel() * x.element_size()
    case = Case(workload=workload, shape=tuple(shape), dtype=dtype_name, device=device, channels_last=channels_last,
                providers=providers, output_names=["out", "x.grad"] if train else ["out"],
                must_move_bytes=must_move_bytes(tensor_bytes(x), param_bytes(ref), out_bytes, train), deep=deep,
                skipped=skipped, extra=dict(extra or {}))
    if dtype in (torch.float16, torch.bfloat16, torch.float32):
        case.oracle = float64_oracle(ref, make_call, inputs)
    # The floor is the PPM's eval (its output holds x's channels); the head's and the model's outputs do not.
    case.floor = _floor_probe(x, out_shape) if workload == "ppm" else None
    return case


def float64_oracle(module: torch.nn.Module, make_call: Callable, inputs: Sequence[torch.Tensor]) -> Callable:
    """The reference in float64 on the same inputs (a deep copy: the measured modules are untouched), made when
    first called (a float32 case calls it only when a provider disagrees with the eager reference)."""
    def call():
        m64 = copy.deepcopy(module).double()
        args = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
        return make_call(m64, m64, *args)()
    return call


# ----------------------------------------------------------------------------------------------------------------
# Error check
# ----------------------------------------------------------------------------------------------------------------
def float_tolerance(dtype: torch.dtype, scale: float, deep: bool) -> float:
    """Allowed max |provider - reference eager| for float32/float64: the forward tests' bound (1e-5 relative) for the
    PPM forward, the gradient tests' bound (1e-4 relative) for gradients and for outputs that pass through
    convolutions after the PPM, where the PPM's last-bit differences are summed over 4096 x 9 products."""
    if dtype == torch.float64:
        return (1e-10 if deep else 1e-12) * scale
    return (1e-4 if deep else 1e-5) * scale + 1e-6


def check_outputs(case: Case, got: list[torch.Tensor], expect: list[torch.Tensor],
                  oracle: list[torch.Tensor] | None) -> tuple[float, dict, bool, dict]:
    """(max_abs_err against the reference eager, per-output errors, wrong, per-output detail).

    float32/float64: wrong when |got - eager| exceeds float_tolerance. float16/bfloat16 (the house rule, STYLE.md
    habit 7): wrong when the error against the float64 oracle exceeds 2x the eager reference's own error against it
    plus 1e-3 max|oracle|; comparing two half-precision results with each other would only measure rounding. A
    float32 case gets the oracle only once some provider is outside float_tolerance of the eager reference; then it
    is wrong when its error against float64 exceeds 2x the eager's own plus float_tolerance."""
    dtype = DTYPES[case.dtype]
    errs, detail, wrong = {}, {}, False
    for name, a, e, o in zip(case.output_names, got, expect, oracle or [None] * len(got)):
        if tuple(a.shape) != tuple(e.shape):
            errs[name] = float("inf")
            detail[name] = f"shape {tuple(a.shape)} != reference {tuple(e.shape)}"
            wrong = True
            continue
        err = (a.double() - e.double()).abs().max().item() if a.numel() else 0.0
        errs[name] = err
        if o is not None:
            scale = o.abs().max().item()
            err64 = (a.double() - o).abs().max().item()
            ref64 = (e.double() - o).abs().max().item()
            if dtype in (torch.float16, torch.bfloat16):
                tol = 2 * ref64 + 1e-3 * scale
            else:
                tol = 2 * ref64 + float_tolerance(dtype, scale, case.deep)
            detail[name] = {"err_vs_fp64": err64, "reference_err_vs_fp64": ref64, "tolerance": tol}
            bad = not err64 <= tol  # `not <=` so NaN is wrong
        else:
            tol = float_tolerance(dtype, e.double().abs().max().item() if e.numel() else 0.0, case.deep)
            detail[name] = {"tolerance": tol}
            bad = not err <= tol
        detail[name]["wrong"] = bad
        wrong = wrong or bad
    return max(errs.values()) if errs else 0.0, errs, wrong, detail


# ----------------------------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_rounds(fns: dict[str, Callable], device: str, rounds: int) -> dict[str, list[float]]:
    """ms per call for each provider; within each round every provider runs once, in order, so that noise that
    comes and goes (another process, clocks) is shared. The caller warms up first."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0: '5' > /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Hands glibc's free heap pages back to the kernel, so that memory a call reuses from the heap is faulted in
    again and shows in its RSS growth (without it, only allocations above the mmap threshold would show)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


CPU_PEAK_METHOD = "peak RSS growth during one call (VmHWM reset via /proc/self/clear_refs, glibc heap trimmed " \
                  "first, the previous call's outputs held)"
CUDA_PEAK_METHOD = "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() " \
                   "before the call"


def peak_memory(fn: Callable, device: str) -> int | None:
    """Bytes a call needs beyond what is allocated before it (inputs, weights, caches are not counted).

    CUDA: the caching allocator's peak of allocated bytes, exact. CPU: the growth of the process's peak RSS: counts
    every page the call touches anew, the compiled extension's own buffers included (the torch profiler's memory view
    would miss those, e.g. the fused CPU kernel's output comes from its own buffer cache). The previous call's
    outputs are kept alive, so a cache cannot hand them back and the output is counted as a user holding it would
    see it. None where /proc/self/clear_refs is not writable."""
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak
    held = fn()
    _malloc_trim()
    if not _reset_peak_rss():
        return None
    base = _proc_status_kb("VmRSS")
    out = fn()
    peak = _proc_status_kb("VmHWM")
    del out, held
    if base is None or peak is None:
        return None
    return max(0, peak - base) * 1024


# ----------------------------------------------------------------------------------------------------------------
# Measuring a case
# ----------------------------------------------------------------------------------------------------------------
def _copy_probe(case: Case):
    """A plain copy between two preallocated buffers: the memory bandwidth reachable in this run, the roofline's
    denominator. Sized like the workload's traffic (at least 32 MiB a buffer, beyond last-level caches; at most
    512 MiB) so that it runs in the same memory regime. Returns (fn, bytes moved per call)."""
    n = min(max(case.must_move_bytes // 2, 32 << 20), 512 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=case.device).uniform_()
    dst = torch.empty_like(src)
    return (lambda: [dst.copy_(src)]), 2 * n * 4


def _floor_probe(x: torch.Tensor, out_shape: Sequence[int]):
    """The least an eval PPM forward can do, measured in the same run: read x once and write the output once, into a
    preallocated output in x's memory format (out[:, :C] = x, the rest zeroed: no page faults, plain stores, as
    torch's copy_ and zero_ run them), for an output (N, >= C, H, W) that holds x's channels. Returns the callable,
    or None for other output shapes."""
    n, c, h, w = x.shape
    if len(out_shape) != 4 or out_shape[0] != n or out_shape[1] < c or tuple(out_shape[2:]) != (h, w):
        return None
    fmt = torch.channels_last if (not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)) \
        else torch.contiguous_format
    out = torch.empty(tuple(out_shape), dtype=x.dtype, device=x.device).contiguous(memory_format=fmt)
    src = x.detach()

    def call():
        out[:, :c].copy_(src)
        out[:, c:].zero_()
        return [out]

    return call


def measure(case: Case, rounds: int, warmup: int, info: dict, progress: Callable[[str], None]) -> tuple[list, dict]:
    """Runs the case; returns (rows, timings) where timings = {"wall_s", "compile_s"} feeds the skip estimates."""
    t_start = time.perf_counter()
    dtype = DTYPES[case.dtype]
    rows_extra = {"channels_last": case.channels_last, **case.extra}
    oracle = None
    if case.oracle is not None and dtype in (torch.float16, torch.bfloat16):
        progress("float64 oracle ...")
        oracle = [t.detach().double() for t in case.oracle()]

    # 1. Correctness, on each provider's first call (the reference eager first: it is the comparison).
    expect, results, failed, first_s, kept = None, {}, {}, {}, {}
    for name, fn in case.providers.items():
        t0 = time.perf_counter()
        try:
            got = [t.detach().clone() for t in fn()]
            sync(case.device)
        except Exception as e:  # a provider that raises is reported as FAILED, never dropped
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            progress(f"{name}: FAILED ({failed[name]})")
            continue
        first_s[name] = time.perf_counter() - t0
        if name == "reference":
            expect = got
        if expect is None:
            failed[name] = "the reference eager provider failed: nothing to compare with"
            continue
        results[name] = check_outputs(case, got, expect, oracle)
        if results[name][2] and oracle is None and case.oracle is not None and dtype == torch.float32:
            # Outside float32's tolerance around the eager reference, which may be the inexact one (its training
            # backward through BatchNorm is 3e-3 relative off float64 at head-train 2x2048x30x30, the fused head's
            # 1e-6): from here on every provider is judged against the float64 truth, as the half types are.
            progress("float64 oracle (a provider disagrees with the eager reference) ...")
            oracle = [t.detach().double() for t in case.oracle()]
            for k, v in kept.items():
                results[k] = check_outputs(case, v, expect, oracle)
            results[name] = check_outputs(case, got, expect, oracle)
            kept.clear()
        if oracle is None and dtype == torch.float32 and case.oracle is not None:
            kept[name] = got  # for a re-check against float64 should a later provider disagree
        del got
        what = "compiled and checked" if name == "torch.compile" else "checked"
        progress(f"{name}: {what} in {first_s[name]:.1f} s, max abs err {results[name][0]:.2e}"
                 + (" WRONG" if results[name][2] else ""))
    live = {k: v for k, v in case.providers.items() if k not in failed}

    # 2. Warm-up, then interleaved rounds with the copy probe as one more provider.
    copy_fn, copy_bytes = _copy_probe(case)
    timed = {**live, "copy": copy_fn}
    if case.floor is not None:
        timed["floor"] = case.floor
    for name, fn in timed.items():
        for _ in range(warmup):
            fn()
    sync(case.device)
    progress(f"timing {len(timed)} providers x {rounds} rounds ...")
    times = time_rounds(timed, case.device, rounds)

    # 3. Peak memory, one more call each.
    peaks = {}
    for name, fn in live.items():
        peaks[name] = peak_memory(fn, case.device)

    stats = {k: (statistics.median(v), min(v), max(v)) for k, v in times.items()}
    bandwidth = copy_bytes / (stats["copy"][0] * 1e-3)  # bytes/s
    eager = stats.get("reference", (None,))[0]
    compiled = stats.get("torch.compile", (None,))[0]
    base = {"workload": case.workload, "shape": list(case.shape), "dtype": case.dtype, "device": case.device}
    common = {"rounds": rounds, "must_move_bytes": case.must_move_bytes, "copy_GBps": bandwidth / 1e9,
              "peak_mem_method": CUDA_PEAK_METHOD if case.device == "cuda" else CPU_PEAK_METHOD, **rows_extra}
    rows = []
    for name in case.providers:
        row = {**base, "provider": name}
        if name in failed:
            row.update(median_ms=None, min_ms=None, max_ms=None, speedup_vs_eager=None, speedup_vs_compile=None,
                       roofline_fraction=None, peak_mem_bytes=None, max_abs_err=None, wrong=True,
                       error=failed[name])
        else:
            med, lo, hi = stats[name]
            err, errs, wrong, detail = results[name]
            row.update(median_ms=med, min_ms=lo, max_ms=hi,
                       speedup_vs_eager=eager / med if eager else None,
                       speedup_vs_compile=compiled / med if compiled else None,
                       roofline_fraction=(case.must_move_bytes / bandwidth) / (med * 1e-3),
                       peak_mem_bytes=peaks.get(name), max_abs_err=err, wrong=wrong,
                       max_abs_err_by_output=errs, check=detail)
        rows.append({**row, **common, **info})
    med, lo, hi = stats["copy"]
    rows.append({**base, "provider": "copy", "median_ms": med, "min_ms": lo, "max_ms": hi, "speedup_vs_eager": None,
                 "speedup_vs_compile": None, "roofline_fraction": 1.0, "peak_mem_bytes": None, "max_abs_err": None,
                 "wrong": False, "copy_bytes": copy_bytes, **common, **info})
    if "floor" in stats:
        med, lo, hi = stats["floor"]
        for row in rows[:-1]:
            if row.get("median_ms"):
                row["vs_floor"] = row["median_ms"] / med  # times the read-x-once + write-once floor (< 1: faster)
        rows.append({**base, "provider": "floor", "median_ms": med, "min_ms": lo, "max_ms": hi,
                     "speedup_vs_eager": eager / med if eager else None,
                     "speedup_vs_compile": compiled / med if compiled else None,
                     "roofline_fraction": (case.must_move_bytes / bandwidth) / (med * 1e-3), "peak_mem_bytes": None,
                     "max_abs_err": None, "wrong": False, **common, **info})
    for name, why in case.skipped.items():
        progress(f"{name}: not run ({why})")
    compile_s = 0.0
    if "torch.compile" in first_s and compiled:
        compile_s = max(0.0, first_s["torch.compile"] - compiled * 1e-3)
    return rows, {"wall_s": time.perf_counter() - t_start, "compile_s": compile_s}


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------
def stderr_progress(prefix: str = "") -> Callable[[str], None]:
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {prefix}{msg}", file=sys.stderr, flush=True)

    return say
