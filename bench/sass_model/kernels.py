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

Source facts used below (csrc/cuda/qmatmul_kernels.cuh, qmatmul_mma.cuh, qmatmul_t.cu,
dequantize.cu, qmatmul_dispatch.cuh, launch.h):
- qmatmul_fast_kernel<Bits, XT, MT, R>: grid ceil(N/R) blocks of (32, WK) threads, WK = 4
  if K/32 >= 128, 2 if >= 64, else 1; warp y walks groups [y*Gw, min(G, (y+1)*Gw)), Gw =
  ceil(ceil(G/WK)/32)*32, 32 groups (lane l: group base + l, 32 codes) per step, R rows
  per step: one hot-loop iteration = R x 32 x 32 codes per warp (masked lanes do no work).
- qmatmul_mma_kernel<Bits, XT, MT16>: NT = 4 n-tiles of 8 rows per warp for MT16 <= 2, 2
  for MT16 = 4, 1 for MT16 = 8; grid ceil(N / 8NT) blocks of (32, WK) threads, WK = 4 if
  ceil(G/4) >= 16 chunks, 2 if >= 8, else 1; warp y walks chunks [y*pw, min(C, (y+1)*pw)),
  pw = ceil(C/WK), one chunk = 4 groups (128 k) of each of its 8NT rows: one hot-loop
  iteration = NT x 8 x 128 weights per warp, 2 x 4 x MT16 x NT mma.m16n8k16 per iteration.
- lora_down_kernel<XT>: grid (rank, ceil(M/16)) blocks of 256 threads, thread k-loop with
  stride 256, rows [16y, 16y + 16) of x per block.
- qmatmul_t_kernel<Bits, GT, MT>: grid (ceil(K / 1024), splits) x 128 threads, thread owns
  8 columns and walks rows_per_split rows, kTUnroll = 4 rows per iteration;
  qmatmul_t_reduce_kernel<GT>: one thread per output of M x K (256 per block), a loop over
  the splits 1..splits-1.
- dequantize_kernel<Bits, OutT>: 8 warps per block, a warp decodes 32 groups = 1024 codes
  in straight-line code, then stores its 32x32 tile in a loop unrolled by 4 (8 trips).
