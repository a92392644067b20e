"""CPU time of one cost-profile task, (matrix, config), on a LLaMA-2-7B-shaped matrix, and
the whole 7B paper-grid profile extrapolated from it: the CPU side of the GPU target
"7B paper-grid profile <= 1 h on one H100/H200" (bench/bench_cuda.py measures the GPU).

Times ``decompose`` exactly as the profiler calls it (rank 64, profile tolerance 1e-3, up
to 100 iterations, seeded) on a 4096x4096 bf16 matrix with N(0, 0.02) entries (random:
flat spectrum, the slow case; real weights converge in fewer iterations), for ``--configs``
configs spread evenly over ``config_grid("paper")``. Extrapolation: mean seconds per task x
432 configs x the 7B's 224 matrices weighted by size (128 of 4096x4096, 96 of 11008x4096,
2.69x the elements each).

    python bench/profile_7b_cpu.py --configs 3 --threads 2 --out bench/results/profile_7b_cpu
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stream_memory import environment  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--out", default="bench/results/profile_7b_cpu")
    args = p.parse_args()
    import torch

    from lqlora_ext import decompose
    from lqlora_ext.method.allocation import config_grid

    torch.set_num_threads(args.threads)
    grid = config_grid("paper")
    picks = [grid[round(i * (len(grid) - 1) / max(args.configs - 1, 1))]
             for i in range(args.configs)]
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(4096, 4096, generator=g) * 0.02).to(torch.bfloat16).float()
    rows = []
    for c in picks:
        t = time.perf_counter()
        d = decompose(w, c, args.rank, seed=0, max_iters=100, tol=1e-3)
        s = time.perf_counter() - t
        rows.append({"config": c.name, "seconds": s, "iters": d.iters})
        print(json.dumps(rows[-1]), flush=True)
    mean = sum(r["seconds"] for r in rows) / len(rows)
    units = 128 + 96 * (11008 / 4096)  # 7B matrices in 4096x4096 equivalents
    total_h = mean * len(grid) * units / 3600
    res = {**environment(), "command": "python " + " ".join(sys.argv), "threads": args.threads,
           "rank": args.rank, "tasks": rows, "mean_seconds_per_task_4096": mean,
           "paper_grid_configs": len(grid), "extrapolated_7b_paper_grid_hours": total_h}
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# One cost-profile task on a LLaMA-2-7B-shaped matrix, CPU ({res['date']}, "
             f"{res['device']}, {args.threads} threads, torch {res['torch']})", "",
             f"`{res['command']}`", "", "| config | s | iterations |", "|---|---|---|"]
    lines += [f"| {r['config']} | {r['seconds']:.1f} | {r['iters']} |" for r in rows]
    lines += ["", f"Mean {mean:.1f} s per (4096x4096, config) task; the 7B paper-grid profile "
                  f"({len(grid)} configs x 224 matrices, {units:.0f} 4096x4096 equivalents) "
                  f"extrapolates to {total_h:.0f} h on this CPU. The target (<= 1 h) is for "
                  f"one H100/H200 (bench/bench_cuda.py, profiling section) and has not been "
                  f"measured: no GPU was available."]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
