"""``lqlora fisher``: the diagonal Fisher of a checkpoint's targeted weights, estimated on
calibration text and written to a Fisher directory (:mod:`lqlora_ext.io.fisher_store`) for
``lqlora quantize --fisher-dir``. The model runs in bf16 by default; the accumulators are
fp32 and exist for the targeted weights only."""
from __future__ import annotations

import os
import time


def cmd_fisher(args) -> int:
    import torch

    from ..io.fisher_store import save_fisher
    from ..io.stream_quantize import checkpoint_key
    from ..io.streaming import CheckpointDir, CheckpointError
    from ..method.fisher import estimate_fisher
    from ..method.targets import select_linear_modules
    from . import validate as V
    from .commands import _texts
    from .data import token_batches

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    t0 = time.time()
    try:
        src = CheckpointDir(args.model)
    except CheckpointError as e:
        raise SystemExit(f"lqlora fisher: {e}") from None
    V.out_dir(args.out, args.overwrite, protect=[args.model])  # before the model loads
    calib_text = V.text_file(args.calibration, "--calibration")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32,
             "float16": torch.float16}[args.dtype]
    print(f"loading {args.model} ({args.dtype})", flush=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    text = _texts(calib_text)[0]
    batches = token_batches(tok, text, args.seq_len, args.calib_seqs)
    targets = select_linear_modules(model, "all-linear")
    fishers = estimate_fisher(model, batches, target_modules=list(targets))
    prefix = getattr(model, "base_model_prefix", "") or ""
    by_key = {}
    for name, f in fishers.items():
        key = checkpoint_key(src, name + ".weight", prefix)
        if key is None:
            raise SystemExit(f"lqlora fisher: {args.model} has no tensor for {name}.weight")
        by_key[key] = f
    del model
    save_fisher(by_key, args.out, src, overwrite=args.overwrite, info={
        "sequences": sum(b.shape[0] for b in batches), "seq_len": args.seq_len,
        "model_dtype": args.dtype, "calibration": args.calibration or "stdlib docstrings",
        "target_modules": "all-linear"})
    print(f"Fisher of {len(by_key)} matrices ({sum(b.shape[0] for b in batches)} sequences x "
          f"{args.seq_len} tokens) saved to {args.out}  ({time.time() - t0:.0f} s)")
    return 0
