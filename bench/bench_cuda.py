"""CUDA microbenchmark of lqlora_ext.qmatmul (NF4/NF3/NF2, optional fused rank-64 LoRA)
against torch bf16 matmul (cuBLAS) and bitsandbytes NF4, plus lqlora.rsvd against
torch.svd_lowrank and the cost profiling of one matrix over the paper's config grid; every
project GPU target checked and reported pass/fail.

Usage (on a machine with a CUDA GPU; scripts/gpu_check.sh runs it as its bench and
bench-full stages):

    python3 bench/bench_cuda.py --out bench_cuda.json --md bench_cuda.md
    python3 bench/bench_cuda.py --quick --out q.json --md q.md      # subset, ~2 min (est.)
    python3 bench/bench_cuda.py --shapes llama2-70b-attn --m 1,16 --sections qmatmul
    python3 bench/bench_cuda.py --device cpu --quick --out /tmp/p.json   # plumbing, no GPU

Default set (an estimated 5-6 minutes on an H100): LLaMA-2-7B
(4096x4096, 11008x4096, 4096x11008), LLaMA-2-70B (8192x8192, 28672x8192, 8192x28672) and
SmolLM2 (576x576, 1536x576) at M = 1, 16, 128, 1024, 4096 with bf16 activations; NF4, NF3,
NF2 at the default block sizes (QuantConfig(bits)); NF4 again with a fused rank-64 LoRA
term; cuBLAS bf16 ``x @ W.T`` (W = the NF4 weight dequantized, in bf16) in the same process;
bitsandbytes ``matmul_4bit`` (``quantize_4bit`` nf4, blocksize 64) when it imports (a note
otherwise). Then ``torch.ops.lqlora.rsvd`` (rank 64 + oversample 10, 4096x4096) against
``torch.svd_lowrank`` with equal niter, and ``profile_costs`` of one 4096x4096 matrix over
``config_grid("paper")`` (432 configs), stopped and extrapolated past --profile-cap-s.

Method (bench/bench_cpu.py's, on a GPU): weights are quantized
on the CPU from a seeded generator (the CPU kernels are the spec; the GPU quantize is the
tests' business) and moved to the device. Every op runs on inputs *and* weights rotated over
enough copies that one sweep moves at least twice the L2 cache (read from the device
properties; copies capped at --max-copies, the row says how many and the working set), and
is timed twice: eager, one CUDA-event pair per call (includes Python and launch overhead), and
through a CUDA graph holding one call per rotation copy, replayed (kernel time; what the
targets use when both sides have it). Warm-up first; medians. Bytes moved are explicit:
packed weight (qcodes + qscales + scale2 + offset) or the dense weight at its dtype, plus
LoRA factors, activations read and output written; GB/s over the median and the fraction of
the device-to-device copy bandwidth measured in-process (1 GiB ``copy_``, read + write
bytes). Each output is checked against an fp32 product with the exact dequantized weight
(relative Frobenius error, every row; bf16 results land near 3e-3, the check fails above
1e-2 or on a non-finite value). The cuBLAS baseline is timed first and again last in each
(shape, M) group: the difference is the run-to-run spread to read the others against.

``--device cpu`` runs the same code paths on the CPU with tiny shapes (host timer, no CUDA
graphs) so the script can be tested where there is no GPU: a plumbing run, not a measurement,
and the JSON and Markdown say so. Exit status: 0 when every row ran and every output was
correct (targets may fail: they are results), 1 otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import operator
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import shapes as shape_table  # noqa: E402  (the one shapes module, tests/shapes.py)

import lqlora_ext as L  # noqa: E402

PLUMBING_NOTE = "plumbing run on the CPU (--device cpu): exercises the code paths, NOT a measurement"

DEFAULTS = {  # (device, quick) -> settings; command-line flags override each
    ("cuda", False): dict(
        shapes="llama2-7b-attn,llama2-7b-up,llama2-7b-down,llama2-70b-attn,llama2-70b-up,"
               "llama2-70b-down,smollm2-q,smollm2-up",
        m="1,16,128,1024,4096", target_s=0.08, warmup=5, min_iters=10, max_iters=2000,
        rsvd_size=4096, rsvd_rank=64, rsvd_niter="0,2", rsvd_reps=7,
        profile_size=4096, profile_rank=64, profile_cap_s=150.0,
        target_shape="llama2-70b-attn"),
    ("cuda", True): dict(
        shapes="llama2-70b-attn,llama2-7b-attn,smollm2-q", m="1,16,1024", target_s=0.04,
        warmup=3, min_iters=10, max_iters=1000, rsvd_size=4096, rsvd_rank=64, rsvd_niter="2",
        rsvd_reps=5, profile_size=4096, profile_rank=64, profile_cap_s=30.0,
        target_shape="llama2-70b-attn"),
    ("cpu", True): dict(
        shapes="k64,odd", m="1,16,33", target_s=0.003, warmup=1, min_iters=3, max_iters=50,
        rsvd_size=128, rsvd_rank=8, rsvd_niter="2", rsvd_reps=3,
        profile_size=48, profile_rank=4, profile_cap_s=1.0, target_shape="k64"),
}
DEFAULTS[("cpu", False)] = dict(DEFAULTS[("cpu", True)], shapes="smollm2-q,smollm2-up",
                                m="1,16,128", target_s=0.05, target_shape="smollm2-q")

BITS = {"nf4": 4, "nf3": 3, "nf2": 2}
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
BASE = "cublas bf16"           # impl name of the dense baseline (torch.mm on the CPU)
BASE_AGAIN = "cublas bf16 (repeat)"
STICKY = ("illegal memory access", "unspecified launch failure", "device-side assert",
          "misaligned address", "illegal instruction", "CUDA error: an illegal")


class Abort(RuntimeError):
    """The CUDA context is unusable (sticky error): stop, keep what was measured."""


# ------------------------------------------------------------------------------ machine info
class Device:
    def __init__(self, kind: str):
        self.kind = kind
        self.cuda = kind == "cuda"
        self.dev = torch.device(kind)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def check_alive(self, e: BaseException):
        """Raise Abort if `e` (or a sync after it) shows a sticky CUDA error."""
        if not self.cuda:
            return
        msg = str(e)
        if any(s in msg for s in STICKY):
            raise Abort(msg)
        try:
            torch.cuda.synchronize()
        except Exception as e2:  # noqa: BLE001
            raise Abort(f"{msg} / then synchronize failed: {e2}")

    def info(self) -> Dict:
        d = {"device_kind": self.kind, "torch": torch.__version__,
             "torch_cuda": torch.version.cuda, "python": platform.python_version(),
             "lqlora_ext": getattr(L, "__version__", "?")}
        try:
            from lqlora_ext import _build_info as bi
            d["lqlora_build"] = {"torch": bi.TORCH_VERSION, "cuda": bi.CUDA_VERSION,
                                 "archs": bi.CUDA_ARCHS}
        except Exception:  # noqa: BLE001
            pass
        if self.cuda:
            p = torch.cuda.get_device_properties(0)
            l2 = getattr(p, "L2_cache_size", 0) or 0
            d.update(device=torch.cuda.get_device_name(0),
                     capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                     memory_gib=round(p.total_memory / 2**30, 1),
                     l2_bytes=int(l2) or 50 << 20, l2_source="device properties" if l2 else
                     "assumed 50 MB (H100); device properties lack L2_cache_size",
                     timing="CUDA events after warm-up, medians; eager and CUDA-graph replay",
                     kernel_registered=torch._C._dispatch_has_kernel_for_dispatch_key(
                         "lqlora::qmatmul", "CUDA"))
        else:
            d.update(device=f"CPU ({platform.processor() or platform.machine()}, "
                            f"{os.cpu_count()} cores)", l2_bytes=1 << 20,
                     l2_source="fixed 1 MiB (plumbing)",
                     timing="time.perf_counter per call (plumbing; no CUDA events or graphs)",
                     plumbing=True, note=PLUMBING_NOTE)
        return d


# ---------------------------------------------------------------------------------- timing
def record_error(D: "Device", e: BaseException, row: Dict, errors: List[str], label: str):
    """A failed measurement: stop if the CUDA context is gone (Abort), else note it in the row
    and the run's error list and go on."""
    D.check_alive(e)
    row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    errors.append(f"{label}: {row['error']}")


