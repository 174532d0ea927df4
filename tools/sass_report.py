"""SASS evidence for the CUDA kernels, without a GPU: per kernel of a built extension (or of any .so / .cubin),
registers, stack / local memory (spills), static shared memory, launch bounds, an occupancy bound from registers,
and the global load/store instructions by width, in the whole kernel and inside its loops.

    python tools/sass_report.py                          # pspnet_fast/_C*.so of this checkout, sm_90
    python tools/sass_report.py --arch sm_80 --arch sm_90 -k head_epilogue -k BFloat16
    python tools/sass_report.py build/x.cubin --json out.json
    python tools/sass_report.py --ptxas-log build.log    # adds ptxas -v spill bytes, when the build printed them

Tools: cuobjdump (cubins out of a .so; -res-usage) and nvdisasm (SASS with branch labels and .nv.info). Looked up
in --tools DIR, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, then the cache $PSPNET_FAST_TOOLS_CACHE (default
~/.cache/pspnet_fast/cuda-tools); when none has them, `pip download --no-deps nvidia-cuda-cuobjdump
nvidia-cuda-nvdisasm` (PyPI) into the cache's wheels/ and the two binaries are unzipped to its bin/ (--no-download:
fail instead). The machine's CUDA 13.0 toolkit here has nvcc and ptxas but neither tool.

Columns (markdown; --json gives the same per kernel, plus the per-opcode detail):
  regs          registers per thread (cuobjdump -res-usage REG)
  stack, local  stack frame bytes (STACK) and local memory bytes (LOCAL) per thread
  LDL/STL       local-memory load / store instructions in the SASS: spill traffic (or a local array) when > 0
  smem          static shared memory bytes (SHARED); dynamic shared memory is chosen at launch by the launchers'
                plans and is not in the binary (tools/cuda_variants.py prints it per launch, from the emulator)
  maxthr        __launch_bounds__ maximum threads per block (EIATTR_MAX_THREADS), '-' when none was given
  warps/SM      the most resident warps per SM that the register count allows (four 16 K-register quadrants,
                allocated per warp in units of 256; 64 warps at most): 64 = full occupancy as far as registers go
  LDG / STG     global loads / stores by access width in bits, "8:a 16:b 32:c 64:d 128:e" (zero widths omitted);
                `loop` columns count only instructions inside a loop, where a loop is the address range from a
                backward branch's target to the branch (the SASS of a C++ loop: its body ends with a branch back
                to its head). Code outside every loop (set-up, epilogues of the last partial vector) is excluded;
                a loop that runs once per thread (peeled head/tail loops `for (i = tid; i < head; i += nt)`)
                still counts as a loop.
  div64, divf, f64  calls to the 64-bit integer division / remainder subroutines, IEEE float division
                (FCHK: the slow-path check of each float division), and double-precision instructions (D*)
  slow(loop)    the same three inside loops
"""
import argparse
import glob
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"cuobjdump": "nvidia-cuda-cuobjdump", "nvdisasm": "nvidia-cuda-nvdisasm"}


def cache_dir():
    return os.path.abspath(os.environ.get("PSPNET_FAST_TOOLS_CACHE")
                           or os.path.join(os.path.expanduser("~"), ".cache", "pspnet_fast", "cuda-tools"))


def _executable(p):
    return p if p and os.path.isfile(p) and os.access(p, os.X_OK) else None


def find_tool(name, tools_dir=None, download=True):
    """Path of cuobjdump / nvdisasm: tools_dir, PATH, CUDA_HOME, /usr/local/cuda, the cache, else pip download."""
    dirs = [tools_dir] if tools_dir else []
    for d in dirs:
        if _executable(os.path.join(d, name)):
            return os.path.join(d, name)
    if shutil.which(name):
        return shutil.which(name)
    for d in [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]:
        if d and _executable(os.path.join(d, "bin", name)):
            return os.path.join(d, "bin", name)
    cached = os.path.join(cache_dir(), "bin", name)
    if _executable(cached):
        return cached
    if not download:
        return None
    return fetch_tool(name)


