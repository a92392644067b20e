"""Device constants and the time model: a kernel takes the largest of its memory, issue,
per-pipe, shared-memory/L1 and latency times, plus a launch overhead.

Every constant names its source. "Datasheet" = NVIDIA H100 Tensor Core GPU datasheet /
H200 product brief (SXM columns); "whitepaper" = NVIDIA H100 Tensor Core GPU
Architecture whitepaper (GH100); "guide" = CUDA C++ Programming Guide, arithmetic
instruction throughput table, compute capability 9.0; "Luo et al." = Luo et al.,
"Benchmarking and Dissecting the Nvidia Hopper GPU Architecture", IPDPS 2024
(pointer-chase latencies on H800, the same GH100 SM).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional

from .analysis import PIPES, Counts


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    sms: int                 # datasheet: 132 SMs on H100 SXM5 and H200 SXM
    clock_hz: float          # see CLOCK_NOTE
    hbm_bytes_s: float       # datasheet peak: H100 SXM 3.35 TB/s, H200 4.8 TB/s
    bw_efficiency: float     # achievable fraction of peak HBM bandwidth (see BW_NOTE)
    l2_bytes: int            # datasheet/whitepaper: 50 MB L2 (H100 SXM5, H200)
    bf16_dense_flops: float  # datasheet: 989.4 TFLOPS bf16 dense (sparsity halves it)
    gemm_efficiency: float = 0.75   # see GEMM_NOTE
    issue_per_clk: float = 4.0      # whitepaper: 4 sub-partitions, 1 warp-instr/clk each
    smem_bytes_per_clk: float = 128.0  # whitepaper/guide: 32 banks x 4 B per clock per SM
    max_warps_per_sm: int = 64      # guide, "Technical Specifications", cc 9.0
    max_blocks_per_sm: int = 32
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024
    launch_us_eager: float = 2.5    # brief: ~2-3 us per launch from Python/ATen
    launch_us_graph: float = 1.0    # brief: ~1 us per kernel node replayed in a CUDA graph


CLOCK_NOTE = ("1.755 GHz: the boost clock reported under load for GH100 (Chips and Cheese, "
              "'Nvidia's H100: Funny L2, and Tons of Bandwidth', 2023); the SXM5 datasheet "
              "maximum is 1.98 GHz, memory-bound loads usually run below it")
GEMM_NOTE = ("cuBLAS bf16 GEMMs of LLM shapes sustain ~700-750 TFLOPS on H100 SXM (NVIDIA's "
             "published cuBLAS / Transformer Engine figures), ~75% of the dense peak; both sides "
             "of a large-M speedup use it")
BW_NOTE = ("90% of peak: the device-to-device copy bandwidth that STREAM-like tests reach on "
           "HBM3 parts; both sides of every speedup use the same fraction")

H100 = Device("H100 SXM", 132, 1.755e9, 3.35e12, 0.90, 50 * 2**20, 989.4e12)
H200 = Device("H200 SXM", 132, 1.755e9, 4.8e12, 0.90, 50 * 2**20, 989.4e12)
DEVICES = {"h100": H100, "h200": H200}

# Tensor pipe: 989.4 TFLOPS dense bf16 at the 1.83 GHz tensor boost over 132 SMs is 4096
# FLOP/clk/SM, i.e. one m16n8k16 HMMA (4096 FLOP) per clock per SM (datasheet arithmetic);
# that peak is reached through wgmma. The warp-level mma.sync that the kernels issue (SASS
# HMMA.16816) reaches about two thirds of it on H100 (Shah et al., "FlashAttention-3",
# 2024, section 2: "mma.sync ... can only reach about 2/3 of the peak throughput of the
# Hopper Tensor Cores").
HMMA_PEAK_PER_CLK = 1.0
MMA_SYNC_FRACTION = 2.0 / 3.0
HMMA_PER_CLK = HMMA_PEAK_PER_CLK * MMA_SYNC_FRACTION
TENSOR_NOTE = (f"{HMMA_PER_CLK:.3f} HMMA.16816 (mma.sync m16n8k16) per clock per SM: the dense "
               "bf16 peak of one per clock (989.4 TFLOPS at 1.83 GHz over 132 SMs) times the ~2/3 "
               "that mma.sync reaches on Hopper (FlashAttention-3, Shah et al. 2024)")

# Variable-latency results (cycles from issue to scoreboard release), unloaded.
LATENCY = {
    "dram": 600,   # Luo et al.: global memory ~ 480-560 cycles unloaded; loaded is higher
    "l2": 270,     # Luo et al.: L2 hit ~ 260-280 cycles
    "l1": 35,      # Luo et al.: L1 hit ~ 33-40 cycles
    "lds": 30,     # Luo et al.: shared memory ~ 29-31 cycles
    "shfl": 30,    # goes through the MIO like LDS
    "ldc": 12,     # constant cache hit
    "s2r": 20,
    "xu": 18,      # MUFU and the 16-lane conversions
    "local": 35,   # LDL/STL of spills: L1 hits
    "hmma": 35,
    "other": 20,
}


# The latency bound counts whole waves of resident blocks: blocks of one kernel take about
# the same path, so a partial last wave costs a whole block's path (the sensitivity table
# shows the bound with fractional waves).
WAVE_QUANTIZED = True


def occupancy(dev: Device, threads: int, regs: int, smem: int) -> int:
    """Resident blocks per SM: register file (per-warp allocation in units of 256
    registers, guide "Occupancy Calculator" rules), shared memory, warps, blocks."""
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = dev.regs_per_sm // (regs_per_warp * warps) if regs_per_warp * warps else dev.max_blocks_per_sm
    by_smem = dev.smem_per_sm // max(smem + 1024, 1)  # 1 KiB per block reserved (cc 9.0)
    by_warps = dev.max_warps_per_sm // warps
    return max(0, min(by_regs, by_smem, by_warps, dev.max_blocks_per_sm))


@dataclasses.dataclass
class KernelTime:
    """Predicted time of one launch, each bound in microseconds."""

    bounds: Dict[str, float]
    launch_us: float
    total_us: float
    binding: str


def kernel_time(dev: Device, blocks: int, threads: int, warp_counts: Counts, warps_total: float,
                dram_bytes: float, warp_cycles: float, resident_blocks: int,
                lut_conflict: float = 1.0, graph: bool = True,
                lut_lds: Optional[float] = None, path_floor_cycles: float = 0.0) -> KernelTime:
    """Largest of the bounds for one launch of ``blocks`` blocks.

    warp_counts: the average warp's counts; warps_total: warps in the grid. Work spreads
    over min(blocks, SMs) SMs, each taking ceil(blocks / SMs) blocks' worth (wave
    quantization); the latency bound is ceil(blocks / (SMs x resident)) waves of the
    longest warp's path. lut_conflict multiplies the wavefronts of the ``lut_lds``
    table-lookup LDS per warp (default: every LDS with a computed address).
    path_floor_cycles: a path the launch cannot finish before, whatever its waves (the
    fused LoRA's producer blocks, which every consumer block waits for)."""
    clk = dev.clock_hz
    per_sm = math.ceil(blocks / dev.sms) * (warps_total / max(blocks, 1))  # warps per SM
    b: Dict[str, float] = {}
    b["memory"] = dram_bytes / (dev.hbm_bytes_s * dev.bw_efficiency) * 1e6
    b["issue"] = per_sm * warp_counts.total / dev.issue_per_clk / clk * 1e6
    for pipe, (_, rate) in PIPES.items():
        n = warp_counts.by_pipe.get(pipe, 0.0)
        if pipe == "tensor":
            rate = HMMA_PER_CLK  # read at call time: the sensitivity rows patch it
        if n and rate:
            b[f"pipe:{pipe}"] = per_sm * n / rate / clk * 1e6
    lut = warp_counts.lut_lds if lut_lds is None else lut_lds
    lds = warp_counts.lds_wavefronts + (lut_conflict - 1.0) * lut
    wavefronts = lds + warp_counts.l1_wavefronts
    b["smem/L1"] = per_sm * wavefronts * 128 / dev.smem_bytes_per_clk / clk * 1e6
    waves = blocks / (dev.sms * max(resident_blocks, 1))
    waves = math.ceil(waves) if WAVE_QUANTIZED else max(1.0, waves)
    b["latency"] = max(waves * warp_cycles, path_floor_cycles) / clk * 1e6
    binding = max(b, key=b.get)
    launch = dev.launch_us_graph if graph else dev.launch_us_eager
    return KernelTime(b, launch, b[binding] + launch, binding)


def elementwise_time(dev: Device, nbytes: float, graph: bool = True) -> KernelTime:
    """A torch elementwise/reduction kernel (copy_, sum, to): memory-bound by assumption."""
    m = nbytes / (dev.hbm_bytes_s * dev.bw_efficiency) * 1e6
    launch = dev.launch_us_graph if graph else dev.launch_us_eager
    return KernelTime({"memory": m}, launch, m + launch, "memory")


def gemm_time(dev: Device, M: int, N: int, K: int, elem_bytes: int = 2,
              graph: bool = True, extra_bytes: float = 0.0) -> KernelTime:
    """cuBLAS bf16 GEMM out[M, N] = x[M, K] @ W[N, K]^T at its roofline: the larger of
    the bytes (W, x, out read/written once) over HBM and 2MNK over the sustained tensor
    rate (dense peak x gemm_efficiency)."""
    nbytes = (N * K + M * K + M * N) * elem_bytes + extra_bytes
    b = {"memory": nbytes / (dev.hbm_bytes_s * dev.bw_efficiency) * 1e6,
         "tensor": 2.0 * M * N * K / (dev.bf16_dense_flops * dev.gemm_efficiency) * 1e6}
    binding = max(b, key=b.get)
    launch = dev.launch_us_graph if graph else dev.launch_us_eager
    return KernelTime(b, launch, b[binding] + launch, binding)


def lut_conflict_factor(levels: int, lanes: int = 32, banks: int = 32, trials: int = 4000,
                        seed: int = 0) -> float:
    """Expected shared-memory wavefronts of one LDS.32 where each lane reads a random entry
    of a ``levels``-entry fp32 table (NF codes are near-uniform by construction: the levels
    are quantiles). Same word = broadcast; distinct words in one bank serialize. Seeded
    Monte Carlo, deterministic; exactly 1 for levels <= 32."""
    if levels <= banks:
        return 1.0
    import random

    rng = random.Random(seed)
    tot = 0
    for _ in range(trials):
        words = {rng.randrange(levels) for _ in range(lanes)}
        per_bank: Dict[int, int] = {}
        for w in words:
            per_bank[w % banks] = per_bank.get(w % banks, 0) + 1
        tot += max(per_bank.values())
    return tot / trials


def fmt_bound(name: Optional[str]) -> str:
    return name or "-"
