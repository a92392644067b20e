"""Static analysis of one kernel's SASS for one launch: which branches go which way, how
often each basic block runs per warp, instruction counts by pipe, shared-memory and L1
wavefronts, and the time one warp needs along its path (from the control codes).

Branches are decided in three ways, in this order:
1. evaluated: the predicate comes from comparisons of kernel parameters and immediates,
   which a small constant propagation follows (LDC c[0x0][param], MOV, IADD3, IMAD, SHF,
   LOP3, ISETP/UISETP); ``params`` gives the launch's parameter words (keyed by their
   constant-bank offset) and may pin special registers (key ``"SR_CTAID.X"``: the block
   index of one role of a grid whose blocks run different code);
2. rules: BRA.DIV (diverged-warp fallback) is not taken; a branch that skips an
   out-of-line CALL and nothing else (``MOV Rret; CALL.REL`` of the IEEE-division slow
   path, entered only for denormal or huge operands) is taken; a chain of unknown branches
   to one target (an unrolled ``if (m >= M) break``) asks the kernel table's
   ``break_chain(k)`` for the k-th break, and any other unknown branch asks ``hint``;
3. otherwise both sides run (weight 1 each, block frequencies capped at their loop's
   header): the SIMT upper bound for a lane-divergent branch. Their number is reported.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from .sass import Block, Instr, Loop, build_cfg, find_loops, innermost_loop_of

M32 = 0xFFFFFFFF
# Launch values: constant-bank words by offset, special registers by name (SR_CTAID.X).
Params = Dict[Union[int, str], int]

# ------------------------------------------------------------------ pipe classification
# Lanes per clock per SM on sm_90 (CUDA C++ Programming Guide, "Arithmetic Instructions",
# throughput table, compute capability 9.0): fp32 add/mul/fma 128; fp16x2 256 results =
# 128 lanes; int add/shift/logic/compare 64; int multiply(-add) 64; conversions and MUFU
# 16; warp shuffle 32. LSU/MIO: 32 lanes per clock per SM (4 sub-partitions x 8 LD/ST
# units, GA100/GH100 whitepapers). Tensor: see hw.py.
PIPES = {
    # pipe: (opcodes, warp-instructions per clock per SM)
    "fma": (("FFMA", "FMUL", "FADD", "FFMA32I", "FMUL32I", "FADD32I", "HFMA2", "HMUL2",
             "HADD2", "HFMA2.MMA", "FSWZADD"), 4.0),
    "imad": (("IMAD", "IMUL", "IMAD32I", "IMUL32I", "IDP", "IMNMX"), 2.0),
    "alu": (("IADD3", "IADD", "IADD32I", "LOP3", "LOP", "LOP32I", "SHF", "SHL", "SHR", "PRMT",
             "ISETP", "ICMP", "SEL", "FSEL", "FSETP", "FMNMX", "VIMNMX", "VIADD", "VIADDMNMX",
             "LEA", "MOV", "MOV32I", "IABS", "BMSK", "SGXT", "PLOP3", "P2R", "R2P", "FCHK",
             "I2FP", "F2FP", "CS2R", "HSETP2", "HMNMX2", "VOTE", "ISCADD", "BFE", "BFI",
             "IMNMX", "CSET", "CSETP"), 2.0),
    # fp64 add/mul/fma and compares: 64 lanes per clock per SM on GH100 (guide, cc 9.0)
    "fp64": (("DFMA", "DMUL", "DADD", "DSETP", "DMNMX"), 2.0),
    "xu": (("MUFU", "F2F", "F2I", "I2F", "FRND", "POPC", "FLO", "BREV", "I2I", "F2IP"), 0.5),
    "lsu": (("LDS", "STS", "LDSM", "LDG", "STG", "LD", "ST", "LDL", "STL", "ATOM", "ATOMS",
             "ATOMG", "RED", "SHFL", "LDGSTS", "MATCH", "REDUX", "CCTL"), 1.0),
    "tensor": (("HMMA", "IMMA", "HGMMA", "DMMA", "BMMA"), None),  # rate set in hw.py
}
_PIPE_OF = {}
for _p, (_ops, _) in PIPES.items():
    for _o in _ops:
        _PIPE_OF.setdefault(_o, _p)
_CONTROL = {"BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BSSY", "BSYNC", "WARPSYNC",
            "BAR", "NOP", "YIELD", "BMOV", "DEPBAR", "ERRBAR", "MEMBAR", "FENCE", "ELECT",
            "KILL", "BPT", "ENDCOLLECTIVE", "ACQBULK", "ARRIVES", "SYNCS"}

# Reported instruction classes (the breakdown); one class per instruction.
CLASSES = ("lds", "sts", "ldg", "stg", "local", "shfl", "fma", "hfma2", "imad", "int",
           "conv", "mufu", "mma", "fp64", "branch", "sync", "uniform", "const", "other")


def pipe_of(ins: Instr) -> str:
    """Execution pipe of an instruction: a key of PIPES, or "issue" (only takes an issue
    slot: control, uniform datapath, constant loads, special registers)."""
    if ins.op in _CONTROL:
        return "issue"
    if ins.op.startswith("U") or ins.op in ("S2UR", "R2UR", "LDC", "S2R"):
        return "issue"
    if ins.op == "HFMA2" and "MMA" in ins.mods:
        return "fma"
    return _PIPE_OF.get(ins.op, "issue")


def class_of(ins: Instr) -> str:
    op = ins.op
    if op in ("LDS", "LDSM"):
        return "lds"
    if op in ("STS", "ATOMS"):
        return "sts"
    if op in ("LDG", "LD", "LDGSTS"):
        return "ldg"
    if op in ("STG", "ST", "RED", "ATOM", "ATOMG"):
        return "stg"
    if op in ("LDL", "STL"):
        return "local"
    if op in ("SHFL", "REDUX", "MATCH", "VOTE"):
        return "shfl"
    if op in ("HFMA2", "HMUL2", "HADD2"):
        return "hfma2"
    if op in ("FFMA", "FMUL", "FADD", "FFMA32I", "FMUL32I", "FADD32I"):
        return "fma"
    if op.startswith("IMAD") or op == "IMUL":
        return "imad"
    if op in ("MUFU",):
        return "mufu"
    if op in ("F2F", "F2I", "I2F", "FRND", "I2FP", "F2FP", "I2I", "F2IP"):
        return "conv"
    if op in ("HMMA", "IMMA", "HGMMA", "DMMA", "BMMA"):
        return "mma"
    if op in ("DFMA", "DMUL", "DADD", "DSETP", "DMNMX"):
        return "fp64"
    if op in ("BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BSSY", "BSYNC", "KILL"):
        return "branch"
    if op in ("BAR", "WARPSYNC", "ENDCOLLECTIVE", "DEPBAR", "MEMBAR", "ERRBAR", "FENCE"):
        return "sync"
    if op.startswith("U") or op in ("S2UR", "R2UR"):
        return "uniform"
    if op in ("LDC", "S2R", "CS2R"):
        return "const"
    if pipe_of(ins) in ("alu", "xu"):
        return "int" if pipe_of(ins) == "alu" else "conv"
    return "other"


# ------------------------------------------------------------------ constant propagation
_NO_DEST = {"STG", "STS", "STL", "ST", "RED", "BRA", "BRX", "JMP", "CALL", "RET", "EXIT",
            "BAR", "BSSY", "BSYNC", "WARPSYNC", "NOP", "MEMBAR", "FENCE", "DEPBAR", "ERRBAR",
            "ENDCOLLECTIVE", "KILL", "BPT", "YIELD", "CCTL"}


def _reg_name(o: str) -> Optional[str]:
    m = re.fullmatch(r"(U?R\d+|U?P[0-6])(\.reuse)?", o.strip())
    return m.group(1) if m else None


def _is_pred(r: Optional[str]) -> bool:
    return bool(r) and r.lstrip("U").startswith("P")


def _dest_regs(ins: Instr) -> List[str]:
    """Registers (R/UR/P/UP) an instruction may write: the first operand, a second
    predicate output (ISETP-like compares; IADD3/LEA carry-out; LOP3's ``P, R`` form), and
    the registers after a wide destination (.64/.128, IMAD.WIDE, CS2R, fp64)."""
    if ins.op in _NO_DEST or not ins.operands:
        return []
    ops = list(ins.operands)
    out: List[str] = [r for r in [_reg_name(ops[0])] if r]
    second = _reg_name(ops[1]) if len(ops) > 1 else None
    if ins.op in ("ISETP", "UISETP", "FSETP", "HSETP2", "PLOP3", "UPLOP3", "DSETP", "CSETP"):
        if second:
            out.append(second)
    elif ins.op in ("IADD3", "UIADD3", "LEA", "ULEA", "IMAD", "VIADD") and _is_pred(second):
        out.append(second)
    elif ins.op in ("LOP3", "ULOP3") and out and _is_pred(out[0]) and second:
        out.append(second)  # LOP3.LUT P0, R5, a, b, c, lut, Pq
    width = 1
    if "128" in ins.mods or ins.op in ("HMMA", "LDSM", "IMMA"):
        width = 4
    elif "64" in ins.mods or "WIDE" in ins.mods or "F64" in ins.mods or ins.op in (
            "CS2R", "DADD", "DFMA", "DMUL"):
        width = 2
    if out and width > 1 and not _is_pred(out[0]):
        pre = "UR" if out[0].startswith("UR") else "R"
        n = int(out[0][len(pre):])
        out += [f"{pre}{n + k}" for k in range(1, width)]
    return out


def _to_int(tok: str) -> Optional[int]:
    tok = tok.strip()
    try:
        if re.fullmatch(r"-?0x[0-9a-fA-F]+", tok):
            return int(tok, 16) & M32
        if re.fullmatch(r"-?\d+", tok):
            return int(tok) & M32
    except ValueError:
        return None
    return None


@dataclasses.dataclass(frozen=True)
class KBits:
    """A register whose bits under ``mask`` are known to be those of ``val`` (the rest
    unknown): kernels keep flags in bits of one register (``LOP3 R0, R0, 0xfffffffd``, then
    ``@P0 LOP3 R0, R0, 0x2``, then ``LOP3.LUT P0, RZ, R0, 0x2``)."""

    val: int
    mask: int


def _known(val: int, mask: int):
    """A register value from known bits: an int when all are known, None when none are."""
    mask &= M32
    if mask == M32:
        return val & M32
    return KBits(val & mask, mask) if mask else None


def _kbits(o: str, regs: dict, params: Params) -> Tuple[int, int]:
    """(value, known mask) of an operand; unknown registers have mask 0."""
    core = o.strip().replace(".reuse", "")
    inv = core.startswith("~")
    core = core[1:] if inv else core
    x = regs.get(core) if re.fullmatch(r"U?R\d+", core) else None
    if isinstance(x, KBits):
        val, mask = x.val, x.mask
    else:
        v = _value(core, regs, params)
        val, mask = (0, 0) if v is None else (v, M32)
    return ((~val & M32) if inv else val), mask


def _lop3_bits(a: Tuple[int, int], b: Tuple[int, int], c: Tuple[int, int], lut: int):
    """LOP3 on partially known operands: a result bit is known where every value the
    unknown input bits can take gives the same LUT output."""
    def can(x, bit):  # bits where operand x can be `bit`
        v, m = x
        return ((v if bit else ~v) & m | ~m) & M32

    can1 = can0 = 0
    for k in range(8):
        sel = can(a, k >> 2 & 1) & can(b, k >> 1 & 1) & can(c, k & 1)
        if (lut >> k) & 1:
            can1 |= sel
        else:
            can0 |= sel
    mask = ~(can1 & can0) & M32
    return _known(can1 & mask, mask)


def _value(o: str, regs: Dict[str, int], params: Params) -> Optional[int]:
    o = o.strip().replace(".reuse", "")
    neg = o.startswith("-")
    inv = o.startswith("~")
    core = o[1:] if (neg or inv) else o
    v: Optional[int]
    if core in ("RZ", "URZ"):
        v = 0
    elif re.fullmatch(r"U?R\d+", core):
        v = regs.get(core)
        if isinstance(v, KBits):  # partly known: unknown as a number
            v = None
    elif re.fullmatch(r"c\[0x0\]\[0x[0-9a-fA-F]+\]", core):
        v = params.get(int(core.split("][")[1].rstrip("]"), 16))
    else:
        v = _to_int(core)
    if v is None:
        return None
    if neg:
        v = (-v) & M32
    if inv:
        v = (~v) & M32
    return v


def _pval(o: str, preds: Dict[str, bool]) -> Optional[bool]:
    o = o.strip()
    neg = o.startswith("!")
    core = o[1:] if neg else o
    if core in ("PT", "UPT"):
        v: Optional[bool] = True
    else:
        v = preds.get(core)
    if v is None:
        return None
    return (not v) if neg else v


def _signed(v: int) -> int:
    return v - (1 << 32) if v & 0x80000000 else v


def _cmp(kind: str, a: int, b: int, unsigned: bool) -> Optional[bool]:
    if not unsigned:
        a, b = _signed(a), _signed(b)
    return {"EQ": a == b, "NE": a != b, "LT": a < b, "LE": a <= b, "GT": a > b,
            "GE": a >= b}.get(kind)


def transfer(ins: Instr, regs: Dict[str, int], preds: Dict[str, bool],
             params: Params) -> None:
    """Apply one instruction to the known register/predicate values (in place)."""
    dests = _dest_regs(ins)
    guard = _pval(ins.pred, preds) if ins.pred else True
    if guard is False:
        return
    ops = ins.operands
    new_r: Dict[str, Optional[int]] = {}
    new_p: Dict[str, Optional[bool]] = {}
    v = lambda o: _value(o, regs, params)  # noqa: E731
    try:
        op = ins.op
        if op in ("S2R", "S2UR") and len(ops) == 2 and ops[1] in params:
            # a special register the launch pins (SR_CTAID.X of a block role)
            new_r[dests[0]] = params[ops[1]] & M32
        elif op in ("LDC", "ULDC") and len(ops) == 2 and re.fullmatch(r"c\[0x0\]\[0x[0-9a-fA-F]+\]", ops[1]):
            off = int(ops[1].split("][")[1].rstrip("]"), 16)
            for k, d in enumerate(dests):
                new_r[d] = params.get(off + 4 * k)
        elif op in ("MOV", "UMOV", "MOV32I") and len(ops) >= 2:
            new_r[dests[0]] = v(ops[1])
        elif op in ("IADD3", "UIADD3") and dests and not any(_is_pred(d) for d in dests):
            a, b, c = (v(o) for o in ops[-3:])
            new_r[dests[0]] = None if None in (a, b, c) else (a + b + c) & M32
        elif op == "VIADD" and len(ops) == 3:
            a, b = v(ops[1]), v(ops[2])
            new_r[dests[0]] = None if None in (a, b) else (a + b) & M32
        elif op in ("IMAD", "UIMAD") and "WIDE" not in ins.mods and "HI" not in ins.mods and len(ops) == 4:
            a, b, c = v(ops[1]), v(ops[2]), v(ops[3])
            new_r[dests[0]] = None if None in (a, b, c) else (a * b + c) & M32
        elif op in ("SHF", "USHF") and len(ops) == 4 and "U32" in ins.mods and "W" not in ins.mods:
            lo, s, hi = v(ops[1]), v(ops[2]), v(ops[3])
            if None in (lo, s, hi):
                new_r[dests[0]] = None
            elif "R" in ins.mods and "HI" in ins.mods and lo == 0:
                new_r[dests[0]] = hi >> min(s, 32) if s < 32 else 0
            elif "L" in ins.mods and "HI" not in ins.mods and hi == 0:
                new_r[dests[0]] = (lo << s) & M32 if s < 32 else 0
            else:
                new_r[dests[0]] = None
        elif op in ("LOP3", "ULOP3") and "LUT" in ins.mods:
            # LOP3.LUT [Pd,] Rd, a, b, c, lut, Pq
            k = 2 if ops and _is_pred(_reg_name(ops[0])) else 1
            a, b, c = (_kbits(o, regs, params) for o in ops[k:k + 3])
            lut = v(ops[k + 3])
            res = None if lut is None else _lop3_bits(a, b, c, lut)
            if k == 2:
                if isinstance(res, KBits):  # nonzero if a known bit is set
                    new_p[_reg_name(ops[0])] = True if res.val else None
                else:
                    new_p[_reg_name(ops[0])] = None if res is None else res != 0
                rd = _reg_name(ops[1])
                if rd and rd not in ("RZ",):
                    new_r[rd] = res
            else:
                new_r[dests[0]] = res
        elif op in ("PLOP3", "UPLOP3") and "LUT" in ins.mods and len(ops) == 7:
            # PLOP3.LUT Pd, Pq, Pa, Pb, Pc, lut_d, lut_q: two boolean LUTs of three predicates
            a, b, c = (_pval(o, preds) for o in ops[2:5])
            luts = (_to_int(ops[5]), _to_int(ops[6]))
            for d, lut in zip(ops[:2], luts):
                rd = _reg_name(d)
                if rd is None or rd in ("PT", "UPT"):
                    continue
                new_p[rd] = (None if None in (a, b, c) or lut is None
                             else bool((lut >> (4 * a + 2 * b + c)) & 1))
        elif op == "P2R" and len(ops) == 4 and ops[1] == "PR":
            # P2R Rd, PR, Rs, mask: predicate P_i -> bit i where the mask has it, else Rs
            src, mask = v(ops[2]), _to_int(ops[3])
            bits = [(i, preds.get(f"P{i}")) for i in range(7) if mask is not None and (mask >> i) & 1]
            if src is None or mask is None or any(x is None for _, x in bits):
                new_r[dests[0]] = None
            else:
                new_r[dests[0]] = (src & ~mask & M32) | sum(1 << i for i, x in bits if x)
        elif op in ("ISETP", "UISETP") and len(ops) == 5 and "EX" not in ins.mods:
            kind = next((m for m in ins.mods if m in ("EQ", "NE", "LT", "LE", "GT", "GE")), None)
            comb = next((m for m in ins.mods if m in ("AND", "OR", "XOR")), "AND")
            a, b = v(ops[2]), v(ops[3])
            res = None if None in (a, b) or kind is None else _cmp(kind, a, b, "U32" in ins.mods)
            c = _pval(ops[4], preds)
            if comb == "AND":
                out = False if (res is False or c is False) else (None if None in (res, c) else True)
            elif comb == "OR":
                out = True if (res is True or c is True) else (None if None in (res, c) else False)
            else:
                out = None if None in (res, c) else (res != c)
            new_p[_reg_name(ops[0]) or ops[0]] = out
            if _reg_name(ops[1]) and ops[1] not in ("PT", "UPT"):
                new_p[_reg_name(ops[1])] = None
        else:
            for d in dests:
                (new_p if _is_pred(d) else new_r)[d] = None
    except (IndexError, TypeError):
        for d in dests:
            (new_p if _is_pred(d) else new_r)[d] = None
    if guard is None:  # predicated with an unknown guard: the old value may survive
        new_r = {d: (x if regs.get(d) == x else None) for d, x in new_r.items()}
        new_p = {d: (x if preds.get(d) == x else None) for d, x in new_p.items()}
    for d, x in new_r.items():
        if d in ("RZ", "URZ", None):
            continue
        if x is None:
            regs.pop(d, None)
        else:
            regs[d] = x
    for d, x in new_p.items():
        if d in ("PT", "UPT", None):
            continue
        if x is None:
            preds.pop(d, None)
        else:
            preds[d] = x
    for d in dests:  # any other written register becomes unknown
        if d not in new_r and d not in new_p:
            (preds if _is_pred(d) else regs).pop(d, None)


def propagate_constants(instrs: Sequence[Instr], blocks: Sequence[Block],
                        params: Params) -> List[Tuple[Dict[str, int], Dict[str, bool]]]:
    """Known (register, predicate) values at each block's last instruction (before it).
    Forward data flow, meet = agreement of every visited predecessor."""
    n = len(blocks)
    out_state: List[Optional[Tuple[dict, dict]]] = [None] * n
    at_last: List[Tuple[dict, dict]] = [({}, {}) for _ in range(n)]
    order = list(range(n))
    for _ in range(8):
        changed = False
        for bi in order:
            b = blocks[bi]
            ins_states = [out_state[p] for p in b.pred if out_state[p] is not None]
            if bi == 0:
                regs: Dict[str, int] = {}
                preds: Dict[str, bool] = {}
            elif not ins_states:
                continue
            else:
                regs = dict(ins_states[0][0])
                preds = dict(ins_states[0][1])
                for r, p in ins_states[1:]:
                    regs = {k: x for k, x in regs.items() if r.get(k) == x}
                    preds = {k: x for k, x in preds.items() if p.get(k) == x}
            for i in range(b.start, b.end - 1):
                transfer(instrs[i], regs, preds, params)
            at_last[bi] = (dict(regs), dict(preds))
            transfer(instrs[b.end - 1], regs, preds, params)
            new = (regs, preds)
            if out_state[bi] != new:
                out_state[bi] = new
                changed = True
        if not changed:
            break
    return at_last


# ------------------------------------------------------------------ branch decisions
@dataclasses.dataclass
class BranchInfo:
    """One conditional branch whose direction the constants did not settle."""

    block: int
    instr: Instr
    target: int
    loop: Optional[int]
    skipped: Counter  # opcodes between the branch and its target (forward branches)


@dataclasses.dataclass
class Decisions:
    taken_weight: Dict[int, float]  # block index -> weight of its "taken" edge
    fall_weight: Dict[int, float]
    evaluated: int = 0
    by_rule: int = 0
    hinted: int = 0
    unknown: int = 0


def decide_branches(instrs: Sequence[Instr], blocks: Sequence[Block], loops: Sequence[Loop],
                    params: Params,
                    break_chain: Optional[Callable[[int, int], Optional[float]]] = None,
                    hint: Optional[Callable[[BranchInfo], Optional[float]]] = None) -> Decisions:
    """Weights of the taken / fall-through edge of every conditional branch (see module
    docstring). ``break_chain(k, n)`` gives P(taken) of the k-th (1-based) of n chained
    breaks; ``hint(info)`` P(taken) of any other unknown branch (None: both sides)."""
    states = propagate_constants(instrs, blocks, params)
    inner = innermost_loop_of(blocks, loops)
    idx_of = {ins.addr: i for i, ins in enumerate(instrs)}
    d = Decisions({}, {})
    unknown: List[BranchInfo] = []
    for b in blocks:
        last = instrs[b.end - 1]
        if last.op != "BRA":
            continue
        kinds = [k for _, k in b.succ]
        if "taken" not in kinds:
            continue
        t = last.branch_target()
        regs, preds = states[b.index]
        if "DIV" in last.mods:
            d.taken_weight[b.index], d.fall_weight[b.index] = 0.0, 1.0
            d.by_rule += 1
            continue
        conds = [last.pred] if last.pred else []
        conds += [o for o in last.operands if re.fullmatch(r"!?U?P[0-6T]", o)]
        vals = [_pval(c, preds) for c in conds]
        if any(x is False for x in vals):
            taken: Optional[bool] = False
        elif vals and all(x is True for x in vals):
            taken = True
        else:
            taken = None
        if taken is not None:
            d.taken_weight[b.index], d.fall_weight[b.index] = float(taken), float(not taken)
            d.evaluated += 1
            continue
        lo, hi = b.end, idx_of.get(t, b.end)
        skipped = Counter(instrs[i].op for i in range(lo, hi)) if hi > lo else Counter()
        if skipped.get("CALL") and 0 < hi - lo <= 3:  # "MOV Rret, ...; CALL.REL slow_path"
            d.taken_weight[b.index], d.fall_weight[b.index] = 1.0, 0.0
            d.by_rule += 1
            continue
        unknown.append(BranchInfo(b.index, last, t, inner[b.index], skipped))
    # chains of forward unknown branches sharing one target inside one loop
    groups: Dict[Tuple[Optional[int], int], List[BranchInfo]] = {}
    for u in unknown:
        if u.target > u.instr.addr:
            groups.setdefault((u.loop, u.target), []).append(u)
    chained = set()
    for (_, _), us in groups.items():
        if len(us) >= 2 and break_chain is not None:
            us.sort(key=lambda u: u.instr.addr)
            for k, u in enumerate(us, 1):
                p = break_chain(k, len(us))
                if p is not None:
                    d.taken_weight[u.block], d.fall_weight[u.block] = p, 1.0 - p
                    d.hinted += 1
                    chained.add(u.block)
    for u in unknown:
        if u.block in chained:
            continue
        p = hint(u) if hint is not None else None
        if p is None:
            d.taken_weight[u.block], d.fall_weight[u.block] = 1.0, 1.0
            d.unknown += 1
        else:
            d.taken_weight[u.block], d.fall_weight[u.block] = p, 1.0 - p
            d.hinted += 1
    return d


# ------------------------------------------------------------------ block frequencies
def block_frequencies(blocks: Sequence[Block], loops: Sequence[Loop], dec: Decisions,
                      trips: Sequence[float]) -> List[float]:
    """Executions of each block per warp. ``trips[j]``: iterations of loop j per entry.

    Forward edges carry freq(src) x weight; a block's frequency is the sum over its
    incoming forward edges, capped at its innermost loop's header frequency (1 per entry
    for the outermost level); a loop header gets (entries) x trips; an edge leaving a
    loop carries the loop's entry count, not its iterations."""
    inner = innermost_loop_of(blocks, loops)
    header_of = {lp.header: j for j, lp in enumerate(loops)}
    freq = [0.0] * len(blocks)
    entries = [0.0] * len(loops)

    def edge_w(b: Block, kind: str) -> float:
        if kind == "taken":
            return dec.taken_weight.get(b.index, 1.0)
        if kind == "fall" and b.index in dec.fall_weight:
            return dec.fall_weight[b.index]
        return 1.0

    def loops_of(bi: int) -> set:
        return {j for j, lp in enumerate(loops) if bi in lp.body}

    for bi in range(len(blocks)):  # address order: forward edges go to higher indices
        b = blocks[bi]
        total = 1.0 if bi == 0 else 0.0
        for p in b.pred:
            if p >= bi:  # back edge, or an out-of-line block (BRA.DIV fallback) returning
                continue
            pb = blocks[p]
            w = min(1.0, sum(edge_w(pb, k) for s, k in pb.succ if s == bi))
            left = loops_of(p) - loops_of(bi)
            if left:  # leaving loop(s): carry the outermost left loop's entries
                total += entries[min(left, key=lambda j: loops[j].depth)] * w
            else:
                total += freq[p] * w
        if bi in header_of:
            j = header_of[bi]
            entries[j] = min(total, _cap(inner, loops, freq, bi, outer_only=True))
            freq[bi] = entries[j] * trips[j]
        else:
            freq[bi] = min(total, _cap(inner, loops, freq, bi))
    return freq


