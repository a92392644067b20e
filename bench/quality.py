"""Perplexity versus total bits/param on SmolLM2-135M (held-out stdlib docstrings).

Runs, all rank 16 unless noted: dense; uniform NF4 / NF3 without low-rank (QLoRA-style
initialization, rank 0); uniform LQ NF3 / NF4; LQ-LoRA with the ILP at budgets 2.5 ... 4.0,
without and with Fisher weighting. Each run's result is appended to a JSON-lines file, so an
interrupted benchmark resumes; profiles are cached by lqlora_ext's cost cache.

    python bench/quality.py [--out bench/results/quality] [--calib-seqs 32] [--eval-seqs 32]

Writes OUT.jsonl, OUT.md (table + the two acceptance bars) and OUT.png (plot).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

import torch

import lqlora_ext as lq
from lqlora_ext.cli.commands import default_model_path, load_dense
from lqlora_ext.cli.data import perplexity, stdlib_texts, token_batches

BUDGETS = (2.5, 2.75, 3.0, 3.25, 3.5, 4.0)


def runs(rank):
    """All runs, the two acceptance bars' runs first (a partial benchmark still decides)."""
    nf4, nf3 = lq.QuantConfig(4), lq.QuantConfig(3)
    yield "dense", None
    yield "uniform NF4 (no low-rank)", dict(budget_bits=9, rank=0, grid=[nf4])
    yield "uniform LQ NF3", dict(budget_bits=9, rank=rank, grid=[nf3])
    yield "LQ-LoRA ILP 3.25", dict(budget_bits=3.25, rank=rank)
    yield "LQ-LoRA ILP + Fisher 3.25", dict(budget_bits=3.25, rank=rank, fisher=True)
    yield "uniform NF3 (no low-rank)", dict(budget_bits=9, rank=0, grid=[nf3])
    yield "uniform LQ NF4", dict(budget_bits=9, rank=rank, grid=[nf4])
    for fisher in (True, False):
        for b in BUDGETS:
            if b != 3.25:
                yield f"LQ-LoRA ILP{' + Fisher' if fisher else ''} {b:g}", dict(
                    budget_bits=b, rank=rank, fisher=fisher)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/quality")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--eval-seqs", type=int, default=32)
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/lqlora/profiles"))
    args = ap.parse_args()

    base, tok = load_dense(default_model_path())
    calib_text, held_text = stdlib_texts()
    held = token_batches(tok, held_text, args.seq_len, args.eval_seqs)
    calib = token_batches(tok, calib_text, args.seq_len, args.calib_seqs)
    done = {}
    if os.path.exists(args.out + ".jsonl"):
        with open(args.out + ".jsonl") as f:
            for line in f:
                r = json.loads(line)
                done[r["run"]] = r
    dense_numel = sum(m.weight.numel() for m in lq.select_linear_modules(base, "all-linear").values())
    for name, kw in runs(args.rank):
        if name in done:
            continue
        t = time.time()
        model = copy.deepcopy(base)
        if kw is None:
            bits, bits_lr, report = 16.0, 16.0, None
        else:
            cfg = lq.LQLoRAConfig(cache_dir=args.cache_dir, progress=False, **kw)
            report = lq.quantize_model(model, cfg, calibration=calib if cfg.fisher else None)
            bits, bits_lr = report.bits_per_param, report.bits_per_param_with_lowrank
        ppl = perplexity(model, held)
        r = {"run": name, "bits_per_param": bits, "bits_per_param_with_lowrank": bits_lr,
             "perplexity": ppl, "seconds": time.time() - t,
             "configs": None if report is None else report.config_counts()}
        print(json.dumps(r), flush=True)
        done[name] = r
        with open(args.out + ".jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
    write_report(args, done, dense_numel)


def write_report(args, done, numel):
    rows = list(done.values())
    lines = [f"# Quality: SmolLM2-135M-Instruct, held-out perplexity vs bits/param",
             "", f"date {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
             f"{platform.machine()} CPU, rank {args.rank}, {args.eval_seqs} held-out and "
             f"{args.calib_seqs} calibration sequences of {args.seq_len} tokens (stdlib "
             f"docstrings), {numel} quantized parameters", "",
             "command: `python bench/quality.py`", "",
             "| run | bits/param (quantized) | bits/param incl. low-rank | perplexity |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['bits_per_param']:.3f} | "
                     f"{r['bits_per_param_with_lowrank']:.3f} | {r['perplexity']:.3f} |")
    g = {r["run"]: r["perplexity"] for r in rows}
    bar1 = ("LQ-LoRA ILP + Fisher 3.25", "uniform NF4 (no low-rank)")
    bar2 = ("LQ-LoRA ILP 3.25", "uniform LQ NF3")
    lines.append("")
    lines.append("Uniform runs use one config for every matrix (no ILP); 'no low-rank' is "
                 "QLoRA-style (rank 0). Bits incl. low-rank count the rank-16 factors at 16 "
                 "bits.")
    lines.append("")
    for a, b in (bar1, bar2):
        if a in g and b in g:
            ok = g[a] <= g[b]
            lines.append(f"- bar: {a} ({g[a]:.3f}) <= {b} ({g[b]:.3f}): "
                         f"{'met' if ok else 'NOT met'}")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, key in (("LQ-LoRA ILP", "LQ-LoRA ILP "), ("LQ-LoRA ILP + Fisher", "LQ-LoRA ILP + Fisher ")):
        pts = sorted((r["bits_per_param_with_lowrank"], r["perplexity"]) for r in rows
                     if r["run"].startswith(key) and r["run"][len(key):].replace(".", "").isdigit())
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    for r in rows:
        if r["run"] == "dense":  # 16 bits/param would squash the interesting range
            ax.axhline(r["perplexity"], color="gray", ls="--", lw=1)
            ax.text(0.01, r["perplexity"] * 1.03, f"dense (16 bits): {r['perplexity']:.1f}",
                    fontsize=7, color="gray", transform=ax.get_yaxis_transform())
        elif r["run"].startswith("uniform"):
            x = r["bits_per_param_with_lowrank"]
            ax.scatter([x], [r["perplexity"]], marker="s")
            ax.annotate(r["run"], (x, r["perplexity"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("bits/param incl. rank-16 low-rank (16-bit)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("SmolLM2-135M: LQ-LoRA vs uniform quantization")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)


if __name__ == "__main__":
    main()