def _n_iters(est_s: float, a) -> int:
    return int(min(a.max_iters, max(a.min_iters, a.target_s / max(est_s, 1e-7))))


def time_eager(fn: Callable[[int], object], D: Device, a) -> Dict:
    """Median per-call microseconds of fn(i) (fn rotates its inputs by i), one event pair
    (CPU: host timer) around each call: includes launch and Python overhead."""
    for i in range(a.warmup):
        fn(i)
    D.sync()
    t0 = time.perf_counter()
    for i in range(3):
        fn(a.warmup + i)
    D.sync()
    n = _n_iters((time.perf_counter() - t0) / 3, a)
    base = a.warmup + 3
    if D.cuda:
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(n)]
        for i, (s, e) in enumerate(ev):
            s.record()
            fn(base + i)
            e.record()
        torch.cuda.synchronize()
        ts = [s.elapsed_time(e) * 1e3 for s, e in ev]
    else:
        ts = []
        for i in range(n):
            t = time.perf_counter()
            fn(base + i)
            ts.append((time.perf_counter() - t) * 1e6)
    return {"us": statistics.median(ts), "us_min": min(ts), "n": n}


def time_graph(fn: Callable[[int], object], copies: int, a) -> Dict:
    """Capture one call per rotation copy into a CUDA graph, replay it: median microseconds
    per call (replay time / copies). Kernel time without launch gaps."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as torch's graph docs advise
        for i in range(min(copies, 2)):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [fn(i) for i in range(copies)]
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    g.replay()
    torch.cuda.synchronize()
    n = max(5, _n_iters(time.perf_counter() - t0, a) // 2)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(n)]
    for st, en in ev:
        st.record()
        g.replay()
        en.record()
    torch.cuda.synchronize()
    ts = [st.elapsed_time(en) * 1e3 / copies for st, en in ev]
    del outs, g
    return {"us": statistics.median(ts), "us_min": min(ts), "n": n}


def copy_bandwidth(D: Device) -> float:
    """GB/s of dst.copy_(src) counting read + write bytes (1 GiB on a GPU, 64 MiB on a CPU)."""
    nbytes = (1 << 30) if D.cuda else (64 << 20)
    src = torch.empty(nbytes // 4, device=D.dev).uniform_()  # never zeros
    dst = torch.empty_like(src)
    ts = []
    for i in range(12 if D.cuda else 4):
        if D.cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            dst.copy_(src)
            e.record()
            torch.cuda.synchronize()
            t = s.elapsed_time(e) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            t = time.perf_counter() - t0
        if i >= 2:
            ts.append(t)
    del src, dst
    return 2 * nbytes / statistics.median(ts) / 1e9


def gemm_tflops(D: Device) -> float:
    """bf16 square matmul rate (8192^3 on a GPU, 256^3 on a CPU): the compute ceiling."""
    n = 8192 if D.cuda else 256
    x = torch.randn(n, n, device=D.dev, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=D.dev, dtype=torch.bfloat16)
    ts = []
    for i in range(8 if D.cuda else 3):
        D.sync()
        t0 = time.perf_counter()
        torch.mm(x, y)
        D.sync()
        if i >= 2 or not D.cuda:
            ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(ts) / 1e12


# ----------------------------------------------------------------------------- qmatmul section
def copies_for(bytes_per_call: int, l2: int, cap: int) -> int:
    """Rotation copies so that one sweep moves at least 2x L2 (>= 2, <= cap)."""
    return max(2, min(cap, math.ceil(2 * l2 / max(1, bytes_per_call))))


def clone_nf(qw):
    return L.NFTensor(qw.qcodes.clone(), qw.qscales.clone(), qw.scale2.clone(),
                      qw.offset.clone(), qw.shape, qw.config, qw.levels.clone())


def grow(lst: List, n: int, make: Callable[[], object]) -> List:
    while len(lst) < n:
        lst.append(make())
    return lst


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y = y.float()
    if not torch.isfinite(y).all():
        return float("nan")
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def try_bnb(D: Device):
    """(bnb, bnb.functional, note): None and the reason when it cannot be used."""
    try:
        import logging
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception as e:  # noqa: BLE001  (any import failure is a result, not a crash)
        return None, None, f"bitsandbytes not benchmarked: import failed: {type(e).__name__}: {e}"
    return bnb, bnbf, None


def bench_qmatmul(a, D: Device, info: Dict, res: Dict) -> None:
    rows, errors = res["qmatmul"], res["errors"]
    bw, l2 = info["copy_bw_gbs"], info["l2_bytes"]
    bnb, bnbf, note = (None, None, "bitsandbytes disabled (--no-bnb)") if a.no_bnb else try_bnb(D)
    info["bitsandbytes"] = getattr(bnb, "__version__", None)
    if note:
        info["bitsandbytes_notes"].append(note)
        print(f"# {note}")
    g = torch.Generator().manual_seed(a.seed)                       # weights: CPU, seeded
    gx = torch.Generator(device=D.dev).manual_seed(a.seed + 3)      # activations: on device
    dt = torch.bfloat16
    hdr = (f"{'shape':<26}{'M':>5}  {'impl':<22}{'us':>10}{'eager us':>10}{'GB/s':>8}{'%BW':>6}"
           f"{'TFLOP/s':>9}{'vs bf16':>9}{'rel err':>9}{'copies':>7}")
    print(hdr + "\n" + "-" * len(hdr))
    for shape in shape_table.lookup(a.shapes.split(",")):
        N, K = shape.rows, shape.cols
        t_setup = time.perf_counter()
        w = torch.randn(N, K, generator=g) * 0.02                  # CPU, seeded
        q_cpu = {k: L.quantize(w, L.QuantConfig(BITS[k])) for k in a.bits}
        del w
        q0 = {k: qc.to(D.dev) for k, qc in q_cpu.items()}
        wdq = {k: qc.dequantize().to(D.dev) for k, qc in q_cpu.items()}  # exact, fp32
        del q_cpu
        qcopies = {k: [q0[k]] for k in a.bits}
        dense = [wdq[a.bits[0]].to(dt)]                            # baseline: the NF4 weight
        r = a.lora_rank
        lora = []
        if r > 0:
            la = (torch.randn(r, K, generator=g) / math.sqrt(K)).to(D.dev, dt)
            lb = (torch.randn(N, r, generator=g) * 0.02).to(D.dev, dt)
            lora = [(la, lb)]
        bnb_w, bnb_ref, bnb_bytes = [], None, 0
        if bnb is not None:
            try:
                bnb_w.append(bnbf.quantize_4bit(dense[0].clone(), blocksize=64,
                                                quant_type="nf4", compress_statistics=True))
                pk, st = bnb_w[0]
                bnb_ref = bnbf.dequantize_4bit(pk, st).float()
                st2 = getattr(st, "state2", None)
                bnb_bytes = pk.numel() * pk.element_size() + sum(
                    t.numel() * t.element_size() for t in
                    (st.absmax, getattr(st, "code", None), getattr(st2, "absmax", None),
                     getattr(st2, "code", None)) if t is not None)
            except Exception as e:  # noqa: BLE001
                D.check_alive(e)
                info["bitsandbytes_notes"].append(f"{shape.id}: quantize_4bit failed: "
                                                  f"{type(e).__name__}: {e}")
                bnb_w = []
        D.sync()
        setup_s = time.perf_counter() - t_setup
        xs: List[torch.Tensor] = []
        for m in a.m:
            xs.clear()
            act = m * K * 2 + m * N * 2                             # x read, out written (bf16)
            flops = 2 * m * N * K
            mk_x = lambda: torch.randn(m, K, generator=gx, device=D.dev, dtype=dt)  # noqa: E731
            grow(xs, 1, mk_x)
            x0f = xs[0].float()
            refs = {k: x0f @ wdq[k].t() for k in a.bits}
            # name -> (fn(i), bytes per call, weight copies list, ref, config, lora rank)
            cands = []

            def add(name, wb, copies_list, make_copy, call, ref, cfg=None, lr=0):
                n = copies_for(wb + act, l2, a.max_copies)
                grow(copies_list, n, make_copy)
                grow(xs, n, mk_x)
                cands.append((name, lambda i: call(xs[i % n], copies_list[i % n]), wb + act,
                              n, ref, cfg, lr))

            mm = lambda x, W: torch.mm(x, W.t())  # noqa: E731  (x @ W.T, cuBLAS)
            add(BASE, N * K * 2, dense, lambda: dense[0].clone(), mm, refs[a.bits[0]])
            for k in a.bits:
                add(f"lqlora {k}", q0[k].nbytes, qcopies[k], lambda k=k: clone_nf(q0[k]),
                    lambda x, q: L.qmatmul(x, q), refs[k], q0[k].config.name)
            if r > 0:
                for k in a.lora_bits:
                    la, lb = lora[0]
                    ref = refs[k] + a.lora_scale * ((x0f @ la.float().t()) @ lb.float().t())
                    pairs: List = []
                    add(f"lqlora {k} +lora{r}", q0[k].nbytes + (r * K + N * r) * 2, pairs,
                        lambda k=k, la=la, lb=lb: (clone_nf(q0[k]), la.clone(), lb.clone()),
                        lambda x, p: L.qmatmul(x, p[0], p[1], p[2], a.lora_scale), ref,
                        q0[k].config.name, r)
            if bnb_w:
                add("bnb nf4", bnb_bytes, bnb_w,
                    lambda: bnbf.quantize_4bit(dense[0].clone(), blocksize=64, quant_type="nf4",
                                               compress_statistics=True),
                    lambda x, p: bnb.matmul_4bit(x, p[0].t(), p[1]), x0f @ bnb_ref.t(),
                    "bnb nf4 blocksize 64, compressed statistics")
            cands.append((BASE_AGAIN,) + cands[0][1:])
            group: Dict[str, Dict] = {}
            for name, fn, nbytes, n, ref, cfg, lr in cands:
                row = {"shape": shape.id, "N": N, "K": K, "M": m, "impl": name, "config": cfg,
                       "lora_rank": lr, "dtype": "bf16", "copies": n,
                       "working_set_bytes": n * nbytes, "bytes": nbytes, "flops": flops}
                try:
                    y = fn(0)
                    D.sync()
                    row["rel_err"] = rel_err(y, ref)
                    row["rows_checked"] = m
                    row["ok"] = bool(row["rel_err"] <= a.err_tol)  # NaN -> False
                    del y
                    te = time_eager(fn, D, a)
                    row.update(eager_us=te["us"], eager_us_min=te["us_min"], eager_iters=te["n"])
                    if D.cuda and not a.no_graphs:
                        try:
                            tg = time_graph(fn, n, a)
                            row.update(graph_us=tg["us"], graph_us_min=tg["us_min"],
                                       graph_iters=tg["n"])
                        except Exception as e:  # noqa: BLE001
                            D.check_alive(e)
                            row["graph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                except Abort:
                    raise
                except Exception as e:  # noqa: BLE001
                    record_error(D, e, row, errors, f"{shape.id} M={m} {name}")
                    row["ok"] = False
                group[name] = row
            base = group[BASE]
            for name, row in group.items():
                mode = "graph" if ("graph_us" in row and "graph_us" in base) else "eager"
                if f"{mode}_us" not in row:
                    rows.append(row)
                    continue
                us = row[f"{mode}_us"]
                gbs = row["bytes"] / (us * 1e-6) / 1e9
                row.update(timing=mode, us=round(us, 3), gbs=round(gbs, 2),
                           frac_bw=round(gbs / bw, 4),
                           tflops=round(row["flops"] / (us * 1e-6) / 1e12, 4),
                           speedup_vs_bf16=(round(base[f"{mode}_us"] / us, 4)
                                            if f"{mode}_us" in base else None))
                for k in ("eager_us", "eager_us_min", "graph_us", "graph_us_min"):
                    if k in row:
                        row[k] = round(row[k], 3)
                if name == BASE:
                    row["setup_s"] = round(setup_s, 2)
                    again = group.get(BASE_AGAIN, {}).get(f"{mode}_us")
                    if again is not None:  # run-to-run spread of the same op
                        row["repeat_spread"] = round(abs(again - us) / us, 4)
                rows.append(row)
                sp = row["speedup_vs_bf16"]
                print(f"{shape.id:<26}{m:>5}  {name:<22}{us:>10.1f}{row['eager_us']:>10.1f}"
                      f"{gbs:>8.0f}{100 * gbs / bw:>5.0f}%{row['tflops']:>9.2f}"
                      f"{'' if sp is None else f'{sp:.2f}x':>9}{row.get('rel_err', 0):>9.1e}"
                      f"{row['copies']:>7}" + ("" if row.get("ok", True) else "  <-- WRONG"))
            print()
            del refs, cands, group
            xs.clear()
            if D.cuda:
                torch.cuda.empty_cache()
        del qcopies, dense, lora, bnb_w, wdq, q0
        if D.cuda:
            torch.cuda.empty_cache()


# -------------------------------------------------------------------------------- rsvd section
def test_matrix(n: int, D: Device, seed: int):
    """[n, n] fp32 with a power-law spectrum s_i = 1/(i+1) (slow decay, like weight
    residuals) and random singular vectors; returns (A, s)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, n, generator=g).to(D.dev))[0]
    v = torch.linalg.qr(torch.randn(n, n, generator=g).to(D.dev))[0]
    s = 1.0 / torch.arange(1, n + 1, dtype=torch.float32, device=D.dev)
    return (u * s) @ v.t(), s


