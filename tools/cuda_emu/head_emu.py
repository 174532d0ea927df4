"""Generates and builds the CPU emulation of csrc/cuda/head_cuda.cu: head_emu.cpp (the same rewrites as make_emu.py,
plus a settable stand-in for the device's opt-in shared memory limit, `emu_set_optin`, and external linkage for the
kernels so that the launch log names them) in PSPNET_FAST_EMU_DIR, compiled into build_head/head_emu.so, op library
`pspnet_head_emu`: head_epilogue, head_context_backward, emu_stats, emu_reset, emu_set_optin, emu_launch_log,
emu_launch_log_clear. `load_head_emu()` does all three steps (an unchanged source is not recompiled)."""
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from emu_common import EMU_DIR, HERE, OPS_SOURCE, REPO, inline_common  # noqa: E402

HEAD_SOURCE = os.path.join(REPO, "csrc", "cuda", "head_cuda.cu")
GEN = os.path.join(EMU_DIR, "head_emu.cpp")
BUILD = os.path.join(EMU_DIR, "build_head")


def generate():
    s = inline_common(open(HEAD_SOURCE).read())
    s = s.replace('#define TORCH_ASSERT_ONLY_METHOD_OPERATORS\n', '')
    hdr = '#include <c10/cuda/CUDAException.h>\n#include <c10/cuda/CUDAGuard.h>\n#include <c10/cuda/CUDAStream.h>\n'
    assert hdr in s
    # emu_extra.h: the occupancy query (2 blocks per SM, 4 SMs: persistent grids of 8 blocks).
    s = s.replace(hdr, '#include "emu_prelude.h"\n#include "emu_extra.h"\ninline long long g_head_optin = 227 * 1024;\n')
    q = 'C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, current_device()));'
    assert q in s
    s = s.replace(q, 'v = static_cast<int>(g_head_optin);')
    s = s.replace('extern __shared__ __align__(16) unsigned char smem[];', 'unsigned char* smem = g_dyn_smem;')
    s = s.replace('is_cuda()', 'is_cpu()')  # the ops' device checks: the emulated ops take CPU tensors
    # External linkage for the kernels, so that the prelude's launch log finds their names (dladdr).
    assert '\nnamespace {\n' in s
    s = s.replace('\nnamespace {\n', '\ninline namespace emu_visible {\n')
    out, i = [], 0
    while True:
        j = s.find('<<<', i)
        if j < 0:
            out.append(s[i:])
            break
        k, depth = j, 0
        while k > 0:
            c = s[k - 1]
            if c == '>':
                depth += 1
            elif c == '<':
                depth -= 1
            if depth == 0 and c in ' \n\t;{}':
                break
            k -= 1
        e = s.find('>>>(', j)
        assert s[k:j].strip(), "a launch whose kernel expression the rewrite cannot find"
        out += [s[i:k], 'emu_launch(' + s[k:j] + ', ' + s[j + 3:e] + ', ']
        i = e + 4
    s = ''.join(out)
    t = s.index('TORCH_LIBRARY_IMPL(pspnet_fast, CUDA, m)')
    impls = re.findall(r'm\.impl\("(\w+)", &([\w:]+)\);', s[t:])
    # A schema may continue in a second string literal on the next line (head_epilogue's does).
    defs_ = [a + b for a, b in re.findall(r'm\.def\("([^"]+)"(?:\s*"([^"]*)")?', open(OPS_SOURCE).read())]
    schemas = dict((re.match(r'(\w+)\(', d).group(1), d) for d in defs_)
    defs = ''.join(f'  m.def("{schemas[name]}", &{fn});\n' for name, fn in impls)
    s = s[:t] + 'TORCH_LIBRARY(pspnet_head_emu, m) {\n' + defs + \
        '  m.def("emu_stats() -> int[]", []() { return std::vector<int64_t>{g_launches, g_max_smem_seen}; });\n' + \
        '  m.def("emu_reset() -> ()", []() { g_launches = 0; g_max_smem_seen = 0; });\n' + \
        '  m.def("emu_set_optin(int v) -> ()", [](int64_t v) { g_head_optin = v; });\n' + \
        '  emu_launch_log_defs(m);\n}\n'
    os.makedirs(EMU_DIR, exist_ok=True)
    if not os.path.exists(GEN) or open(GEN).read() != s:
        open(GEN, 'w').write(s)
    return [n for n, _ in impls]





def load_head_emu(verbose=True):
    """torch.ops.pspnet_head_emu, generated and built first when the source changed."""
    ops = generate()
    if verbose:
        print("emulated ops:", ops, flush=True)
    import torch
    from torch.utils.cpp_extension import load

    os.makedirs(BUILD, exist_ok=True)
    t0 = time.time()
    load(name="head_emu", sources=[GEN], extra_include_paths=[os.path.join(REPO, "csrc"), HERE],
         extra_cflags=["-O2", "-pthread", "-Wall", "-Wno-unused-function", "-Wno-sign-compare"],
         extra_ldflags=["-pthread"], is_python_module=False, build_directory=BUILD, verbose=False)
    if verbose:
        print(f"build {time.time() - t0:.0f}s", flush=True)
    torch.ops.load_library(os.path.join(BUILD, "head_emu.so"))
    return torch.ops.pspnet_head_emu
