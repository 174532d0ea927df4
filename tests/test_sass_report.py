"""tools/sass_report.py: the SASS parser on a hand-written listing (always), and the report on the built extension's
sm_90 cubin when the extension has CUDA code and cuobjdump / nvdisasm can be found or downloaded (else skipped)."""
import glob
import importlib.util
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("sass_report", os.path.join(REPO, "tools", "sass_report.py"))
sr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sr)

# A kernel in nvdisasm's syntax: a loop (.L_x_1 .. the backward branch at 0x0090) holding a 128-bit load and a
# 16-bit store, a 32-bit load before it, a 64-bit store after it, and a subroutine whose loads are not the kernel's.
LISTING = """
//--------------------- .nv.info._Z1kPf --------------------------
	//----- nvinfo : EIATTR_MAX_THREADS
	.align		4
        /*0054*/ 	.byte	0x04, 0x05
        /*0058*/ 	.word	0x00000100
        /*005c*/ 	.word	0x00000001
        /*0060*/ 	.word	0x00000001
	//----- nvinfo : EIATTR_CRS_STACK_SIZE
        /*0064*/ 	.word	0x00000000
//--------------------- .text._Z1kPf --------------------------
_Z1kPf:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
.L_x_1:
        /*0020*/                   LDG.E.128.CONSTANT R8, desc[UR4][R6.64] ;
        /*0030*/                   FCHK P0, R2, R3 ;
        /*0040*/                   STG.E.U16 desc[UR4][R10.64], R9 ;
        /*0050*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm20_div_s64) ;
        /*0060*/                   STL [R1], R2 ;
        /*0090*/               @P0 BRA `(.L_x_1) ;
        /*00a0*/                   STG.E.64 desc[UR4][R10.64], R8 ;
        /*00b0*/                   BRA `(.L_x_2) ;
.L_x_2:
        /*00c0*/                   EXIT ;
        .type           $__internal_0_$__cuda_sm20_div_s64,@function
$__internal_0_$__cuda_sm20_div_s64:
        /*00d0*/                   LDG.E.64 R2, desc[UR4][R4.64] ;
        /*00e0*/                   RET.REL.NODEC R20 `(_Z1kPf) ;
"""


def test_parser_on_a_listing():
    kernels = sr.parse_nvdisasm(LISTING)
    assert list(kernels) == ["_Z1kPf"]
    info = kernels["_Z1kPf"]
    assert info["max_threads"] == [256, 1, 1]
    assert sr.loop_ranges(info["instrs"], info["labels"], "_Z1kPf") == [(0x20, 0x90)]
    r = sr.analyse("_Z1kPf", info, {"regs": 40, "stack": 0, "smem": 0, "local": 0})
    assert r["ldg"] == {32: 1, 128: 1}  # the subroutine's 64-bit load is not the kernel's
    assert r["ldg_loop"] == {128: 1}
    assert r["stg"] == {16: 1, 64: 1}
    assert r["stg_loop"] == {16: 1}
    assert (r["div64"], r["div64_loop"], r["divf"], r["divf_loop"], r["stl"], r["ldl"]) == (1, 1, 1, 1, 1, 0)
    assert r["warps_per_sm"] == 48  # 40 registers: 1280 per warp, 12 warps in each 16 K quadrant


def test_widths_and_occupancy():
    assert [sr.width_of(o) for o in ["LDG.E.U16", "LDG.E", "LDG.E.64.CONSTANT", "STG.E.128", "LDG.E.S8"]] == \
        [16, 32, 64, 128, 8]
    assert sr.warps_per_sm(128) == 16 and sr.warps_per_sm(32) == 64 and sr.warps_per_sm(255) == 8
    assert sr.short_name("void pspnet_fast::(anonymous namespace)::k<c10::BFloat16, float, 4>(c10::BFloat16 const*,"
                         " pspnet_fast::(anonymous namespace)::P)") == "k<BFloat16, float, 4>"


def _built_so():
    so = sorted(glob.glob(os.path.join(REPO, "pspnet_fast", "_C*.so")))
    return so[0] if so else None


def test_report_on_the_built_extension():
    so = _built_so()
    if so is None:
        pytest.skip("extension not built")
    cuobjdump = sr.find_tool("cuobjdump", download=os.environ.get("PSPNET_FAST_NO_DOWNLOAD", "") in ("", "0"))
    nvdisasm = cuobjdump and sr.find_tool("nvdisasm")
    if not (cuobjdump and nvdisasm):
        pytest.skip("cuobjdump / nvdisasm not found and not downloadable")
    listing = subprocess.run([cuobjdump, "-lelf", so], capture_output=True, text=True).stdout
    if ".sm_90.cubin" not in listing:
        pytest.skip("the extension has no sm_90 code (built without CUDA or for other archs)")
    rows = sr.report([so], ["sm_90"], ["^head_epilogue_kernel<BFloat16"])
    assert rows, "no head_epilogue_kernel<BFloat16, ...> in the sm_90 cubin"
    for r in rows:
        assert r["arch"] == "sm_90" and 0 < r["regs"] <= 255
        assert r["max_threads"] and r["max_threads"][0] > 0  # launched under __launch_bounds__
        assert sum(r["stg"].values()) > 0 and sum(r["ldg"].values()) > 0
        assert r["loops"] > 0
    table = sr.markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "head_epilogue_kernel<BFloat16" in table