def wall_median(fn: Callable[[int], object], D: Device, reps: int, warmup: int = 2) -> float:
    """Median seconds per call by host clock with a sync around each call (these ops sync
    internally: eigen/SVD solvers, host-drawn sketches)."""
    for i in range(warmup):
        fn(i)
    ts = []
    for i in range(reps):
        D.sync()
        t0 = time.perf_counter()
        fn(i)
        D.sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_rsvd(a, D: Device, res: Dict) -> None:
    n, r, p = a.rsvd_size, a.rsvd_rank, a.rsvd_oversample
    A, s = test_matrix(n, D, a.seed + 1)
    A2 = [A, A.clone()]  # 2 x 64 MiB at 4096: more than L2
    an = float(A.norm())
    optimal = float(s[r:].norm() / s.norm())

    def err(u, sv, v):
        return float((A - (u * sv) @ v.t()).norm()) / an

    print(f"# rsvd {n}x{n} rank {r} + oversample {p}; optimal rank-{r} relative error "
          f"{optimal:.4f}")
    for niter in a.rsvd_niter:
        row = {"size": n, "rank": r, "oversample": p, "niter": niter, "optimal_err": optimal}
        try:
            lq = lambda i: torch.ops.lqlora.rsvd(A2[i % 2], r, p, niter, a.seed, None)  # noqa
            tl = lambda i: torch.svd_lowrank(A2[i % 2], q=r + p, niter=niter)  # noqa: E731
            u, sv, v = lq(0)
            row["lqlora_err"] = err(u, sv, v)
            u, sv, v = tl(0)
            row["torch_err"] = err(u[:, :r], sv[:r], v[:, :r])
            row["lqlora_ms"] = wall_median(lq, D, a.rsvd_reps) * 1e3
            row["torch_ms"] = wall_median(tl, D, a.rsvd_reps) * 1e3
            row["speedup"] = round(row["torch_ms"] / row["lqlora_ms"], 3)
            row["err_ratio"] = round(row["lqlora_err"] / row["torch_err"], 4)
            print(f"#   niter {niter}: lqlora.rsvd {row['lqlora_ms']:.2f} ms err "
                  f"{row['lqlora_err']:.4f} | torch.svd_lowrank {row['torch_ms']:.2f} ms err "
                  f"{row['torch_err']:.4f} | {row['speedup']:.2f}x")
        except Abort:
            raise
        except Exception as e:  # noqa: BLE001
            record_error(D, e, row, res["errors"], f"rsvd niter={niter}")
        res["rsvd"].append(row)
    del A, A2


