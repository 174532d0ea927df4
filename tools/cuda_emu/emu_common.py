"""Paths and switches shared by the CUDA emulator scripts (make_emu.py, build.py, test_emu*.py).

Everything is located from this file, so the tools run from any checkout and any working directory. Generated
files (ppm_emu.cpp, the build directory) go to PSPNET_FAST_EMU_DIR, by default a folder under the system temp
directory named after the checkout: outside the repository (nothing generated can be committed by accident), but
stable between runs so that ninja reuses an unchanged build, and separate per checkout so two worktrees do not
overwrite each other's generated source.
"""
import hashlib
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CUDA_DIR = os.path.join(REPO, "csrc", "cuda")
CU_SOURCE = os.path.join(CUDA_DIR, "ppm_cuda.cu")
COMMON_HEADER = os.path.join(CUDA_DIR, "cuda_common.cuh")
OPS_SOURCE = os.path.join(REPO, "csrc", "ops.cpp")


def _default_dir():
    tag = hashlib.sha1(REPO.encode()).hexdigest()[:10]
    uid = os.getuid() if hasattr(os, "getuid") else "u"
    return os.path.join(tempfile.gettempdir(), f"pspnet_fast_emu-{uid}-{tag}")


EMU_DIR = os.path.abspath(os.environ.get("PSPNET_FAST_EMU_DIR") or _default_dir())
if os.path.commonpath([EMU_DIR, REPO]) == REPO:
    sys.exit(f"PSPNET_FAST_EMU_DIR={EMU_DIR} is inside the repository {REPO}; pick a folder outside it")
GEN_CPP = os.path.join(EMU_DIR, "ppm_emu.cpp")
BUILD_DIR = os.path.join(EMU_DIR, "build")
EMU_SO = os.path.join(BUILD_DIR, "ppm_emu.so")

# Quick mode runs a representative subset of each test script (run.sh quick passes --quick); the env var lets a
# script run by hand pick it up too.
QUICK = "--quick" in sys.argv or os.environ.get("PSPNET_FAST_EMU_QUICK", "") not in ("", "0")


def inline_common(src: str) -> str:
    """src (a csrc/cuda source) with `#include "cuda_common.cuh"` replaced by that header's text, less its
    `#pragma once` and c10/cuda includes (the including file's own, or the emulator prelude, stand in for them), so that
    the generator's rewrites (device checks, launches) reach the shared helpers too: each .cu becomes one unit."""
    inc = '#include "cuda_common.cuh"'
    if inc not in src:
        return src
    lines = [ln for ln in open(COMMON_HEADER).read().splitlines(keepends=True)
             if ln.strip() != "#pragma once" and not ln.startswith("#include <c10/cuda/")]
    text = "".join(lines)
    out = []
    for ln in src.splitlines(keepends=True):
        # The include line may carry a trailing comment.
        out.append(text if ln.startswith(inc) else ln)
    return "".join(out)


def load_emu():
    """torch.ops.pspnet_emu, the emulated CUDA ops, from the library build.py made."""
    import torch

    if not os.path.exists(EMU_SO):
        sys.exit(f"{EMU_SO} not found: run make_emu.py and build.py first (or tools/cuda_emu/run.sh)")
    torch.ops.load_library(EMU_SO)
    return torch.ops.pspnet_emu


def load_cpu_ops():
    """torch.ops.pspnet_fast from the repository's compiled extension (its CPU kernels are a second reference)."""
    import torch

    sys.path.insert(0, REPO)
    from pspnet_fast import _ext

    if not _ext.load():
        sys.exit(f"pspnet_fast._C could not be loaded ({_ext.error()}); build the extension first (make build)")
    return torch.ops.pspnet_fast