def _cap(inner, loops, freq, bi, outer_only=False) -> float:
    j = inner[bi]
    if outer_only and j is not None and loops[j].header == bi:
        j = loops[j].parent
    if j is None:
        return 1.0
    return freq[loops[j].header]


# ------------------------------------------------------------------ counting
@dataclasses.dataclass
class Counts:
    """Per-warp instruction counts (warp-instructions) and memory-instruction traffic."""

    by_class: Counter = dataclasses.field(default_factory=Counter)
    by_pipe: Counter = dataclasses.field(default_factory=Counter)
    total: float = 0.0
    lds_wavefronts: float = 0.0  # conflict-free shared-memory wavefronts (128 B each)
    l1_wavefronts: float = 0.0   # global/local data through L1 (128 B per wavefront)
    ldg_bytes: Counter = dataclasses.field(default_factory=Counter)  # by "LDG.E.EF.128" etc.
    lut_lds: float = 0.0         # LDS.32 with a computed address (table lookups)

    def add(self, other: "Counts", k: float = 1.0) -> None:
        for c, v in other.by_class.items():
            self.by_class[c] += k * v
        for c, v in other.by_pipe.items():
            self.by_pipe[c] += k * v
        for c, v in other.ldg_bytes.items():
            self.ldg_bytes[c] += k * v
        self.total += k * other.total
        self.lds_wavefronts += k * other.lds_wavefronts
        self.l1_wavefronts += k * other.l1_wavefronts
        self.lut_lds += k * other.lut_lds