def fetch_tool(name):
    """pip download the tool's wheel into the cache, unzip its binary to the cache's bin/."""
    root = cache_dir()
    wheels = os.path.join(root, "wheels")
    os.makedirs(wheels, exist_ok=True)
    pkg = PACKAGES[name]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           "--timeout", "20", "--retries", "1", pkg, "-d", wheels]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"sass_report: could not download {pkg}: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    stem = pkg.replace("-", "_")
    found = sorted(glob.glob(os.path.join(wheels, stem + "-*.whl")))
    if not found:
        return None
    os.makedirs(os.path.join(root, "bin"), exist_ok=True)
    dst = os.path.join(root, "bin", name)
    with zipfile.ZipFile(found[-1]) as z:
        members = [m for m in z.namelist() if m.endswith("/bin/" + name)]
        if not members:
            return None
        with z.open(members[0]) as src, open(dst + ".part", "wb") as out:
            shutil.copyfileobj(src, out)
    os.chmod(dst + ".part", os.stat(dst + ".part").st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(dst + ".part", dst)
    return dst


def run(cmd, cwd=None):
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[:500]}")
    return r.stdout


def extract_cubins(cuobjdump, path, archs, workdir):
    """[(cubin path, arch)] for the wanted archs: path itself when it is a cubin, else cuobjdump -xelf of a .so."""
    if path.endswith(".cubin"):
        return [(path, None)]  # its arch: nvdisasm's .target line
    listing = run([cuobjdump, "-lelf", path])
    names = re.findall(r"ELF file\s+\d+:\s+(\S+)", listing)
    out = []
    for n in names:
        m = re.search(r"\.(sm_\d+a?)\.cubin$", n)
        if m and m.group(1) in archs:
            run([cuobjdump, "-xelf", n, os.path.abspath(path)], cwd=workdir)
            out.append((os.path.join(workdir, n), m.group(1)))
    return out


def res_usage(cuobjdump, cubin):
    """{mangled kernel: {regs, stack, smem, local}} from cuobjdump -res-usage."""
    txt = run([cuobjdump, "-res-usage", cubin])
    out = {}
    for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", txt):
        out[m.group(1)] = {"regs": int(m.group(2)), "stack": int(m.group(3)), "smem": int(m.group(4)),
                           "local": int(m.group(5))}
    return out


INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
LABEL = re.compile(r"^(\.L_x_\d+|\$[\w$]+|_Z\w+):\s*$")


def width_of(op):
    """Access width in bits of an LDG / STG / LDS / STS / LDL / STL opcode (cuobjdump syntax, e.g. LDG.E.U16)."""
    parts = op.split(".")[1:]
    for p in parts:
        if p in ("U8", "S8"):
            return 8
        if p in ("U16", "S16"):
            return 16
        if p in ("64", "128"):
            return int(p)
    return 32


def parse_nvdisasm(txt):
    """{mangled kernel: {"instrs": [(offset, opcode, operands, region)], "labels": {label: offset},
    "max_threads": [x, y, z] | None}}; region is the kernel itself or the name of the subroutine ($__internal_...)
    the instruction belongs to. The .nv.info.<kernel> sections (launch bounds) may come before or after the code."""
    kernels, max_threads = {}, {}
    cur = region = info_fn = info_attr = None
    pending = []
    for line in txt.splitlines():
        if line.startswith("//---------------------"):
            sec = line.split()[1] if len(line.split()) > 1 else ""
            cur = info_fn = info_attr = None
            if sec.startswith(".text."):
                cur = region = sec[len(".text."):]
                kernels.setdefault(cur, {"instrs": [], "labels": {}, "max_threads": None})
                pending = []
            elif sec.startswith(".nv.info."):
                info_fn = sec[len(".nv.info."):]
            continue
        if info_fn is not None:
            m = re.search(r"nvinfo : (\w+)", line)
            if m:
                info_attr = m.group(1)
                continue
            if info_attr == "EIATTR_MAX_THREADS":
                w = re.search(r"\.word\s+0x([0-9a-f]+)", line)
                if w:
                    max_threads.setdefault(info_fn, []).append(int(w.group(1), 16))
            continue
        if cur is None:
            continue
        lm = LABEL.match(line)
        if lm:
            pending.append(lm.group(1))
            if lm.group(1).startswith("$"):
                region = lm.group(1)
            continue
        im = INSTR.match(line)
        if im:
            off = int(im.group(1), 16)
            for name in pending:
                kernels[cur]["labels"][name] = off
            pending = []
            kernels[cur]["instrs"].append((off, im.group(3), im.group(4), region))
    for k, v in max_threads.items():
        if k in kernels:
            kernels[k]["max_threads"] = v[:3]
    return kernels


