"""Functional API of the fused PPM: backend choice, fake kernels, autograd.

The three ops (schemas in csrc/ops.cpp; S = sum of b*b over bins, level l at columns [off_l, off_l + b_l^2)):

    pyramid_pool(x (N, C, H, W), bins)                              -> (N, C, S) float32 (float64 for float64 x)
    ppm_reduce(pooled (N, C, S), weight (L, R, C), scale, shift, bins, relu) -> (N, R, S), pooled's dtype
    upsample_concat(x, levels (N, R, S), bins, align_corners)       -> (N, C + L*R, H, W), x's dtype and layout

their adjoints (upsample_concat_backward, pyramid_pool_backward), and the fused head's two ops (head_epilogue,
head_context_backward; see pspnet_fast/head.py).

Backends implement the same ops: "cpu" (C++, CPU tensors), "cuda" (CUDA C++, CUDA tensors), "triton" (Triton
kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) and "reference" (pure PyTorch). `choose_backend`
picks one per input; the environment variable PSPNET_FAST_BACKEND overrides the caller's choice.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import _ext

BACKENDS = ("cpu", "cuda", "triton", "reference")
_CHOICES = ("auto",) + BACKENDS
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# Backend registry: each backend says why it cannot run an input.
# ----------------------------------------------------------------------------------------------------------------
def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.lru_cache(maxsize=None)
def _triton_module():
    """pspnet_fast.kernels.ppm_triton, or the reason it cannot be imported."""
    try:
        import triton  # noqa: F401
    except Exception as e:
        return None, f"triton is not importable ({type(e).__name__}: {e})"
    try:
        from .kernels import ppm_triton
    except Exception as e:
        return None, f"the Triton kernels failed to import ({type(e).__name__}: {e})"
    try:
        from .kernels import head_triton  # noqa: F401  (registers the fused head's Triton ops)
    except ImportError:
        pass  # the head's Triton ops are optional: OpSet.head_epilogue is None and the head runs the reference
    return ppm_triton, ""


def _why_not_machine(name: str) -> str | None:
    """Why backend `name` cannot run on this machine at all (None: it can)."""
    if name == "reference":
        return None
    if name == "cpu":
        return None if _ext.load() else f"the extension pspnet_fast._C is not loaded ({_ext.error()})"
    if name == "cuda":
        if not _ext.load():
            return f"the extension pspnet_fast._C is not loaded ({_ext.error()})"
        if _ext.cuda_archs() is None:
            return "the extension was built without CUDA (CPU-only torch, no nvcc, or PSPNET_FAST_SKIP_CUDA=1)"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if name == "triton":
        mod, why = _triton_module()
        if mod is None:
            return why
        if not torch.cuda.is_available() and not _triton_interpret():
            return "no CUDA device is available (set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)"
        return None
    raise ValueError(f"unknown backend {name!r}; expected one of {_CHOICES}")


def why_not(name: str, x: torch.Tensor) -> str | None:
    """Why backend `name` cannot run on input x (None: it can)."""
    why = _why_not_machine(name)
    if why is not None or name == "reference":
        return why
    if x.dtype not in _FLOAT_DTYPES:
        return f"dtype {x.dtype} is not one of float32, float64, float16, bfloat16"
    if name == "cpu" and x.device.type != "cpu":
        return f"input is on {x.device}, the cpu backend takes CPU tensors"
    if name == "cuda" and x.device.type != "cuda":
        return f"input is on {x.device}, the cuda backend takes CUDA tensors"
    if name == "triton":
        if x.device.type == "cpu" and not _triton_interpret():
            return "input is on cpu; Triton runs CPU tensors only under TRITON_INTERPRET=1"
        if x.device.type not in ("cpu", "cuda"):
            return f"input is on {x.device}"
    return None


def available_backends() -> dict[str, dict]:
    """Every backend with whether it runs on this machine and, if not, why: {name: {"available": bool, "reason": str}}."""
    out = {}
    for name in BACKENDS:
        why = _why_not_machine(name)
        out[name] = {"available": why is None, "reason": why or ""}
    return out


def check_backend_name(backend: str) -> str:
    if backend not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {backend!r}")
    return backend


def choose_backend(x: torch.Tensor, requested: str = "auto") -> str:
    """The backend that runs x: PSPNET_FAST_BACKEND if set, else `requested`; "auto" takes the fastest that runs x
    (cpu for CPU tensors; cuda, then triton, for CUDA tensors; else the reference). A named backend that cannot run
    x raises ValueError with the reason."""
    env = os.environ.get("PSPNET_FAST_BACKEND", "").strip()
    if env:
        if env not in _CHOICES:
            raise ValueError(f"PSPNET_FAST_BACKEND must be one of {_CHOICES}, got {env!r}")
        requested = env
    check_backend_name(requested)
    if requested != "auto":
        why = why_not(requested, x)
        if why is not None:
            raise ValueError(f"pspnet_fast backend {requested!r} cannot run this input: {why}")
        return requested
    order = ("cpu", "reference") if x.device.type == "cpu" else ("cuda", "triton", "reference")
    for name in order:
        if why_not(name, x) is None:
            return name
    return "reference"


@dataclass(frozen=True)
class OpSet:
    pyramid_pool: Callable
    ppm_reduce: Callable
    upsample_concat: Callable
    upsample_concat_backward: Callable
    pyramid_pool_backward: Callable
    ppm_forward: Callable | None  # None where the backend has no read-once forward: see ppm_forward()
    head_epilogue: Callable | None  # None where the backend has no fused-head kernels
    head_context_backward: Callable | None


_OP_NAMES = ("pyramid_pool", "ppm_reduce", "upsample_concat", "upsample_concat_backward", "pyramid_pool_backward")
_OPTIONAL_OP_NAMES = ("ppm_forward", "head_epilogue", "head_context_backward")


def _has_kernel(ns, name: str, dispatch_key: str | None) -> bool:
    if not hasattr(ns, name):
        return False
    if dispatch_key is None:
        return True
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pspnet_fast::{name}", dispatch_key)


def _op_set(prefix: str, dispatch_key: str | None = None) -> OpSet:
    ns = torch.ops.pspnet_fast
    extra = [getattr(ns, prefix + name) if _has_kernel(ns, prefix + name, dispatch_key) else None
             for name in _OPTIONAL_OP_NAMES]
    return OpSet(*(getattr(ns, prefix + name) for name in _OP_NAMES), *extra)


def op_set(backend: str) -> OpSet:
    """The ops of a compiled backend ("cpu" and "cuda" share the dispatcher ops; "triton" has its own)."""
    if backend in ("cpu", "cuda"):
        return _op_set("", backend.upper())
    if backend == "triton":
        mod, why = _triton_module()
        if mod is None:
            raise RuntimeError(why)
        return _op_set("triton_")
    raise ValueError(f"backend {backend!r} has no fused ops")


# ----------------------------------------------------------------------------------------------------------------
# Shapes (used by the fake kernels).
# ----------------------------------------------------------------------------------------------------------------
def _offsets(bins: Sequence[int]) -> list[int]:
    offs, o = [], 0
    for b in bins:
        offs.append(o)
        o += b * b
    return offs


def total_bins(bins: Sequence[int]) -> int:
    return sum(b * b for b in bins)


def _pooled_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _out_memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# ----------------------------------------------------------------------------------------------------------------
# Fake kernels and autograd, registered for the dispatcher ops and (when importable) the Triton ops.
# ----------------------------------------------------------------------------------------------------------------
def _fake_pyramid_pool(x, bins):
    return x.new_empty((x.shape[0], x.shape[1], total_bins(bins)), dtype=_pooled_dtype(x.dtype))


def _fake_ppm_reduce(pooled, weight, scale, shift, bins, relu):
    return pooled.new_empty((pooled.shape[0], weight.shape[1], pooled.shape[2]))


def _fake_upsample_concat(x, levels, bins, align_corners, x_last=False):
    n, c, h, w = x.shape
    return x.new_empty((n, c + len(bins) * levels.shape[1], h, w)).contiguous(memory_format=_out_memory_format(x))


def _fake_upsample_concat_backward(grad_out, in_channels, bins, align_corners, x_last=False):
    n, co = grad_out.shape[:2]
    return grad_out.new_empty((n, (co - in_channels) // len(bins), total_bins(bins)),
                              dtype=_pooled_dtype(grad_out.dtype))


def _fake_pyramid_pool_backward(grad_pooled, grad_out, bins, x_offset=0):
    n, c = grad_pooled.shape[:2]
    h, w = grad_out.shape[2:]
    return grad_out.new_empty((n, c, h, w)).contiguous(memory_format=_out_memory_format(grad_out))


def _fake_ppm_forward(x, weight, scale, shift, bins, relu, align_corners, x_last=False):
    n, c, h, w = x.shape
    return x.new_empty((n, c + len(bins) * weight.shape[1], h, w)).contiguous(memory_format=_out_memory_format(x))


def ppm_forward(kernels: OpSet, x, weight, scale, shift, bins, relu, align_corners, x_last=False):
    """The eval forward (N, C + L*R, H, W): kernels.ppm_forward (x read once) where the backend has it, else the
    composition pyramid_pool -> ppm_reduce -> upsample_concat (x read twice; the same values)."""
    if kernels.ppm_forward is not None:
        return kernels.ppm_forward(x, weight, scale, shift, bins, relu, align_corners, x_last)
    from . import _order
    pooled = kernels.pyramid_pool(x, bins)
    levels = kernels.ppm_reduce(pooled, weight, scale, shift, bins, relu)
    return _order.upsample_concat(kernels, x, levels, bins, align_corners, x_last)


def _fake_head_epilogue(z, q, bins, align_corners, scale, shift, relu):
    return z.new_empty(z.shape).contiguous(memory_format=_out_memory_format(z))


def _fake_head_context_backward(grad, bins, align_corners):
    return grad.new_empty((grad.shape[0], grad.shape[1], 9, total_bins(bins)), dtype=_pooled_dtype(grad.dtype))


def _pool_setup(ctx, inputs, output):
    x, bins = inputs
    ctx.bins = tuple(bins)
    ctx.x_shape = tuple(x.shape)
    ctx.x_dtype = x.dtype
    ctx.x_format = _out_memory_format(x)


def _pool_backward_for(prefix: str):
    def backward(ctx, grad):
        # The op alone has no grad_out to add: a zero expanded to x's shape stands in (the kernels may materialize
        # it). This path serves direct op use and traced graphs; the module's own autograd node passes the real
        # grad_out and writes grad_x in one pass.
        zero = grad.new_zeros((), dtype=ctx.x_dtype).expand(ctx.x_shape)
        gx = getattr(torch.ops.pspnet_fast, prefix + "pyramid_pool_backward")(grad, zero, ctx.bins)
        return gx.contiguous(memory_format=ctx.x_format), None
    return backward


def _reduce_setup(ctx, inputs, output):
    pooled, weight, scale, shift, bins, relu = inputs
    ctx.bins = tuple(bins)
    ctx.relu = relu
    ctx.has_scale = scale is not None
    ctx.save_for_backward(pooled, weight, scale if scale is not None else pooled.new_empty(0),
                          shift if shift is not None else pooled.new_empty(0), output)


def _reduce_backward(ctx, grad):
    """Per level, with the images folded into the columns: g (R, N*s), p (C, N*s); dW = g p^T, dp = W^T g (one GEMM
    each, nothing zero-filled)."""
    pooled, weight, scale, shift, out = ctx.saved_tensors
    n, c = pooled.shape[:2]
    grad = grad.to(pooled.dtype)
    if ctx.relu:
        # torch.relu's backward: gradient where the result is positive.
        grad = grad * (out > 0).to(grad.dtype)
    g_pooled, g_weight, g_scale, g_shift = [], [], [], []
    for l, (b, off) in enumerate(zip(ctx.bins, _offsets(ctx.bins))):
        s = b * b
        p = pooled[:, :, off:off + s].permute(1, 0, 2).reshape(c, n * s)  # (C, N*s)
        g = grad[:, :, off:off + s].permute(1, 0, 2).reshape(-1, n * s)  # (R, N*s)
        if ctx.has_scale:
            y = torch.matmul(weight[l], p)  # (R, N*s), before the affine epilogue
            g_scale.append((g * y).sum(1))
            g_shift.append(g.sum(1))
            g = g * scale[l].view(-1, 1)
        g_weight.append(torch.matmul(g, p.t()))  # (R, C)
        g_pooled.append(torch.matmul(weight[l].t(), g).reshape(c, n, s).permute(1, 0, 2))  # (N, C, s)
    return (torch.cat(g_pooled, 2), torch.stack(g_weight), torch.stack(g_scale) if ctx.has_scale else None,
            torch.stack(g_shift) if ctx.has_scale else None, None, None)


def _upsample_setup(ctx, inputs, output):
    x, levels, bins, align_corners = inputs[:4]
    # x_last: the dispatcher op's fifth argument ([levels..., x]); the Triton op has four.
    ctx.x_last = bool(inputs[4]) if len(inputs) > 4 else False
    ctx.n_inputs = len(inputs)
    ctx.bins = tuple(bins)
    ctx.align_corners = align_corners
    ctx.c = x.shape[1]
    ctx.x_dtype = x.dtype
    ctx.x_format = _out_memory_format(x)
    ctx.levels_dtype = levels.dtype


def _upsample_backward_for(prefix: str):
    def backward(ctx, grad):
        """grad_x = grad_out's x channels (a view); grad_levels by the upsample_concat_backward op."""
        op = getattr(torch.ops.pspnet_fast, prefix + "upsample_concat_backward")
        if ctx.x_last:
            lr = grad.shape[1] - ctx.c
            gx = grad[:, lr:].to(ctx.x_dtype)
            # The CPU kernel reads the x-last layout itself; CUDA and Triton read the levels-only view (in_channels 0).
            gl = (op(grad, ctx.c, ctx.bins, ctx.align_corners, x_last=True) if not prefix and grad.device.type == "cpu"
                  else op(grad[:, :lr], 0, ctx.bins, ctx.align_corners))
        else:
            gx = grad[:, :ctx.c].to(ctx.x_dtype)
            gl = op(grad, ctx.c, ctx.bins, ctx.align_corners)
        return (gx, gl.to(ctx.levels_dtype)) + (None,) * (ctx.n_inputs - 2)
    return backward


