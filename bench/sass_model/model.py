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
    """One kernel launch predicted on one device."""

    kernel: str
    ctx: Ctx
    launch: Launch
    analysis: A.KernelAnalysis
    time: KernelTime
    resident_blocks: int


_CACHE: Dict[Tuple, A.KernelAnalysis] = {}


def run(kernel: Kernel, ctx: Ctx, dev: Device, graph: bool = True) -> LaunchResult:
    spec = KERNELS[kernel.family]
    la = spec.launch(spec, ctx)
    uses_m = any(f[0] == "M" for f in spec.params)  # else M only matters through the params
    key = (kernel.mangled, tuple(sorted(la.params.items())),
           ctx if uses_m else dataclasses.replace(ctx, M=0))
    an = _CACHE.get(key)
    if an is None:
        lv = la.load_levels(kernel.instrs) if la.load_levels else None
        an = A.analyze(kernel.instrs, la.params, la.loop_trips, latency_fn(spec.ldg_level, lv),
                       la.break_chain, la.hint)
        _CACHE[key] = an
    regs = kernel.res.get("REG", 32)
    smem = kernel.res.get("SHARED", 0)
    resident = occupancy(dev, la.threads, regs, smem)
    conflict = lut_conflict_factor(la.lut_levels) if la.lut_levels else 1.0
    # table lookups: one LDS per decoded weight (32 per warp-instruction); other LDS with
    # computed addresses (dequantize's tile transpose) are conflict-free by construction
    lut = min(an.per_warp.lut_lds, la.weights / 32 / max(la.warps_total, 1.0)) if la.lut_levels else 0.0
    kt = kernel_time(dev, la.grid, la.threads, an.per_warp, la.warps_total, la.dram_bytes,
                     an.warp_cycles, resident, conflict, graph, lut_lds=lut)
    return LaunchResult(kernel.demangled, ctx, la, an, kt, resident)


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