# --------------------------------------------------------------------------- profiling section
def bench_profile(a, D: Device, res: Dict) -> None:
    from lqlora_ext.method.allocation import config_grid
    from lqlora_ext.method.profiling import profile_costs

    grid = config_grid(a.profile_grid)
    n, r = a.profile_size, a.profile_rank
    w = (torch.randn(n, n, generator=torch.Generator().manual_seed(a.seed + 2)) * 0.02).to(D.dev)
    out = {"size": n, "rank": r, "grid": a.profile_grid, "configs": len(grid),
           "cap_s": a.profile_cap_s, "chunk": a.profile_chunk, "done": 0}
    print(f"# profiling {n}x{n}, rank {r}, grid {a.profile_grid!r} ({len(grid)} configs), "
          f"stop after {a.profile_cap_s:.0f} s and extrapolate")
    try:
        D.sync()
        t0 = time.perf_counter()
        for i in range(0, len(grid), a.profile_chunk):
            chunk = grid[i:i + a.profile_chunk]
            costs = profile_costs({"w": w}, chunk, r, cache_dir=None, workers=1,
                                  progress=False)
            if not torch.isfinite(costs).all():
                raise RuntimeError(f"non-finite cost for configs {i}..{i + len(chunk) - 1}")
            out["done"] += len(chunk)
            if time.perf_counter() - t0 > a.profile_cap_s and out["done"] < len(grid):
                break
        D.sync()
        el = time.perf_counter() - t0
        out["elapsed_s"] = round(el, 2)
        out["complete"] = out["done"] == len(grid)
        out["seconds"] = round(el if out["complete"] else el * len(grid) / out["done"], 2)
        out["extrapolated"] = not out["complete"]
        print(f"#   {out['done']}/{len(grid)} configs in {el:.1f} s -> "
              f"{'' if out['complete'] else 'extrapolated '}{out['seconds']:.1f} s for the grid")
    except Abort:
        raise
    except Exception as e:  # noqa: BLE001
        record_error(D, e, out, res["errors"], "profiling")
    res["profiling"] = out


