"""The mapping table: for each CUDA kernel of csrc/cuda/, how a launch maps onto its SASS.

A kernel change means one edit here (and in paths.py if the host glue changes). Each
``KernelSpec`` says, from the source:
- ``tparams``: the template parameters, in order, as they appear in the demangled name;
- ``params``: the kernel's parameter list (C layout from 0x210 of constant bank 0 on
  sm_90; structs as nested field lists), so that branches on parameters are evaluated;
- ``launch(ctx)``: grid and block (the launcher's arithmetic), parameter values, the
  iterations of each loop (``trips``), the weights one warp processes, and the DRAM bytes;
- ``ldg_level``: where its non-streaming global loads hit (latency only; ``.EF``
  evict-first loads are weight streams and always come from DRAM).

Source facts used below (csrc/cuda/qmatmul_kernels.cuh, qmatmul_t.cu, dequantize.cu,
launch.h):
- qmatmul_fast_kernel<Bits, XT, MT, R>: grid ceil(N/R) blocks of (32, WK) threads, WK = 4
  if K/32 >= 128, 2 if >= 64, else 1; warp y walks groups [y*Gw, min(G, (y+1)*Gw)), Gw =
  ceil(ceil(G/WK)/32)*32, 32 groups (lane l: group base + l, 32 codes) per step, R rows
  per step: one hot-loop iteration = R x 32 x 32 codes per warp (masked lanes do no work).
- lora_down_kernel<XT>: rank blocks of 256 threads, thread k-loop with stride 256.
- qmatmul_t_kernel<GT>: grid (ceil(K / 2048), splits) x 256 threads, thread owns 8
  columns and walks rows_per_split rows, kTMTile = 4 rows of g per outer pass.
- dequantize_kernel<Bits, OutT>: 8 warps per block, a warp decodes 32 groups = 1024 codes
  in straight-line code, then stores its 32x32 tile in a loop unrolled by 4 (8 trips).
- unpack_scales_kernel: one thread per scale, 256 per block.
"""
from __future__ import annotations

import dataclasses
import math
import struct
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .analysis import Loop
from .sass import Block, Instr

PARAM_BASE = 0x210  # sm_70+: kernel parameters start at c[0x0][0x210]
BUILTIN = {"ntid.x": 0x0, "ntid.y": 0x4, "ntid.z": 0x8, "nctaid.x": 0xC, "nctaid.y": 0x10,
           "nctaid.z": 0x14}  # blockDim / gridDim words of constant bank 0

# Field = (name, size, align) or (name, [fields]) for a struct.
PTR, INT, F32, I64 = 8, 4, 4, 8
SCALE_ARGS = [("qscales", PTR, 8), ("scale2", PTR, 8), ("scale2_dtype", INT, 4),
              ("scale_bits", INT, 4), ("log2_b1", INT, 4), ("Lq", F32, 4)]
LORA_ARGS = [("t", PTR, 8), ("b", PTR, 8), ("b_dtype", INT, 4), ("rank", INT, 4),
             ("scale", F32, 4)]
DTYPE_CODE = {"float32": 0, "float16": 1, "bfloat16": 2}  # launch.h enum DType


