"""Tests of pspnet_fast.ops; the Triton interpreter preamble shared by the tests/ops/test_*triton*.py files."""

import os
import sys

import pytest
import torch


def triton_interpreter():
    """Triton in its CPU interpreter for the calling test module; call it at the module's top, before anything imports
    triton (pspnet_fast does), and check the kernels with require_interpreted after importing them.

    TRITON_INTERPRET=1 must be set before triton is imported, and it stays in force for the whole process: Triton's own
    @triton.jit helpers are built at import time. So the module skips itself where a CUDA device is present (setting
    it would turn the compiled GPU Triton tests of the other files into interpreter runs; there those cover the Triton
    backend, and `TRITON_INTERPRET=1 pytest <file>` runs the interpreter tests alone) and where triton was already
    imported in compiled mode (run the file in its own pytest process, or with the other interpreter files). Returns
    the triton module (the module skips itself where triton is not installed)."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a CUDA device is present: the Triton backend is tested on it by the other test files",
                    allow_module_level=True)
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton already imported without TRITON_INTERPRET=1; run this file in its own pytest process",
                    allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
    return pytest.importorskip("triton")


def require_interpreted(kernel, module: str):
    """Skips the calling test module where `kernel` (a @triton.jit function of `module`) is compiled, not interpreted:
    its module was imported before TRITON_INTERPRET=1 was set."""
    if type(kernel).__name__ != "InterpretedFunction":
        pytest.skip(f"{module} was imported without TRITON_INTERPRET=1", allow_module_level=True)