# ------------------------------------------------------------------------------------ targets
def evaluate_targets(a, res: Dict) -> List[Dict]:
    """Every project GPU target: status pass / fail / missing (no row) / skipped."""
    rows = [r for r in res["qmatmul"] if "us" in r]
    by = {(r["shape"], r["M"], r["impl"]): r for r in rows}
    shapes_run = sorted({r["shape"] for r in res["qmatmul"]}, key=lambda s: s)
    ms_run = sorted({r["M"] for r in res["qmatmul"]})
    prim = shape_table.lookup([a.target_shape])[0].id
    out: List[Dict] = []

    def tgt(tid, desc, value, op, thr, shape=None, m=None, impl=None, status=None, detail=""):
        if status is None:
            status = "missing" if value is None else "pass" if OPS[op](value, thr) else "fail"
        out.append({"id": tid, "target": desc, "shape": shape, "M": m, "impl": impl,
                    "value": None if value is None else round(value, 4), "op": op,
                    "threshold": thr, "status": status, "detail": detail})

    def sp(shape, m, impl):
        r = by.get((shape, m, impl))
        return None if r is None else r.get("speedup_vs_bf16")

    for k, thr in (("nf4", 3.0), ("nf3", 3.8), ("nf2", 4.5)):
        tgt(f"m1-{k}-speedup", f"M=1 {prim} {k.upper()} >= {thr}x bf16 cuBLAS",
            sp(prim, 1, f"lqlora {k}"), ">=", thr, prim, 1, f"lqlora {k}")
        r = by.get((prim, 1, f"lqlora {k}"))
        tgt(f"m1-{k}-bandwidth", f"M=1 {prim} {k.upper()} >= 75% of copy bandwidth",
            None if r is None else r["frac_bw"], ">=", 0.75, prim, 1, f"lqlora {k}")
    tgt("m16-nf4-speedup", f"M=16 {prim} NF4 >= 2.5x bf16 cuBLAS",
        sp(prim, 16, "lqlora nf4"), ">=", 2.5, prim, 16, "lqlora nf4")
    for s in shapes_run:
        for m in (m for m in ms_run if m >= 1024):
            for k in a.bits:
                tgt("large-m-throughput", f"M>={1024} {k.upper()} >= 0.9x bf16 throughput",
                    sp(s, m, f"lqlora {k}"), ">=", 0.9, s, m, f"lqlora {k}")
    for s in shapes_run:
        for k in a.lora_bits:
            r0, r1 = by.get((s, 1, f"lqlora {k}")), by.get((s, 1, f"lqlora {k} +lora{a.lora_rank}"))
            v = None if (r0 is None or r1 is None) else r1["us"] / r0["us"] - 1
            tgt("lora-overhead-m1", f"M=1 fused rank-{a.lora_rank} LoRA adds <= 15% ({k})",
                v, "<=", 0.15, s, 1, f"lqlora {k} +lora{a.lora_rank}",
                status="missing" if a.lora_rank <= 0 else None)
    bnb_ok = any(r["impl"] == "bnb nf4" for r in res["qmatmul"])
    for s in shapes_run:
        for m in ms_run:
            rq, rb = by.get((s, m, "lqlora nf4")), by.get((s, m, "bnb nf4"))
            v = None if (rq is None or rb is None) else rb["us"] / rq["us"]
            tgt("faster-than-bnb", "NF4 faster than bitsandbytes NF4 (ratio bnb/lqlora > 1)",
                v, ">", 1.0, s, m, "lqlora nf4",
                status=None if bnb_ok else "skipped",
                detail="" if bnb_ok else "; ".join(res["info"].get("bitsandbytes_notes", [])))
    rs = [r for r in res["rsvd"] if r["niter"] == 2 and "speedup" in r] or \
        [r for r in res["rsvd"] if "speedup" in r]
    if rs:
        r = rs[0]
        eq = r["lqlora_err"] <= r["torch_err"] * 1.02 + 1e-6
        tgt("rsvd-speedup", f"lqlora.rsvd >= 3x torch.svd_lowrank at equal accuracy "
            f"({r['size']}x{r['size']}, rank {r['rank']}+{r['oversample']}, niter {r['niter']})",
            r["speedup"], ">=", 3.0, status=None if eq else "fail",
            detail=f"error {r['lqlora_err']:.4f} vs {r['torch_err']:.4f}"
                   + ("" if eq else " (accuracy not equal: > 1.02x)"))
    else:
        tgt("rsvd-speedup", "lqlora.rsvd >= 3x torch.svd_lowrank at equal accuracy", None,
            ">=", 3.0)
    p = res.get("profiling") or {}
    tgt("profile-grid", f"cost profiling of one {p.get('size', '?')}x{p.get('size', '?')} "
        f"matrix over the {p.get('grid', '?')} grid < 60 s", p.get("seconds"), "<", 60.0,
        status=("fail" if p.get("extrapolated") and p.get("elapsed_s", 0) >= 60 else
                "incomplete" if p.get("extrapolated") else None),
        detail=("" if not p else f"{p.get('done')}/{p.get('configs')} configs in "
                f"{p.get('elapsed_s')} s" + (", extrapolated" if p.get("extrapolated") else "")))
    return out


