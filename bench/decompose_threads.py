"""Speed cost of thread-count-independent decompositions.

``decompose`` runs with one intra-op thread by default (``threads=1``), so its result is
the same bits for any torch thread setting. This measures what that costs against torch's
own setting (``threads=None`` at ``--threads`` intra-op threads) for one matrix decomposed
in-process, and checks the bits: pinned results must be identical at 1..--threads threads;
unpinned ones are compared too (they usually differ).

Work per decomposition is fixed (``tol=0``, ``max_iters=--iters``: the stopping rule is
off, so both regimes run the same iterations) and reported per iteration. The two regimes
alternate, ``--repeat`` times each, after a warm-up; medians are quoted.

    python bench/decompose_threads.py --shape 1536x576 --rank 16 --threads 2
    python bench/decompose_threads.py --mode pinned --shape 1536x576 --repeat 8  # one regime
        (for timing whole processes, e.g. /usr/bin/time -v, one regime per process)
    python bench/decompose_threads.py --shape 1536x576 --json bench/results/x.json --md ...
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import lqlora_ext as lq


def weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A seeded matrix with a decaying spectrum plus noise (like pretrained weights)."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
    s = 1.0 / torch.arange(1, k + 1, dtype=torch.float32) ** 0.7
    return ((u * s) @ v.t() + 0.002 * torch.randn(rows, cols, generator=g)).contiguous()


def run(w, cfg, rank, iters, threads, pinned):
    torch.set_num_threads(threads)
    t = time.perf_counter()
    d = lq.decompose(w, cfg, rank, tol=0.0, max_iters=iters, threads=1 if pinned else None)
    return time.perf_counter() - t, d


def same(a, b) -> bool:
    return a.history == b.history and torch.equal(a.l1, b.l1) and torch.equal(a.q.qcodes,
                                                                               b.q.qcodes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1536x576", help="ROWSxCOLS")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--iters", type=int, default=8, help="iterations per decomposition")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--mode", choices=["both", "pinned", "free"], default="both")
    ap.add_argument("--json", help="append the record to this JSON list file")
    ap.add_argument("--md", help="append a table row to this Markdown file")
    a = ap.parse_args(argv)
    load = round(os.getloadavg()[0], 2)  # the machine may be shared: say how busy it was
    rows, cols = (int(x) for x in a.shape.lower().split("x"))
    w, cfg = weight(rows, cols), lq.QuantConfig(a.bits)
    modes = ["pinned", "free"] if a.mode == "both" else [a.mode]
    for m in modes:  # warm-up: allocator, OpenMP pool, MKL
        run(w, cfg, a.rank, 1, a.threads, m == "pinned")
    times = {m: [] for m in modes}
    results = {}
    for _ in range(a.repeat):
        for m in modes:
            dt, d = run(w, cfg, a.rank, a.iters, a.threads, m == "pinned")
            times[m].append(dt / d.iters)
            results.setdefault(m, d)
    rec = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(
               ["python", "bench/decompose_threads.py", *(argv if argv is not None else sys.argv[1:])]),
           "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
           "load_average_1min_at_start": load,
           "torch": torch.__version__, "lqlora_ext": lq.__version__,
           "blas": "MKL" if torch.backends.mkl.is_available() else "other",
           "shape": [rows, cols], "rank": a.rank, "config": cfg.name, "threads": a.threads,
           "iters": a.iters, "repeat": a.repeat,
           "ms_per_iter": {m: {"median": 1e3 * statistics.median(v), "min": 1e3 * min(v),
                               "max": 1e3 * max(v)} for m, v in times.items()}}
    if a.mode == "both":
        rec["slowdown_pinned_over_free"] = (rec["ms_per_iter"]["pinned"]["median"]
                                            / rec["ms_per_iter"]["free"]["median"])
        # Bits: pinned must match itself at 1..threads threads; unpinned is compared too.
        rec["pinned_identical_across_threads"] = all(
            same(run(w, cfg, a.rank, a.iters, n, True)[1], results["pinned"])
            for n in range(1, a.threads + 1))
        rec["free_identical_across_threads"] = all(
            same(run(w, cfg, a.rank, a.iters, n, False)[1], results["free"])
            for n in range(1, a.threads + 1))
    print(json.dumps(rec))
    if a.json:
        old = []
        if os.path.exists(a.json):
            with open(a.json) as f:
                old = json.load(f)
        with open(a.json, "w") as f:
            json.dump(old + [rec], f, indent=1)
    if a.md and a.mode == "both":
        p, f_ = rec["ms_per_iter"]["pinned"], rec["ms_per_iter"]["free"]
        with open(a.md, "a") as f:
            f.write(f"| {rows}x{cols} | {a.rank} | {a.threads} | {p['median']:.1f} "
                    f"({p['min']:.1f}-{p['max']:.1f}) | {f_['median']:.1f} "
                    f"({f_['min']:.1f}-{f_['max']:.1f}) | "
                    f"{rec['slowdown_pinned_over_free']:.2f} | "
                    f"{'yes' if rec['pinned_identical_across_threads'] else 'NO'} | "
                    f"{'yes' if rec['free_identical_across_threads'] else 'no'} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
