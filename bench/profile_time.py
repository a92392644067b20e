"""Wall time of the whole cost profile of SmolLM2-135M (210 matrices x default grid, rank 16)
from a cold cache, plus the resume time from a warm one.

    python bench/profile_time.py [--out bench/results/profile_time.json]
    python bench/profile_time.py --matrices 35 --save-costs costs.pt   # a subset; the costs

``--save-costs`` writes the cost matrix, so that two builds can be checked for identical
costs (the profiler's grouping of configs must not change a CPU cost).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch

import lqlora_ext as lq
from lqlora_ext.cli.commands import default_model_path, load_dense


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--grid", default="default")
    ap.add_argument("--out", default=None)
    ap.add_argument("--matrices", type=int, default=None, help="profile the first N only")
    ap.add_argument("--save-costs", default=None)
    ap.add_argument("--no-resume", action="store_true", help="skip the warm-cache rerun")
    args = ap.parse_args()
    model, _ = load_dense(default_model_path())
    targets = lq.select_linear_modules(model, "all-linear")
    weights = {n: m.weight.detach() for n, m in targets.items()}
    if args.matrices is not None:
        weights = dict(list(weights.items())[:args.matrices])
    grid = lq.config_grid(args.grid)
    with tempfile.TemporaryDirectory() as cache:
        t = time.time()
        costs = lq.profile_costs(weights, grid, args.rank, cache_dir=cache, progress=True)
        cold = time.time() - t
        warm = None
        if not args.no_resume:
            t = time.time()
            again = lq.profile_costs(weights, grid, args.rank, cache_dir=cache, progress=False)
            warm = time.time() - t
            assert torch.equal(costs, again)
    if args.save_costs:
        torch.save(costs, args.save_costs)
    r = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
         "machine": f"{platform.machine()}, {os.cpu_count()} cores", "matrices": len(weights),
         "configs": len(grid), "rank": args.rank, "cold_seconds": cold,
         "resume_seconds": warm}
    print(json.dumps(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