def _epilogue_setup(ctx, inputs, output):
    z, q, bins, align_corners, scale, shift, relu = inputs
    ctx.bins, ctx.align_corners, ctx.relu = tuple(bins), align_corners, relu
    ctx.z_dtype, ctx.q_dtype = z.dtype, q.dtype
    ctx.has_scale = scale is not None
    empty = q.new_empty(0)
    ctx.save_for_backward(z if ctx.has_scale else empty, q if ctx.has_scale else empty,
                          scale if ctx.has_scale else empty, output if relu else empty)


def _epilogue_backward_for(prefix: str):
    def backward(ctx, grad):
        """out = act((z + context(q)) * scale + shift): the ReLU mask and the scale apply to the gradient, then
        grad_z is that gradient and grad_q its context adjoint (head_context_backward)."""
        z, q, scale, out = ctx.saved_tensors
        ops_ns = torch.ops.pspnet_fast
        g = grad.to(ctx.q_dtype)
        if ctx.relu:
            g = g * (out > 0).to(g.dtype)  # torch.relu's backward: where the result is positive
        g_scale = g_shift = None
        if ctx.has_scale:
            g_shift = g.sum((0, 2, 3))
            v = getattr(ops_ns, prefix + "head_epilogue")(z, q, ctx.bins, ctx.align_corners, None, None, False)
            g_scale = (g * v.to(g.dtype)).sum((0, 2, 3))
            g = g * scale.view(1, -1, 1, 1)
        g_q = getattr(ops_ns, prefix + "head_context_backward")(g, ctx.bins, ctx.align_corners)
        return g.to(ctx.z_dtype), g_q, None, None, g_scale, g_shift, None
    return backward


