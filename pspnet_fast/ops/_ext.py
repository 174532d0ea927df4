"""Loads the compiled extension pspnet_fast._C once; without it everything falls back to the reference."""
from __future__ import annotations

import importlib
import os
import warnings

import torch

_loaded: bool | None = None
_error: str = ""


def load() -> bool:
    """True when pspnet_fast._C imported and registered its ops. Warns once when it is missing or broken."""
    global _loaded, _error
    if _loaded is None:
        try:
            importlib.import_module("pspnet_fast._C")
            torch.ops.pspnet_fast.build_info()
            _loaded = True
        except Exception as e:  # ImportError, an undefined symbol, an ABI mismatch: all mean "use the reference"
            _loaded = False
            _error = f"{type(e).__name__}: {e}"
            if not os.environ.get("PSPNET_FAST_QUIET"):
                warnings.warn(
                    "pspnet_fast: the compiled extension pspnet_fast._C could not be loaded "
                    f"({_error}); the C++/CUDA backends are unavailable and modules fall back to the reference "
                    "(or Triton on a GPU). Rebuild with `pip install --no-build-isolation -e .`.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _loaded


def error() -> str:
    load()
    return _error


def build_info() -> list[str]:
    """What the binary holds: ["cpu"] or ["cpu", "cuda:8.0;9.0"]; [] when the extension is missing."""
    return list(torch.ops.pspnet_fast.build_info()) if load() else []


def cuda_archs() -> str | None:
    for part in build_info():
        if part.startswith("cuda:"):
            return part[len("cuda:"):]
    return None