def layout(fields: Sequence, base: int = PARAM_BASE, prefix: str = "") -> Tuple[Dict[str, Tuple[int, int]], int, int]:
    """C layout of a parameter list -> ({name: (offset, size)}, end offset, alignment)."""
    out: Dict[str, Tuple[int, int]] = {}
    off, max_align = base, 1
    for f in fields:
        if isinstance(f[1], list):
            sub, _, al = layout(f[1], 0, "")
            size = _struct_size(f[1])
            off = -(-off // al) * al
            for k, (o, s) in sub.items():
                out[f"{prefix}{f[0]}.{k}"] = (off + o, s)
            off += size
            max_align = max(max_align, al)
        else:
            name, size, al = f
            off = -(-off // al) * al
            out[prefix + name] = (off, size)
            off += size
            max_align = max(max_align, al)
    return out, off, max_align


def _struct_size(fields) -> int:
    _, end, al = layout(fields, 0)
    return -(-end // al) * al


def param_words(fields: Sequence, values: Dict[str, object], builtins: Dict[str, int]) -> Dict[int, int]:
    """Constant-bank words for a launch: parameters (ints, floats as fp32 bits, pointers as
    a non-null dummy unless 0/None) plus blockDim/gridDim."""
    lay, _, _ = layout(fields)
    words: Dict[int, int] = {BUILTIN[k]: v & 0xFFFFFFFF for k, v in builtins.items()}
    for name, (off, size) in lay.items():
        if name not in values:
            continue
        v = values[name]
        if isinstance(v, float):
            raw = struct.unpack("<I", struct.pack("<f", v))[0]
        elif v is None:
            raw = 0
        else:
            raw = int(v)
        if size == 8:
            words[off] = raw & 0xFFFFFFFF
            words[off + 4] = (raw >> 32) & 0xFFFFFFFF
        else:
            words[off] = raw & 0xFFFFFFFF
    return words


DUMMY_PTR = 0x7F0000001000  # any non-null device address


@dataclasses.dataclass(frozen=True)
class Ctx:
    """One launch's inputs: weight [N, K], M activation rows, the NF config, LoRA rank (0:
    none), the activation dtype and the template arguments of the variant."""

    N: int
    K: int
    M: int
    bits: int
    block_size: int = 64
    scale_bits: int = 8
    scale_block_size: int = 256
    scale_dtype: str = "float32"
    x_dtype: str = "bfloat16"
    lora_rank: int = 0
    t: Tuple = ()
    rows: int = 0        # dequantize: rows of this chunk (0 = N)
    splits: int = 1      # qmatmul_t

    @property
    def nblocks(self) -> int:
        return math.ceil(self.N * self.K / self.block_size)

    @property
    def ngroups(self) -> int:
        return math.ceil(self.nblocks / self.scale_block_size)

    def packed_bytes(self, rows: Optional[int] = None) -> float:
        """qcodes + qscales + scale2 of `rows` rows (all rows by default)."""
        n = (self.N if rows is None else rows) * self.K
        nb = n / self.block_size
        s2 = {"float32": 4, "float16": 2, "bfloat16": 2}[self.scale_dtype]
        return n * self.bits / 8 + nb * self.scale_bits / 8 + nb / self.scale_block_size * s2


@dataclasses.dataclass
class Launch:
    """What the table derives for one launch."""

    grid: int
    threads: int
    params: Dict[int, int]
    warps_total: float
    weights: float            # weights (or outputs, for non-weight kernels) processed
    dram_bytes: float
    bytes_detail: Dict[str, float]
    loop_trips: Callable      # (loops, blocks, instrs, reached) -> (avg, max, hot index)
    break_chain: Optional[Callable[[int, int], Optional[float]]] = None
    hint: Optional[Callable] = None
    lut_levels: int = 0       # table-lookup LDS: entries of the fp32 LUT (0: none)
    # where each global load hits, for the latency path: {address: "dram"/"l2"/"l1"};
    # loads not listed use the kernel's ldg_level, evict-first (.EF) loads "dram"
    load_levels: Optional[Callable[[Sequence[Instr]], Dict[int, str]]] = None


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    family: str
    tparams: Tuple[str, ...]
    params: Tuple
    launch: Callable[["KernelSpec", Ctx], Launch]
    ldg_level: str = "l2"


# Activations read by every block stay in L1 when they fit next to the LUT and the
# streamed weights (228 KiB of L1 + shared memory per SM on GH100, whitepaper); beyond
# that they come from L2.
L1_RESIDENT_BYTES = 160 * 1024


def activation_level(nbytes: float) -> str:
    return "l1" if nbytes <= L1_RESIDENT_BYTES else "l2"


# ------------------------------------------------------------------ loops: roles and trips
@dataclasses.dataclass
class LoopInfo:
    index: int
    loop: Loop
    addr: int
    ops: Dict[str, int]        # base opcode histogram of the body (nested loops included)
    own_ops: Dict[str, int]    # base opcodes of the blocks not inside a nested loop
    own_full: Dict[str, int]   # the same by full opcode (``LDG.E.EF.128``)


def loop_infos(loops: List[Loop], blocks: List[Block], instrs: Sequence[Instr]) -> List[LoopInfo]:
    out = []
    for j, lp in enumerate(loops):
        nested = set()
        for c in lp.children:
            nested |= loops[c].body
        own: Dict[str, int] = {}
        full: Dict[str, int] = {}
        for bi in lp.body - nested:
            for i in range(blocks[bi].start, blocks[bi].end):
                own[instrs[i].op] = own.get(instrs[i].op, 0) + 1
                full[instrs[i].full_op] = full.get(instrs[i].full_op, 0) + 1
        allops: Dict[str, int] = {}
        for bi in lp.body:
            for i in range(blocks[bi].start, blocks[bi].end):
                allops[instrs[i].op] = allops.get(instrs[i].op, 0) + 1
                allops[instrs[i].full_op + "#"] = allops.get(instrs[i].full_op + "#", 0) + 1
        out.append(LoopInfo(j, lp, instrs[blocks[lp.header].start].addr, allops, own, full))
    return out


def _has(ops: Dict[str, int], op: str) -> int:
    """Count of a base opcode in a histogram of base opcodes."""
    return ops.get(op, 0)


def unrolled_trips(n: int, u: int, copies: Sequence[int]) -> float:
    """Trips of the copy with u bodies of a runtime loop of n iterations that the compiler
    emitted as copies unrolled by ``copies`` (e.g. 16, 4, 1): they run greedily, the widest
    first, each on what the previous left (n = 8 over 16/4/1: 0, 2, 0 trips)."""
    rest = n
    for c in sorted(set(copies) | {u}, reverse=True):
        t, rest = divmod(rest, c)
        if c == u:
            return float(t)
    return 0.0


def _ldg_ef(info: LoopInfo) -> bool:
    """The loop holds evict-first (weight-stream) loads, itself or in a nested loop."""
    return any(k.startswith("LDG.E.EF") for k in info.ops)


# ------------------------------------------------------------------ qmatmul_fast_kernel
FAST_PARAMS = (("x", PTR, 8), ("M", INT, 4), ("K", INT, 4), ("N", INT, 4), ("qcodes", PTR, 8),
               ("sa", SCALE_ARGS), ("offset", PTR, 8), ("levels", PTR, 8), ("log2_b0", INT, 4),
               ("nblocks", INT, 4), ("lora", LORA_ARGS), ("out", PTR, 8))


def fast_geometry(K: int) -> Tuple[int, List[int]]:
    """(WK, steps of each warp y) of qmatmul_fast_kernel for K (K % 32 == 0)."""
    G = K // 32
    WK = 4 if G >= 32 * 4 else (2 if G >= 64 else 1)
    Gw = math.ceil(math.ceil(G / WK) / 32) * 32
    steps = []
    for y in range(WK):
        g0, g1 = y * Gw, min(G, (y + 1) * Gw)
        steps.append(max(0, math.ceil((g1 - g0) / 32)))
    return WK, steps


def _scale_params(ctx: Ctx) -> Dict[str, object]:
    return {"sa.qscales": DUMMY_PTR, "sa.scale2": DUMMY_PTR,
            "sa.scale2_dtype": DTYPE_CODE[ctx.scale_dtype], "sa.scale_bits": ctx.scale_bits,
            "sa.log2_b1": int(math.log2(ctx.scale_block_size)),
            "sa.Lq": float((1 << ctx.scale_bits) - 1)}


def fast_launch(spec: KernelSpec, ctx: Ctx) -> Launch:
    bits, MT, R = ctx.t[0], ctx.t[2], ctx.t[3]
    N, K, M = ctx.N, ctx.K, ctx.M
    WK, steps = fast_geometry(K)
    grid = math.ceil(N / R)
    has_lora = ctx.lora_rank > 0
    vals = {"x": DUMMY_PTR, "M": M, "K": K, "N": N, "qcodes": DUMMY_PTR, "offset": DUMMY_PTR,
            "levels": DUMMY_PTR, "log2_b0": int(math.log2(ctx.block_size)),
            "nblocks": ctx.nblocks, "lora.t": DUMMY_PTR if has_lora else 0,
            "lora.b": DUMMY_PTR if has_lora else 0, "lora.b_dtype": DTYPE_CODE[ctx.x_dtype],
            "lora.rank": ctx.lora_rank, "lora.scale": 1.0, "out": DUMMY_PTR, **_scale_params(ctx)}
    params = param_words(spec.params, vals, {"ntid.x": 32, "ntid.y": WK, "ntid.z": 1,
                                             "nctaid.x": grid, "nctaid.y": 1, "nctaid.z": 1})
    xb = 2 if ctx.x_dtype != "float32" else 4
    det = {"weights (codes + scales)": ctx.packed_bytes(), "x": M * K * xb, "out": M * N * xb}
    if has_lora:
        det["lora b + t"] = N * ctx.lora_rank * xb + M * ctx.lora_rank * 4
    outputs = R * MT  # epilogue: threads tid < R*MT, one output each (only warp 0 when <= 32)
    epi_warps = math.ceil(min(outputs, 32 * WK) / 32)
    refill = min(1.0, 32 / ctx.block_size) if ctx.block_size >= 32 else 1.0

    def trips(loops, blocks, instrs, reached):
        infos = loop_infos(loops, blocks, instrs)
        hot = next((i.index for i in infos if _ldg_ef(i) and i.loop.depth == 0
                    and reached[i.index]), None)
        avg, mx = [1.0] * len(loops), [1.0] * len(loops)
        if hot is None:
            return avg, mx, None
        avg[hot], mx[hot] = sum(steps) / WK, float(max(steps))
        hot_addr = infos[hot].addr
        for i in infos:
            if i.index == hot or i.addr < hot_addr:
                continue  # the LUT fill loops before the hot loop: at most one trip
            if i.loop.depth == 0:  # epilogue: for (idx = tid; idx < R*MT; idx += 32*WK)
                avg[i.index], mx[i.index] = epi_warps / WK, 1.0
            elif _has(i.own_ops, "LDS"):  # for (k < WK) v += red[k][r][m]: 1 LDS per k
                copies = [_has(o.own_ops, "LDS") for o in infos
                          if o.loop.parent == i.loop.parent and _has(o.own_ops, "LDS")]
                avg[i.index] = mx[i.index] = unrolled_trips(WK, _has(i.own_ops, "LDS"), copies)
            elif _has(i.own_ops, "LDG"):  # lora_term: for (j < rank): loads t[m, j], b[n, j]
                # one copy per b dtype (only the reached one runs), each unrolled
                copies = [max(1, _has(o.own_ops, "LDG") // 2) for o in infos
                          if o.loop.parent == i.loop.parent and _has(o.own_ops, "LDG")
                          and reached[o.index]]
                u = max(1, _has(i.own_ops, "LDG") // 2)
                avg[i.index] = mx[i.index] = unrolled_trips(ctx.lora_rank, u, copies)
        return avg, mx, hot

    def hint(info) -> Optional[float]:
        # The scale-window refill (`if (j_last >= wj[r] + 32)`, warp-uniform, loop-carried):
        # the skipped region decodes one scale (MUFU.RCP of the division) and holds no
        # shuffle. It runs every B0/32 steps.
        if info.skipped.get("MUFU") and not info.skipped.get("SHFL"):
            return 1.0 - refill
        return None

    x_level = activation_level(M * K * xb)

    def levels(instrs):
        # load8(x + ...): 16-byte read-only loads; scale codes / scale2: L2 (their lines
        # are shared by neighbouring steps); weight codes: .EF, DRAM
        return {i.addr: x_level for i in instrs
                if i.op == "LDG" and "CONSTANT" in i.mods and "128" in i.mods}

    return Launch(grid, 32 * WK, params, grid * WK, N * K, sum(det.values()), det, trips,
                  hint=hint, lut_levels=1 << bits, load_levels=levels)


# ------------------------------------------------------------------ lora_down_kernel
LORA_DOWN_PARAMS = (("x", PTR, 8), ("M", INT, 4), ("K", INT, 4), ("a", PTR, 8),
                    ("a_dtype", INT, 4), ("rank", INT, 4), ("t", PTR, 8))


def lora_down_launch(spec: KernelSpec, ctx: Ctx) -> Launch:
    K, M, r = ctx.K, ctx.M, ctx.lora_rank
    n = math.ceil(K / 256)  # k-loop iterations of a thread
    params = param_words(spec.params, {"x": DUMMY_PTR, "M": M, "K": K, "a": DUMMY_PTR,
                                       "a_dtype": DTYPE_CODE[ctx.x_dtype], "rank": r,
                                       "t": DUMMY_PTR},
                         {"ntid.x": 256, "ntid.y": 1, "ntid.z": 1, "nctaid.x": r,
                          "nctaid.y": 1, "nctaid.z": 1})
    xb = 2 if ctx.x_dtype != "float32" else 4
    det = {"a": r * K * xb, "x": M * K * xb, "t": M * r * 4}

    def trips(loops, blocks, instrs, reached):
        # k-loops (global loads; one copy per x dtype / M, only the reached one runs): n
        # iterations, the source loop is not unrolled (one `a` load per M-row block of
        # x loads). Reduction loops (`for w < blockDim.x / 32` over part[w][m], LDS):
        # unrolled copies of an 8-trip loop.
        infos = loop_infos(loops, blocks, instrs)
        avg = [1.0] * len(loops)
        for i in infos:
            if _has(i.own_ops, "LDG"):
                avg[i.index] = float(n)
            elif _has(i.own_ops, "LDS"):
                copies = [_has(o.own_ops, "LDS") for o in infos
                          if _has(o.own_ops, "LDS") and not _has(o.own_ops, "LDG")]
                avg[i.index] = unrolled_trips(8, _has(i.own_ops, "LDS"), copies)
        k_loops = [i for i in infos if _has(i.own_ops, "LDG")]
        hot = k_loops[0].index if k_loops else None
        return avg, list(avg), hot

    x_level = activation_level(M * K * xb)

    def levels(instrs):
        # per k-iteration the source loads a[j, k] first (streamed once: DRAM), then x[m, k]
        # for each m (shared by all blocks: L1/L2): the first load after each loop head is a
        from .sass import build_cfg, find_loops
        blocks = build_cfg(instrs)
        heads = {instrs[blocks[lp.header].start].addr for lp in find_loops(blocks)}
        out, first = {}, False
        for i in instrs:
            if i.addr in heads:
                first = True
            if i.op == "LDG":
                out[i.addr] = "dram" if first else x_level
                first = False
        return out

    return Launch(r, 256, params, r * 8, ctx.N * ctx.K, sum(det.values()), det, trips,
                  load_levels=levels)


# ------------------------------------------------------------------ qmatmul_t_kernel
T_PARAMS = (("g", PTR, 8), ("M", INT, 4), ("N", INT, 4), ("K", INT, 4), ("qcodes", PTR, 8),
            ("bits", INT, 4), ("scales", PTR, 8), ("levels", PTR, 8), ("log2_b0", INT, 4),
            ("rows_per_split", INT, 4), ("partial", PTR, 8))
K_T_THREADS, K_T_MTILE = 256, 4


def t_splits(N: int, K: int, sms: int = 132) -> int:
    """qmatmul_t_splits (qmatmul_t.cu): two blocks per SM, at most 32 splits, >= 16 rows."""
    col_blocks = math.ceil(K / (8 * K_T_THREADS))
    want = math.ceil(2 * sms / col_blocks)
    return int(min(max(want, 1), min(32, max(1, N // 16))))


def t_launch(spec: KernelSpec, ctx: Ctx) -> Launch:
    N, K, M = ctx.N, ctx.K, ctx.M
    splits = ctx.splits
    rps = math.ceil(N / splits)
    cols = math.ceil(K / (8 * K_T_THREADS))
    grid = cols * splits
    params = param_words(spec.params, {"g": DUMMY_PTR, "M": M, "N": N, "K": K,
                                       "qcodes": DUMMY_PTR, "bits": ctx.bits,
                                       "scales": DUMMY_PTR, "levels": DUMMY_PTR,
                                       "log2_b0": int(math.log2(ctx.block_size)),
                                       "rows_per_split": rps, "partial": DUMMY_PTR},
                         {"ntid.x": 256, "ntid.y": 1, "ntid.z": 1, "nctaid.x": cols,
                          "nctaid.y": splits, "nctaid.z": 1})
    passes = math.ceil(M / K_T_MTILE)
    rows_in_pass = [min(K_T_MTILE, M - K_T_MTILE * p) for p in range(passes)]
    xb = 2 if ctx.x_dtype != "float32" else 4
    det = {"codes": N * K * ctx.bits / 8, "scales fp32": ctx.nblocks * 4.0,
           "g": M * N * xb, "partial": splits * M * K * 4.0}
    live_warps = splits * math.ceil(K / 256)  # a warp owns 256 columns; warps past K exit

    def trips(loops, blocks, instrs, reached):
        # for (m0 < M; m0 += 4) { for (n in split) {...} }: the n-loop (LUT loads, no
        # nested loop) is hot; two copies (K % 8 == 0 or not), one reached.
        infos = loop_infos(loops, blocks, instrs)
        avg = [1.0] * len(loops)
        hot = None
        for i in infos:
            if i.loop.children:
                avg[i.index] = float(passes)
            elif _has(i.own_ops, "LDS") and i.loop.depth > 0:
                avg[i.index] = float(rps)
                if reached[i.index]:
                    hot = i.index
        return avg, list(avg), hot

    def chain(k: int, n: int) -> Optional[float]:
        # `if (m0 + mm >= M) break` for mm = 1..3: taken in the passes with <= k rows
        return sum(1 for r in rows_in_pass if r <= k) / passes

    g_level = activation_level(M * N * xb)

    def levels(instrs):
        # codes and the fp32 scales (32-bit read-only loads, each read by one block): DRAM;
        # g[m, n] (16-bit; one address for the whole warp, read by every column block): L1/L2
        return {i.addr: (g_level if ("U16" in i.mods) else "dram") for i in instrs if i.op == "LDG"}

    return Launch(grid, 256, params, float(live_warps),
                  N * K, sum(det.values()), det, trips, break_chain=chain,
                  lut_levels=1 << ctx.bits, load_levels=levels)


# ------------------------------------------------------------------ dequantize_kernel
DQ_PARAMS = (("qcodes", PTR, 8), ("sa", SCALE_ARGS), ("offset", PTR, 8), ("levels", PTR, 8),
             ("n", I64, 8), ("log2_b0", INT, 4), ("nblocks", I64, 8), ("e_begin", I64, 8),
             ("e_end", I64, 8), ("out", PTR, 8))


def dq_launch(spec: KernelSpec, ctx: Ctx) -> Launch:
    rows = ctx.rows or ctx.N
    n = ctx.N * ctx.K
    e_end = rows * ctx.K
    groups = math.ceil(e_end / 32)
    grid = math.ceil(groups / (32 * 8))
    params = param_words(spec.params, {"qcodes": DUMMY_PTR, "offset": DUMMY_PTR,
                                       "levels": DUMMY_PTR, "n": n,
                                       "log2_b0": int(math.log2(ctx.block_size)),
                                       "nblocks": ctx.nblocks, "e_begin": 0, "e_end": e_end,
                                       "out": DUMMY_PTR, **_scale_params(ctx)},
                         {"ntid.x": 256, "ntid.y": 1, "ntid.z": 1, "nctaid.x": grid,
                          "nctaid.y": 1, "nctaid.z": 1})
    ob = 2 if ctx.x_dtype != "float32" else 4
    det = {"weights (codes + scales)": ctx.packed_bytes(rows), "dense out": rows * ctx.K * ob}

    def trips(loops, blocks, instrs, reached):
        # straight-line decode of 1024 codes per warp, then the tile-store loop
        # (32 rows, unrolled by the number of stores in its body); no hot loop
        infos = loop_infos(loops, blocks, instrs)
        avg = [1.0] * len(loops)
        for i in infos:
            if _has(i.own_ops, "STG"):
                avg[i.index] = 32.0 / _has(i.own_ops, "STG")
        return avg, list(avg), None

    return Launch(grid, 256, params, grid * 8.0, rows * ctx.K, sum(det.values()), det, trips,
                  lut_levels=1 << ctx.bits)


# ------------------------------------------------------------------ unpack_scales_kernel
UNPACK_PARAMS = (("sa", SCALE_ARGS), ("offset", PTR, 8), ("nblocks", I64, 8), ("out", PTR, 8))


def unpack_launch(spec: KernelSpec, ctx: Ctx) -> Launch:
    nb = ctx.nblocks
    grid = math.ceil(nb / 256)
    params = param_words(spec.params, {"offset": DUMMY_PTR, "nblocks": nb, "out": DUMMY_PTR,
                                       **_scale_params(ctx)},
                         {"ntid.x": 256, "ntid.y": 1, "ntid.z": 1, "nctaid.x": grid,
                          "nctaid.y": 1, "nctaid.z": 1})
    s2 = {"float32": 4, "float16": 2, "bfloat16": 2}[ctx.scale_dtype]
    det = {"qscales + scale2": nb * ctx.scale_bits / 8 + ctx.ngroups * s2, "scales fp32": nb * 4.0}

    def trips(loops, blocks, instrs, reached):
        return [1.0] * len(loops), [1.0] * len(loops), None

    return Launch(grid, 256, params, grid * 8.0, ctx.N * ctx.K, sum(det.values()), det, trips)


KERNELS: Dict[str, KernelSpec] = {
    "qmatmul_fast_kernel": KernelSpec("qmatmul_fast_kernel", ("Bits", "XT", "MT", "R"),
                                      FAST_PARAMS, fast_launch, ldg_level="l2"),
    "lora_down_kernel": KernelSpec("lora_down_kernel", ("XT",), LORA_DOWN_PARAMS,
                                   lora_down_launch, ldg_level="dram"),
    "qmatmul_t_kernel": KernelSpec("qmatmul_t_kernel", ("GT",), T_PARAMS, t_launch,
                                   ldg_level="dram"),
    "dequantize_kernel": KernelSpec("dequantize_kernel", ("Bits", "OutT"), DQ_PARAMS,
                                    dq_launch, ldg_level="dram"),
    "unpack_scales_kernel": KernelSpec("unpack_scales_kernel", (), UNPACK_PARAMS,
                                       unpack_launch, ldg_level="dram"),
}

CXX_TYPE = {"bfloat16": "__nv_bfloat16", "float16": "__half", "float32": "float"}
