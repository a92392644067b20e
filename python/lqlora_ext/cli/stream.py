"""``lqlora quantize`` in streaming mode: a checkpoint directory quantized tensor by tensor
(:func:`lqlora_ext.io.stream_quantize.quantize_checkpoint`), resumably, on one process or
on every rank of a ``torchrun`` launch; optionally the quantized model's held-out
perplexity afterwards (the dense model is never loaded)."""
from __future__ import annotations

import os
import time


def parse_size(text: str) -> int:
    """``"2GB"``, ``"500MiB"``, ``"1e9"`` -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    try:
        n = int(float(num) * units[s[len(num):]])
    except (KeyError, ValueError):
        raise SystemExit(f"lqlora: cannot read size {text!r} (e.g. 2GB, 500MiB)") from None
    if n <= 0:
        raise SystemExit(f"lqlora: size {text!r} must be positive")
    return n


def cmd_quantize_stream(args) -> int:
    import torch

    from ..distributed.env import RendezvousError, init
    from ..io.stream_quantize import quantize_checkpoint
    from ..io.streaming import CheckpointError
    from ..nn.model import LQLoRAConfig

    if args.model is None or not os.path.isdir(args.model):
        raise SystemExit(f"lqlora quantize: streaming mode needs --model DIR, a Hugging Face "
                         f"checkpoint directory (got {args.model!r})")
    fisher = bool(args.fisher_dir) or args.fisher
    if fisher and not args.fisher_dir:
        raise SystemExit("lqlora quantize: streaming mode with Fisher weighting needs "
                         "--fisher-dir DIR (make it with `lqlora fisher --model MODEL --out "
                         "DIR`), or pass --no-fisher")
    try:
        world = init(args.device, connect_timeout=args.dist_timeout)
    except RendezvousError as e:
        raise SystemExit(str(e)) from None
    log = (lambda s: print(s, flush=True)) if world.is_main else (lambda s: None)
    try:
        torch.manual_seed(args.seed)
        if world.distributed:
            log(f"torchrun: {world.world_size} processes ({world.backend}), "
                f"{torch.get_num_threads()} torch thread(s) each")
        from .commands import default_out
        out = args.out or default_out(args.model, args.budget, args.rank, fisher)
        cfg = LQLoRAConfig(budget_bits=args.budget, rank=args.rank, fisher=fisher,
                           grid=args.grid, seed=args.seed, cache_dir=args.cache_dir,
                           max_iters=args.max_iters)
        t0 = time.time()
        try:
            summary = quantize_checkpoint(args.model, out, cfg, fisher_dir=args.fisher_dir,
                                          device=args.device, world=world,
                                          max_shard_bytes=parse_size(args.max_shard_size),
                                          log=log, overwrite=args.overwrite)
        except (CheckpointError, ValueError) as e:
            raise SystemExit(f"lqlora quantize: {e}") from None
        if world.is_main and args.eval:
            _evaluate(out, args, summary)
        log(f"\nmodel weights: {summary['weights_mib_before']:.1f} MiB -> "
            f"{summary['weights_mib_after']:.1f} MiB; LQ-LoRA {summary['bits_per_param']:.3f} "
            f"bits/param, {summary['bits_per_param_with_lowrank']:.3f} with low-rank")
        log(f"saved to {out}  ({time.time() - t0:.0f} s)")
        world.barrier()
    finally:
        world.close()
    return 0


def _evaluate(out: str, args, summary: dict) -> None:
    from ..io.streaming import atomic_write_json
    from .commands import _texts, load_lq
    from .data import perplexity, token_batches

    try:
        model, tok = load_lq(out)
    except (OSError, ValueError) as e:
        raise SystemExit(f"lqlora quantize: cannot evaluate {out} ({e}); the checkpoint is "
                         f"saved; pass --no-eval to skip evaluation") from None
    held = token_batches(tok, _texts(None)[1], args.seq_len, args.eval_seqs)
    ppl = perplexity(model, held)
    print(f"held-out perplexity (quantized): {ppl:.3f}  [{len(held)} x {args.seq_len} tokens]",
          flush=True)
    summary["perplexity_after"] = ppl
    atomic_write_json(os.path.join(out, "report.json"), summary, indent=1)


def wants_streaming(args) -> bool:
    """Streaming unless told otherwise when: under torchrun, a Fisher directory is given,
    or evaluation is off (the in-memory path exists to measure the dense model too)."""
    from ..distributed.env import in_torchrun

    if args.stream is False:
        if in_torchrun():
            raise SystemExit("lqlora quantize: --no-stream (the in-memory path) runs in one "
                             "process; under torchrun every rank would do the whole job")
        if args.fisher_dir:
            raise SystemExit("lqlora quantize: --fisher-dir is read by the streaming path; "
                             "drop --no-stream (the in-memory path estimates the Fisher "
                             "itself from --calibration)")
        return False
    return bool(args.stream) or in_torchrun() or bool(args.fisher_dir) or not args.eval
