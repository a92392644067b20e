"""The static SASS cost model (bench/sass_cost_model.py): its pure functions on a small
hand-written SASS snippet, and, where cuobjdump and a CUDA-built module exist, one decode
path of the real module (sm_90a) plus the spill check of issue 11 item 3."""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import sass_cost_model as cli  # noqa: E402
from sass_model import analysis as A  # noqa: E402
from sass_model import hw, kernels, module, paths  # noqa: E402
from sass_model.sass import build_cfg, find_loops, parse_res_usage, parse_sass  # noqa: E402

M1_NF4 = ("_ZN6lqlora4cuda19qmatmul_fast_kernelILi4E13__nv_bfloat16Li1ELi4EEEvPKT0_iiiPKjNS0_"
          "9ScaleArgsEPKfSA_iiNS0_9LoraFusedEPS3_")
M16_NF4 = ("_ZN6lqlora4cuda19qmatmul_fast_kernelILi4E13__nv_bfloat16Li16ELi2EEEvPKT0_iiiPKjNS0_"
           "9ScaleArgsEPKfSA_iiNS0_9LoraFusedEPS3_")

# cuobjdump -sass layout: address comment, instruction, low encoding word; then the high
# word, whose bits 41..61 are the control code (stall, yield, write/read scoreboard, wait
# mask). A prologue with a branch on the log2_b0 parameter (c[0x0][0x260]), one loop
# (0x80..0x1c0) holding a lane-divergent branch, an fdiv-style slow-path CALL, a spill
# store/load, and a self-branch after EXIT.
FIXTURE = """
	code for sm_90a
		Function : {name}
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R2, c[0x0][0x260] ;                              /* 0x0000000000000000 */
                                                                                           /* 0x000e220000000000 */
        /*0010*/                   S2R R0, SR_TID.X ;                                   /* 0x0000000000000000 */
                                                                                           /* 0x000e620000000000 */
        /*0020*/                   ISETP.NE.AND P0, PT, R2, 0x4, PT ;                   /* 0x0000000000000000 */
                                                                                           /* 0x001fe80000000000 */
        /*0030*/                   @!P0 BRA 0x60 ;                                      /* 0x0000000000000000 */
                                                                                           /* 0x000fea0000000000 */
        /*0040*/                   IADD3 R3, R0, 0x1, RZ ;                              /* 0x0000000000000000 */
                                                                                           /* 0x002fe80000000000 */
        /*0050*/                   BRA 0x70 ;                                           /* 0x0000000000000000 */
                                                                                           /* 0x000fe20000000000 */
        /*0060*/                   IMAD.MOV.U32 R3, RZ, RZ, RZ ;                        /* 0x0000000000000000 */
                                                                                           /* 0x000fe40000000000 */
        /*0070*/                   MOV R4, RZ ;                                         /* 0x0000000000000000 */
                                                                                           /* 0x000fe20000000000 */
        /*0080*/                   LDG.E.EF.128 R8, desc[UR4][R6.64] ;                  /* 0x0000000000000000 */
                                                                                           /* 0x000ea20000000000 */
        /*0090*/                   LDG.E.128.CONSTANT R12, desc[UR4][R10.64] ;          /* 0x0000000000000000 */
                                                                                           /* 0x000ee20000000000 */
        /*00a0*/                   PRMT R16, R8, 0x4440, RZ ;                           /* 0x0000000000000000 */
                                                                                           /* 0x004fe20000000000 */
        /*00b0*/                   LOP3.LUT R17, R9, 0x3c3c3c3c, RZ, 0xc0, !PT ;        /* 0x0000000000000000 */
                                                                                           /* 0x000fe20000000000 */
        /*00c0*/                   SHF.R.U32.HI R18, RZ, 0x2, R9 ;                      /* 0x0000000000000000 */
                                                                                           /* 0x000fe20000000000 */
        /*00d0*/                   LDS R19, [R16] ;                                     /* 0x0000000000000000 */
                                                                                           /* 0x000f220000000000 */
        /*00e0*/                   LDS R20, [R17+0x40] ;                                /* 0x0000000000000000 */
                                                                                           /* 0x000f220000000000 */
        /*00f0*/                   ISETP.GE.AND P1, PT, R0, R3, PT ;                    /* 0x0000000000000000 */
                                                                                           /* 0x000fe20000000000 */
        /*0100*/                   @P1 BRA 0x130 ;                                      /* 0x0000000000000000 */
                                                                                           /* 0x000fea0000000000 */
        /*0110*/                   FFMA R4, R19, R12, R4 ;                              /* 0x0000000000000000 */
                                                                                           /* 0x018fe80000000000 */
        /*0120*/                   HFMA2 R5, R20, R13, R5 ;                             /* 0x0000000000000000 */
                                                                                           /* 0x000fe80000000000 */
        /*0130*/                   FCHK P2, R4, R5 ;                                    /* 0x0000000000000000 */
                                                                                           /* 0x000fe20000000000 */
        /*0140*/                   @!P2 BRA 0x160 ;                                     /* 0x0000000000000000 */
                                                                                           /* 0x000fea0000000000 */
        /*0150*/                   CALL.REL.NOINC 0x200 ;                               /* 0x0000000000000000 */
                                                                                           /* 0x000fea0000000000 */
        /*0160*/                   I2F.U32 R21, R0 ;                                    /* 0x0000000000000000 */
                                                                                           /* 0x000f620000000000 */
        /*0170*/                   SHFL.IDX PT, R22, R4, R0, 0x1f ;                     /* 0x0000000000000000 */
                                                                                           /* 0x020e220000000000 */
        /*0180*/                   IMAD R6, R6, 0x10, RZ ;                              /* 0x0000000000000000 */
                                                                                           /* 0x001fe40000000000 */
        /*0190*/                   STL.64 [R1], R4 ;                                    /* 0x0000000000000000 */
                                                                                           /* 0x0003e20000000000 */
        /*01a0*/                   LDL R23, [R1+0x8] ;                                  /* 0x0000000000000000 */
                                                                                           /* 0x000e620000000000 */
        /*01b0*/                   ISETP.NE.AND P3, PT, R6, RZ, PT ;                    /* 0x0000000000000000 */
                                                                                           /* 0x002fe80000000000 */
        /*01c0*/                   @P3 BRA 0x80 ;                                       /* 0x0000000000000000 */
                                                                                           /* 0x000fea0000000000 */
        /*01d0*/                   STG.E desc[UR4][R2.64], R4 ;                         /* 0x0000000000000000 */
                                                                                           /* 0x000fe20000000000 */
        /*01e0*/                   EXIT ;                                               /* 0x0000000000000000 */
                                                                                           /* 0x000fea0000000000 */
        /*01f0*/                   BRA 0x1f0 ;                                          /* 0x0000000000000000 */
                                                                                           /* 0x000fe20000000000 */
        /*0200*/                   RET.REL.NODEC R20 0x0 ;                              /* 0x0000000000000000 */
                                                                                           /* 0x000fea0000000000 */
"""
RES = """
Resource usage:
 Function {name}:
  REG:80 STACK:8 SHARED:1152 LOCAL:0 CONSTANT[0]:656 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


@pytest.fixture()
def fn():
    funcs = parse_sass(FIXTURE.format(name="kern"))
    assert list(funcs) == ["kern"]
    ins = funcs["kern"]
    blocks = build_cfg(ins)
    return ins, blocks, find_loops(blocks)


def test_parse_instructions_and_control_codes(fn):
    ins, _, _ = fn
    assert len(ins) == 33 and ins[0].addr == 0 and ins[-1].addr == 0x200
    ldg = ins[8]
    assert (ldg.op, ldg.mods, ldg.width_bytes()) == ("LDG", ("E", "EF", "128"), 16)
    assert ins[3].pred == "!P0" and ins[3].branch_target() == 0x60
    # ctrl: LDC sets scoreboard 0; ISETP waits on it with a 4-cycle stall; FFMA waits on 3 and 4
    assert (ins[0].ctrl.wbar, ins[0].ctrl.stall) == (0, 1)
    assert (ins[2].ctrl.wait, ins[2].ctrl.stall, ins[2].ctrl.wbar) == (0b1, 4, None)
    assert ins[17].ctrl.wait == 0b11000
    assert (ins[25].op, ins[25].ctrl.rbar, ins[25].ctrl.wbar) == ("STL", 1, None)


def test_cfg_and_natural_loop(fn):
    ins, blocks, loops = fn
    starts = [ins[b.start].addr for b in blocks]
    assert starts == [0x0, 0x40, 0x60, 0x70, 0x80, 0x110, 0x130, 0x150, 0x160, 0x1d0, 0x1f0, 0x200]
    assert len(loops) == 1  # the self-branch after EXIT is unreachable, CALL is not followed
    lp = loops[0]
    assert ins[blocks[lp.header].start].addr == 0x80
    assert sorted(ins[blocks[b].start].addr for b in lp.body) == [0x80, 0x110, 0x130, 0x150, 0x160]


def test_branch_decisions_and_counts(fn):
    ins, blocks, loops = fn
    d = A.decide_branches(ins, blocks, loops, params={0x260: 6})  # log2_b0 = 6: P0 true
    first = blocks[0].index
    assert (d.taken_weight[first], d.fall_weight[first]) == (0.0, 1.0)  # evaluated: not taken
    assert (d.evaluated, d.by_rule, d.unknown) == (1, 1, 2)  # slow-path CALL skipped by rule
    freq = A.block_frequencies(blocks, loops, d, [3.0])
    by_addr = {ins[b.start].addr: freq[b.index] for b in blocks}
    assert by_addr[0x60] == 0.0 and by_addr[0x40] == 1.0 and by_addr[0x70] == 1.0
    assert by_addr[0x80] == 3.0 and by_addr[0x110] == 3.0  # divergent branch: both sides
    assert by_addr[0x150] == 0.0 and by_addr[0x1d0] == 1.0 and by_addr[0x200] == 0.0
    c = A.count_blocks(ins, blocks, freq)
    assert c.total == 4 + 2 + 1 + 3 * 20 + 2
    it = A.count_blocks(ins, blocks, A.block_frequencies(blocks, loops, d, [1.0]),
                        sorted(loops[0].body))
    assert it.total == 20
    assert dict(it.by_class) == {"ldg": 2, "int": 6, "lds": 2, "branch": 3, "fma": 1, "hfma2": 1,
                                 "conv": 1, "shfl": 1, "imad": 1, "local": 2}
    assert it.by_pipe["alu"] == 6 and it.by_pipe["fma"] == 2 and it.by_pipe["lsu"] == 7
    assert it.by_pipe["xu"] == 1 and it.by_pipe["imad"] == 1 and it.by_pipe["issue"] == 3
    assert it.lut_lds == 2 and it.lds_wavefronts == 2
    assert it.l1_wavefronts == 4 + 4 + 2 + 1  # two 512-byte loads, STL.64, LDL.32
    assert dict(it.ldg_bytes) == {"LDG.E.EF.128": 512, "LDG.E.128.CONSTANT": 512}
    # log2_b0 = 4 takes the other side of the prologue branch
    d4 = A.decide_branches(ins, blocks, loops, params={0x260: 4})
    f4 = A.block_frequencies(blocks, loops, d4, [3.0])
    assert A.count_blocks(ins, blocks, f4).total == 4 + 1 + 1 + 3 * 20 + 2
    assert A.spill_bytes(ins) == (8, 4)


def test_warp_latency_path(fn):
    ins, blocks, loops = fn
    d = A.decide_branches(ins, blocks, loops, params={0x260: 6})
    lat = lambda i: 600 if i.op == "LDG" else 30  # noqa: E731

    def cycles(n):
        f = A.block_frequencies(blocks, loops, d, [float(n)])
        return A.simulate_warp(ins, blocks, loops, f, [float(n)], lat)

    per_iter = cycles(10) - cycles(5)
    assert per_iter % 5 == 0 and per_iter / 5 >= 600  # one DRAM round trip per iteration
    # straight line: LDG (scoreboard 0), then an FFMA waiting on it, then EXIT
    txt = FIXTURE.format(name="k2").split("/*0080*/")[0] + """
        /*0080*/                   LDG.E R8, desc[UR4][R6.64] ;                         /* 0x0 */
                                                                                           /* 0x000e220000000000 */
        /*0090*/                   FFMA R4, R8, R8, R4 ;                                /* 0x0 */
                                                                                           /* 0x001fe80000000000 */
        /*00a0*/                   EXIT ;                                               /* 0x0 */
                                                                                           /* 0x000fea0000000000 */