- unpack_scales_kernel: one thread per scale, 256 per block.
"""
from __future__ import annotations

import dataclasses
import math
import struct
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .sass import Block, Instr, Loop

PARAM_BASE = 0x210  # sm_70+: kernel parameters start at c[0x0][0x210]
BUILTIN = {"ntid.x": 0x0, "ntid.y": 0x4, "ntid.z": 0x8, "nctaid.x": 0xC, "nctaid.y": 0x10,
           "nctaid.z": 0x14}  # blockDim / gridDim words of constant bank 0

# Field = (name, size, align) or (name, [fields]) for a struct.
PTR, INT, F32, I64 = 8, 4, 4, 8
SCALE_ARGS = [("qscales", PTR, 8), ("scale2", PTR, 8), ("scale2_dtype", INT, 4),
              ("scale_bits", INT, 4), ("log2_b1", INT, 4), ("Lq", F32, 4)]
LORA_ARGS = [("t", PTR, 8), ("b", PTR, 8), ("b_dtype", INT, 4), ("rank", INT, 4),
             ("scale", F32, 4)]
LORA_FUSED = [("a", PTR, 8), ("a_dtype", INT, 4), ("b", PTR, 8), ("b_dtype", INT, 4),
              ("rank", INT, 4), ("scale", F32, 4), ("t", PTR, 8), ("ready", PTR, 8),
              ("tiles", INT, 4), ("kslices", INT, 4), ("producers", INT, 4)]  # lora.cuh LoraFused
K_LORA_J = 4  # launch.h kLoraJ: columns of t per producer tile
K_LORA_TILE_M = 16  # launch.h kLoraTileM: rows of x per tile
K_LORA_K_CHUNK = 512  # launch.h kLoraKChunk: K per producer slice (before rounding)
K_LORA_MAX_SLICES = 16  # launch.h kLoraMaxSlices
K_LORA_UNROLL = 4  # lora.cuh lora_produce kU: loads in flight per lane and step
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
    # blocks that run different code (the fused LoRA's producer blocks): each role is
    # analyzed on its own with SR_CTAID.X pinned; None = every block alike
    roles: Optional[List["Role"]] = None


@dataclasses.dataclass(frozen=True)
class Role:
    """A set of blocks of one grid that take the same path: ``ctaid`` is a representative
    blockIdx.x, ``warps`` the warps of these blocks that do work."""

    name: str
    blocks: int
    warps: float
    ctaid: int


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


def induction_stride(loop: Loop, blocks: List[Block], instrs: Sequence[Instr]) -> Optional[int]:
    """The step of the counter a loop's back edge tests: the latch's ``ISETP`` on register r,
    and the ``IADD3 r, r, imm`` / ``VIADD r, r, imm`` in the body (|imm|; None if not found).
    A source loop ``k += 32`` unrolled u times steps by 32u."""
    import re as _re

    for lb in loop.latches:
        b = blocks[lb]
        br = instrs[b.end - 1]
        if br.op != "BRA" or not br.pred:
            continue
        pred = br.pred.lstrip("!")
        reg = None
        body = sorted(i for bi in loop.body for i in range(blocks[bi].start, blocks[bi].end)
                      if i < b.end - 1)
        for i in reversed(body):  # the last compare that sets the branch's predicate
            x = instrs[i]
            if x.op in ("ISETP", "UISETP") and x.operands and x.operands[0] == pred:
                reg = x.operands[2].replace(".reuse", "")
                break
        if reg is None:
            continue
        for bi in loop.body:
            for i in range(blocks[bi].start, blocks[bi].end):
                x = instrs[i]
                ops = [o.replace(".reuse", "") for o in x.operands]
                if not ops or ops[0] != reg or x.op not in ("IADD3", "VIADD", "UIADD3"):
                    continue
                imms = [o for o in ops[1:] if _re.fullmatch(r"-?0x[0-9a-fA-F]+", o)]
                if reg in ops[1:] and len(imms) == 1:
                    v = int(imms[0], 16)
                    return abs(v - (1 << 32) if v & 0x80000000 else v)
    return None


def _ldg_ef(info: LoopInfo) -> bool:
    """The loop holds evict-first (weight-stream) loads, itself or in a nested loop."""
    return any(k.startswith("LDG.E.EF") for k in info.ops)


# ------------------------------------------------------------------ the fused LoRA term
def lora_tiles(rank: int, M: int) -> int:
    """launch.h lora_tiles: ceil(rank / kLoraJ) x ceil(M / 16) tiles of t."""
    return math.ceil(rank / K_LORA_J) * math.ceil(M / K_LORA_TILE_M) if rank else 0


def lora_k_slices(K: int) -> int:
    """launch.h lora_k_slices: producer blocks per tile, each a K slice."""
    return min(K_LORA_MAX_SLICES, max(1, math.ceil(K / K_LORA_K_CHUNK)))


def lora_chunk(K: int) -> int:
    """lora.cuh lora_produce: the K slice of one producer block (a multiple of 32)."""
    return math.ceil(math.ceil(K / lora_k_slices(K)) / 32) * 32


def lora_producers(rank: int, M: int, K: int) -> int:
    """Producer blocks of a fused launch: tiles x K slices (0 without LoRA)."""
    return lora_tiles(rank, M) * lora_k_slices(K)


def lora_values(ctx: Ctx) -> Dict[str, object]:
    """The LoraFused parameter words of a launch (producers = 0: no LoRA term)."""
    on = ctx.lora_rank > 0
    return {"lora.a": DUMMY_PTR if on else 0, "lora.a_dtype": DTYPE_CODE[ctx.x_dtype],
            "lora.b": DUMMY_PTR if on else 0, "lora.b_dtype": DTYPE_CODE[ctx.x_dtype],
            "lora.rank": ctx.lora_rank, "lora.scale": 1.0, "lora.t": DUMMY_PTR if on else 0,
            "lora.ready": DUMMY_PTR if on else 0, "lora.tiles": lora_tiles(ctx.lora_rank, ctx.M),
            "lora.kslices": lora_k_slices(ctx.K),
            "lora.producers": lora_producers(ctx.lora_rank, ctx.M, ctx.K)}


def lora_roles(ctx: Ctx, base_blocks: int, warps_per_block: int) -> List[Role]:
    """Producer blocks [0, P) and the weight blocks after them. Without LoRA (P = 0) one
    role, so that ``blockIdx.x < producers`` is still decided (consumer: blockIdx.x = P)."""
    P = lora_producers(ctx.lora_rank, ctx.M, ctx.K)
    cons = Role("consumer", base_blocks, float(base_blocks * warps_per_block), P)
    return ([Role("producer", P, float(P * warps_per_block), 0)] if P else []) + [cons]


def _unrolled(n: int, i: LoopInfo, blocks: List[Block], instrs: Sequence[Instr], step1: int) -> float:
    """Trips of a copy of an n-iteration source loop (step ``step1``) unrolled u times, u
    from its counter's step: n // u, the remainder running in straight-line code or a
    narrower copy (nvcc emits the remainder first or last; either way n // u here)."""
    u = max(1, (induction_stride(i.loop, blocks, instrs) or step1) // step1)
    return float(n // u) if u > 1 else float(n)


def _producer_k_loop(i: LoopInfo) -> bool:
    return (_has(i.own_ops, "LDG") and _has(i.own_ops, "FFMA") and not _has(i.ops, "LDS")
            and not _ldg_ef(i) and not i.loop.children)


def lora_load_levels(instrs: Sequence[Instr]) -> Dict[int, str]:
    """Where the fused LoRA's loads hit: a (lora_produce's k-loop) and b (lora_dot's loop,
    the one with .STRONG.GPU loads of t, or the tensor-core epilogue's HMMA loop) stream
    from DRAM once per launch, t comes from L2 (just written by the producers). Loads of
    x (read-only, .CONSTANT) are left to the caller."""
    from .sass import build_cfg, find_loops

    blocks = build_cfg(instrs)
    loops = find_loops(blocks)
    infos = loop_infos(loops, blocks, instrs)
    out: Dict[int, str] = {}
    for i in infos:
        lora_loop = _producer_k_loop(i) or (not _ldg_ef(i) and (
            any("STRONG" in k for k in i.own_full) or _has(i.own_ops, "HMMA")))
        if not lora_loop:
            continue
        for bi in i.loop.body:
            for x in instrs[blocks[bi].start:blocks[bi].end]:
                if x.op == "LDG" and "CONSTANT" not in x.mods:
                    out[x.addr] = "l2" if "STRONG" in x.mods else "dram"
    return out


def lora_loop_trips(i: LoopInfo, infos: List[LoopInfo], blocks: List[Block],
                    instrs: Sequence[Instr], ctx: Ctx, warps: int) -> Optional[float]:
    """Trips of the fused LoRA's loops (lora.cuh), or None for another loop:
    - lora_produce's k-loop ``for (k = k_begin + lane; k < k_end; k += 4 * 32)`` over its
      K slice (loads and FMAs, no shared memory, no weight stream; one copy per a dtype):
      chunk / 128 over its unroll factor (the counter's step / 128);
    - its column loop ``for (jj = warp; jj < kLoraJ; jj += warps)`` (holds the k-loop):
      ceil(kLoraJ / warps);
    - the last slice's sum ``for (s = 0; s < kslices; ++s)`` (L2 loads of the planes and
      FADDs, no FMA): kslices, and its ``for (idx = tid; idx < Mt * kLoraJ; ...)``: 64 values
      over the block's threads;
    - lora_wait's spin loop (NANOSLEEP): no extra round (the wait is the producer role's
      path, taken as the longest of the roles);
    - lora_dot's ``for (j = lane; j < rank; j += 32)`` (L2 loads of t, .STRONG.GPU)."""
    if _has(i.ops, "NANOSLEEP"):
        return 0.0
    strong = sum(v for k, v in i.own_full.items() if k.startswith("LDG") and "STRONG" in k)
    if strong and not i.loop.children:
        if _lora_slice_sum(i):
            return _unrolled(lora_k_slices(ctx.K), i, blocks, instrs, 1)
        return _unrolled(math.ceil(ctx.lora_rank / 32), i, blocks, instrs, 32)
    if _producer_k_loop(i):
        step = 32 * K_LORA_UNROLL
        return _unrolled(math.ceil(lora_chunk(ctx.K) / step), i, blocks, instrs, step)
    if i.loop.children and any(_producer_k_loop(infos[c]) for c in i.loop.children):
        return float(math.ceil(K_LORA_J / warps))
    if i.loop.children and any(_lora_slice_sum(infos[c]) for c in i.loop.children):
        return float(math.ceil(K_LORA_TILE_M * K_LORA_J / (32 * warps)))
    return None


def _lora_slice_sum(i: LoopInfo) -> bool:
    """The last slice's ordered sum over the planes: L2 (.STRONG.GPU) loads and FADDs, no
    FMA (lora_dot's loop, the other loop with such loads, multiplies by b)."""
    strong = any(k.startswith("LDG") and "STRONG" in k for k in i.own_full)
    return strong and not _has(i.own_ops, "FFMA") and not i.loop.children


# ------------------------------------------------------------------ qmatmul_fast_kernel
FAST_PARAMS = (("x", PTR, 8), ("M", INT, 4), ("K", INT, 4), ("N", INT, 4), ("qcodes", PTR, 8),
               ("sa", SCALE_ARGS), ("offset", PTR, 8), ("levels", PTR, 8), ("log2_b0", INT, 4),
               ("nblocks", INT, 4), ("lora", LORA_FUSED), ("out", PTR, 8))


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
    base = math.ceil(N / R)
    P = lora_producers(ctx.lora_rank, M, K)
    grid = P + base
    vals = {"x": DUMMY_PTR, "M": M, "K": K, "N": N, "qcodes": DUMMY_PTR, "offset": DUMMY_PTR,
            "levels": DUMMY_PTR, "log2_b0": int(math.log2(ctx.block_size)),
            "nblocks": ctx.nblocks, "out": DUMMY_PTR, **lora_values(ctx), **_scale_params(ctx)}
    params = param_words(spec.params, vals, {"ntid.x": 32, "ntid.y": WK, "ntid.z": 1,
                                             "nctaid.x": grid, "nctaid.y": 1, "nctaid.z": 1})
    xb = 2 if ctx.x_dtype != "float32" else 4
    det = {"weights (codes + scales)": ctx.packed_bytes(), "x": M * K * xb, "out": M * N * xb}
    if P:
        det["lora a + b + t"] = (ctx.lora_rank * K + N * ctx.lora_rank) * xb + M * ctx.lora_rank * 4
    outputs = R * MT  # epilogue: warp y takes outputs y, y + WK, ... (one warp per output)
    refill = min(1.0, 32 / ctx.block_size) if ctx.block_size >= 32 else 1.0
    # outputs of the epilogue loop a warp skips (`if (n >= N || m >= M) continue`)
    skip = sum(1 for idx in range(outputs) if idx % MT >= M) / outputs

    def trips(loops, blocks, instrs, reached):
        infos = loop_infos(loops, blocks, instrs)
        hot = next((i.index for i in infos if _ldg_ef(i) and i.loop.depth == 0
                    and reached[i.index]), None)
        avg, mx = [1.0] * len(loops), [1.0] * len(loops)
        for i in infos:
            t = lora_loop_trips(i, infos, blocks, instrs, ctx, WK)
            if t is not None:
                avg[i.index] = mx[i.index] = t
        if hot is None:
            return avg, mx, None
        avg[hot], mx[hot] = sum(steps) / WK, float(max(steps))
        hot_addr = infos[hot].addr
        lds_copies = [_has(o.own_ops, "LDS") for o in infos if o.addr > hot_addr
                      and _has(o.own_ops, "LDS") and not _has(o.own_ops, "LDG")]
        for i in infos:
            if i.index == hot or i.addr < hot_addr or lora_loop_trips(
                    i, infos, blocks, instrs, ctx, WK) is not None:
                continue  # the LUT fill before the hot loop: at most one trip
            if i.loop.depth == 0:  # for (idx = wk; idx < R*MT; idx += WK): per warp
                avg[i.index], mx[i.index] = outputs / WK, float(math.ceil(outputs / WK))
            elif _has(i.own_ops, "LDS") and not _has(i.own_ops, "LDG"):
                # for (k < WK) v += red[k][r][m]: copies unrolled by their LDS count
                avg[i.index] = mx[i.index] = unrolled_trips(WK, _has(i.own_ops, "LDS"), lds_copies)
        return avg, mx, hot

    def hint(info) -> Optional[float]:
        # The scale-window refill (`if (j_last >= wj[r] + 32)`, warp-uniform, loop-carried):
        # the skipped region decodes one scale (MUFU.RCP of the division) and holds no
        # shuffle. It runs every B0/32 steps.
        if info.skipped.get("MUFU") and not info.skipped.get("SHFL"):
            return 1.0 - refill
        # the epilogue's `continue` past an output this launch does not have (m >= M):
        # skips the cross-warp sum (LDS) and the store
        if info.skipped.get("LDS") and info.skipped.get("STG") and not info.skipped.get("LDG.EF"):
            return skip
        return None

    x_level = activation_level(M * K * xb)

    def levels(instrs):
        # load8(x + ...): 16-byte read-only loads; scale codes / scale2: L2 (their lines
        # are shared by neighbouring steps); weight codes: .EF, DRAM; the LoRA term's a and
        # b (read once per launch): DRAM; t (.STRONG.GPU, just written): L2
        return {**lora_load_levels(instrs), **{
            i.addr: x_level for i in instrs
            if i.op == "LDG" and "CONSTANT" in i.mods and ("128" in i.mods or "U16" in i.mods)}}

    wpb = WK
    return Launch(grid, 32 * WK, params, float(grid * WK), N * K, sum(det.values()), det, trips,
                  hint=hint, lut_levels=1 << bits, load_levels=levels,
                  roles=lora_roles(ctx, base, wpb))


# ------------------------------------------------------------------ qmatmul_mma_kernel
MMA_PARAMS = (("x", PTR, 8), ("M", INT, 4), ("K", INT, 4), ("N", INT, 4), ("qcodes", PTR, 8),
              ("sa", SCALE_ARGS), ("offset", PTR, 8), ("levels", PTR, 8), ("log2_b0", INT, 4),
              ("lora", LORA_FUSED), ("out", PTR, 8))
K_MMA_WARPS = 4  # qmatmul_mma.cuh kMmaWarps
SMS = 132  # H100 SXM and H200 SXM: the SM count the launchers size their grids for


def mma_nt(mt16: int) -> int:
    """n-tiles of 8 rows per warp (MmaTraits<MT16>::NT)."""
    return 4 if mt16 <= 2 else (2 if mt16 == 4 else 1)


def mma_max_warps(mt16: int) -> int:
    """MmaTraits<MT16>::kMaxWarps."""
    return 2 * K_MMA_WARPS if mt16 == 1 else K_MMA_WARPS


def mma_warps(chunks: int, blocks: int, lora: bool, max_warps: int, sms: int = SMS) -> int:
    """qmatmul_mma.cuh mma_warps: warps per block along K."""
    if chunks < 8:
        return 1
    if chunks < 16:
        return 2
    warps = K_MMA_WARPS * blocks
    few = warps < 8 * sms or (chunks >= 8 * max_warps and warps < 16 * sms)
    return (max_warps if max_warps > K_MMA_WARPS and chunks >= 4 * max_warps and not lora
            and few else K_MMA_WARPS)


def mma_geometry(K: int, blocks: int, lora: bool, mt16: int) -> Tuple[int, List[int]]:
    """(WK, chunks of each warp y) of qmatmul_mma_kernel<.., MT16> for K (K % 32 == 0) and
    a grid of ``blocks`` row blocks."""
    chunks = math.ceil(K // 32 / 4)
    WK = mma_warps(chunks, blocks, lora, mma_max_warps(mt16))
    pw = math.ceil(chunks / WK)
    return WK, [max(0, min(chunks, (y + 1) * pw) - y * pw) for y in range(WK)]


def mma_launch(spec: KernelSpec, ctx: Ctx) -> Launch:
    mt16 = ctx.t[2]
    NT = mma_nt(mt16)
    N, K, M = ctx.N, ctx.K, ctx.M
    base = math.ceil(N / (8 * NT))
    P = lora_producers(ctx.lora_rank, M, K)
    WK, chunks = mma_geometry(K, base, P > 0, mt16)
    grid = P + base
    vals = {"x": DUMMY_PTR, "M": M, "K": K, "N": N, "qcodes": DUMMY_PTR, "offset": DUMMY_PTR,
            "levels": DUMMY_PTR, "log2_b0": int(math.log2(ctx.block_size)), "out": DUMMY_PTR,
            **lora_values(ctx), **_scale_params(ctx)}
    params = param_words(spec.params, vals, {"ntid.x": 32, "ntid.y": WK, "ntid.z": 1,
                                             "nctaid.x": grid, "nctaid.y": 1, "nctaid.z": 1})
    xb = 2
    det = {"weights (codes + scales)": ctx.packed_bytes(), "x": M * K * xb, "out": M * N * xb}
    if P:
        det["lora a + b + t"] = (ctx.lora_rank * K + N * ctx.lora_rank) * xb + M * ctx.lora_rank * 4

    def trips(loops, blocks, instrs, reached):
        # the chunk loop (weight streams) is hot; after it, the cross-warp sum
        # `for (k = 1; k < WK; ++k)` (LDS; unrolled copies, warp 0 only), the LoRA
        # up-projection `for (s0 = 0; s0 < rank; s0 += 16)` (HMMA, loads of t and b), and
        # the fused LoRA's producer and wait loops (lora_loop_trips)
        infos = loop_infos(loops, blocks, instrs)
        hot = next((i.index for i in infos if _ldg_ef(i) and i.loop.depth == 0
                    and reached[i.index]), None)
        avg, mx = [1.0] * len(loops), [1.0] * len(loops)
        for i in infos:
            if _has(i.own_ops, "HMMA") and not _ldg_ef(i):
                avg[i.index] = mx[i.index] = _unrolled(math.ceil(ctx.lora_rank / 16), i, blocks,
                                                       instrs, 16)
                continue
            t = lora_loop_trips(i, infos, blocks, instrs, ctx, WK)
            if t is not None:
                avg[i.index] = mx[i.index] = t
        if hot is None:
            return avg, mx, None
        avg[hot], mx[hot] = sum(chunks) / WK, float(max(chunks))
        hot_addr = infos[hot].addr
        lds_loops = [i for i in infos if i.addr > hot_addr and _has(i.own_ops, "LDS")
                     and not _has(i.own_ops, "LDG")]
        base_lds = min((_has(i.own_ops, "LDS") for i in lds_loops), default=1)
        copies = [_has(i.own_ops, "LDS") // base_lds for i in lds_loops]
        for i in lds_loops:
            u = _has(i.own_ops, "LDS") // base_lds
            # warp 0 only (the others return after storing their sums)
            avg[i.index] = unrolled_trips(WK - 1, u, copies) / WK
            mx[i.index] = unrolled_trips(WK - 1, u, copies)
        return avg, mx, hot

    x_level = activation_level(M * K * xb)

    def levels(instrs):
        # x rows: 16-byte read-only loads shared by every block (L1/L2); scale codes and
        # scale2: L2; weight codes: .EF, DRAM; the LoRA term's loads: lora_load_levels
        return {**lora_load_levels(instrs), **{
            i.addr: x_level for i in instrs
            if i.op == "LDG" and "CONSTANT" in i.mods and ("128" in i.mods or "U16" in i.mods)}}

    return Launch(grid, 32 * WK, params, float(grid * WK), N * K, sum(det.values()), det, trips,
                  lut_levels=1 << ctx.bits, load_levels=levels, roles=lora_roles(ctx, base, WK))


# ------------------------------------------------------------------ lora_down_kernel
LORA_DOWN_PARAMS = (("x", PTR, 8), ("M", INT, 4), ("K", INT, 4), ("a", PTR, 8),
                    ("a_dtype", INT, 4), ("rank", INT, 4), ("t", PTR, 8))


K_LORA_ROWS = 16  # lora_down_kernel: rows of x per block (kSmallM)


def lora_down_launch(spec: KernelSpec, ctx: Ctx) -> Launch:
    K, M, r = ctx.K, ctx.M, ctx.lora_rank
    n = math.ceil(K / 256)  # k-loop iterations of a thread
    ys = math.ceil(M / K_LORA_ROWS)
    rows = [min(K_LORA_ROWS, M - K_LORA_ROWS * y) for y in range(ys)]  # Mt of block row y
    params = param_words(spec.params, {"x": DUMMY_PTR, "M": M, "K": K, "a": DUMMY_PTR,
                                       "a_dtype": DTYPE_CODE[ctx.x_dtype], "rank": r,
                                       "t": DUMMY_PTR},
                         {"ntid.x": 256, "ntid.y": 1, "ntid.z": 1, "nctaid.x": r,
                          "nctaid.y": ys, "nctaid.z": 1})
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

    def chain(k: int, nb: int) -> Optional[float]:
        # `if (m >= Mt) break` for m = 1..15: taken in the block rows with <= k rows
        return sum(1 for x in rows if x <= k) / len(rows)

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

    grid = r * ys
    return Launch(grid, 256, params, grid * 8, ctx.N * ctx.K, sum(det.values()), det, trips,
                  break_chain=chain, load_levels=levels)


# ------------------------------------------------------------------ qmatmul_t_kernel
T_PARAMS = (("g", PTR, 8), ("M", INT, 4), ("N", INT, 4), ("K", INT, 4), ("qcodes", PTR, 8),
            ("scales", PTR, 8), ("levels", PTR, 8), ("log2_b0", INT, 4),
            ("rows_per_split", INT, 4), ("partial", PTR, 8))
K_T_THREADS, K_T_UNROLL = 128, 4  # qmatmul_t.cu kTThreads, kTUnroll


def t_unroll(MT: int) -> int:
    """qmatmul_t_kernel's rows in flight U: kTUnroll, 2 for MT = 16 (registers)."""
    return 2 if MT > 4 else K_T_UNROLL


def t_column_blocks(K: int) -> int:
    return math.ceil(K / (8 * K_T_THREADS))


def t_splits(N: int, K: int, sms: int = 132) -> int:
    """qmatmul_t_splits (qmatmul_t.cu): four blocks per SM, at most 64 splits, >= 32 rows."""
    want = math.ceil(4 * sms / t_column_blocks(K))
    return int(min(max(want, 1), min(64, max(1, N // 32))))


def t_tile(M: int) -> int:
    """The MT template argument launch_qmatmul_t_small picks for M."""
    return 1 if M == 1 else (4 if M <= 4 else 16)


def t_launch(spec: KernelSpec, ctx: Ctx) -> Launch:
    N, K, M = ctx.N, ctx.K, ctx.M
    splits = ctx.splits
    rps = math.ceil(N / splits)
    cols = t_column_blocks(K)
    grid = cols * splits
    params = param_words(spec.params, {"g": DUMMY_PTR, "M": M, "N": N, "K": K,
                                       "qcodes": DUMMY_PTR, "scales": DUMMY_PTR,
                                       "levels": DUMMY_PTR,
                                       "log2_b0": int(math.log2(ctx.block_size)),
                                       "rows_per_split": rps, "partial": DUMMY_PTR},
                         {"ntid.x": K_T_THREADS, "ntid.y": 1, "ntid.z": 1, "nctaid.x": cols,
                          "nctaid.y": splits, "nctaid.z": 1})
    # rows of each split: the last one may be short (or empty)
    split_rows = [max(0, min(N, (s + 1) * rps) - s * rps) for s in range(splits)]
    iters = [math.ceil(r / t_unroll(ctx.t[2])) for r in split_rows]
    xb = 2 if ctx.x_dtype != "float32" else 4
    det = {"codes": N * K * ctx.bits / 8, "scales fp32": ctx.nblocks * 4.0,
           "g": M * N * xb, "partial": splits * M * K * 4.0}
    warps_per_split = math.ceil(K / 256)  # a warp owns 256 columns; warps past K exit

    def trips(loops, blocks, instrs, reached):
        # for (nb in split; nb += 4) {...}: the loop with the weight/LUT loads is hot (two
        # copies, K % 8 == 0 or not, one reached); nothing else loops at run time
        infos = loop_infos(loops, blocks, instrs)
        avg = [1.0] * len(loops)
        mx = [1.0] * len(loops)
        hot = None
        for i in infos:
            if _has(i.ops, "LDS") and _has(i.ops, "LDG"):
                avg[i.index] = sum(iters) / max(1, len(iters))
                mx[i.index] = float(max(iters))
                if reached[i.index] and hot is None:
                    hot = i.index
        return avg, mx, hot

    g_level = activation_level(M * N * xb)

    def levels(instrs):
        # codes and the fp32 scales (each read by one block): DRAM; g[m, n] (16-bit; one
        # address for the whole warp, read by every column block): L1/L2
        return {i.addr: (g_level if ("U16" in i.mods) else "dram") for i in instrs if i.op == "LDG"}

    return Launch(grid, K_T_THREADS, params, float(splits * warps_per_split),
                  N * K, sum(det.values()), det, trips,
                  lut_levels=1 << ctx.bits, load_levels=levels)


# ------------------------------------------------------------------ qmatmul_t_reduce_kernel
T_REDUCE_PARAMS = (("partial", PTR, 8), ("splits", INT, 4), ("mk", I64, 8), ("out", PTR, 8))


def t_reduce_launch(spec: KernelSpec, ctx: Ctx) -> Launch:
    mk = ctx.M * ctx.K
    grid = math.ceil(mk / 256)
    splits = ctx.splits
    params = param_words(spec.params, {"partial": DUMMY_PTR, "splits": splits, "mk": mk,
                                       "out": DUMMY_PTR},
                         {"ntid.x": 256, "ntid.y": 1, "ntid.z": 1, "nctaid.x": grid,
                          "nctaid.y": 1, "nctaid.z": 1})
    ob = 2 if ctx.x_dtype != "float32" else 4
    det = {"partial fp32": splits * mk * 4.0, "out": mk * ob}

    def trips(loops, blocks, instrs, reached):
        # for (s = 1; s < splits; ++s): copies unrolled by the loads in their bodies
        infos = loop_infos(loops, blocks, instrs)
        avg = [1.0] * len(loops)
        copies = [_has(i.own_ops, "LDG") for i in infos if _has(i.own_ops, "LDG")]
        for i in infos:
            if _has(i.own_ops, "LDG"):
                avg[i.index] = unrolled_trips(splits - 1, _has(i.own_ops, "LDG"), copies)
        return avg, list(avg), None

    def levels(instrs):
        return {i.addr: "l2" for i in instrs if i.op == "LDG"}  # just written by qmatmul_t

    return Launch(grid, 256, params, math.ceil(mk / 32), mk, sum(det.values()), det, trips,
                  load_levels=levels)


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


# ------------------------------------------------------------------ jacobi_eigh_kernel
JACOBI_PARAMS = (("g", PTR, 8), ("k", INT, 4), ("evals", PTR, 8), ("evecs", PTR, 8),
                 ("work", PTR, 8))
K_JACOBI_THREADS = 512       # rsvd.h kJacobiThreads
K_JACOBI_MAX_SHARED = 76     # rsvd.h kJacobiMaxSharedOrder


@dataclasses.dataclass(frozen=True)
class JacobiCtx:
    """One eigensolver launch, or one of its phases (see ``jacobi_launch``): ``batch``
    matrices of order ``k``; ``phase`` "outside" (everything but the sweeps), "rotating"
    (one sweep whose every round rotates, ``pair_fraction`` of the pairs in each) or
    "quiet" (one sweep whose rounds all stop after the pair pass)."""

    batch: int
    k: int
    phase: str = "outside"
    pair_fraction: float = 1.0
    t: Tuple = ()

    @property
    def kp(self) -> int:
        return self.k + (self.k & 1)


def jacobi_loops(loops: List[Loop], blocks: List[Block], instrs: Sequence[Instr]) -> Dict[str, object]:
    """Roles of the kernel's loops, from their SASS (rsvd.cu's structure): the sweep loop is
    the outermost loop holding barriers, the round loop its child; the round loop's children
    in address order are the pair pass (MUFU: sqrt, reciprocal), the row rotations and the
    column rotations (DFMA; a nested element loop unless unrolled) and the zeroing of g_pq
    (no DFMA). Loops before the sweep loop fill the working copy (global loads of g) or take
    max |g_ii| (DSETP, no stores); loops after it sort (DSETP: counting; stores: copying)."""
    infos = loop_infos(loops, blocks, instrs)
    roles: Dict[str, object] = {"init": [], "dmax": [], "count": [], "copy": []}
    sweep = next((i for i in infos if loops[i.index].parent is None and _has(i.ops, "BAR")), None)
    if sweep is None:
        raise ValueError("jacobi_eigh_kernel: no loop with barriers (the kernel changed: update "
                         "bench/sass_model/kernels.py)")
    rnd = next(i for i in infos if loops[i.index].parent == sweep.index)
    kids = sorted((infos[c] for c in loops[rnd.index].children), key=lambda i: i.addr)
    pair = next(i for i in kids if _has(i.own_ops, "MUFU"))
    dfma = [i for i in kids if _has(i.ops, "DFMA") and i is not pair]
    zero = [i for i in kids if not _has(i.ops, "DFMA") and i is not pair]
    if len(dfma) != 2 or len(zero) != 1:
        raise ValueError("jacobi_eigh_kernel: expected a row and a column rotation loop and a "
                         "zeroing loop in the round loop (the kernel changed)")
    roles.update(sweep=sweep.index, round=rnd.index, pair=pair.index, rows=dfma[0].index,
                 cols=dfma[1].index, zero=zero[0].index)
    for i in infos:
        if loops[i.index].parent is None and i.addr < sweep.addr:
            stores = _has(i.own_ops, "STG") + _has(i.own_ops, "STS")
            roles["init" if stores else "dmax"].append(i.index)
    for i in infos:
        if i.addr < sweep.addr or i.index == sweep.index or loops[i.index].parent == sweep.index:
            continue
        if loops[i.index].parent is not None and loops[loops[i.index].parent].parent is None \
                and infos[loops[i.index].parent].addr > sweep.addr:
            roles["copy" if _has(i.own_ops, "STG") else "count"].append(i.index)
    return roles


def jacobi_launch(spec: KernelSpec, ctx: "JacobiCtx") -> Launch:
    """Trips per warp (16 warps of 32 threads; kp = k rounded up to even, h = kp / 2 pairs):
    - fill: idx = tid .. kp^2 step 512; dmax: k diagonal reads (every thread);
    - per sweep kp - 1 rounds; pair pass: i = tid .. h step 512 (warps holding a pair: 1
      trip); rows and columns: warp w takes pairs w, w + 16, ... (ceil((h - w) / 16)), its
      lanes the elements j = lane .. kp step 32 (the shared-memory variant unrolls them
      completely; the global one loops ceil(kp / 32) times, in copies unrolled by the loads
      in their bodies); zeroing like the pair pass;
    - sort: i = tid .. k (one trip for the warps holding an eigenvalue), each counting over
      k and copying k eigenvector entries.
    Branch weights: in the rotating phase a pair is skipped with probability 1 -
    pair_fraction (the ``continue`` over the rotation body; the pair pass's ``if (!skip)``),
    and no round stops after its pair pass; in the quiet phase every round does."""
    k, kp = ctx.k, ctx.kp
    h = kp // 2
    nt, nw = K_JACOBI_THREADS, K_JACOBI_THREADS // 32
    params = param_words(spec.params, {"g": DUMMY_PTR, "k": k, "evals": DUMMY_PTR,
                                       "evecs": DUMMY_PTR, "work": DUMMY_PTR},
                         {"ntid.x": nt, "ntid.y": 1, "ntid.z": 1, "nctaid.x": ctx.batch,
                          "nctaid.y": 1, "nctaid.z": 1})
    det = {"g fp64": ctx.batch * k * k * 8.0, "evals + evecs": ctx.batch * (k + k * k) * 8.0}
    if ctx.phase == "outside":
        det["eigenvector rows (init)"] = ctx.batch * kp * kp * 8.0
    warps_busy = lambda n: sum(1 for w in range(nw) if w * 32 < n) / nw  # noqa: E731
    per_warp_pairs = [math.ceil(max(0, h - w) / nw) for w in range(nw)]
    roles_of: Dict[int, str] = {}  # branch address -> what decides it (find_roles)
    loop_roles: Dict[str, object] = {}  # jacobi_loops of the kernel (find_roles)

    def find_roles(instrs) -> Dict[int, str]:
        # called before the branch decisions (Launch.load_levels), which need the roles;
        # every load keeps the kernel's level. The branches the phase decides: in the pair,
        # row, column and zeroing loops the one that skips the most code (the pair's
        # ``if (!skip)`` / ``continue``; the others guard elements or slow paths), in the
        # round loop the one that skips its barriers.
        from .sass import build_cfg, find_loops, innermost_loop_of

        blocks = build_cfg(instrs)
        loops = find_loops(blocks)
        r = jacobi_loops(loops, blocks, instrs)
        loop_roles.update(r)
        inner = innermost_loop_of(blocks, loops)
        index_of = {x.addr: i for i, x in enumerate(instrs)}
        best: Dict[int, Tuple[int, int]] = {}
        for b in blocks:
            last = instrs[b.end - 1]
            t = last.branch_target()
            if last.op != "BRA" or not last.pred or t is None or t <= last.addr:
                continue
            j = inner[b.index]
            skipped = instrs[b.end:index_of.get(t, b.end)]
            if j == r["round"]:
                if any(x.op == "BAR" for x in skipped):
                    roles_of[last.addr] = "round"
            elif j in (r["pair"], r["rows"], r["cols"], r["zero"]):
                if len(skipped) > best.get(j, (-1, 0))[0]:
                    best[j] = (len(skipped), last.addr)
        for j, (_, addr) in best.items():
            roles_of[addr] = "pair" if j == r["pair"] else "rotation"
        return {}

    def trips(loops, blocks, instrs, reached):
        r = loop_roles  # the analysis builds the same loops from the same SASS
        avg = [1.0] * len(loops)
        mx = [1.0] * len(loops)
        infos = loop_infos(loops, blocks, instrs)

        def unrolled(indices, n):
            copies = [max(1, _has(infos[j].own_ops, "LDG") + _has(infos[j].own_ops, "LDS"))
                      for j in indices]
            for j, u in zip(indices, copies):
                avg[j] = mx[j] = unrolled_trips(n, u, copies)

        unrolled(r["init"], math.ceil(kp * kp / nt))
        unrolled(r["dmax"], k)
        sweeps = 0.0 if ctx.phase == "outside" else 1.0
        avg[r["sweep"]] = mx[r["sweep"]] = sweeps
        avg[r["round"]] = mx[r["round"]] = kp - 1.0
        for j in (r["pair"], r["zero"]):
            avg[j], mx[j] = warps_busy(h), 1.0
        for j in (r["rows"], r["cols"]):
            avg[j], mx[j] = sum(per_warp_pairs) / nw, float(max(per_warp_pairs))
        for d in (r["rows"], r["cols"]):
            unrolled(list(loops[d].children), math.ceil(kp / 32))
        sort_outer = {loops[j].parent for j in r["count"] + r["copy"]}
        for j in sort_outer:
            avg[j], mx[j] = warps_busy(k), 1.0
        unrolled(r["count"], k)
        unrolled(r["copy"], k)
        return avg, mx, r["round"]

    def hint(info) -> Optional[float]:
        role = roles_of.get(info.instr.addr)
        quiet = ctx.phase == "quiet"
        if role == "round":  # if (!__syncthreads_or(any)) continue
            return 1.0 if quiet else 0.0
        if role == "pair":  # if (!skip) { ... }
            return 1.0 if quiet else 1.0 - ctx.pair_fraction
        if role == "rotation":  # if (s == 0.0) continue
            return 1.0 - ctx.pair_fraction
        return None

    return Launch(ctx.batch, nt, params, ctx.batch * float(nw), ctx.batch * float(k * k),
                  sum(det.values()), det, trips, hint=hint, load_levels=find_roles)


# ------------------------------------------------------------------ gaussian_sketch_kernel
SKETCH_PARAMS = (("seed", I64, 8), ("count", I64, 8), ("out", PTR, 8))
K_SKETCH_THREADS = 256       # sketch.cu kThreads
K_SKETCH_MAX_BLOCKS = 1024   # sketch.cu's grid cap


@dataclasses.dataclass(frozen=True)
class SketchCtx:
    """One sketch launch: ``count`` elements of ``dtype`` (rsvd's [B, n, k] sketch)."""

    count: int
    dtype: str = "float32"
    t: Tuple = ()


def sketch_launch(spec: KernelSpec, ctx: "SketchCtx") -> Launch:
    """One thread per pair (Philox block + Box-Muller), grid-stride over the pairs; the
    fill loop inside runs once per pair. Every other loop (Philox rounds, the series) is
    unrolled in the SASS; the division and square-root slow paths (CALL) are never taken
    for these operands."""
    pairs = (ctx.count + 1) // 2
    grid = max(1, min(math.ceil(pairs / K_SKETCH_THREADS), K_SKETCH_MAX_BLOCKS))
    params = param_words(spec.params, {"seed": 0, "count": ctx.count, "out": DUMMY_PTR},
                         {"ntid.x": K_SKETCH_THREADS, "ntid.y": 1, "ntid.z": 1,
                          "nctaid.x": grid, "nctaid.y": 1, "nctaid.z": 1})
    elem = 8 if ctx.dtype == "float64" else 4
    det = {"sketch out": ctx.count * float(elem)}
    per_thread = pairs / (grid * K_SKETCH_THREADS)

    def trips(loops, blocks, instrs, reached):
        infos = loop_infos(loops, blocks, instrs)
        avg = [1.0] * len(loops)
        hot = None
        for i in infos:  # the outermost loop holding the stores is the grid-stride loop
            if _has(i.ops, "STG") and (hot is None or len(i.loop.body) > len(infos[hot].loop.body)):
                hot = i.index
        if hot is not None:
            avg[hot] = per_thread
        return avg, [math.ceil(a) for a in avg], hot

    return Launch(grid, K_SKETCH_THREADS, params, grid * K_SKETCH_THREADS / 32.0,
                  float(ctx.count), sum(det.values()), det, trips)


KERNELS: Dict[str, KernelSpec] = {
    "qmatmul_fast_kernel": KernelSpec("qmatmul_fast_kernel", ("Bits", "XT", "MT", "R"),
                                      FAST_PARAMS, fast_launch, ldg_level="l2"),
    "lora_down_kernel": KernelSpec("lora_down_kernel", ("XT",), LORA_DOWN_PARAMS,
                                   lora_down_launch, ldg_level="dram"),
    "qmatmul_mma_kernel": KernelSpec("qmatmul_mma_kernel", ("Bits", "XT", "MT16"), MMA_PARAMS,
                                     mma_launch, ldg_level="l2"),
    "qmatmul_t_kernel": KernelSpec("qmatmul_t_kernel", ("Bits", "GT", "MT"), T_PARAMS, t_launch,
                                   ldg_level="dram"),
    "qmatmul_t_reduce_kernel": KernelSpec("qmatmul_t_reduce_kernel", ("GT",), T_REDUCE_PARAMS,
                                          t_reduce_launch, ldg_level="l2"),
    "dequantize_kernel": KernelSpec("dequantize_kernel", ("Bits", "OutT"), DQ_PARAMS,
                                    dq_launch, ldg_level="dram"),
    "unpack_scales_kernel": KernelSpec("unpack_scales_kernel", (), UNPACK_PARAMS,
                                       unpack_launch, ldg_level="dram"),
    # the eigenvector rows live in global memory, written and re-read by the same block
    "jacobi_eigh_kernel": KernelSpec("jacobi_eigh_kernel", ("kShared",), JACOBI_PARAMS,
                                     jacobi_launch, ldg_level="l2"),
    "gaussian_sketch_kernel": KernelSpec("gaussian_sketch_kernel", ("T",), SKETCH_PARAMS,
                                         sketch_launch, ldg_level="l2"),
}

CXX_TYPE = {"bfloat16": "__nv_bfloat16", "float16": "__half", "float32": "float"}