def _register(prefix: str, with_fake: bool) -> None:
    ns = "pspnet_fast::" + prefix
    if with_fake:
        torch.library.register_fake(ns + "pyramid_pool")(_fake_pyramid_pool)
        torch.library.register_fake(ns + "ppm_reduce")(_fake_ppm_reduce)
        torch.library.register_fake(ns + "upsample_concat")(_fake_upsample_concat)
        torch.library.register_fake(ns + "upsample_concat_backward")(_fake_upsample_concat_backward)
        torch.library.register_fake(ns + "pyramid_pool_backward")(_fake_pyramid_pool_backward)
        torch.library.register_fake(ns + "ppm_forward")(_fake_ppm_forward)
        torch.library.register_fake(ns + "head_epilogue")(_fake_head_epilogue)
        torch.library.register_fake(ns + "head_context_backward")(_fake_head_context_backward)
    torch.library.register_autograd(ns + "pyramid_pool", _pool_backward_for(prefix), setup_context=_pool_setup)
    torch.library.register_autograd(ns + "ppm_reduce", _reduce_backward, setup_context=_reduce_setup)
    torch.library.register_autograd(ns + "upsample_concat", _upsample_backward_for(prefix),
                                    setup_context=_upsample_setup)
    if hasattr(torch.ops.pspnet_fast, prefix + "head_epilogue"):
        torch.library.register_autograd(ns + "head_epilogue", _epilogue_backward_for(prefix),
                                        setup_context=_epilogue_setup)


_registered: set[str] = set()


def ensure_registered(backend: str) -> None:
    """Registers fake kernels and autograd for a backend's ops, once (the Triton ops derive their fake kernels)."""
    key = "triton" if backend == "triton" else "ext"
    if key in _registered:
        return
    if key == "ext":
        if _ext.load():
            _register("", with_fake=True)
    else:
        op_set("triton")
        _register("triton_", with_fake=False)
    _registered.add(key)


if _ext.load():
    ensure_registered("cpu")