def count_instr(ins: Instr, c: Counts, k: float) -> None:
    c.total += k
    c.by_class[class_of(ins)] += k
    c.by_pipe[pipe_of(ins)] += k
    w = ins.width_bytes()
    if ins.op in ("LDS", "STS", "LDSM", "ATOMS"):
        c.lds_wavefronts += k * max(1.0, 32 * w / 128)
        if ins.op == "LDS" and w == 4 and not re.search(r"\[(URZ|UR\d+)?(\+?0x[0-9a-f]+)?\]$", ins.operands[-1]):
            c.lut_lds += k
    elif ins.op in ("LDG", "STG", "LD", "ST", "LDL", "STL", "RED", "ATOMG"):
        c.l1_wavefronts += k * max(1.0, 32 * w / 128)
        if ins.op in ("LDG", "LD"):
            c.ldg_bytes[ins.full_op] += k * 32 * w


def count_blocks(instrs: Sequence[Instr], blocks: Sequence[Block], freq: Sequence[float],
                 select: Optional[Sequence[int]] = None) -> Counts:
    c = Counts()
    for b in (blocks if select is None else [blocks[i] for i in select]):
        f = freq[b.index]
        if f <= 0:
            continue
        for i in range(b.start, b.end):
            count_instr(instrs[i], c, f)
    return c


