"""Backend choice: which backends run here and why not (device, dtype, not built), the chooser, the op sets.

Backends implement the same ops (schemas in csrc/ops.cpp; see pspnet_fast.ops for the list): "cpu" (C++, CPU
tensors), "cuda" (CUDA C++, CUDA tensors), "triton" (Triton kernels; CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1) and "reference" (pure PyTorch). `choose_backend` picks one per input; the environment variable
PSPNET_FAST_BACKEND overrides the caller's choice.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

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
        # Imported on first use: the Triton kernels need triton (optional) and cost ~1 s to import.
        from ..kernels import ppm_triton
    except Exception as e:
        return None, f"the Triton kernels failed to import ({type(e).__name__}: {e})"
    try:
        from ..kernels import head_triton  # noqa: F401  (registers the fused head's Triton ops)
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


@torch.compiler.assume_constant_result  # a registry lookup: torch.compile takes its value at trace time
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


_op_sets: dict[str, OpSet] = {}  # backend -> its op set, once built (eager calls only)


def op_set(backend: str) -> OpSet:
    """The ops of a compiled backend ("cpu" and "cuda" share the dispatcher ops; "triton" has its own). Built once per
    backend in eager mode (the registry lookups cost ~20 us, on every module call)."""
    compiling = torch.compiler.is_compiling()
    if not compiling and backend in _op_sets:
        return _op_sets[backend]
    if backend in ("cpu", "cuda"):
        ks = _op_set("", backend.upper())
    elif backend == "triton":
        mod, why = _triton_module()
        if mod is None:
            raise RuntimeError(why)
        ks = _op_set("triton_")
    else:
        raise ValueError(f"backend {backend!r} has no fused ops")
    if not compiling:
        _op_sets[backend] = ks
    return ks