def loop_ranges(instrs, labels, kernel):
    """Address ranges [target, branch] of the backward branches in the kernel's own code (not its subroutines)."""
    out = []
    for off, op, args, region in instrs:
        if region != kernel or not op.startswith("BRA"):
            continue
        m = re.search(r"`\((\.L_x_\d+)\)", args)
        if m and labels.get(m.group(1)) is not None and labels[m.group(1)] <= off:
            out.append((labels[m.group(1)], off))
    return out


def warps_per_sm(regs):
    """Resident warps per SM allowed by the register file (sm_80 / sm_90: four 16 K-register quadrants, registers
    allocated per warp in units of 256; 64 warps at most), as the CUDA occupancy calculator counts them."""
    if regs <= 0:
        return 64
    per_warp = -(-regs * 32 // 256) * 256
    return min(64, 4 * (16384 // per_warp))


def fmt_widths(d):
    return " ".join(f"{w}:{d[w]}" for w in sorted(d, key=int) if d[w]) or "-"  # JSON keys are strings


def analyse(kernel, info, res):
    instrs, labels = info["instrs"], info["labels"]
    loops = loop_ranges(instrs, labels, kernel)

    def in_loop(off):
        return any(a <= off <= b for a, b in loops)

    r = {"ldg": {}, "stg": {}, "ldg_loop": {}, "stg_loop": {}, "lds": 0, "sts": 0, "ldl": 0, "stl": 0,
         "div64": 0, "divf": 0, "f64": 0, "div64_loop": 0, "divf_loop": 0, "f64_loop": 0, "loops": len(loops),
         "instructions": len(instrs), "opcodes": {}}
    for off, op, args, region in instrs:
        # Subroutine bodies are counted through their calls (div64), not instruction by instruction.
        own = region == kernel
        loop = own and in_loop(off)
        base = op.split(".")[0]
        if own:
            r["opcodes"][op] = r["opcodes"].get(op, 0) + 1
        if base == "CALL" and "div" in args and ("s64" in args or "u64" in args or "rem" in args):
            r["div64"] += 1
            r["div64_loop"] += loop
        if not own:
            continue
        if base in ("LDG", "STG"):
            w = width_of(op)
            key = base.lower()
            r[key][w] = r[key].get(w, 0) + 1
            if loop:
                r[key + "_loop"][w] = r[key + "_loop"].get(w, 0) + 1
        elif base in ("LDS", "STS", "LDL", "STL"):
            r[base.lower()] += 1
        elif base == "FCHK":
            r["divf"] += 1
            r["divf_loop"] += loop
        elif base in ("DADD", "DMUL", "DFMA", "DSETP", "DMNMX") or (base in ("F2F", "I2F", "F2I") and ".F64" in op):
            r["f64"] += 1
            r["f64_loop"] += loop
    r.update(res or {})
    r["max_threads"] = info.get("max_threads")
    r["warps_per_sm"] = warps_per_sm(r.get("regs", 0))
    return r


def demangle(names):
    exe = shutil.which("c++filt")
    if not exe or not names:
        return {n: n for n in names}
    out = subprocess.run([exe], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(d):
    """'void pspnet_fast::(anonymous namespace)::k<c10::BFloat16, float, 4>(...)' -> 'k<BFloat16, float, 4>'."""
    s = re.sub(r"^void ", "", d)
    depth, cut = 0, len(s)
    for i, ch in enumerate(s):  # drop the parameter list: the first '(' at template depth 0 after the name
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not s[i:].startswith("(anonymous"):
            cut = i
            break
    s = s[:cut]
    s = s.replace("pspnet_fast::(anonymous namespace)::", "").replace("pspnet_fast::", "").replace("c10::", "")
    return s


def parse_ptxas_log(path):
    """{mangled: {"spill_stores": b, "spill_loads": b}} from a build log with ptxas -v lines."""
    out, fn = {}, None
    for line in open(path, errors="replace"):
        m = re.search(r"Compiling entry function '(\w+)'", line) or re.search(r"Function properties for (\w+)", line)
        if m:
            fn = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and fn:
            out[fn] = {"spill_stores": int(m.group(1)), "spill_loads": int(m.group(2))}
    return out


def report(paths, archs, filters, tools_dir=None, download=True, ptxas_log=None):
    cuobjdump = find_tool("cuobjdump", tools_dir, download)
    nvdisasm = find_tool("nvdisasm", tools_dir, download)
    if not cuobjdump or not nvdisasm:
        raise FileNotFoundError(f"cuobjdump ({cuobjdump}) / nvdisasm ({nvdisasm}) not found and not downloadable")
    spills = parse_ptxas_log(ptxas_log) if ptxas_log else {}
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for path in paths:
            for cubin, arch in extract_cubins(cuobjdump, path, archs, work):
                txt = run([nvdisasm, cubin])
                if arch is None:
                    m = re.search(r"\.target\s+(sm_\d+a?)", txt)
                    arch = m.group(1) if m else "?"
                    if arch not in archs:
                        continue
                res = res_usage(cuobjdump, cubin)
                kernels = parse_nvdisasm(txt)
                names = demangle(list(kernels))
                for k, info in kernels.items():
                    if not info["instrs"]:
                        continue
                    short = short_name(names[k])
                    if filters and not all(re.search(f, short) for f in filters):
                        continue
                    r = analyse(k, info, res.get(k))
                    r.update({"kernel": short, "mangled": k, "arch": arch, "cubin": os.path.basename(cubin),
                              "source": os.path.basename(path)})
                    if k in spills:
                        r.update(spills[k])
                    rows.append(r)
    rows.sort(key=lambda r: (r["arch"], r["cubin"], r["kernel"]))
    return rows


def markdown(rows):
    hdr = ("| arch | kernel | regs | stack | local | LDL/STL | smem | maxthr | warps/SM | LDG | LDG loop | STG | "
           "STG loop | div64 divf f64 | slow(loop) |")
    out = [hdr, "|" + " --- |" * (hdr.count("|") - 1)]
    for r in rows:
        mt = r.get("max_threads")
        out.append(
            f"| {r['arch']} | `{r['kernel']}` | {r.get('regs', '?')} | {r.get('stack', '?')} | {r.get('local', '?')}"
            f" | {r['ldl']}/{r['stl']} | {r.get('smem', '?')} | {mt[0] if mt else '-'} | {r['warps_per_sm']}"
            f" | {fmt_widths(r['ldg'])} | {fmt_widths(r['ldg_loop'])} | {fmt_widths(r['stg'])}"
            f" | {fmt_widths(r['stg_loop'])} | {r['div64']} {r['divf']} {r['f64']}"
            f" | {r['div64_loop']} {r['divf_loop']} {r['f64_loop']} |")
    return "\n".join(out)


def default_paths():
    return sorted(glob.glob(os.path.join(REPO, "pspnet_fast", "_C*.so")))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("paths", nargs="*", help=".so or .cubin files (default: pspnet_fast/_C*.so of this checkout)")
    ap.add_argument("--arch", action="append", help="sm_90 (default); repeat for more, e.g. --arch sm_80")
    ap.add_argument("-k", "--kernel", action="append", default=[],
                    help="regex on the short kernel name; repeat: all must match")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON ('-' for stdout, no table)")
    ap.add_argument("--tools", metavar="DIR", help="directory holding cuobjdump and nvdisasm")
    ap.add_argument("--no-download", action="store_true", help="fail instead of downloading the tools")
    ap.add_argument("--ptxas-log", metavar="FILE", help="build log with ptxas -v output: adds spill bytes")
    ap.add_argument("--opcodes", action="store_true", help="JSON: keep the per-opcode counts")
    a = ap.parse_args(argv)
    paths = a.paths or default_paths()
    if not paths:
        sys.exit("no extension found: build it (pspnet_fast/_C*.so) or give a .so / .cubin path")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        sys.exit(f"sass_report: no such file: {', '.join(missing)}")
    try:
        rows = report(paths, a.arch or ["sm_90"], a.kernel, a.tools, not a.no_download, a.ptxas_log)
    except FileNotFoundError as e:
        sys.exit(f"sass_report: {e}")
    if not a.opcodes:
        for r in rows:
            r.pop("opcodes", None)
    if a.json == "-":
        json.dump(rows, sys.stdout, indent=1)
        print()
        return rows
    print(markdown(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