# ------------------------------------------------------------------ single-warp timing
READ_RELEASE = 8  # cycles until a variable-latency instruction has read its sources


def simulate_warp(instrs: Sequence[Instr], blocks: Sequence[Block], loops: Sequence[Loop],
                  freq: Sequence[float], trips_max: Sequence[float],
                  latency: Callable[[Instr], int],
                  trace: Optional[Callable[[Instr, float, float], None]] = None) -> float:
    """Cycles one warp needs along its typical path, alone on its sub-partition.

    The path: blocks with a per-warp frequency > 0, in address order; a loop's body
    (blocks run in at least half its iterations) repeats ``trips_max`` times, timed from
    its third simulated iteration on (steady state). Each instruction issues after the
    previous one's stall count and once the scoreboards it waits on are released; a
    variable-latency instruction releases its write scoreboard ``latency(ins)`` cycles
    after issue. BAR waits for every outstanding scoreboard (the other warps are assumed
    symmetric). ``trace(ins, ready, issue)``, if given, sees every simulated instruction
    with the cycle it was ready to issue (after the previous one's stall) and the cycle it
    issued (after its scoreboard waits)."""
    inner = innermost_loop_of(blocks, loops)
    state = {"t": 0.0, "bar": [0.0] * 6}

    def step(ins: Instr) -> None:
        t = state["t"]
        cc = ins.ctrl
        bar = state["bar"]
        if cc is not None:
            for k in range(6):
                if (cc.wait >> k) & 1:
                    t = max(t, bar[k])
        if ins.op == "BAR":
            t = max([t] + bar) + 20
        if trace is not None:
            trace(ins, state["t"], t)
        if cc is not None:
            if cc.wbar is not None:
                bar[cc.wbar] = max(bar[cc.wbar], t + latency(ins))
            if cc.rbar is not None:
                bar[cc.rbar] = max(bar[cc.rbar], t + READ_RELEASE)
            t += max(1, cc.stall)
        else:
            t += 1
        state["t"] = t

    def run_blocks(bis: List[int]) -> None:
        for bi in bis:
            b = blocks[bi]
            for i in range(b.start, b.end):
                if instrs[i].op == "EXIT" and instrs[i].pred is None:
                    return
                step(instrs[i])

    def run_region(level: Optional[int]) -> None:
        # blocks whose innermost loop is `level`, and child loops as units, in address order
        scope = [lp_i for lp_i, lp in enumerate(loops) if lp.parent == level]
        body = (set(range(len(blocks))) if level is None else loops[level].body)
        cap = 1.0 if level is None else max(freq[loops[level].header], 1e-30)
        items: List[Tuple[int, str, int]] = []
        for bi in sorted(body):
            if inner[bi] == level and freq[bi] > 0 and (level is None or freq[bi] >= 0.5 * cap):
                items.append((blocks[bi].start, "b", bi))
        for j in scope:
            if freq[loops[j].header] > 0 and (level is None or freq[loops[j].header] >= 0.5 * cap):
                items.append((blocks[loops[j].header].start, "l", j))
        items.sort()
        for _, kind, x in items:
            if kind == "b":
                run_blocks([x])
            else:
                run_loop(x)

    def run_loop(j: int) -> None:
        n = trips_max[j]
        if n <= 0:
            return
        full = int(n)
        sim = min(full, 3)
        t_prev = state["t"]
        delta = 0.0
        for _ in range(max(sim, 1)):
            t_prev = state["t"]
            run_region(j)
            delta = state["t"] - t_prev
        rest = n - max(sim, 1)
        if rest > 0:
            shift = delta * rest
            state["t"] += shift
            state["bar"] = [x + shift if x > t_prev else x for x in state["bar"]]

    run_region(None)
    return max([state["t"]] + state["bar"])


