"""Rewrites csrc/cuda/ppm_cuda.cu into host C++ (ppm_emu.cpp in PSPNET_FAST_EMU_DIR) that emu_prelude.h runs on the
CPU: CUDA headers -> the prelude, dynamic shared memory -> the prelude's per-block buffer, kernel<<<cfg>>>(args) ->
emu_launch(kernel, cfg, args), and the CUDA op registrations -> a pspnet_emu library with the schemas of ops.cpp."""
import os, re, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from emu_common import CU_SOURCE, EMU_DIR, GEN_CPP, OPS_SOURCE, inline_common
src = inline_common(open(CU_SOURCE).read())
s = src.replace('#define TORCH_ASSERT_ONLY_METHOD_OPERATORS\n', '')
s = s.replace('#include <c10/cuda/CUDAException.h>\n#include <c10/cuda/CUDAGuard.h>\n#include <c10/cuda/CUDAStream.h>\n', '#include "emu_prelude.h"\n')
assert 'emu_prelude' in s
s = s.replace('extern __shared__ __align__(16) unsigned char smem[];', 'unsigned char* smem = g_dyn_smem;')
s = s.replace('.is_cuda()', '.is_cpu()')  # the ops' device checks: the emulated ops take CPU tensors
# kernel<<<cfg>>>(args) -> emu_launch(kernel, cfg, args)
out = []; i = 0
while True:
    j = s.find('<<<', i)
    if j < 0: out.append(s[i:]); break
    # kernel expression: back to previous statement boundary (whitespace after ; { } or newline indentation)
    k = j
    depth = 0
    while k > 0:
        c = s[k-1]
        if c == '>': depth += 1
        elif c == '<': depth -= 1
        if depth == 0 and (c in ' \n\t;{}'):
            break
        k -= 1
    kexpr = s[k:j]
    e = s.find('>>>(', j)
    cfg = s[j+3:e]
    out.append(s[i:k]); out.append('emu_launch(' + kexpr + ', ' + cfg + ', ')
    i = e + 4
s = ''.join(out)
t = s.index('TORCH_LIBRARY_IMPL(pspnet_fast, CUDA, m)')
# Every op the CUDA block registers, with its schema from ops.cpp, as pspnet_emu::<name>.
impls = re.findall(r'm\.impl\("(\w+)", &([\w:]+)\);', s[t:])
# A schema may be split over adjacent string literals ("...) " "-> Tensor"): join them.
schemas = dict((re.match(r'(\w+)\(', d).group(1), d) for d in
               (''.join(re.findall(r'"([^"]*)"', lits)) for lits in
                re.findall(r'm\.def\(((?:\s*"[^"]*")+)', open(OPS_SOURCE).read())))
defs = ''.join(f'  m.def("{schemas[name]}", &{fn});\n' for name, fn in impls)
print("emulated ops:", [n for n, _ in impls])
s = s[:t] + 'TORCH_LIBRARY(pspnet_emu, m) {\n' + defs + \
    '  m.def("emu_stats() -> int[]", []() { return std::vector<int64_t>{g_launches, g_max_smem_seen}; });\n}\n'
os.makedirs(EMU_DIR, exist_ok=True)
# Rewrite only on a change: ninja rebuilds by modification time, and an unchanged source should not cost a recompile.
changed = not os.path.exists(GEN_CPP) or open(GEN_CPP).read() != s
if changed:
    open(GEN_CPP, 'w').write(s)
print("wrote" if changed else "unchanged", GEN_CPP)
