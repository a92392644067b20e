"""CPU microbenchmark of lqlora_ext.qmatmul against dense fp32 / bf16 GEMM (and bitsandbytes'
CPU 4-bit matmul when it imports), plus quantize / dequantize throughput.

Usage (no arguments: LLaMA-2-7B 4096x4096, NF4 defaults at M = 1, 16, 512, NF3/NF2 at M = 1;
about 25 s on 2 idle cores):

    python3 bench/bench_cpu.py
    python3 bench/bench_cpu.py --shapes llama2-7b-attn,smollm2-up --m 1,8 --out results.json
    python3 bench/bench_cpu.py --no-bnb --min-time 0.5

Method (Marlin bench.py style): every op is timed on inputs *and weights* rotated over
enough copies that the working set is at least twice the L3 cache, so no call finds its
weight in cache from the previous one; a few warm-up calls, then the median over at least
--iters calls and --min-time seconds. Bytes are explicit: packed weight (qcodes + qscales +
scale2 + offset) or the dense weight at its dtype, plus activations read and outputs
written. Bandwidth is compared against an in-process copy of a 512 MiB tensor (read +
write bytes). FLOP counts are 2*M*N*K.

Each group prints how much CPU *other* processes used while it ran; above ~10% the numbers
are contaminated. On a shared box, run it at raised priority, e.g.
``bash -c 'echo -20 > /proc/self/autogroup; exec nice -n -20 python3 bench/bench_cpu.py'``
(root; under autogroup scheduling plain nice ranks processes only within one autogroup).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import shapes as shape_table  # noqa: E402  (the one shapes module, tests/shapes.py)

import lqlora_ext as L  # noqa: E402
from lqlora_ext import ops  # noqa: E402


# ------------------------------------------------------------------------------ machine info
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def l3_bytes() -> int:
    """Largest cache size from sysfs (L3 on x86), 32 MiB if unknown."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            with open(os.path.join(base, d, "size")) as f:
                s = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1], 1)
            best = max(best, int(s.rstrip("KM")) * mult)
    except (OSError, ValueError):
        pass
    return best or 32 << 20


# ---------------------------------------------------------------------------------- timing
def bench_round_robin(cands: Dict[str, Callable[[int], object]], warmup: int, iters: int,
                      min_time: float) -> Dict[str, Dict[str, float]]:
    """Median/min microseconds of each fn(i), i = call index (the fn rotates its inputs).

    Candidates are interleaved call by call (A B C A B C ...), so a load change on a shared
    machine hits all of them alike and the ratios stay meaningful."""
    for i in range(warmup):
        for fn in cands.values():
            fn(i)
    times: Dict[str, List[float]] = {k: [] for k in cands}
    t_end = time.perf_counter() + min_time * len(cands)
    i = warmup
    while True:
        for k, fn in cands.items():
            t0 = time.perf_counter()
            fn(i)
            times[k].append(time.perf_counter() - t0)
        i += 1
        n = i - warmup
        if (n >= iters and time.perf_counter() > t_end) or n >= 50 * iters:
            break
    return {k: {"us": statistics.median(v) * 1e6, "us_min": min(v) * 1e6, "n": len(v)}
            for k, v in times.items()}


class ForeignLoad:
    """CPU time used by *other* processes while we run, as a fraction of all CPUs (Linux
    /proc/stat minus our own os.times()). A shared machine makes every number suspect, so
    each table group reports it; > ~0.1 means the timings are contaminated."""

    def __init__(self):
        self.t0 = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        tck = os.sysconf("SC_CLK_TCK")
        busy = (sum(v) - v[3] - v[4]) / tck
        me = os.times()
        return busy, sum(v) / tck, me.user + me.system

    def fraction(self) -> Optional[float]:
        t1 = self._read()
        if t1 is None or self.t0 is None:
            return None
        busy, tot, me = (b - a for a, b in zip(self.t0, t1))
        return round(max(0.0, busy - me) / tot, 3) if tot > 0 else None


