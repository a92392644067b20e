"""Per-rank memory of FSDP2-sharded LQ-LoRA finetuning: 1 rank vs N ranks.

A LLaMA-2-7B-shaped model of a few layers (built from a config with seeded random weights,
nothing downloaded) is quantized once (``--prepare``, cached in ``--work``) and written as a
``torch.distributed.checkpoint`` (lqlora_ext.distributed.fsdp.save_sharded, one process).
Then, for each world size in ``--ranks``, torchrun starts that many processes; each builds
the model on the meta device with LQLinear skeletons, shards it with
``lqlora_ext.distributed.fsdp.shard_model`` (FSDP2: one unit per decoder layer, the
embedding and the LM head units of their own), allocates
only its own shards (``to_empty``) and loads them from the checkpoint (``load_sharded``:
the 1-process checkpoint is resharded on load), so no rank ever holds the whole model.
One rank is the unsharded baseline: the same model and loading path without FSDP.
Each rank reports:

- its tensor bytes (exact accounting, ``local_bytes``): LQ packed tensors (codes, scale
  codes, second-level scales, offsets), other frozen tensors (embeddings, LM head, norms),
  trainable adapters;
- its resident set (RSS) after loading and its peak while training ``--steps`` AdamW steps
  on a fixed per-rank micro-batch (``--batch-size`` x ``--seq-len`` random tokens), sampled
  every 2 ms; the median step time.

    python bench/fsdp_memory.py --prepare [--model config:llama2-7b:2] [--ranks 1,2] \\
        [--rank 64] [--bits 4] [--batch-size 1] [--seq-len 256] [--steps 3] \\
        [--work /tmp/lqlora-bench-fsdp] [--out bench/results/fsdp_memory_7b2l_cpu]

The quantization is uniform (``--bits``, block 64, 8-bit scales in blocks of 256, fp32
second level; ``--max-iters`` decomposition iterations, default 3: the decomposition's
accuracy does not change memory). CPU only: every rank runs one torch thread over gloo.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from finetune_memory import CONFIG_MODELS, RSSSampler  # noqa: E402


def _config(args):
    import transformers

    name, _, layers = args.model[len("config:"):].partition(":")
    if not args.model.startswith("config:") or name not in CONFIG_MODELS:
        raise SystemExit(f"--model {args.model}: expected config:NAME[:LAYERS], NAME one of "
                         f"{sorted(CONFIG_MODELS)}")
    return transformers.LlamaConfig(**CONFIG_MODELS[name], num_hidden_layers=int(layers or 2),
                                    max_position_embeddings=max(4096, args.seq_len),
                                    tie_word_embeddings=False)


def _ckpt(args):
    return os.path.join(args.work, args.model.replace(":", "_") + f"-nf{args.bits}-r{args.rank}")


def prepare(args):
    """Quantize the model once and write it as a DCP checkpoint plus its config."""
    import torch
    import transformers

    import lqlora_ext as lq
    from lqlora_ext.distributed import fsdp as lqf

    d = _ckpt(args)
    if os.path.isfile(os.path.join(d, lqf.MANIFEST)):
        return
    torch.manual_seed(1234)
    cfg = _config(args)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    t0 = time.perf_counter()
    rep = lq.quantize_model(model, lq.LQLoRAConfig(
        budget_bits=99, rank=args.rank, grid=[lq.QuantConfig(args.bits)],
        max_iters=args.max_iters))
    print(f"quantized in {time.perf_counter() - t0:.0f} s, "
          f"{rep.bits_per_param:.3f} bits/param", flush=True)
    lqf.save_sharded(d, model)
    cfg.to_json_file(os.path.join(d, "model_config.json"))


def _build(args, cfg, modules):
    """The model on the meta device with LQLinear skeletons, frozen like after quantize."""
    import torch
    import transformers

    from lqlora_ext.integrations.hf import install_skeletons
    from lqlora_ext.nn.linear import freeze_base

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    install_skeletons(model, modules)
    freeze_base(model)
    return model


def worker(args):
    import torch
    import torch.distributed as dist
    import transformers

    from lqlora_ext.distributed import fsdp as lqf

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    d = _ckpt(args)
    cfg = transformers.LlamaConfig.from_json_file(os.path.join(d, "model_config.json"))
    modules = lqf.read_manifest(d)["modules"]
    sampler = RSSSampler()
    rss_start = sampler.rss()
    with RSSSampler() as load_peak:
        model = _build(args, cfg, modules)
        if world > 1:  # one rank is the unsharded baseline (FSDP would add a gathered copy)
            lqf.shard_model(model)
        model.to_empty(device="cpu")
        # Non-persistent buffers are not in any checkpoint: recompute the rotary table.
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
        lqf.load_sharded(d, model)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    model.train()
    nbytes = lqf.local_bytes(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=g)
               for _ in range(args.steps)]
    times = []
    with RSSSampler() as s:
        rss_loaded = s.peak
        for b in batches:
            t0 = time.perf_counter()
            model(input_ids=b, labels=b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    res = {"rank": rank, "world": world, "bytes": nbytes,
           "rss_start_mib": rss_start / 2**20, "rss_load_peak_mib": load_peak.peak / 2**20,
           "rss_loaded_mib": rss_loaded / 2**20, "rss_peak_train_mib": s.peak / 2**20,
           "median_step_s": statistics.median(times[1:] or times), "step_s": times}
    out = [None] * world
    dist.all_gather_object(out, res)
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()


def _launch(args, world):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           "--master-addr", "127.0.0.1", "--master-port", str(29700 + world), __file__,
           "--worker"] + [a for a in sys.argv[1:] if a != "--prepare"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        raise SystemExit(f"world size {world} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(line[-1][7:])


def _mib(b):
    return b / 2**20


def report(args, runs, meta):
    lines = [f"# FSDP2 per-rank memory ({meta['date']}, {meta['device']}, {meta['cores']} cores, "
             f"torch {meta['torch']})", "", f"`{meta['command']}`", "",
             f"Model {args.model} (float tensors fp32), LQ-LoRA uniform NF{args.bits} "
             f"(block 64, 8-bit scales x 256, fp32 second level), LoRA rank {args.rank}, "
             f"per-rank micro-batch {args.batch_size} x {args.seq_len} tokens, AdamW, "
             f"median of steps 2..{args.steps}; gloo, 1 thread per rank.", "",
             "| ranks | rank | LQ packed MiB | other frozen MiB | trainable MiB | "
             "RSS after load MiB | peak RSS while loading MiB | peak RSS in training MiB | "
             "median step s |", "|---|---|---|---|---|---|---|---|---|"]
    for world, res in runs.items():
        for r in res:
            b = r["bytes"]
            lines.append(f"| {world} | {r['rank']} | {_mib(b['packed']):.1f} | "
                         f"{_mib(b['frozen']):.1f} | {_mib(b['trainable']):.1f} | "
                         f"{r['rss_loaded_mib']:.0f} | {r['rss_load_peak_mib']:.0f} | "
                         f"{r['rss_peak_train_mib']:.0f} | {r['median_step_s']:.2f} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="config:llama2-7b:2")
    ap.add_argument("--ranks", default="1,2", help="world sizes to measure, e.g. 1,2")
    ap.add_argument("--rank", type=int, default=64, help="LoRA rank")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--max-iters", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--work", default="/tmp/lqlora-bench-fsdp")
    ap.add_argument("--out", default="bench/results/fsdp_memory_7b2l_cpu")
    ap.add_argument("--prepare", action="store_true", help="quantize first if not cached")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    os.makedirs(args.work, exist_ok=True)
    if args.prepare_only:
        return prepare(args)
    if args.prepare:  # in its own process, so that the dense model's memory is returned
        rest = [a for a in sys.argv[1:] if a != "--prepare"]
        if subprocess.run([sys.executable, __file__, "--prepare-only"] + rest).returncode:
            raise SystemExit("prepare failed")
    runs = {}
    for world in (int(w) for w in args.ranks.split(",")):
        runs[world] = _launch(args, world)
        print(json.dumps([{k: v for k, v in r.items() if k != "step_s"} for r in runs[world]]),
              flush=True)
    import torch
    meta = {"date": time.strftime("%Y-%m-%d"), "device": "cpu",
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "transformers": __import__("transformers").__version__,
            "lqlora_ext": __import__("lqlora_ext").__version__,
            "command": " ".join(["python", "bench/fsdp_memory.py"] + sys.argv[1:]),
            "model": args.model, "bits": args.bits, "lora_rank": args.rank,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps}
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "runs": {str(k): v for k, v in runs.items()}}, f, indent=1)
    lines = report(args, runs, meta)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
