"""An unmodified ``transformers.Trainer`` on an LQ-LoRA model, launched by torchrun on CPU
processes (tests/test_fsdp_trainer.py runs it):

    python -m torch.distributed.run --nproc-per-node 2 tests/fsdp_trainer_run.py MODEL_DIR OUT

Four Trainer runs of 3 steps in turn (one launch: process start-up dominates on CPU):
``ddp`` (the reference: no FSDP, Q replicated); ``fsdp2``: accelerate's FSDP2
configuration (``fsdp_config={"fsdp_version": 2, ...}``, sharded state dicts, a Trainer
checkpoint every 2 steps); the same resumed from its step-2 checkpoint; ``fsdp2-bf16``: bf16
mixed precision with ``cpu_ram_efficient_loading`` (the model goes through the meta device
and is re-loaded from rank 0), exported with ``lqlora_ext.distributed.fsdp.save_pretrained``
to OUT/final. Rank 0 writes OUT/result.json.

accelerate (1.15) enables FSDP only on accelerator devices: on a CPU world it silently
falls back to DDP. ``_cpu_fsdp`` applies accelerate's own FSDP branch of
``AcceleratorState.__init__`` to the CPU world, so that its FSDP2 code path
(``fsdp2_prepare_model``: auto wrap per decoder layer, fp32 upcast of trainable
parameters, sharded checkpoints) runs here exactly as it does on GPUs.
"""
from __future__ import annotations

import json
import os
import sys

import torch


def _cpu_fsdp() -> None:
    from accelerate import state as st
    from accelerate.utils import DistributedType

    init = st.AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    st.AcceleratorState.__init__ = patched


class Sequences(torch.utils.data.Dataset):
    def __init__(self, n=12, seq=16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 128, (n, seq), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def trainer(model_dir, out, mode, max_steps):
    import transformers

    import lqlora_ext  # noqa: F401  (registers quant_method "lqlora")

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    kw = {}
    if mode.startswith("fsdp2"):
        kw = dict(fsdp=True, fsdp_config={
            "fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"})
    if mode == "fsdp2-bf16":  # mixed precision, and the model loaded through the meta device
        kw["bf16"] = True
        kw["fsdp_config"]["cpu_ram_efficient_loading"] = True
    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=2, max_steps=max_steps,
        learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="steps",
        save_steps=2, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True, **kw)
    return transformers.Trainer(model=model, args=args, train_dataset=Sequences())


def _run(model_dir, out, mode, resume=None):
    from lqlora_ext.distributed import fsdp as lqf

    tr = trainer(model_dir, out, mode, 3)
    tr.train(resume_from_checkpoint=resume)
    losses = {h["step"]: h["loss"] for h in tr.state.log_history if "loss" in h}
    return tr, {"losses": [losses[k] for k in sorted(losses)],
                "model_class": type(tr.model).__name__, "bytes": lqf.local_bytes(tr.model)}


def main(model_dir, out):
    torch.set_num_threads(1)
    _cpu_fsdp()
    from lqlora_ext.distributed import fsdp as lqf

    res = {}
    _, res["ddp"] = _run(model_dir, os.path.join(out, "ddp"), "ddp")
    _, res["fsdp2"] = _run(model_dir, os.path.join(out, "fsdp2"), "fsdp2")
    _, res["resumed"] = _run(model_dir, os.path.join(out, "fsdp2"), "fsdp2",
                             resume=os.path.join(out, "fsdp2", "checkpoint-2"))
    tr, res["fsdp2_bf16"] = _run(model_dir, os.path.join(out, "bf16"), "fsdp2-bf16")
    lqf.save_pretrained(tr.model, os.path.join(out, "final"))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(res, f)
    # Neither the Trainer nor accelerate destroys the process group, so this script does, as
    # every torchrun script should: left to the interpreter's teardown, gloo's worker threads
    # can still hold tensors, and one that needs the GIL after finalization began aborts the
    # rank (pytorch/pytorch#190489).
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
