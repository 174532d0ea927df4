"""Build of pspnet_fast: one extension, pspnet_fast._C.

The C++ CPU kernels always build. The CUDA kernels are added when this torch has CUDA and nvcc is found (the GPU
itself need not be present), or when FORCE_CUDA=1; PSPNET_FAST_SKIP_CUDA=1 skips them. TORCH_CUDA_ARCH_LIST defaults
to "8.0;9.0" (A100, H100/H200); MAX_JOBS and NVCC_THREADS bound the parallel compile. The build prints what it builds.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """CUDA_HOME from the environment, else /usr/local/cuda, else the folder above the nvcc on PATH.

    Resolving nvcc through a wrapper script in /usr/local/bin would make torch guess /usr/local, which has no CUDA
    headers, so the canonical install folder is tried before PATH.
    """
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def _say(msg):
    print(f"[pspnet_fast build] {msg}", file=sys.stderr, flush=True)


def _extensions():
    import torch
    from packaging.version import Version

    cuda_home = _find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported; set it before that import.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = [os.path.join("csrc", "ops.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # csrc/cuda/*.cpp: host code of the CUDA backend (e.g. ppm_reduce's cuBLAS call), compiled only with the .cu files.
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cuda_sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))

    if _flag("PSPNET_FAST_SKIP_CUDA"):
        with_cuda, why = False, "PSPNET_FAST_SKIP_CUDA=1"
    elif _flag("FORCE_CUDA"):
        with_cuda, why = True, "FORCE_CUDA=1"
    elif not cuda_sources:
        with_cuda, why = False, "no CUDA sources in csrc/cuda"
    elif torch.version.cuda is None:
        with_cuda, why = False, f"torch {torch.__version__} is a CPU-only build"
    elif cuda_home is None:
        with_cuda, why = False, "nvcc not found (set CUDA_HOME)"
    else:
        with_cuda, why = True, f"torch CUDA {torch.version.cuda}, nvcc in {cuda_home}"

    cxx_flags = ["-O3"]
    if sys.platform.startswith("linux"):
        cxx_flags += ["-fopenmp"]
    define_macros = []
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], define_macros=define_macros)

    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or "8.0;9.0"
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        nvcc_flags += ["--threads", os.environ.get("NVCC_THREADS", "2")]
        if torch.version.cuda and Version(torch.version.cuda) >= Version("13.0"):
            nvcc_flags += ["-Wno-deprecated-gpu-targets"]
        define_macros += [("PSPNET_FAST_WITH_CUDA", None), ("PSPNET_FAST_CUDA_ARCHS", f'"{arch_list}"')]
        _say(f"building C++ CPU kernels + CUDA kernels ({why}; archs {arch_list}): {sources + cuda_sources}")
        ext = CUDAExtension(
            "pspnet_fast._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
            **kwargs,
        )
    else:
        _say(f"building C++ CPU kernels only (CUDA skipped: {why}): {sources}")
        ext = CppExtension(
            "pspnet_fast._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
            **kwargs,
        )
    return [ext]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    # MAX_JOBS is read by BuildExtension (ninja -j); default to the machine's cores.
    return BuildExtension.with_options(use_ninja=True)


setup(
    packages=["pspnet_fast", "pspnet_fast.ops", "pspnet_fast.nn", "pspnet_fast.models", "pspnet_fast.interop",
              "pspnet_fast.training", "pspnet_fast.kernels", "pspnet_fast.benchmarks"],
    package_dir={"pspnet_fast.kernels": "kernels", "pspnet_fast.benchmarks": "benchmarks"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
)
