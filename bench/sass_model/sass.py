"""SASS text -> instructions, control codes, basic blocks, natural loops.

Pure functions over the text that ``cuobjdump -sass`` prints; nothing here runs a tool.

Layouts:
- ``parse_sass(text)`` -> ``{mangled name: [Instr]}`` in address order.
- An instruction line is ``/*0980*/  @!P0 LDG.E.EF.128 R4, desc[UR6][R4.64] ;  /* lo */``
  followed by a line holding the high 64 bits of the 128-bit encoding, whose bits 41..61
  are the scheduling control code (sm_70+; see ``Ctrl``).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional, Sequence, Tuple

_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;\s*(?:/\*\s*(0x[0-9a-fA-F]+)\s*\*/)?\s*$")
_ENC_HI = re.compile(r"^\s*/\*\s*(0x[0-9a-fA-F]+)\s*\*/\s*$")
_PRED = re.compile(r"^@(!?U?P[0-6T])\s+")
_REG = re.compile(r"(?<![A-Za-z0-9_.])(-?\|?!?)(U?R)(Z|\d+)\b")


@dataclasses.dataclass(frozen=True)
class Ctrl:
    """Scheduling control code of one instruction (bits 105..125 of the encoding).

    stall: cycles before the warp may issue its next instruction (fixed-latency results
    are ready by then). wbar / rbar: scoreboard (0..5) that this variable-latency
    instruction releases when its result is written / its sources are read (None: none).
    wait: scoreboards this instruction waits on before issuing (bit mask, 6 bits).
    """

    stall: int
    yield_: bool
    wbar: Optional[int]
    rbar: Optional[int]
    wait: int

    @staticmethod
    def from_hi(hi: int) -> "Ctrl":
        wbar, rbar = (hi >> 46) & 7, (hi >> 49) & 7
        return Ctrl(stall=(hi >> 41) & 0xF, yield_=bool((hi >> 45) & 1),
                    wbar=None if wbar == 7 else wbar, rbar=None if rbar == 7 else rbar,
                    wait=(hi >> 52) & 0x3F)


@dataclasses.dataclass(frozen=True)
class Instr:
    """One SASS instruction. ``op`` is the base opcode (``LDG``), ``mods`` its dotted
    modifiers (``("E", "EF", "128")``), ``operands`` the comma-split operand strings."""

    addr: int
    pred: Optional[str]  # "P0", "!P1", "UP0", or None (always)
    op: str
    mods: Tuple[str, ...]
    operands: Tuple[str, ...]
    text: str
    ctrl: Optional[Ctrl] = None

    @property
    def full_op(self) -> str:
        return ".".join((self.op,) + self.mods)

    def branch_target(self) -> Optional[int]:
        """Target address of BRA/CALL/BSSY-style instructions (the last hex operand)."""
        if self.op not in ("BRA", "CALL", "JMP", "BSSY", "BREAK", "BPT"):
            return None
        for o in reversed(self.operands):
            m = re.search(r"0x([0-9a-fA-F]+)\s*$", o)
            if m:
                return int(m.group(1), 16)
        return None

    def width_bytes(self) -> int:
        """Access width of a memory instruction per lane: 4 unless .64/.128/.U8/.16 say."""
        for m in self.mods:
            if m in ("64", "128"):
                return int(m) // 8
            if m in ("U8", "S8"):
                return 1
            if m in ("U16", "S16"):
                return 2
        return 4


def _split_operands(s: str) -> Tuple[str, ...]:
    out, depth, cur = [], 0, []
    for ch in s:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return tuple(out)


def parse_instr(addr: int, body: str, hi: Optional[int] = None) -> Instr:
    """``body`` is the text between the address comment and the ';'."""
    pred = None
    m = _PRED.match(body)
    if m:
        pred, body = m.group(1), body[m.end():]
    head, _, rest = body.partition(" ")
    parts = head.split(".")
    return Instr(addr=addr, pred=pred, op=parts[0], mods=tuple(parts[1:]),
                 operands=_split_operands(rest.strip()), text=body.strip(),
                 ctrl=Ctrl.from_hi(hi) if hi is not None else None)


def split_functions(text: str) -> Dict[str, str]:
    """``Function : name`` sections of cuobjdump/nvdisasm output -> {name: section text}.
    Cheap (no per-instruction work): parse a section with ``parse_function`` when needed."""
    out: Dict[str, str] = {}
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"^[ \t]*Function\s*:\s*(\S+)", text, re.M)]
    for k, (pos, name) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else len(text)
        out[name] = out.get(name, "") + text[pos:end]
    return out


def parse_function(section: str) -> List[Instr]:
    """One function's instructions. The control code is read from the encoding's high word
    (the comment line after each instruction); without encodings ``ctrl`` is None."""
    cur: List[Instr] = []
    pending: Optional[Tuple[int, str]] = None
    for line in section.splitlines():
        im = _INSTR.match(line)
        if im:
            if pending:
                cur.append(parse_instr(*pending))
            pending = (int(im.group(1), 16), im.group(2))
            continue
        hm = _ENC_HI.match(line)
        if hm and pending:
            cur.append(parse_instr(pending[0], pending[1], int(hm.group(1), 16)))
            pending = None
    if pending:
        cur.append(parse_instr(*pending))
    return cur


def parse_sass(text: str) -> Dict[str, List[Instr]]:
    """Every function of a SASS dump -> its instructions, in address order."""
    return {name: parse_function(sec) for name, sec in split_functions(text).items()}


def spill_bytes_text(section: str) -> Tuple[int, int]:
    """(STL bytes, LDL bytes) of one function's section, as ptxas -v counts spill stores /
    loads, without parsing every instruction."""
    st = ld = 0
    if "STL" not in section and "LDL" not in section:
        return 0, 0
    for m in re.finditer(r"\b(STL|LDL)((?:\.[A-Z0-9]+)*)\s", section):
        mods = m.group(2).split(".")
        w = 16 if "128" in mods else 8 if "64" in mods else 1 if ("U8" in mods or "S8" in mods) \
            else 2 if ("U16" in mods or "S16" in mods) else 4
        if m.group(1) == "STL":
            st += w
        else:
            ld += w
    return st, ld


def parse_res_usage(text: str) -> Dict[str, Dict[str, int]]:
    """``cuobjdump -res-usage`` -> {mangled name: {"REG": .., "STACK": .., "SHARED": ..,
    "LOCAL": ..}} (per-thread registers, stack frame and local bytes; static shared bytes
    per block)."""
    out: Dict[str, Dict[str, int]] = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"^\s*Function\s+(\S+?):\s*$", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            out[name] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            name = None
    return out


# ------------------------------------------------------------------ control flow graph
_ENDS_BLOCK = {"BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "KILL", "BPT"}


@dataclasses.dataclass
class Block:
    """Basic block [start, end) of instruction indices; succ holds (block index, kind):
    kind is "fall", "taken" (conditional branch taken), "jump" (unconditional)."""

    index: int
    start: int
    end: int
    succ: List[Tuple[int, str]] = dataclasses.field(default_factory=list)
    pred: List[int] = dataclasses.field(default_factory=list)


def _is_divergence_branch(ins: Instr) -> bool:
    return ins.op == "BRA" and "DIV" in ins.mods  # taken only when the warp has diverged


def build_cfg(instrs: Sequence[Instr]) -> List[Block]:
    """Basic blocks of one function. A BRA.DIV (the compiler's fallback for a diverged
    warp at a shuffle/vote) is kept as a conditional edge; CALL does not end a block (the
    callee, an out-of-line slow path, is not followed)."""
    by_addr = {ins.addr: i for i, ins in enumerate(instrs)}
    leaders = {0}
    for i, ins in enumerate(instrs):
        t = ins.branch_target() if ins.op in ("BRA", "JMP") else None
        if t is not None and t in by_addr:
            leaders.add(by_addr[t])
        if ins.op in _ENDS_BLOCK or (ins.op == "BRA"):
            if i + 1 < len(instrs):
                leaders.add(i + 1)
    starts = sorted(leaders)
    blocks = [Block(k, s, (starts[k + 1] if k + 1 < len(starts) else len(instrs)))
              for k, s in enumerate(starts)]
    start_of = {b.start: b.index for b in blocks}
    for b in blocks:
        last = instrs[b.end - 1]
        cond = last.pred is not None and last.pred not in ("PT",)
        nxt = b.index + 1 if b.index + 1 < len(blocks) else None
        if last.op in ("BRA", "JMP"):
            t = last.branch_target()
            tb = start_of.get(by_addr.get(t, -1)) if t is not None else None
            uncond = not cond and not _is_divergence_branch(last) and not _has_pred_operand(last)
            if tb is not None:
                b.succ.append((tb, "jump" if uncond else "taken"))
            if not uncond and nxt is not None:
                b.succ.append((nxt, "fall"))
        elif last.op in ("EXIT", "RET", "KILL", "BPT"):
            if cond and nxt is not None:
                b.succ.append((nxt, "fall"))
        elif nxt is not None:
            b.succ.append((nxt, "fall"))
    for b in blocks:
        for s, _ in b.succ:
            blocks[s].pred.append(b.index)
    return blocks


def _has_pred_operand(ins: Instr) -> bool:
    """``BRA !P4, 0x8a70``: a branch with a predicate operand is conditional."""
    return any(re.fullmatch(r"!?U?P[0-6]", o) for o in ins.operands)


def reachable(blocks: Sequence[Block]) -> List[bool]:
    seen = [False] * len(blocks)
    stack = [0] if blocks else []
    while stack:
        b = stack.pop()
        if seen[b]:
            continue
        seen[b] = True
        stack.extend(s for s, _ in blocks[b].succ)
    return seen


def dominators(blocks: Sequence[Block]) -> List[set]:
    """Iterative dominator sets over the blocks reachable from the entry."""
    live = reachable(blocks)
    allb = {b.index for b in blocks if live[b.index]}
    dom = [set(allb) if live[b.index] else set() for b in blocks]
    if blocks:
        dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for b in blocks:
            if b.index == 0 or not live[b.index]:
                continue
            ps = [dom[p] for p in b.pred if live[p]]
            new = set.intersection(*ps) if ps else set()
            new = new | {b.index}
            if new != dom[b.index]:
                dom[b.index] = new
                changed = True
    return dom


@dataclasses.dataclass
class Loop:
    """A natural loop: header block, the blocks of its body (header included), the
    back-edge source blocks, its parent loop (index into the loop list) and depth."""

    header: int
    body: set
    latches: List[int]
    parent: Optional[int] = None
    depth: int = 0
    children: List[int] = dataclasses.field(default_factory=list)


def find_loops(blocks: Sequence[Block]) -> List[Loop]:
    """Natural loops (back edge u -> h with h dominating u), merged per header, ordered by
    header address; nesting from body inclusion."""
    dom = dominators(blocks)
    by_header: Dict[int, Loop] = {}
    for b in blocks:
        for s, _ in b.succ:
            if s in dom[b.index]:  # back edge
                body = {s, b.index}
                stack = [b.index]
                while stack:
                    x = stack.pop()
                    if x == s:
                        continue
                    for p in blocks[x].pred:
                        if p not in body and dom[p]:
                            body.add(p)
                            stack.append(p)
                lp = by_header.setdefault(s, Loop(s, set(), []))
                lp.body |= body
                lp.latches.append(b.index)
    loops = [by_header[h] for h in sorted(by_header)]
    for i, lp in enumerate(loops):
        cands = [j for j, o in enumerate(loops) if j != i and lp.body < o.body]
        if cands:
            lp.parent = min(cands, key=lambda j: len(loops[j].body))
            loops[lp.parent].children.append(i)
    for lp in loops:
        d, p = 0, lp.parent
        while p is not None:
            d, p = d + 1, loops[p].parent
        lp.depth = d
    return loops


def innermost_loop_of(blocks: Sequence[Block], loops: Sequence[Loop]) -> List[Optional[int]]:
    """For each block, the index of the smallest loop containing it (None: top level)."""
    out: List[Optional[int]] = [None] * len(blocks)
    for b in blocks:
        best = None
        for j, lp in enumerate(loops):
            if b.index in lp.body and (best is None or len(lp.body) < len(loops[best].body)):
                best = j
        out[b.index] = best
    return out
