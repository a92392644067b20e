"""CPU speed of lqlora::rsvd, of its Gaussian sketch and of the decomposition built on it,
in process.

One rsvd of a random [m, n] fp32 matrix (rank, oversample 10, niter 2, a fresh seed per
repeat), the sketch alone (lqlora::rsvd_sketch, [n, rank + 10]) next to torch.randn of the
same size (the generator the sketch replaced), and a Fisher-weighted decompose of a random
[m, n] weight (NF3, 6 iterations, tol 0, its default one thread); medians of interleaved
repeats after a warm-up, torch's thread setting.

    python bench/rsvd_cpu.py [--m 4096 --n 4096 --rank 64 --repeat 7] [--out bench/results/rsvd_cpu.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

import lqlora_ext
from lqlora_ext import ops


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "rsvd_cpu.json"))
    args = ap.parse_args()
    k = args.rank + 10
    a = torch.randn(args.m, args.n, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator()
    w = 0.02 * a
    fisher = torch.rand(args.m, args.n, generator=torch.Generator().manual_seed(1))
    cases = {
        "decompose (NF3, Fisher, 6 iterations)": lambda i: lqlora_ext.decompose(
            w, lqlora_ext.QuantConfig(3), args.rank, fisher=fisher, max_iters=6, tol=0, seed=i),
        "rsvd": lambda i: ops.rsvd(a, args.rank, 10, 2, i, None),
        "rsvd_sketch": lambda i: ops.rsvd_sketch(a, k, i),
        "torch.randn (same size)": lambda i: torch.randn(args.n, k, generator=gen.manual_seed(i)),
    }
    times = {name: [] for name in cases}
    for name, fn in cases.items():  # warm-up
        fn(0)
    for i in range(args.repeat):
        for name, fn in cases.items():
            times[name].append(_time(lambda: fn(i + 1)))
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python bench/rsvd_cpu.py " + " ".join(
               f"--{k2} {v}" for k2, v in vars(args).items() if k2 != "out"),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
           "threads": torch.get_num_threads(), "lqlora_ext": lqlora_ext.__version__,
           "shape": [args.m, args.n], "rank": args.rank, "k": k,
           "median_ms": {name: 1e3 * statistics.median(v) for name, v in times.items()},
           "min_ms": {name: 1e3 * min(v) for name, v in times.items()}}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    for name in cases:
        print(f"{name:38s} median {doc['median_ms'][name]:9.2f} ms  min {doc['min_ms'][name]:9.2f} ms")


if __name__ == "__main__":
    main()