"""
    k2 = parse_sass(txt)["k2"][-3:]
    b2 = build_cfg(k2)
    assert A.simulate_warp(k2, b2, [], [1.0] * len(b2), [], lat) == 600 + 4


def test_constant_propagation_ops():
    regs, preds = {}, {}
    p = {0x21c: 8192, 0x220: 576}
    for t in ("LDC R3, c[0x0][0x21c]", "SHF.R.U32.HI R4, RZ, 0x5, R3", "IMAD R5, R4, 0x3, RZ",
              "IADD3 R6, R5, -0x1, RZ", "LOP3.LUT P1, RZ, R3, 0x7, RZ, 0xc0, !PT",
              "ISETP.GE.U32.AND P0, PT, R4, 0x80, PT", "ISETP.GT.AND P2, PT, R3, c[0x0][0x220], P0"):
        A.transfer(A.Instr(0, None, *_op(t)), regs, preds, p)
    assert regs["R4"] == 256 and regs["R5"] == 768 and regs["R6"] == 767
    assert preds == {"P1": False, "P0": True, "P2": True}
    A.transfer(A.Instr(0, None, *_op("IMAD.WIDE R4, R3, 0x4, RZ")), regs, preds, p)
    assert "R4" not in regs and "R5" not in regs  # 64-bit result: unknown


def _op(t):
    from sass_model.sass import parse_instr

    i = parse_instr(0, t)
    return i.op, i.mods, i.operands, i.text


def test_tables_and_time_model():
    lay, _, _ = kernels.layout(kernels.FAST_PARAMS)
    # offsets read back from the sm_90a SASS of qmatmul_fast_kernel (c[0x0][...])
    assert lay["K"][0] == 0x21C and lay["N"][0] == 0x220 and lay["sa.scale2_dtype"][0] == 0x240
    assert lay["sa.Lq"][0] == 0x24C and lay["log2_b0"][0] == 0x260
    assert lay["lora.rank"][0] == 0x284 and lay["lora.kslices"][0] == 0x2A4
    assert lay["out"][0] == 0x2B0
    assert kernels.layout(kernels.LORA_DOWN_PARAMS)[0]["t"][0] == 0x230
    assert kernels.fast_geometry(8192) == (4, [2, 2, 2, 2])
    assert kernels.fast_geometry(576) == (1, [1])
    assert kernels.t_splits(8192, 8192) == 64  # 4 blocks per SM, capped at 64 splits
    # a runtime loop compiled as copies unrolled 16x, 4x, 1x runs them greedily
    assert [kernels.unrolled_trips(8, u, [16, 4, 1]) for u in (16, 4, 1)] == [0, 2, 0]
    assert [kernels.unrolled_trips(23, u, [16, 4, 1]) for u in (16, 4, 1)] == [1, 1, 3]
    assert kernels.unrolled_trips(64, 4, [4]) == 16
    assert paths.decode_tile(1) == (1, 4) and paths.decode_tile(3) == (4, 4)
    assert paths.decode_tile(16) == (16, 2)
    assert round(paths.bits_per_param(4), 3) == 4.127 and round(paths.physical_limit(4), 2) == 3.88
    assert hw.lut_conflict_factor(16) == 1.0
    assert hw.lut_conflict_factor(256) == hw.lut_conflict_factor(256) > 2.0  # seeded
    assert hw.occupancy(hw.H100, 128, 80, 1152) == 6  # 80 regs x 4 warps: 24 warps/SM
    c = A.Counts()
    c.total, c.by_pipe["fma"] = 1000.0, 1000.0
    t = hw.kernel_time(hw.H100, 132, 128, c, 132 * 4, 1e3, 100.0, 1)
    assert t.binding == "issue" and t.total_us == pytest.approx(
        4 * 1000 / 4 / hw.H100.clock_hz * 1e6 + hw.H100.launch_us_graph)
    g = hw.gemm_time(hw.H100, 1, 8192, 8192)
    assert g.binding == "memory" and 40 < g.total_us < 50  # 128 MiB of bf16 at 3.0 TB/s


def test_demangled_names():
    fam, targs = module.split_demangled(
        "void lqlora::cuda::qmatmul_fast_kernel<4, __nv_bfloat16, 1, 4>(__nv_bfloat16 const*, "
        "int, int, int, unsigned int const*, lqlora::cuda::ScaleArgs, float const*, float const*, "
        "int, int, lqlora::cuda::LoraArgs, __nv_bfloat16*)")
    assert (fam, targs) == ("qmatmul_fast_kernel", ("4", "__nv_bfloat16", "1", "4"))
    fam, targs = module.split_demangled("void lqlora::cuda::(anonymous namespace)::"
                                        "dequantize_kernel<8, float>(unsigned int const*, long)")
    assert (fam, targs) == ("dequantize_kernel", ("8", "float"))
    assert parse_res_usage(RES.format(name="k"))["k"] == {"REG": 80, "STACK": 8, "SHARED": 1152,
                                                          "LOCAL": 0}


@pytest.mark.parametrize("name,rc", [(M1_NF4, 1), (M16_NF4, 0)])
def test_check_spills_cli(tmp_path, capsys, name, rc):
    """--check-spills fails only when an M = 1 decode kernel (MT = 1) spills."""
    sass, res = tmp_path / "k.sass", tmp_path / "k.res"
    sass.write_text(FIXTURE.format(name=name))
    res.write_text(RES.format(name=name))
    assert cli.main(["--sass", str(sass), "--res", str(res), "--check-spills"]) == rc
    out = capsys.readouterr()
    assert "qmatmul_fast_kernel<4, __nv_bfloat16" in out.out and "SPILLS" in out.out
    assert ("M = 1 decode kernels spill" in out.err) == bool(rc)


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--shapes", "no-such-shape", "--sass", str(tmp_path / "x")])
    assert "unknown shape 'no-such-shape'" in capsys.readouterr().err
    assert cli.main(["--sass", str(tmp_path / "missing.sass")]) == 2
    assert "missing.sass" in capsys.readouterr().err


# ------------------------------------------------------------------ the real module
def _real_module():
    tool = module.find_tool("cuobjdump")
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or pip install nvidia-cuda-cuobjdump)")
    try:
        so = module.default_module()
    except module.ToolError as e:
        pytest.skip(str(e))
    try:
        arches = module.list_arches(tool, so)
    except module.ToolError as e:  # cuobjdump: "does not contain device code" (CPU build)
        pytest.skip(f"{os.path.basename(so)}: {e}")
    if cli.ARCH not in arches:
        pytest.skip(f"{os.path.basename(so)} has no {cli.ARCH} cubin (built without CUDA)")
    return tool, so


def test_real_module_decode_path_and_spills(capsys):
    tool, so = _real_module()
    res = module.dump_res_usage(tool, so, cli.ARCH)
    names = [n for n in parse_res_usage(res)
             if n in (M1_NF4,) or n.startswith("_ZN6lqlora4cuda16lora_down_kernelI13__nv_bfloat16")]
    assert len(names) == 2, names
    ks = module.load_kernels(module.dump_sass(tool, so, cli.ARCH, names), res)
    from sass_model import model

    for k in ks:
        if k.section:
            assert model.param_drift(k) == [], f"{k.family}: parameters moved; update kernels.py"
    ix = module.index(ks)
    base = paths.qmatmul_path(ix, hw.H100, "llama2-70b-attn", 8192, 8192, 1, 4)
    step = base.steps[-1].result
    assert step.analysis.hot_loop is not None and step.launch.grid == 2048
    pw = base.per_weight()
    assert 0.95 <= pw["lds"] <= 1.2  # one shared-memory LUT load per weight (+ the LUT fill)
    assert pw["fma"] >= 1.0 and 3.0 <= pw["total"] <= 12.0
    assert 1.0 < base.speedup < paths.physical_limit(4)
    lora = paths.qmatmul_path(ix, hw.H100, "llama2-70b-attn", 8192, 8192, 1, 4, lora_rank=64)
    assert lora.total_us > base.total_us and len(lora.steps) == 2
    # issue 11 item 3: the M = 1 decode kernels stay spill-free (registers/stack for all)
    assert cli.check_spills(ks) == 0
    assert "kernels for sm_90a" in capsys.readouterr().out
