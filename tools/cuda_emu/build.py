"""Compiles the units that make_emu.py generated (listed in sources.txt) into BUILD_DIR/ppm_emu.so, a torch op library
(pspnet_emu)."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from emu_common import BUILD_DIR, GEN_SOURCES_LIST, HERE, REPO
import torch
from torch.utils.cpp_extension import load
os.makedirs(BUILD_DIR, exist_ok=True)
# csrc for ppm_math.h (included by the kernels), HERE for emu_prelude.h; -pthread: every CUDA thread is a std::thread.
sources = open(GEN_SOURCES_LIST).read().split()
load(name="ppm_emu", sources=sources, extra_include_paths=[os.path.join(REPO, "csrc"), HERE],
     extra_cflags=["-O2", "-pthread", "-Wall", "-Wno-unused-function", "-Wno-sign-compare"], extra_ldflags=["-pthread"],
     is_python_module=False, build_directory=BUILD_DIR, verbose=False)
print("ok", BUILD_DIR)
