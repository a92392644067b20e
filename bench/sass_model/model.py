"""One kernel launch through the model: the table's launch facts + the SASS analysis +
the device time model."""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

from . import analysis as A
from .hw import LATENCY, Device, KernelTime, kernel_time, lut_conflict_factor, occupancy
from .kernels import KERNELS, Ctx, Launch
from .module import Kernel


def latency_fn(ldg_level: str, levels: Optional[Dict[int, str]] = None):
    """Scoreboard latency of each variable-latency instruction (hw.LATENCY); global loads
    by ``levels[address]``, else DRAM for evict-first (.EF) streams, else ``ldg_level``."""
    levels = levels or {}

    def lat(ins: A.Instr) -> int:
        op = ins.op
        if op in ("LDG", "LD"):
            if "EF" in ins.mods:
                return LATENCY["dram"]
            return LATENCY[levels.get(ins.addr, ldg_level)]
        if op in ("LDS", "LDSM", "STS", "ATOMS"):
            return LATENCY["lds"]
        if op in ("SHFL", "REDUX", "MATCH", "VOTE"):
            return LATENCY["shfl"]
        if op in ("LDC", "ULDC"):
            return LATENCY["ldc"]
        if op in ("S2R", "S2UR", "CS2R"):
            return LATENCY["s2r"]
        if op in ("MUFU", "F2F", "F2I", "I2F", "FRND", "POPC", "FLO", "BREV", "I2I"):
            return LATENCY["xu"]
        if op in ("LDL", "STL"):
            return LATENCY["local"]
        if op in ("HMMA", "IMMA", "HGMMA"):
            return LATENCY["hmma"]
        return LATENCY["other"]

    return lat


@dataclasses.dataclass
class LaunchResult:
    """One kernel launch predicted on one device. With block roles, ``analysis`` is the
    main (weight-streaming, last) role's with its per-warp counts replaced by the average
    over every role, the other roles' paths are a floor under the latency bound, and
    ``roles`` holds each role's own analysis."""

    kernel: str
    ctx: Ctx
    launch: Launch
    analysis: A.KernelAnalysis
    time: KernelTime
    resident_blocks: int
    roles: Dict[str, A.KernelAnalysis] = dataclasses.field(default_factory=dict)


_CACHE: Dict[Tuple, A.KernelAnalysis] = {}


def _analyze(kernel: Kernel, spec, la: Launch, ctx: Ctx, params: dict) -> A.KernelAnalysis:
    uses_m = any(f[0] == "M" for f in spec.params)  # else M only matters through the params
    key = (kernel.mangled, hash(kernel.section), tuple(sorted(params.items(), key=str)),
           ctx if uses_m or not hasattr(ctx, "M") else dataclasses.replace(ctx, M=0))
    an = _CACHE.get(key)
    if an is None:
        lv = la.load_levels(kernel.instrs) if la.load_levels else None
        an = A.analyze(kernel.instrs, params, la.loop_trips, latency_fn(spec.ldg_level, lv),
                       la.break_chain, la.hint)
        _CACHE[key] = an
    return an


def _combine(roles: Dict[str, A.KernelAnalysis], warps: Dict[str, float], main: str) -> A.KernelAnalysis:
    """The main role's analysis with the per-warp counts averaged over every role's warps."""
    total = sum(warps.values()) or 1.0
    avg = A.Counts()
    for name, an in roles.items():
        avg.add(an.per_warp, warps[name] / total)
    return dataclasses.replace(roles[main], per_warp=avg)


def run(kernel: Kernel, ctx: Ctx, dev: Device, graph: bool = True) -> LaunchResult:
    spec = KERNELS[kernel.family]
    la = spec.launch(spec, ctx)
    roles: Dict[str, A.KernelAnalysis] = {}
    floor = 0.0  # the other roles' paths: the main role's blocks wait for them (lora_wait)
    if la.roles:
        for role in la.roles:
            roles[role.name] = _analyze(kernel, spec, la, ctx,
                                        {**la.params, "SR_CTAID.X": role.ctaid})
        main = la.roles[-1].name
        an = _combine(roles, {r.name: r.warps for r in la.roles}, main)
        floor = max([roles[r.name].warp_cycles for r in la.roles[:-1]] + [0.0])
    else:
        an = _analyze(kernel, spec, la, ctx, la.params)
    regs = kernel.res.get("REG", 32)
    smem = kernel.res.get("SHARED", 0)
    resident = occupancy(dev, la.threads, regs, smem)
    conflict = lut_conflict_factor(la.lut_levels) if la.lut_levels else 1.0
    # table lookups: one LDS per decoded weight (32 per warp-instruction); other LDS with
    # computed addresses (dequantize's tile transpose) are conflict-free by construction
    lut = min(an.per_warp.lut_lds, la.weights / 32 / max(la.warps_total, 1.0)) if la.lut_levels else 0.0
    kt = kernel_time(dev, la.grid, la.threads, an.per_warp, la.warps_total, la.dram_bytes,
                     an.warp_cycles, resident, conflict, graph, lut_lds=lut,
                     path_floor_cycles=floor)
    return LaunchResult(kernel.demangled, ctx, la, an, kt, resident, roles)


def param_drift(kernel: Kernel) -> list:
    """Constant-bank parameter offsets the kernel's SASS reads that the table's parameter
    layout does not have (a changed kernel signature): [] when they agree."""
    import re

    from .kernels import PARAM_BASE, layout

    spec = KERNELS[kernel.family]
    lay, end, _ = layout(spec.params)
    valid = set()
    for off, size in lay.values():
        valid |= {off + 4 * k for k in range(max(1, size // 4))}
    seen = {int(m, 16) for m in re.findall(r"c\[0x0\]\[(0x[0-9a-fA-F]+)\]", kernel.section)}
    return sorted(o for o in seen if o >= PARAM_BASE and o not in valid)
