"""What one ``lqlora::rsvd`` call on CUDA launches (csrc/cuda/ops_rsvd.cpp), what one
lockstep iteration of a batched decomposition launches (method/batched.py and
method/decomposition.py, on CUDA tensors), and their predicted times; the cost profile of a
matrix and of a model from those.

Every step is one ATen op (or one cuSOLVER call, or a host sync) in the order the code runs
it. Timing per step, in eager mode (the op syncs, so it is never graph-captured):
- GEMMs at their roofline: the larger of the bytes over HBM and the flops over the sustained
  fp32 (cuBLAS SGEMM, CUDA cores: torch's default fp32 matmul does not use TF32) or fp64
  (DGEMM on the fp64 tensor cores) rate; plus one launch.
- elementwise and reduction kernels (casts, isfinite, sub, stack, ...) at their bytes
  (hw.elementwise_time).
- cuSOLVER potrf / trsm on these small batched matrices: a fixed time per call (SOLVER_US).
- a host sync (``.item()``, ``float()``): the GPU idles for SYNC_US while the host wakes and
  issues the next kernel.
- the Jacobi eigensolver from its SASS (kernels.jacobi_launch), for the sweep statistics of
  the Gram matrices (jacobi.sweep_stats).
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Dict, List, Optional, Sequence

from . import model
from .analysis import Counts
from .hw import Device, KernelTime, elementwise_time, kernel_time
from .kernels import K_JACOBI_MAX_SHARED, JacobiCtx, SketchCtx
from .paths import Step, _kernel

# Datasheet (H100 SXM5; the H200 SXM has the same SMs and clocks): FP32 67 TFLOPS, FP64
# Tensor Core 67 TFLOPS.
FP32_FLOPS = 66.9e12
FP64_TENSOR_FLOPS = 66.9e12
# Assumed, not measured (the sensitivity table varies them): cuBLAS reaches ~70% of the
# fp32 / fp64 peak on these GEMMs (one dimension is only k = rank + oversample).
GEMM_EFFICIENCY = 0.70
SOLVER_US = 20.0     # one cuSOLVER potrf / trsm call on B matrices of order k <= 76
SYNC_US = 10.0       # GPU idle per host sync: the host's wake-up plus the next launch
TINY = 64.0          # bytes of a "tiny" kernel (k-sized vectors, flags)
# Whether CholeskyQR's first pass is accepted (max |Q^T Q - I| <= 1e-10, ops_rsvd.cpp): so
# on well-conditioned sketches (cond <~ 1e3); the sensitivity table prices the second pass.
SINGLE_PASS = True

SENSITIVITY = {
    "GEMM_EFFICIENCY": (0.5, 0.85),
    "SOLVER_US": (10.0, 40.0),
    "SYNC_US": (5.0, 20.0),
    "SINGLE_PASS": (False,),
}


def _kt(dev: Device, bounds: Dict[str, float], graph: bool = False) -> KernelTime:
    launch = dev.launch_us_graph if graph else dev.launch_us_eager
    binding = max(bounds, key=bounds.get)
    return KernelTime(bounds, launch, bounds[binding] + launch, binding)


def gemm(dev: Device, name: str, B: int, M: int, N: int, K: int, elem: int,
         extra_bytes: float = 0.0) -> Step:
    """Batched C[B, M, N] = A[B, M, K] B[B, K, N] in fp32 (elem 4) or fp64 (elem 8);
    extra_bytes: more operands read (addmm's input)."""
    nbytes = B * (M * K + K * N + M * N) * elem + extra_bytes
    peak = FP32_FLOPS if elem == 4 else FP64_TENSOR_FLOPS
    b = {"memory": nbytes / (dev.hbm_bytes_s * dev.bw_efficiency) * 1e6,
         "fp32" if elem == 4 else "fp64": 2.0 * B * M * N * K / (peak * GEMM_EFFICIENCY) * 1e6}
    return Step(f"{'S' if elem == 4 else 'D'}GEMM {name} {B}x[{M}x{K}]@[{K}x{N}]", _kt(dev, b),
                nbytes)


def ew(dev: Device, name: str, nbytes: float) -> Step:
    return Step(name, elementwise_time(dev, nbytes, graph=False), nbytes)


def solver(name: str) -> Step:
    return Step(name, KernelTime({"solver": SOLVER_US}, 0.0, SOLVER_US, "solver"), 0.0)


def sync(name: str) -> Step:
    return Step(f"host sync ({name})", KernelTime({"sync": SYNC_US}, 0.0, SYNC_US, "sync"), 0.0)


def host(name: str, us: float) -> Step:
    return Step(name, KernelTime({"host": us}, 0.0, us, "host"), 0.0)


def finite_check(dev: Device, what: str, n: float, elem: int) -> List[Step]:
    """rsvd_args.h rsvd_check_finite: isfinite, logical_not, any, item."""
    return [ew(dev, f"isfinite({what})", n * (elem + 1)), ew(dev, "logical_not", 2 * n),
            ew(dev, "any", n), sync("any().item()")]


def orthonormal(dev: Device, B: int, rows: int, k: int) -> List[Step]:
    """ops_rsvd.cpp orthonormal on fp64 [B, rows, k] for fp32 factors: one CholeskyQR pass,
    the Gram of its Q and the acceptance test (one sync); then, unless SINGLE_PASS, the
    second pass and the fallback test (a second sync)."""
    out: List[Step] = [gemm(dev, "gram", B, k, k, rows, 8),
                       solver(f"cholesky_ex #1 (potrf, batched {B}x{k}x{k})"),
                       solver(f"solve_triangular #1 (trsm, {B}x{rows}x{k})"),
                       gemm(dev, "gram of Q1", B, k, k, rows, 8)]
    out += [ew(dev, n, TINY) for n in ("eye", "sub", "abs", "amax", "le", "eq", "logical_and",
                                        "all")]
    out.append(sync("all().item()"))
    if SINGLE_PASS:
        return out
    out += [solver(f"cholesky_ex #2 (potrf, batched {B}x{k}x{k})"),
            solver(f"solve_triangular #2 (trsm, {B}x{rows}x{k})")]
    out += [ew(dev, n, TINY) for n in ("sub", "abs", "amax", "ne", "ne", "logical_or",
                                        "logical_or", "le", "logical_not", "any")]
    out.append(sync("bad.any().item()"))
    return out


def orth_cast(dev: Device, B: int, rows: int, k: int) -> List[Step]:
    """orth(y) of rsvd_cuda: to fp64, orthonormal, back to fp32."""
    n = B * rows * k
    return [ew(dev, "to(float64)", 12 * n)] + orthonormal(dev, B, rows, k) + \
        [ew(dev, "to(float32)", 12 * n)]


@dataclasses.dataclass(frozen=True)
class JacobiStats:
    """Per eigensolve: sweeps, rotating and quiet rounds, fraction of pairs rotated in the
    rotating rounds (jacobi.SweepStats, averaged over the measured Gram matrices)."""

    rotating_rounds: float
    quiet_rounds: float
    pair_fraction: float


def jacobi_step(ix, dev: Device, B: int, k: int, st: JacobiStats) -> Step:
    """The eigensolver launch: the per-warp counts and path of its three phases (outside
    the sweeps, a rotating sweep, a quiet sweep) combined by the rounds of each kind."""
    shared = k + (k & 1) <= K_JACOBI_MAX_SHARED
    kern = _kernel(ix, "jacobi_eigh_kernel", ("true" if shared else "false",))
    kp1 = k + (k & 1) - 1
    res = {ph: model.run(kern, JacobiCtx(B, k, ph, st.pair_fraction), dev, graph=False)
           for ph in ("outside", "rotating", "quiet")}
    base = res["outside"]
    wr, wq = st.rotating_rounds / kp1, st.quiet_rounds / kp1
    an = {ph: r.analysis for ph, r in res.items()}
    counts = Counts()
    counts.add(an["outside"].per_warp)
    cycles = an["outside"].warp_cycles
    for ph, w in (("rotating", wr), ("quiet", wq)):
        counts.add(an[ph].per_warp, w)
        counts.add(an["outside"].per_warp, -w)
        cycles += w * (an[ph].warp_cycles - an["outside"].warp_cycles)
    la = base.launch
    kt = kernel_time(dev, la.grid, la.threads, counts, la.warps_total, la.dram_bytes, cycles,
                     base.resident_blocks, graph=False)
    return Step(f"jacobi_eigh_kernel<{str(shared).lower()}> ({B} blocks, {st.rotating_rounds:.0f}"
                f" rotating + {st.quiet_rounds:.0f} quiet rounds)", kt, la.dram_bytes, base)


def sketch_step(ix, dev: Device, count: int) -> Step:
    """The fp32 Gaussian sketch drawn on the device (sketch.cu) from its SASS."""
    kern = _kernel(ix, "gaussian_sketch_kernel", ("float",))
    r = model.run(kern, SketchCtx(count), dev, graph=False)
    return Step(f"gaussian_sketch_kernel<float> ({count} elements)", r.time, r.launch.dram_bytes,
                r)


def rsvd_steps(ix, dev: Device, B: int, m: int, n: int, rank: int, oversample: int, niter: int,
               warm: bool, st: JacobiStats) -> List[Step]:
    """lqlora::rsvd of fp32 a [B, m, n] (ops_rsvd.cpp rsvd_cuda, in its order)."""
    k = min(rank + oversample, m, n)
    s: List[Step] = []
    if warm:  # rsvd_sketch: init is on the device already
        s += finite_check(dev, "init", B * n * k, 4)
    else:
        s.append(sketch_step(ix, dev, B * n * k))
    s.append(gemm(dev, "A @ Omega", B, m, k, n, 4))
    # NaN/Inf in A found through Y (rsvd_check_sketch_product): isfinite, all, item.
    s += [ew(dev, "isfinite(Y)", B * m * k * 5), ew(dev, "all", B * m * k), sync("all().item()")]
    s += orth_cast(dev, B, m, k)
    for _ in range(niter):
        s.append(gemm(dev, "A^T Q", B, n, k, m, 4))
        s += orth_cast(dev, B, n, k)
        s.append(gemm(dev, "A Q", B, m, k, n, 4))
        s += orth_cast(dev, B, m, k)
    s.append(gemm(dev, "Q^T A", B, k, n, m, 4))
    s.append(ew(dev, "to(float64) of B", 12 * B * k * n))
    s.append(gemm(dev, "B B^T", B, k, k, n, 8))
    s.append(jacobi_step(ix, dev, B, k, st))
    s += [ew(dev, "clamp_min", TINY), ew(dev, "sqrt", TINY), ew(dev, "w.to(float32)", TINY)]
    s.append(gemm(dev, "U = Q W", B, m, rank, k, 4))
    s.append(gemm(dev, "B^T W", B, n, rank, k, 8))
    s += orthonormal(dev, B, n, rank)
    s.append(ew(dev, "V.to(float32)", 12 * B * n * rank))
    s += [ew(dev, "abs(U)", 8 * B * m * rank), ew(dev, "argmax", 4 * B * m * rank)]
    s += [ew(dev, op, TINY) for op in ("gather", "lt", "to", "1 - 2x")]
    s += [ew(dev, "U * sign", 8 * B * m * rank), ew(dev, "V * sign", 8 * B * n * rank)]
    return s


def quantize_steps(dev: Device, m: int, n: int, bits: int, block_size: int = 64) -> List[Step]:
    """formats.nf.quantize + lqlora::quantize on CUDA (ops_cuda.cpp, quantize.cu) and
    q.dequantize() for one config."""
    e = m * n
    nb = e / block_size
    s = [ew(dev, "aminmax", 4 * e), ew(dev, "stack", TINY), sync("tolist()"),
         host("levels.to(device)", SYNC_US)]
    # NaN/Inf found through the block absmax (ops_cuda.cpp): isfinite(s1).all() and a sync.
    s += [ew(dev, "absmax_kernel", 4 * e + 4 * nb), ew(dev, "isfinite(s1)", 5 * nb),
          ew(dev, "all", nb), sync("all().item()")]
    s += [ew(dev, "offset_kernel", 4 * nb),
          ew(dev, "group_kernel", 4 * nb), ew(dev, "scale_code_kernel", 8 * nb),
          ew(dev, "code_kernel", 4 * e + e * bits / 8 + 4 * nb)]
    s += [ew(dev, "unpack_scales_kernel", 5 * nb), ew(dev, "dequantize_kernel",
                                                     4 * e + e * bits / 8 + 4 * nb)]
    return s


def batch_steps(ix, dev: Device, A: int, m: int, n: int, rank: int, st: JacobiStats,
                oversample: int = 10, fisher: bool = True) -> List[Step]:
    """The batch part of one lockstep iteration of decompose_many with A configs still
    running on an [m, n] matrix: their stacked residuals and warm subspaces, one batched rsvd
    (warm start, no power iteration) and the factors."""
    e = m * n
    k = min(rank + oversample, m, n)
    s: List[Step] = []
    for _ in range(A):  # _Run.residual: W - Qd, Fisher scaling
        s.append(ew(dev, "W - Qd", 12 * e))
        if fisher:
            s += [ew(dev, "d_row * r", 8 * e), ew(dev, "* d_col", 8 * e)]
    s += [ew(dev, "stack(residuals)", 8 * A * e), ew(dev, "stack(warm)", 8 * A * n * rank)]
    s.append(sketch_step(ix, dev, n * (k - rank)))  # lowrank's fresh columns
    s.append(ew(dev, "cat(warm, fresh)", 8 * A * n * k))
    s += rsvd_steps(ix, dev, A, m, n, rank, oversample, 0, True, st)
    s += [ew(dev, "clamp_min.sqrt", TINY), ew(dev, "U * rs", 8 * A * m * rank),
          ew(dev, "rs * V^T", 8 * A * n * rank)]
    return s


def advance_steps(dev: Device, m: int, n: int, rank: int, bits: int,
                  fisher: bool = True) -> List[Step]:
    """One config's _Run.advance: W - L1 L2, quantize, dequantize, the error."""
    e = m * n
    s: List[Step] = []
    if fisher:
        s += [ew(dev, "l1 / d_row", 8 * m * rank), ew(dev, "l2 / d_col", 8 * n * rank)]
    s.append(gemm(dev, "addmm W - L1 L2", 1, m, n, rank, 4, extra_bytes=4 * e))
    s += quantize_steps(dev, m, n, bits)
    s.append(ew(dev, "T.sub_(Qd)", 12 * e))
    if fisher:
        s += [ew(dev, "square_", 8 * e), ew(dev, "dot(e, F)", 8 * e)]
    else:
        s.append(ew(dev, "vector_norm", 4 * e))
    s.append(sync("float(error)"))
    return s


def iteration_steps(ix, dev: Device, A: int, m: int, n: int, rank: int, bits: int,
                    st: JacobiStats) -> List[Step]:
    """One whole lockstep iteration: the batch part and every config's advance."""
    return batch_steps(ix, dev, A, m, n, rank, st) + A * advance_steps(dev, m, n, rank, bits)


def total_us(steps: Sequence[Step]) -> float:
    return sum(x.time.total_us for x in steps)


def by_kind(steps: Sequence[Step]) -> Dict[str, float]:
    """Time by what binds each step: GEMMs, memory-bound kernels, the eigensolver, solver
    calls, syncs, host work."""
    out: Dict[str, float] = {}
    for x in steps:
        if "GEMM" in x.name:
            key = "GEMMs"
        elif x.name.startswith("jacobi"):
            key = "Jacobi eigensolver"
        else:
            key = {"solver": "cuSOLVER calls", "sync": "host syncs", "host": "host work"}.get(
                x.time.binding, "elementwise (memory + launch)")
        out[key] = out.get(key, 0.0) + x.time.total_us
    return out


def batch_size(m: int, n: int, configs: int, budget: int = 2 << 30) -> int:
    """method/batched.py batch_size: configs per chunk under BATCH_BYTES (2 GiB)."""
    return max(1, min(configs, budget // (8 * m * n)))


def profile_matrix_us(ix, dev: Device, m: int, n: int, rank: int, iters: Sequence[int],
                      configs: int, st_first: JacobiStats, st_warm: JacobiStats,
                      bits: int = 3) -> Dict[str, float]:
    """decompose_many over ``configs`` configs of one [m, n] matrix whose iteration counts
    cycle through ``iters``: the shared first step (rsvd with 2 power iterations) and every
    config's first advance, then per chunk (batch_size) the lockstep iterations, the batch
    shrinking as configs stop."""
    adv = total_us(advance_steps(dev, m, n, rank, bits))
    out = {"first step (shared rsvd)": total_us(rsvd_steps(ix, dev, 1, m, n, rank, 10, 2,
                                                           False, st_first)),
           "first advance (every config)": configs * adv, "lockstep iterations": 0.0}
    size = batch_size(m, n, configs)
    its = [iters[i % len(iters)] for i in range(configs)]
    cache: Dict[int, float] = {}
    for c0 in range(0, configs, size):
        chunk = its[c0:c0 + size]
        for t in range(1, max(chunk)):
            live = sum(1 for x in chunk if x > t)
            if live not in cache:
                cache[live] = total_us(batch_steps(ix, dev, live, m, n, rank, st_warm)) + live * adv
            out["lockstep iterations"] += cache[live]
    out["total"] = sum(out.values())
    return out


def svd_lowrank_gemm_floor(dev: Device, m: int, n: int, q: int, niter: int) -> float:
    """torch.svd_lowrank(A, q, niter) runs the same 2 + 2 niter fp32 GEMMs as rsvd (plus
    1 + 2 niter cuSOLVER QRs of the [m, q] / [n, q] panels and an SVD of the [q, n]
    projection, which this model has no SASS or constant for)."""
    steps = [gemm(dev, "", 1, m, q, n, 4) for _ in range(1 + niter)]
    steps += [gemm(dev, "", 1, n, q, m, 4) for _ in range(niter)]
    steps.append(gemm(dev, "", 1, q, n, m, 4))
    steps.append(gemm(dev, "", 1, m, q, q, 4))
    return total_us(steps)


def stats_from(records: Sequence[dict]) -> Optional[JacobiStats]:
    if not records:
        return None
    return JacobiStats(*(statistics.fmean(r[f] for r in records)
                         for f in ("rotating_rounds", "quiet_rounds", "pair_fraction")))
