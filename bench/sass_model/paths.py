"""What one call of the op launches, per M (csrc/cuda/ops_cuda.cpp), and its predicted time
against bf16 cuBLAS.

qmatmul (qmatmul_cuda):
- M <= kSmallM (16): lora_down_kernel when LoRA is present, then qmatmul_fast_kernel with
  (MT, R) = (1, 4) for M = 1, (4, 4) for M <= 4, (16, 2) otherwise (qmatmul_small);
- M > 16: per chunk of max(1, 2^26 / K) rows: dequantize_kernel to x's dtype, then at::mm
  (cuBLAS); one chunk writes ``out`` directly (mm_out), several go through a temporary
  and a strided ``copy_`` into ``out``; LoRA adds mm(x, a^T) and addmm_(out, t, b^T).
qmatmul_t (qmatmul_t_cuda), M <= 16: unpack_scales_kernel, qmatmul_t_kernel over
``splits`` row splits, partial.sum(0) when splits > 1, then .to(dtype).

Torch's own kernels (cuBLAS GEMMs, copy_, sum, to) have no SASS here: GEMMs are timed at
their roofline (hw.gemm_time), elementwise kernels at their bytes (hw.elementwise_time).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

from . import model
from .hw import Device, KernelTime, elementwise_time, gemm_time
from .kernels import CXX_TYPE, Ctx, t_splits
from .module import Kernel

K_SMALL_M = 16          # launch.h kSmallM
K_CHUNK_ELEMS = 1 << 26  # ops_cuda.cpp kChunkElems


class PathError(RuntimeError):
    """The module lacks a kernel variant the path needs."""


@dataclasses.dataclass
class Step:
    name: str
    time: KernelTime
    dram_bytes: float
    result: Optional[model.LaunchResult] = None  # None: a torch kernel (no SASS here)


@dataclasses.dataclass
class PathResult:
    op: str            # "qmatmul" / "qmatmul_t"
    path: str
    shape: str
    N: int
    K: int
    M: int
    bits: int
    lora_rank: int
    device: str
    steps: List[Step]
    baseline: KernelTime

    @property
    def total_us(self) -> float:
        return sum(s.time.total_us for s in self.steps)

    @property
    def speedup(self) -> float:
        return self.baseline.total_us / self.total_us

    @property
    def binding(self) -> str:
        s = max(self.steps, key=lambda s: s.time.total_us)
        return f"{s.name.split('<')[0]}: {s.time.binding}"

    def per_weight(self) -> Dict[str, float]:
        """Lane-instructions per weight by class, summed over the path's kernels with SASS,
        plus DRAM bytes per weight over every step."""
        out: Dict[str, float] = {}
        w = self.N * self.K
        for s in self.steps:
            if s.result is None:
                continue
            a = s.result.analysis.per_warp
            tot = s.result.launch.warps_total
            for c, v in a.by_class.items():
                out[c] = out.get(c, 0.0) + v * tot * 32 / w
            out["total"] = out.get("total", 0.0) + a.total * tot * 32 / w
            for op, b in a.ldg_bytes.items():
                out["ldg_bytes:" + op] = out.get("ldg_bytes:" + op, 0.0) + b * tot / w
        out["dram_bytes"] = sum(s.dram_bytes for s in self.steps) / w
        return out


def _kernel(ix, family: str, targs) -> Kernel:
    k = ix.get((family, tuple(str(t) for t in targs)))
    if k is None:
        raise PathError(f"the module has no {family}<{', '.join(map(str, targs))}> for sm_90a "
                        f"(built without it, or the kernel changed: update bench/sass_model/kernels.py)")
    return k


def decode_tile(M: int) -> tuple:
    """(MT, R) that qmatmul_small picks for M."""
    return (1, 4) if M == 1 else ((4, 4) if M <= 4 else (K_SMALL_M, 2))


def qmatmul_path(ix, dev: Device, shape: str, N: int, K: int, M: int, bits: int,
                 lora_rank: int = 0, x_dtype: str = "bfloat16", graph: bool = True) -> PathResult:
    xt = CXX_TYPE[x_dtype]
    base = Ctx(N, K, M, bits, x_dtype=x_dtype, lora_rank=lora_rank)
    steps: List[Step] = []
    if M <= K_SMALL_M:
        if K % 32 != 0:
            raise PathError(f"K = {K} is not a multiple of 32: the generic kernel is not modeled")
        if lora_rank:
            k = _kernel(ix, "lora_down_kernel", (xt,))
            r = model.run(k, dataclasses.replace(base, t=(xt,)), dev, graph)
            steps.append(Step(f"lora_down_kernel<{xt}> ({lora_rank} blocks)", r.time,
                              r.launch.dram_bytes, r))
        MT, R = decode_tile(M)
        k = _kernel(ix, "qmatmul_fast_kernel", (bits, xt, MT, R))
        r = model.run(k, dataclasses.replace(base, t=(bits, xt, MT, R)), dev, graph)
        steps.append(Step(f"qmatmul_fast_kernel<{bits}, {xt}, {MT}, {R}>", r.time,
                          r.launch.dram_bytes, r))
        path = "decode" + ("+lora" if lora_rank else "")
    else:
        chunk = max(1, K_CHUNK_ELEMS // K)
        k = _kernel(ix, "dequantize_kernel", (bits, xt))
        for r0 in range(0, N, chunk):
            rows = min(N, r0 + chunk) - r0
            r = model.run(k, dataclasses.replace(base, rows=rows, t=(bits, xt)), dev, graph)
            steps.append(Step(f"dequantize_kernel<{bits}, {xt}> ({rows} rows)", r.time,
                              r.launch.dram_bytes, r))
            g = gemm_time(dev, M, rows, K, graph=graph)
            steps.append(Step(f"cuBLAS mm {M}x{rows}x{K}", g, (rows * K + M * K + M * rows) * 2))
            if rows != N:
                nb = 2.0 * M * rows * 2
                steps.append(Step("copy_ into out (strided)", elementwise_time(dev, nb, graph), nb))
        if lora_rank:
            g1 = gemm_time(dev, M, lora_rank, K, graph=graph)
            steps.append(Step(f"cuBLAS mm x@a^T {M}x{lora_rank}x{K}", g1,
                              (lora_rank * K + M * K + M * lora_rank) * 2))
            g2 = gemm_time(dev, M, N, lora_rank, graph=graph, extra_bytes=M * N * 2)
            steps.append(Step(f"cuBLAS addmm_ {M}x{N}x{lora_rank}", g2,
                              (N * lora_rank + M * lora_rank + 2 * M * N) * 2))
        path = "dequantize+cuBLAS" + ("+lora" if lora_rank else "")
    baseline = gemm_time(dev, M, N, K, graph=graph)
    return PathResult("qmatmul", path, shape, N, K, M, bits, lora_rank, dev.name, steps, baseline)


def qmatmul_t_path(ix, dev: Device, shape: str, N: int, K: int, M: int, bits: int,
                   x_dtype: str = "bfloat16", graph: bool = True) -> PathResult:
    """g [M, N] @ W [N, K] -> [M, K], the small-M path (M <= 16)."""
    if M > K_SMALL_M:
        raise PathError("qmatmul_t is modeled for M <= 16 (its small-M kernel) only")
    xt = CXX_TYPE[x_dtype]
    splits = t_splits(N, K, dev.sms)
    base = Ctx(N, K, M, bits, x_dtype=x_dtype, splits=splits)
    steps: List[Step] = []
    k = _kernel(ix, "unpack_scales_kernel", ())
    r = model.run(k, base, dev, graph)
    steps.append(Step("unpack_scales_kernel", r.time, r.launch.dram_bytes, r))
    k = _kernel(ix, "qmatmul_t_kernel", (xt,))
    r = model.run(k, dataclasses.replace(base, t=(xt,)), dev, graph)
    steps.append(Step(f"qmatmul_t_kernel<{xt}> ({splits} splits)", r.time, r.launch.dram_bytes, r))
    if splits > 1:
        nb = splits * M * K * 4.0 + M * K * 4.0
        steps.append(Step("partial.sum(0)", elementwise_time(dev, nb, graph), nb))
    nb = M * K * 4.0 + M * K * 2.0
    steps.append(Step(".to(bfloat16)", elementwise_time(dev, nb, graph), nb))
    baseline = gemm_time(dev, M, K, N, graph=graph)
    return PathResult("qmatmul_t", "qmatmul_t small-M", shape, N, K, M, bits, 0, dev.name,
                      steps, baseline)


def bits_per_param(bits: int, block_size: int = 64, scale_bits: int = 8,
                   scale_block_size: int = 256, scale2_bits: int = 32) -> float:
    """METHOD.md §1: b + b0/B0 + bits(b1)/(B0 B1)."""
    return bits + scale_bits / block_size + scale2_bits / (block_size * scale_block_size)


def physical_limit(bits: int) -> float:
    """M = 1 bound: bf16 bytes over packed bytes (16 / 4.127 = 3.9x for NF4)."""
    return 16.0 / bits_per_param(bits)

