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
# Headers of csrc/cuda that the generators inline into each unit (a header may include the other).
INLINED_HEADERS = ("cuda_common.cuh", "cuda_host.h", "ppm_cuda.h")
OPS_SOURCE = os.path.join(REPO, "csrc", "ops.cpp")


def _default_dir():
    tag = hashlib.sha1(REPO.encode()).hexdigest()[:10]
    uid = os.getuid() if hasattr(os, "getuid") else "u"
    return os.path.join(tempfile.gettempdir(), f"pspnet_fast_emu-{uid}-{tag}")


EMU_DIR = os.path.abspath(os.environ.get("PSPNET_FAST_EMU_DIR") or _default_dir())
if os.path.commonpath([EMU_DIR, REPO]) == REPO:
    sys.exit(f"PSPNET_FAST_EMU_DIR={EMU_DIR} is inside the repository {REPO}; pick a folder outside it")
GEN_SOURCES_LIST = os.path.join(EMU_DIR, "sources.txt")  # the units make_emu.py generated, one per line
BUILD_DIR = os.path.join(EMU_DIR, "build")
EMU_SO = os.path.join(BUILD_DIR, "ppm_emu.so")

# Quick mode runs a representative subset of each test script (run.sh quick passes --quick); the env var lets a
# script run by hand pick it up too.
QUICK = "--quick" in sys.argv or os.environ.get("PSPNET_FAST_EMU_QUICK", "") not in ("", "0")


def inline_common(src: str, _seen=None) -> str:
    """src (a csrc/cuda source) with each `#include "<h>"` of INLINED_HEADERS replaced by that header's text (once per
    unit, recursively), less its `#pragma once` and c10/cuda includes (the including file's own, or the emulator
    prelude, stand in for them), so that the generator's rewrites (device checks, launches) reach the shared helpers
    too: each .cu or .cpp becomes one self-contained unit."""
    seen = set() if _seen is None else _seen
    out = []
    for ln in src.splitlines(keepends=True):
        name = next((h for h in INLINED_HEADERS if ln.startswith(f'#include "{h}"')), None)
        if name is None:
            out.append(ln)
            continue
        if name in seen:
            continue
        seen.add(name)
        text = "".join(x for x in open(os.path.join(CUDA_DIR, name)).read().splitlines(keepends=True)
                       if x.strip() != "#pragma once" and not x.startswith("#include <c10/cuda/"))
        out.append(inline_common(text, seen))
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