# ------------------------------------------------------------------ one kernel, one launch
@dataclasses.dataclass
class KernelAnalysis:
    """Everything the time model needs from one kernel's SASS for one launch."""

    per_warp: Counts            # average warp
    loops: List[Loop]
    loop_trips: List[float]
    hot_loop: Optional[int]
    hot_iter: Counts            # one iteration of the hot loop, per warp
    warp_cycles: float          # longest warp's path, cycles
    decisions: Decisions
    spill_store_bytes: int
    spill_load_bytes: int


def spill_bytes(instrs: Sequence[Instr]) -> Tuple[int, int]:
    """Static spill traffic per thread as ptxas -v counts it: bytes of STL / LDL."""
    st = sum(i.width_bytes() for i in instrs if i.op == "STL")
    ld = sum(i.width_bytes() for i in instrs if i.op == "LDL")
    return st, ld


def analyze(instrs: Sequence[Instr], params: Params,
            loop_trips: Callable[[List[Loop], List[Block], Sequence[Instr], List[bool]],
                                 Tuple[List[float], List[float], Optional[int]]],
            latency: Callable[[Instr], int],
            break_chain=None, hint=None) -> KernelAnalysis:
    """``loop_trips(loops, blocks, instrs, reached)`` -> (average trips per entry, the
    longest warp's trips per entry, index of the hot loop) -- the kernel table supplies
    it; ``reached[j]``: loop j's header runs under the decided branches."""
    blocks = build_cfg(instrs)
    loops = find_loops(blocks)
    dec = decide_branches(instrs, blocks, loops, params, break_chain, hint)
    f1 = block_frequencies(blocks, loops, dec, [1.0] * len(loops))
    reached = [f1[lp.header] > 0 for lp in loops]
    avg, mx, hot = loop_trips(loops, blocks, instrs, reached)
    freq = block_frequencies(blocks, loops, dec, avg)
    per_warp = count_blocks(instrs, blocks, freq)
    hot_iter = Counts()
    if hot is not None:
        ones = [1.0 if j == hot else t for j, t in enumerate(avg)]
        f1 = block_frequencies(blocks, loops, dec, ones)
        scale = f1[loops[hot].header]
        sel = sorted(loops[hot].body)
        hot_iter = count_blocks(instrs, blocks, [x / scale if scale else 0.0 for x in f1], sel)
    fmax = block_frequencies(blocks, loops, dec, mx)
    cycles = simulate_warp(instrs, blocks, loops, fmax, mx, latency)
    st, ld = spill_bytes(instrs)
    return KernelAnalysis(per_warp, loops, list(avg), hot, hot_iter, cycles, dec, st, ld)
