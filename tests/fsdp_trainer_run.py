"""An unmodified ``transformers.Trainer`` on an LQ-LoRA model, launched by torchrun on CPU
processes (tests/test_fsdp_trainer.py runs it):

    python -m torch.distributed.run --nproc-per-node 2 tests/fsdp_trainer_run.py \\
        MODEL_DIR OUT_DIR {fsdp2,ddp}

``fsdp2``: accelerate's FSDP2 configuration (``fsdp_config={"fsdp_version": 2, ...}``,
sharded state dicts), a Trainer checkpoint after step 2 and a second Trainer that resumes
from it; the HF export goes through ``lqlora_ext.distributed.fsdp.save_pretrained``.
``ddp``: the same run without FSDP (the reference). Rank 0 writes OUT_DIR/result.json.

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
    if mode == "fsdp2":
        kw = dict(fsdp=True, fsdp_config={
            "fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"})
    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=2, max_steps=max_steps,
        learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="steps",
        save_steps=2, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True, **kw)
    return transformers.Trainer(model=model, args=args, train_dataset=Sequences())


def main(model_dir, out, mode):
    torch.set_num_threads(1)
    if mode == "fsdp2":
        _cpu_fsdp()
    from lqlora_ext.distributed import fsdp as lqf

    rank = int(os.environ.get("RANK", "0"))
    tr = trainer(model_dir, out, mode, 3)
    tr.train()
    res = {"losses": [h["loss"] for h in tr.state.log_history if "loss" in h],
           "model_class": type(tr.model).__name__, "bytes": lqf.local_bytes(tr.model)}
    if mode == "fsdp2":
        lqf.save_pretrained(tr.model, os.path.join(out, "final"))
        again = trainer(model_dir, out, mode, 3)
        again.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
        res["resumed_losses"] = [h["loss"] for h in again.state.log_history if "loss" in h]
    if rank == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
