"""Decomposition speed/quality on real weights: our decompose() vs the reference loop.

Reference loop (METHOD.md §2): Q <- 0; repeat up to 100 times: rank-r torch.svd_lowrank
(q = r + 10, niter = 2) of W - Q; Q <- dequant(quant(W - L1 L2)); stop when the error
rises (we report its best iterate, which favours the reference). Ours: lqlora_ext.decompose
with default settings (warm-started seeded rSVD, relative tolerance 1e-3).

    OMP_NUM_THREADS=1 python bench/decompose.py [--model PATH] [--rank 16] [--out bench/results/decompose.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import lqlora_ext as lq


def reference_loop(w, cfg, rank, max_iters=100):
    Q = torch.zeros_like(w)
    best, hist = float("inf"), []
    for _ in range(max_iters):
        u, s, v = torch.svd_lowrank(w - Q, q=rank + 10, niter=2)
        LR = (u[:, :rank] * s[:rank]) @ v[:, :rank].t()
        Q = lq.quantize(w - LR, cfg).dequantize()
        e = float((w - Q - LR).square().sum())
        hist.append(e)
        if e > best:
            break
        best = e
    return best, len(hist)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from lqlora_ext.cli.commands import default_model_path, load_dense

    torch.manual_seed(0)
    model, _ = load_dense(args.model or default_model_path())
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
             "model.layers.15.mlp.gate_proj", "model.layers.15.mlp.down_proj",
             "model.layers.29.self_attn.o_proj", "model.layers.29.mlp.up_proj"]
    cfgs = [lq.QuantConfig(2), lq.QuantConfig(3), lq.QuantConfig(4)]
    rows, t_ref, t_ours = [], 0.0, 0.0
    for n in names:
        w = model.get_submodule(n).weight.detach().float()
        for c in cfgs:
            t = time.perf_counter()
            e_ref, it_ref = reference_loop(w, c, args.rank)
            dt_ref = time.perf_counter() - t
            t = time.perf_counter()
            d = lq.decompose(w, c, args.rank)
            dt = time.perf_counter() - t
            t_ref += dt_ref
            t_ours += dt
            rows.append({"matrix": n, "shape": list(w.shape), "config": c.name,
                         "ref_error": e_ref, "ref_iters": it_ref, "ref_s": dt_ref,
                         "ours_error": d.error, "ours_iters": d.iters, "ours_s": dt,
                         "error_ratio": d.error / e_ref})
            r = rows[-1]
            print(f"{n:36s} {c.name:22s} ref {e_ref:.4e} ({it_ref:3d} it, {dt_ref:6.3f}s)  "
                  f"ours {d.error:.4e} ({d.iters:3d} it, {dt:6.3f}s)  ratio {r['error_ratio']:.4f}",
                  flush=True)
    worst = max(r["error_ratio"] for r in rows)
    print(f"\ntotal: reference {t_ref:.2f}s, ours {t_ours:.2f}s, speed-up {t_ref / t_ours:.2f}x; "
          f"worst error ratio ours/ref {worst:.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                       "cpu": platform.processor() or platform.machine(),
                       "threads": torch.get_num_threads(), "rank": args.rank,
                       "speedup": t_ref / t_ours, "worst_error_ratio": worst, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
