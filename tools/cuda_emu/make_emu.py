"""Rewrites the PPM sources of csrc/cuda (every ppm_*.cu and ppm_*.cpp; head_cuda.cu is test_emu_head.py's) into host
C++ units (emu_<name>.cpp in PSPNET_FAST_EMU_DIR) that emu_prelude.h runs on the CPU: cuda_common.cuh inlined, CUDA
headers -> the prelude, dynamic shared memory -> the prelude's per-block buffer, kernel<<<cfg>>>(args) ->
emu_launch(kernel, cfg, args), device checks -> CPU tensors, and each file's CUDA op registrations -> a fragment of the
pspnet_emu library with the schemas of ops.cpp (plus emu_stats). build.py compiles the units into one library."""
import glob, os, re, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from emu_common import CUDA_DIR, EMU_DIR, GEN_SOURCES_LIST, OPS_SOURCE, inline_common

CUDA_HDR = '#include <c10/cuda/CUDAException.h>\n#include <c10/cuda/CUDAGuard.h>\n#include <c10/cuda/CUDAStream.h>\n'
# A schema may be split over adjacent string literals ("...) " "-> Tensor"): join them.
SCHEMAS = dict((re.match(r'(\w+)\(', d).group(1), d) for d in
               (''.join(re.findall(r'"([^"]*)"', lits)) for lits in
                re.findall(r'm\.def\(((?:\s*"[^"]*")+)', open(OPS_SOURCE).read())))


def rewrite_launches(s):
    """kernel<<<cfg>>>(args) -> emu_launch(kernel, cfg, args)."""
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
        assert kexpr.strip(), "a launch whose kernel expression the rewrite cannot find"
        e = s.find('>>>(', j)
        cfg = s[j+3:e]
        out.append(s[i:k]); out.append('emu_launch(' + kexpr + ', ' + cfg + ', ')
        i = e + 4
    return ''.join(out)


def rewrite(path):
    s = inline_common(open(path).read())
    s = s.replace('#define TORCH_ASSERT_ONLY_METHOD_OPERATORS\n', '')
    assert CUDA_HDR in s, f"{path}: the c10/cuda include block the rewrite replaces is missing"
    s = s.replace(CUDA_HDR, '#include "emu_prelude.h"\n#include "emu_extra.h"\n')
    s = s.replace('extern __shared__ __align__(16) unsigned char smem[];', 'unsigned char* smem = g_dyn_smem;')
    s = s.replace('.is_cuda()', '.is_cpu()')  # the ops' device checks: the emulated ops take CPU tensors
    s = rewrite_launches(s)
    impls = []
    t = s.find('TORCH_LIBRARY_IMPL(pspnet_fast, CUDA, m)')
    if t >= 0:
        # Every op the CUDA block registers, with its schema from ops.cpp, as pspnet_emu::<name>.
        e = s.index('\n}\n', t) + 3
        impls = re.findall(r'm\.impl\("(\w+)", &([\w:]+)\);', s[t:e])
        defs = ''.join(f'  m.def("{SCHEMAS[name]}", &{fn});\n' for name, fn in impls)
        s = s[:t] + 'TORCH_LIBRARY_FRAGMENT(pspnet_emu, m) {\n' + defs + '}\n' + s[e:]
    return s, [n for n, _ in impls]


def write(path, text):
    # Rewrite only on a change: ninja rebuilds by modification time; an unchanged source should not cost a recompile.
    changed = not os.path.exists(path) or open(path).read() != text
    if changed:
        open(path, 'w').write(text)
    return changed


os.makedirs(EMU_DIR, exist_ok=True)
sources = sorted(glob.glob(os.path.join(CUDA_DIR, 'ppm_*.cu')) + glob.glob(os.path.join(CUDA_DIR, 'ppm_*.cpp')))
assert sources, f"no ppm_*.cu / ppm_*.cpp in {CUDA_DIR}"
gen, ops = [], []
for src in sources:
    text, names = rewrite(src)
    out = os.path.join(EMU_DIR, 'emu_' + os.path.splitext(os.path.basename(src))[0] + '.cpp')
    print(("wrote" if write(out, text) else "unchanged"), out, names)
    gen.append(out); ops += names
stats = os.path.join(EMU_DIR, 'emu_stats.cpp')
write(stats, '#include <torch/library.h>\n#include "emu_prelude.h"\nTORCH_LIBRARY_FRAGMENT(pspnet_emu, m) {\n'
      '  m.def("emu_stats() -> int[]", []() { return std::vector<int64_t>{g_launches, g_max_smem_seen}; });\n}\n')
gen.append(stats)
# Units of sources that no longer exist must not be compiled.
for old in glob.glob(os.path.join(EMU_DIR, 'emu_*.cpp')):
    if old not in gen:
        os.remove(old)
write(GEN_SOURCES_LIST, '\n'.join(gen) + '\n')
print("emulated ops:", ops)