def copy_bandwidth(nbytes: int = 512 << 20, reps: int = 7) -> float:
    """GB/s of dst.copy_(src) counting read + write bytes (STREAM 'copy')."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        ts.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(ts) / 1e9


def copies_for(bytes_per_copy: int, l3: int, cap: int = 64) -> int:
    return max(2, min(cap, math.ceil(2 * l3 / max(1, bytes_per_copy))))


# ----------------------------------------------------------------------------- candidates
def packed_bytes(qw) -> int:
    return qw.nbytes


def clone_nf(qw):
    return L.NFTensor(qw.qcodes.clone(), qw.qscales.clone(), qw.scale2.clone(),
                      qw.offset.clone(), qw.shape, qw.config, qw.levels.clone())


def try_bnb():
    """(module, functional module, note): module None (note says why) when it cannot be
    used; otherwise note, if any, says which of its CPU code paths is in play."""
    try:
        import logging
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception as e:  # any import failure is a result to record, not a crash
        return None, None, f"import bitsandbytes failed: {type(e).__name__}: {e}"
    note = None
    try:  # which CPU path bitsandbytes took (its fused kernel comes from the HF hub)
        from bitsandbytes.backends.cpu import ops as bnb_cpu
        if getattr(bnb_cpu, "gemm_4bit_forward_kernel", "absent") is None:
            note = ("bitsandbytes' fused CPU gemm_4bit_forward (downloaded at import from the "
                    "'kernels-community' hub repo via the `kernels` package) is unavailable "
                    "offline; M=1 uses its bundled gemv_4bit_inference_cpu_nf4_bf16 (x cast to "
                    "bf16), M>1 dequantize_4bit + dense matmul")
    except Exception as e:
        note = f"could not inspect the bitsandbytes CPU backend: {type(e).__name__}: {e}"
    return bnb, bnbf, note


def run(args) -> Dict:
    torch.manual_seed(0)
    l3 = l3_bytes()
    info = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "lqlora_ext": L.__version__, "l3_bytes": l3,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "loadavg_at_start": os.getloadavg()[0],
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    print(f"# {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
          f"torch {info['torch']} ({info['cpu_capability']}), L3 {l3 >> 20} MiB, "
          f"load avg {info['loadavg_at_start']:.2f}")
    fl = ForeignLoad()
    bw = copy_bandwidth()
    info["copy_bw_gbs"], info["copy_bw_foreign_cpu"] = bw, fl.fraction()
    print(f"# measured copy bandwidth (512 MiB tensor copy, read+write): {bw:.1f} GB/s\n")

    bnb, bnbf, bnb_reason = (None, None, "disabled (--no-bnb)") if args.no_bnb else try_bnb()
    if bnb is not None:
        info["bitsandbytes"] = bnb.__version__
    rows_out: List[Dict] = []
    hdr = (f"{'shape':<28}{'M':>5}  {'impl':<26}{'us':>11}{'GB/s':>8}{'%BW':>6}"
           f"{'GFLOP/s':>9}{'vs fp32':>9}")
    print(hdr)
    print("-" * len(hdr))

    def record(shape, m, impl, t, nbytes, flops, base_us, note=""):
        """One table row; GB/s from explicit bytes, %BW against the measured copy."""
        gbs = nbytes / (t["us"] * 1e-6) / 1e9
        row = {"shape": shape.id, "N": shape.rows, "K": shape.cols, "M": m, "impl": impl,
               "us": round(t["us"], 2), "us_min": round(t["us_min"], 2), "iters": t["n"],
               "bytes": nbytes, "gbs": round(gbs, 2), "frac_bw": round(gbs / bw, 3),
               "gflops": round(flops / (t["us"] * 1e-6) / 1e9, 2),
               "speedup_vs_fp32": None if base_us is None else round(base_us / t["us"], 3)}
        if note:
            row["note"] = note
        rows_out.append(row)
        sp = "" if base_us is None else f"{base_us / t['us']:.2f}x"
        print(f"{shape.id:<28}{m:>5}  {impl:<26}{t['us']:>11.1f}{gbs:>8.1f}"
              f"{100 * gbs / bw:>5.0f}%{row['gflops']:>9.1f}{sp:>9}")
        return row

    bnb_notes: List[str] = [] if bnb_reason is None else [bnb_reason]
    run_load = ForeignLoad()
    ops_rows: List[Dict] = []
    for shape in shape_table.lookup(args.shapes.split(",")):
        N, K = shape.rows, shape.cols
        w = torch.randn(N, K) * 0.02
        configs = {"nf4": L.QuantConfig(4), "nf3": L.QuantConfig(3), "nf2": L.QuantConfig(2)}
        q = {k: L.quantize(w, c) for k, c in configs.items()}
        wdq = q["nf4"].dequantize()  # dense baselines use the same (dequantized NF4) weights
        n_d32 = copies_for(N * K * 4, l3, cap=4)
        n_d16 = copies_for(N * K * 2, l3, cap=6)
        dense32 = [wdq.clone() for _ in range(n_d32)]
        dense16 = [wdq.bfloat16() for _ in range(n_d16)]
        qcopies = {k: [qw] + [clone_nf(qw) for _ in range(copies_for(qw.nbytes, l3) - 1)]
                   for k, qw in q.items()}
        bnb_w = None
        if bnb is not None:
            try:
                bq = []
                for _ in range(copies_for(N * K // 2, l3)):
                    bq.append(bnbf.quantize_4bit(wdq.clone(), blocksize=64, quant_type="nf4",
                                                 compress_statistics=True))
                bnb_w = bq
            except Exception as e:
                bnb_notes.append(f"quantize_4bit failed: {type(e).__name__}: {e}")

        for m in [int(v) for v in args.m.split(",")]:
            nx = 8
            xs = [torch.randn(m, K) for _ in range(nx)]
            xs16 = [x.bfloat16() for x in xs]
            act32, act16 = m * K * 4 + m * N * 4, m * K * 2 + m * N * 2
            flops = 2 * m * N * K
            # name -> (fn(i), bytes moved, note)
            cands = {
                "dense fp32 x@W.T": (lambda i: torch.mm(xs[i % nx], dense32[i % n_d32].t()),
                                     N * K * 4 + act32, ""),
                "dense bf16 x@W.T": (lambda i: torch.mm(xs16[i % nx], dense16[i % n_d16].t()),
                                     N * K * 2 + act16, ""),
            }
            for k in ["nf4"] + (["nf3", "nf2"] if m in args.low_bits_m else []):
                qc = qcopies[k]
                dts = (("fp32", xs, act32), ("bf16", xs16, act16)) if k == "nf4" else (
                    ("fp32", xs, act32),)
                for dt_name, xl, ab in dts:
                    cands[f"lqlora {k} qmatmul x{dt_name}"] = (
                        lambda i, xl=xl, qc=qc: L.qmatmul(xl[i % nx], qc[i % len(qc)]),
                        qc[0].nbytes + ab, "")
            if bnb_w is not None:
                nb = len(bnb_w)
                st0 = bnb_w[0][1]
                qb = bnb_w[0][0].numel() * bnb_w[0][0].element_size() + sum(
                    t_.numel() * t_.element_size() for t_ in (st0.absmax, st0.state2.absmax))
                for dt_name, xl, ab in (("fp32", xs, act32), ("bf16", xs16, act16)):
                    fn = (lambda i, xl=xl: bnb.matmul_4bit(xl[i % nx], bnb_w[i % nb][0].t(),
                                                           bnb_w[i % nb][1]))
                    try:
                        y = fn(0)
                        ref = xl[0].float() @ wdq.t()
                        err = ((y.float() - ref).norm() / ref.norm()).item()
                        cands[f"bnb nf4 matmul_4bit x{dt_name}"] = (
                            fn, qb + ab, f"rel err vs dense fp32 {err:.1e}")
                    except Exception as e:
                        bnb_notes.append(f"matmul_4bit M={m} x{dt_name} failed: "
                                         f"{type(e).__name__}: {e}")
            fl = ForeignLoad()
            res = bench_round_robin({k: v[0] for k, v in cands.items()}, args.warmup,
                                    args.iters, args.min_time)
            foreign = fl.fraction()
            base = res["dense fp32 x@W.T"]["us"]
            for k, (_, nbytes, note) in cands.items():
                record(shape, m, k, res[k], nbytes, flops, base, note)["foreign_cpu"] = foreign
            print(f"# other processes used {100 * (foreign or 0):.0f}% of the CPUs meanwhile"
                  + ("  <-- CONTAMINATED" if (foreign or 0) > 0.1 else "") + "\n")

        # quantize / dequantize throughput (GB/s of the fp32 weight)
        for k in ("nf4", "nf3", "nf2"):
            c = configs[k]
            qw = q[k]
            fl = ForeignLoad()
            r = bench_round_robin({"q": lambda i: L.quantize(w, c),
                                   "d": lambda i: qw.dequantize()},
                                  1, max(3, args.iters // 2), args.min_time / 2)
            tq, td, foreign = r["q"], r["d"], fl.fraction()
            for op, t in (("quantize", tq), ("dequantize", td)):
                gbs = N * K * 4 / (t["us"] * 1e-6) / 1e9
                ops_rows.append({"shape": shape.id, "config": c.name, "op": op,
                                 "us": round(t["us"], 1), "gbs_fp32": round(gbs, 2),
                                 "frac_bw": round(gbs / bw, 3), "foreign_cpu": foreign})
        print(f"{'shape':<28}{'config':<24}{'op':<12}{'ms':>9}{'GB/s fp32':>11}{'%BW':>6}")
        for r in ops_rows:
            if r["shape"] == shape.id:
                print(f"{r['shape']:<28}{r['config']:<24}{r['op']:<12}{r['us'] / 1e3:>9.2f}"
                      f"{r['gbs_fp32']:>11.2f}{100 * r['frac_bw']:>5.0f}%")
        print()

    if bnb_notes:
        print("# bitsandbytes:", "; ".join(bnb_notes))
    info["bitsandbytes_notes"] = bnb_notes
    info["loadavg_at_end"] = os.getloadavg()[0]
    info["foreign_cpu"] = run_load.fraction()
    print(f"# other processes used {100 * (info['foreign_cpu'] or 0):.0f}% of the CPUs during "
          "the whole run")
    return {"info": info, "qmatmul": rows_out, "quantize_dequantize": ops_rows}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama2-7b-attn",
                   help="comma list of tests/shapes.py names or ids, or ROWSxCOLS")
    p.add_argument("--m", default="1,16,512", help="comma list of activation rows M")
    p.add_argument("--low-bits-m", default="1",
                   help="M values at which NF3 and NF2 are also timed")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10, help="minimum timed calls per row")
    p.add_argument("--min-time", type=float, default=0.4, help="minimum seconds per row")
    p.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes even if present")
    p.add_argument("--out", help="write results as JSON here")
    args = p.parse_args(argv)
    args.low_bits_m = {int(v) for v in args.low_bits_m.split(",") if v}
    t0 = time.time()
    res = run(args)
    res["info"]["wall_s"] = round(time.time() - t0, 1)
    print(f"# total {res['info']['wall_s']} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
