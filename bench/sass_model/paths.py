"""What one call of the op launches, per M (csrc/cuda/ops_cuda.cpp, qmatmul_dispatch.cuh,
qmatmul_t.cu), and its predicted time against bf16 cuBLAS.

qmatmul (qmatmul_cuda), M <= qmatmul_fused_max_m (64 for 16-bit x with K % 32 == 0, else
16): with LoRA, a memset of the producer counter, then one launch whose first
ceil(rank/4) x ceil(M/16) blocks compute x @ a^T (lora.cuh) and whose other blocks run
- 16-bit x, K % 32 == 0, 4 < M <= 64: qmatmul_mma_kernel<Bits, XT, MT16>, MT16 = 1, 2, 4
  for M <= 16, 32, 64 (tensor cores);
- otherwise (M <= 4, or fp32 x up to 16): qmatmul_fast_kernel with (MT, R) = (1, 4) for
  M = 1, (4, 4) for M <= 4, (16, 2) otherwise;
beyond: per chunk of max(1, 2^26 / K) rows, dequantize_kernel to x's dtype, then at::mm
(cuBLAS), each chunk's product written by mm_out straight into its columns of ``out``;
LoRA adds mm(x, a^T) and addmm_(out, t, b^T).
qmatmul_t (qmatmul_t_cuda), M <= 16: unpack_scales_kernel, qmatmul_t_kernel<Bits, GT, MT>
(MT = 1, 4, 16) over ``splits`` row splits into fp32 partials, qmatmul_t_reduce_kernel (the
fixed-order sum over splits and the cast); M > 16: dequantize + at::mm, in chunks of rows
with an fp32 accumulator when one chunk does not hold the whole weight.

Torch's own kernels (cuBLAS GEMMs, copy_, add_, to) have no SASS here: GEMMs are timed at
their roofline (hw.gemm_time), elementwise kernels at their bytes (hw.elementwise_time).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

from . import model
from .hw import Device, KernelTime, elementwise_time, gemm_time
from .kernels import CXX_TYPE, Ctx, t_splits, t_tile
from .module import Kernel

K_SMALL_M = 16          # launch.h kSmallM
K_MMA_MIN_M = 4         # launch.h kMmaMinM: the tensor-core kernel takes M > 4
K_MMA_TALL_ROWS = 8192  # launch.h kMmaTallRows: and M >= 2 for NF2-NF4 with this many rows
K_MMA_MID_ROWS = 4096   # launch.h kMmaMidRows: and M >= 3 for NF2-NF4 with this many rows
K_MMA_MAX_M = 64        # launch.h kMmaMaxM
K_CHUNK_ELEMS = 1 << 26  # ops_cuda.cpp kChunkElems
FUSED_KERNELS = ("fast", "mma")


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
    """(MT, R) of qmatmul_fast_kernel that qmatmul_small picks for M."""
    return (1, 4) if M == 1 else ((4, 4) if M <= 4 else (K_SMALL_M, 2))


def mma_tile(M: int) -> int:
    """MT16 of qmatmul_mma_kernel for M (LQ_MMA_MT16_SWITCH)."""
    return 1 if M <= 16 else (2 if M <= 32 else (4 if M <= 64 else 8))


def fused_max_m(x_dtype: str, K: int) -> int:
    """launch.h qmatmul_fused_max_m: the largest M the fused kernels take."""
    return K_MMA_MAX_M if x_dtype != "float32" and K % 32 == 0 else K_SMALL_M


def use_mma(x_dtype: str, M: int, N: int, K: int, bits: int) -> bool:
    """launch.h qmatmul_use_mma."""
    if x_dtype == "float32" or K % 32 != 0:
        return False
    if M > K_MMA_MIN_M:
        return True
    return bits <= 4 and ((M >= 2 and N >= K_MMA_TALL_ROWS) or (M >= 3 and N >= K_MMA_MID_ROWS))


def fused_kernel(x_dtype: str, M: int, N: int, K: int, bits: int) -> Optional[str]:
    """Which fused kernel qmatmul_small launches for M ("mma", "fast"; None: the generic
    kernel for K % 32 != 0 or the dequantize + cuBLAS path beyond fused_max_m)."""
    if M > fused_max_m(x_dtype, K):
        return None
    if use_mma(x_dtype, M, N, K, bits):
        return "mma"
    return "fast" if K % 32 == 0 else None


def fused_step(ix, dev: Device, base: Ctx, kind: str, graph: bool) -> Step:
    """One launch of the decode (``fast``) or tensor-core (``mma``) kernel for base.M."""
    xt = CXX_TYPE[base.x_dtype]
    bits, M = base.bits, base.M
    if kind == "mma":
        if base.x_dtype == "float32":
            raise PathError("qmatmul_mma_kernel takes 16-bit activations only")
        if M > K_MMA_MAX_M:
            raise PathError(f"qmatmul_mma_kernel takes M <= {K_MMA_MAX_M}, got {M}")
        mt16 = mma_tile(M)
        targs: tuple = (bits, xt, mt16)
        name = f"qmatmul_mma_kernel<{bits}, {xt}, {mt16}>"
        family = "qmatmul_mma_kernel"
    elif kind == "fast":
        if M > K_SMALL_M:
            raise PathError(f"qmatmul_fast_kernel takes M <= {K_SMALL_M}, got {M}")
        MT, R = decode_tile(M)
        targs = (bits, xt, MT, R)
        name = f"qmatmul_fast_kernel<{bits}, {xt}, {MT}, {R}>"
        family = "qmatmul_fast_kernel"
    else:
        raise PathError(f"unknown fused kernel {kind!r} (one of {', '.join(FUSED_KERNELS)})")
    k = _kernel(ix, family, targs)
    r = model.run(k, dataclasses.replace(base, t=targs), dev, graph)
    return Step(name, r.time, r.launch.dram_bytes, r)


def qmatmul_path(ix, dev: Device, shape: str, N: int, K: int, M: int, bits: int,
                 lora_rank: int = 0, x_dtype: str = "bfloat16", graph: bool = True,
                 kernel: Optional[str] = None) -> PathResult:
    """The op's path for M (``kernel`` = "fast" / "mma" forces that fused kernel at any M it
    can run, e.g. the tensor-core kernel at M <= 4 where dispatch does not send it)."""
    xt = CXX_TYPE[x_dtype]
    base = Ctx(N, K, M, bits, x_dtype=x_dtype, lora_rank=lora_rank)
    steps: List[Step] = []
    kind = kernel or fused_kernel(x_dtype, M, N, K, bits)
    if kind is None and M <= fused_max_m(x_dtype, K):
        raise PathError(f"K = {K} is not a multiple of 32: the generic kernel is not modeled")
    if kind is not None:
        if K % 32 != 0:
            raise PathError(f"K = {K} is not a multiple of 32: the fused kernels need it")
        if lora_rank:  # the LoRA term rides in the same launch (lora.cuh): a memset node
            steps.append(Step("cudaMemsetAsync(ready)", elementwise_time(dev, 4.0, graph), 4.0))
        steps.append(fused_step(ix, dev, base, kind, graph))
        path = ("tensor-core" if kind == "mma" else "decode") + ("+lora" if lora_rank else "")
    else:
        chunk = max(1, K_CHUNK_ELEMS // K)
        k = _kernel(ix, "dequantize_kernel", (bits, xt))
        for r0 in range(0, N, chunk):
            rows = min(N, r0 + chunk) - r0
            r = model.run(k, dataclasses.replace(base, rows=rows, t=(bits, xt)), dev, graph)
            steps.append(Step(f"dequantize_kernel<{bits}, {xt}> ({rows} rows)", r.time,
                              r.launch.dram_bytes, r))
            # mm_out straight into the chunk's columns of out (ldc = N): no copy
            g = gemm_time(dev, M, rows, K, graph=graph)
            steps.append(Step(f"cuBLAS mm {M}x{rows}x{K}", g, (rows * K + M * K + M * rows) * 2))
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
    """g [M, N] @ W [N, K] -> [M, K] (the backward's grad-input product)."""
    xt = CXX_TYPE[x_dtype]
    steps: List[Step] = []
    baseline = gemm_time(dev, M, K, N, graph=graph)
    if M > K_SMALL_M:
        chunk = max(1, K_CHUNK_ELEMS // K)
        base = Ctx(N, K, M, bits, x_dtype=x_dtype)
        k = _kernel(ix, "dequantize_kernel", (bits, xt))
        if chunk < N:
            nb = M * K * 4.0
            steps.append(Step("zeros fp32 accumulator", elementwise_time(dev, nb, graph), nb))
        for r0 in range(0, N, chunk):
            rows = min(N, r0 + chunk) - r0
            r = model.run(k, dataclasses.replace(base, rows=rows, t=(bits, xt)), dev, graph)
            steps.append(Step(f"dequantize_kernel<{bits}, {xt}> ({rows} rows)", r.time,
                              r.launch.dram_bytes, r))
            g = gemm_time(dev, M, K, rows, graph=graph)
            steps.append(Step(f"cuBLAS mm {M}x{K}x{rows}", g, (rows * K + M * rows + M * K) * 2))
            if chunk < N:
                nb = M * K * (2 + 4 + 4.0)
                steps.append(Step("add_ into fp32", elementwise_time(dev, nb, graph), nb))
        if chunk < N:
            nb = M * K * 6.0
            steps.append(Step(f".to({x_dtype})", elementwise_time(dev, nb, graph), nb))
        return PathResult("qmatmul_t", "dequantize+cuBLAS", shape, N, K, M, bits, 0, dev.name,
                          steps, baseline)
    splits = t_splits(N, K, dev.sms)
    base = Ctx(N, K, M, bits, x_dtype=x_dtype, splits=splits)
    k = _kernel(ix, "unpack_scales_kernel", ())
    r = model.run(k, base, dev, graph)
    steps.append(Step("unpack_scales_kernel", r.time, r.launch.dram_bytes, r))
    mt = t_tile(M)
    k = _kernel(ix, "qmatmul_t_kernel", (bits, xt, mt))
    r = model.run(k, dataclasses.replace(base, t=(bits, xt, mt)), dev, graph)
    steps.append(Step(f"qmatmul_t_kernel<{bits}, {xt}, {mt}> ({splits} splits)", r.time,
                      r.launch.dram_bytes, r))
    k = _kernel(ix, "qmatmul_t_reduce_kernel", (xt,))
    r = model.run(k, dataclasses.replace(base, t=(xt,)), dev, graph)
    steps.append(Step(f"qmatmul_t_reduce_kernel<{xt}> ({splits} splits)", r.time,
                      r.launch.dram_bytes, r))
    return PathResult("qmatmul_t", "qmatmul_t small-M", shape, N, K, M, bits, 0, dev.name,
                      steps, baseline)


def bits_per_param(bits: int, block_size: int = 64, scale_bits: int = 8,
                   scale_block_size: int = 256, scale2_bits: int = 32) -> float:
    """METHOD.md §1: b + b0/B0 + bits(b1)/(B0 B1)."""
    return bits + scale_bits / block_size + scale2_bits / (block_size * scale_block_size)


def physical_limit(bits: int) -> float:
    """M = 1 bound: bf16 bytes over packed bytes (16 / 4.127 = 3.9x for NF4)."""
    return 16.0 / bits_per_param(bits)