# ------------------------------------------------------------------------------------ markdown
def fmt_us(us: float) -> str:
    return f"{us:.1f} µs" if us < 1e4 else f"{us / 1e3:.2f} ms"


def write_md(res: Dict, path: str) -> None:
    info = res["info"]
    L_ = []
    plumb = info.get("plumbing")
    L_.append("# CUDA qmatmul benchmark" + (" — PLUMBING RUN, NOT A MEASUREMENT" if plumb else ""))
    L_.append("")
    if plumb:
        L_ += [f"**{PLUMBING_NOTE}.** Tiny shapes, host timer, no CUDA graphs; every number "
               "below only shows that the code path ran.", ""]
    L_.append(f"{info['date']}, {info['device']}"
              + (f" (sm_{info['capability'].replace('.', '')}, {info['sms']} SMs, "
                 f"{info['memory_gib']} GiB)" if "capability" in info else "")
              + f", torch {info['torch']} (CUDA {info['torch_cuda']}), lqlora_ext "
              f"{info['lqlora_ext']}, bitsandbytes {info.get('bitsandbytes') or 'absent'}; "
              f"command: `{info['command']}` ({info.get('wall_s', '?')} s).")
    L_.append("")
    L_.append(f"Measured in-process: copy bandwidth **{info['copy_bw_gbs']:.0f} GB/s** "
              f"(device-to-device `copy_`, read + write), bf16 GEMM "
              f"**{info['gemm_bf16_tflops']:.0f} TFLOP/s**; L2 {info['l2_bytes'] / 1e6:.0f} MB "
              f"({info['l2_source']}). Timing: {info['timing']}. Times below are CUDA-graph "
              "replays (kernel time) where both the row and the baseline have one, else eager; "
              "speedups against cuBLAS bf16 `x @ W.T` in the same mode.")
    L_.append("")
    t = res["targets"]
    summ = res["targets_summary"]
    L_.append("## Targets (" + ", ".join(f"{v} {k}" for k, v in summ.items()) + ")")
    L_.append("")
    L_.append("| target | shape | M | value | need | status |")
    L_.append("|---|---|---:|---:|---:|---|")
    for x in t:
        v = "—" if x["value"] is None else f"{x['value']:.3g}"
        L_.append(f"| {x['target']} | {x['shape'] or ''} | {'' if x['M'] is None else x['M']} "
                  f"| {v} | {x['op']} {x['threshold']} | **{x['status']}**"
                  + (f" ({x['detail']})" if x["detail"] else "") + " |")
    L_.append("")
    rows = res["qmatmul"]
    shapes_ = list(dict.fromkeys(r["shape"] for r in rows))
    if rows:
        L_.append("## qmatmul (bf16 activations): time and speedup vs cuBLAS bf16")
        L_.append("")
    for s in shapes_:
        ms = sorted({r["M"] for r in rows if r["shape"] == s})
        impls = list(dict.fromkeys(r["impl"] for r in rows if r["shape"] == s))
        L_.append(f"### {s}")
        L_.append("")
        L_.append("| impl | " + " | ".join(f"M={m}" for m in ms) + " |")
        L_.append("|---|" + "---:|" * len(ms))
        for im in impls:
            cells = []
            for m in ms:
                r = next((r for r in rows if r["shape"] == s and r["M"] == m and r["impl"] == im),
                         None)
                if r is None:
                    cells.append("")
                elif "us" not in r:
                    cells.append("error")
                else:
                    c = fmt_us(r["us"])
                    if im not in (BASE, BASE_AGAIN) and r.get("speedup_vs_bf16"):
                        c += f" ({r['speedup_vs_bf16']:.2f}x)"
                    if not r.get("ok", True):
                        c += " WRONG"
                    cells.append(c)
            L_.append(f"| {im} | " + " | ".join(cells) + " |")
        L_.append("")
    small = [r for r in rows if "us" in r and r["M"] <= 16]
    if small:
        L_ += ["## Decode path (M <= 16): bytes and bandwidth", "",
               "| shape | M | impl | µs (eager) | bytes | GB/s | % copy BW | rel err | copies |",
               "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in small:
            L_.append(f"| {r['shape']} | {r['M']} | {r['impl']} | {r['us']:.1f} "
                      f"({r['eager_us']:.1f}) | {r['bytes'] / 1e6:.2f} MB | {r['gbs']:.0f} | "
                      f"{100 * r['frac_bw']:.0f}% | {r.get('rel_err', float('nan')):.1e} | "
                      f"{r['copies']} |")
        L_.append("")
    if res["rsvd"]:
        L_ += ["## rsvd vs torch.svd_lowrank", "",
               "| size | rank + oversample | niter | lqlora.rsvd ms | torch ms | speedup | "
               "lqlora err | torch err | optimal err |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["rsvd"]:
            if "speedup" in r:
                L_.append(f"| {r['size']} | {r['rank']} + {r['oversample']} | {r['niter']} | "
                          f"{r['lqlora_ms']:.2f} | {r['torch_ms']:.2f} | {r['speedup']:.2f}x | "
                          f"{r['lqlora_err']:.4f} | {r['torch_err']:.4f} | "
                          f"{r['optimal_err']:.4f} |")
            else:
                L_.append(f"| {r['size']} | {r['rank']} + {r['oversample']} | {r['niter']} | "
                          f"error: {r.get('error', '?')[:80]} | | | | | |")
        L_.append("")
    p = res.get("profiling")
    if p:
        L_ += ["## Cost profiling", ""]
        if "seconds" in p:
            L_.append(f"One {p['size']}x{p['size']} matrix, rank {p['rank']}, grid "
                      f"`{p['grid']}` ({p['configs']} configs): {p['done']} configs in "
                      f"{p['elapsed_s']} s" + (f", extrapolated to **{p['seconds']} s**"
                                               if p["extrapolated"] else
                                               f": **{p['seconds']} s**") + ".")
        else:
            L_.append(f"failed: {p.get('error')}")
        L_.append("")
    notes = info.get("bitsandbytes_notes") or []
    if notes or res["errors"] or res.get("aborted"):
        L_ += ["## Notes", ""]
        L_ += [f"- {n}" for n in notes]
        L_ += [f"- ERROR: {e}" for e in res["errors"]]
        if res.get("aborted"):
            L_.append(f"- ABORTED: {res['aborted']}")
        L_.append("")
    with open(path, "w") as f:
        f.write("\n".join(L_))


# --------------------------------------------------------------------------------------- main
def parse(argv: Optional[List[str]]):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true",
                   help="~2-minute subset on a GPU (tiny shapes with --device cpu)")
    p.add_argument("--sections", default="qmatmul,rsvd,profile",
                   help="comma list of qmatmul, rsvd, profile")
    p.add_argument("--shapes", help="comma list of tests/shapes.py names or ids, or ROWSxCOLS")
    p.add_argument("--m", help="comma list of activation rows M (default 1,16,128,1024,4096)")
    p.add_argument("--bits", default="nf4,nf3,nf2", help="NF widths to time (default blocks)")
    p.add_argument("--lora-rank", type=int, default=64, help="fused LoRA rank (0: none)")
    p.add_argument("--lora-bits", default="nf4", help="widths also timed with the LoRA term")
    p.add_argument("--lora-scale", type=float, default=0.5)
    p.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes even if present")
    p.add_argument("--no-graphs", action="store_true", help="eager timing only")
    p.add_argument("--target-shape", help="shape of the M=1 / M=16 speed targets "
                                          "(default llama2-70b-attn, 8192x8192)")
    p.add_argument("--target-s", type=float, help="seconds of timed calls per measurement")
    p.add_argument("--warmup", type=int)
    p.add_argument("--min-iters", type=int)
    p.add_argument("--max-iters", type=int)
    p.add_argument("--max-copies", type=int, default=512, help="rotation copies cap")
    p.add_argument("--err-tol", type=float, default=1e-2, help="max relative error of an output")
    p.add_argument("--rsvd-size", type=int)
    p.add_argument("--rsvd-rank", type=int)
    p.add_argument("--rsvd-oversample", type=int, default=10)
    p.add_argument("--rsvd-niter", help="comma list of power iterations (both methods)")
    p.add_argument("--rsvd-reps", type=int)
    p.add_argument("--profile-grid", default="paper", help="allocation.config_grid name")
    p.add_argument("--profile-size", type=int)
    p.add_argument("--profile-rank", type=int)
    p.add_argument("--profile-cap-s", type=float,
                   help="stop profiling after this many seconds and extrapolate")
    p.add_argument("--profile-chunk", type=int, default=16, help="configs per profile_costs call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write results as JSON here")
    p.add_argument("--md", help="write a Markdown summary here")
    a = p.parse_args(argv)
    for k, v in DEFAULTS[(a.device, a.quick)].items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    a.m = [int(v) for v in str(a.m).split(",") if v]
    a.bits = [b for b in a.bits.split(",") if b]
    a.lora_bits = [b for b in a.lora_bits.split(",") if b]
    for b in a.bits + a.lora_bits:
        if b not in BITS:
            p.error(f"unknown width {b!r}; choose from {sorted(BITS)}")
    if not set(a.lora_bits) <= set(a.bits):
        p.error("--lora-bits must be a subset of --bits")
    a.rsvd_niter = [int(v) for v in str(a.rsvd_niter).split(",") if v]
    a.sections = [s for s in a.sections.split(",") if s]
    for s in a.sections:
        if s not in ("qmatmul", "rsvd", "profile"):
            p.error(f"unknown section {s!r}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("CUDA is not available; for a plumbing run use --device cpu --quick")
    return a


def main(argv: Optional[List[str]] = None) -> int:
    a = parse(argv)
    torch.manual_seed(a.seed)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references stay fp32
    D = Device(a.device)
    t0 = time.time()
    info = D.info()
    info.update(date=datetime.datetime.now().isoformat(timespec="seconds"),
                command=" ".join([os.path.basename(sys.executable)] + sys.argv
                                 if argv is None else ["bench_cuda.py"] + list(argv)),
                quick=a.quick, sections=a.sections, bitsandbytes_notes=[],
                settings={k: getattr(a, k) for k in (
                    "shapes", "m", "bits", "lora_rank", "lora_bits", "lora_scale", "target_s",
                    "warmup", "min_iters", "max_iters", "max_copies", "err_tol", "target_shape",
                    "rsvd_size", "rsvd_rank", "rsvd_oversample", "rsvd_niter", "profile_grid",
                    "profile_size", "profile_rank", "profile_cap_s", "seed")})
    res = {"info": info, "qmatmul": [], "rsvd": [], "profiling": None, "targets": [],
           "targets_summary": {}, "errors": []}
    if D.cuda and not info.get("kernel_registered"):
        res["errors"].append("lqlora::qmatmul has no CUDA kernel: built without CUDA?")
    print(f"# {info['device']}, torch {info['torch']} (CUDA {info['torch_cuda']}), "
          f"L2 {info['l2_bytes'] / 1e6:.0f} MB" + (f"\n# {PLUMBING_NOTE}" if not D.cuda else ""))
    code = 0
    try:
        with torch.no_grad():
            info["copy_bw_gbs"] = round(copy_bandwidth(D), 1)
            info["gemm_bf16_tflops"] = round(gemm_tflops(D), 1)
            print(f"# copy bandwidth {info['copy_bw_gbs']:.0f} GB/s (read + write), bf16 GEMM "
                  f"{info['gemm_bf16_tflops']:.0f} TFLOP/s\n")
            if "qmatmul" in a.sections:
                bench_qmatmul(a, D, info, res)
            if "rsvd" in a.sections:
                bench_rsvd(a, D, res)
            if "profile" in a.sections:
                bench_profile(a, D, res)
    except Abort as e:
        res["aborted"] = f"CUDA context unusable, stopped: {e}"
        res["errors"].append(res["aborted"])
        print("# ABORTED:", e)
    except BaseException as e:  # noqa: BLE001  (keep what was measured, then re-raise)
        res["aborted"] = f"{type(e).__name__}: {e}"
        res["errors"].append(res["aborted"] + "\n" + traceback.format_exc(limit=5))
        code = 1
        if not isinstance(e, Exception):
            raise
    finally:
        info["wall_s"] = round(time.time() - t0, 1)
        info.setdefault("copy_bw_gbs", float("nan"))
        info.setdefault("gemm_bf16_tflops", float("nan"))
        res["targets"] = evaluate_targets(a, res)
        summ: Dict[str, int] = {}
        for x in res["targets"]:
            summ[x["status"]] = summ.get(x["status"], 0) + 1
        res["targets_summary"] = summ
        wrong = [f"{r['shape']} M={r['M']} {r['impl']}" for r in res["qmatmul"]
                 if not r.get("ok", True)]
        res["wrong_outputs"] = wrong
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1, default=str)
            print(f"# wrote {a.out}")
        if a.md:
            write_md(res, a.md)
            print(f"# wrote {a.md}")
    print("\n# targets: " + ", ".join(f"{v} {k}" for k, v in res["targets_summary"].items()))
    for x in res["targets"]:
        if x["status"] != "pass" and x["id"] not in ("faster-than-bnb",):
            v = "-" if x["value"] is None else f"{x['value']:.3g}"
            print(f"#   {x['status']:<10} {x['target']} [{x['shape'] or ''} M={x['M']}]: {v}")
    if wrong:
        print("# WRONG OUTPUTS:", "; ".join(wrong))
    if res["errors"]:
        print("# errors:", len(res["errors"]))
    print(f"# total {info['wall_s']} s" + (f"  ({PLUMBING_NOTE})" if not D.cuda else ""))
    if res["errors"] or wrong or res.get("aborted"):
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
