"""A plain causal-LM finetuning loop for LQ-LoRA models (what ``lqlora finetune`` runs).

Only parameters with ``requires_grad`` train (after :func:`~lqlora_ext.quantize_model`:
the adapters). The loop is deliberately ordinary (AdamW, linear warm-up then cosine decay,
optional autocast and activation checkpointing) so that its numbers describe the layers,
not the loop; any other loop (HF Trainer, PEFT) works on the same model.
"""
from __future__ import annotations

import dataclasses
import math
import resource
import statistics
import time
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn


@dataclasses.dataclass
class FinetuneResult:
    """losses: per optimizer step; step_seconds: wall time per step (median reported);
    peak_memory_bytes: CUDA max allocated on a GPU, else the process's peak RSS."""

    losses: List[float]
    step_seconds: List[float]
    peak_memory_bytes: int
    peak_memory_kind: str
    trainable_params: int

    @property
    def median_step_seconds(self) -> float:
        return statistics.median(self.step_seconds) if self.step_seconds else float("nan")

    def to_dict(self) -> dict:
        return {"losses": self.losses, "median_step_seconds": self.median_step_seconds,
                "peak_memory_bytes": self.peak_memory_bytes,
                "peak_memory_kind": self.peak_memory_kind,
                "trainable_params": self.trainable_params}


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _lr_lambda(steps: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def finetune(model: nn.Module, sequences: Tensor, steps: int = 60, batch_size: int = 4,
             lr: float = 5e-4, weight_decay: float = 0.0, warmup: int = 5,
             autocast_dtype: Optional[torch.dtype] = None, checkpointing: bool = False,
             progress: bool = True, log_every: int = 10,
             log: Optional[Callable[[dict], None]] = None, seed: int = 0) -> FinetuneResult:
    """Train ``model`` (a causal LM returning ``.loss`` given ``labels``) for ``steps``
    optimizer steps on ``sequences`` (LongTensor ``[N, T]``, cycled in a seeded shuffled
    order, ``batch_size`` rows per step). ``log`` receives ``{"step", "loss", "lr"}``
    every ``log_every`` steps. Returns a :class:`FinetuneResult`."""
    from tqdm.auto import tqdm

    if sequences.dim() != 2 or sequences.dtype != torch.long:
        raise ValueError(f"finetune: sequences must be a LongTensor [N, T], got "
                         f"{sequences.dtype} {tuple(sequences.shape)}")
    if not 1 <= batch_size <= sequences.shape[0]:
        raise ValueError(f"finetune: batch_size {batch_size} must be in 1..{sequences.shape[0]}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("finetune: the model has no trainable parameters (quantize_model "
                         "leaves the adapters trainable; rank 0 has none)")
    dev = params[0].device
    if checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or \
            getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ValueError("finetune: checkpointing needs a transformers model")
        enable()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, warmup))
    g = torch.Generator().manual_seed(seed)
    order: List[int] = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    losses, times = [], []
    model.train()
    bar = tqdm(range(steps), desc="finetuning", unit="step", disable=not progress)
    for step in bar:
        if len(order) < batch_size:
            order += torch.randperm(sequences.shape[0], generator=g).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        batch = sequences[idx].to(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if log is not None and (step % log_every == 0 or step == steps - 1):
            log({"step": step + 1, "loss": losses[-1], "lr": sched.get_last_lr()[0],
                 "step_seconds": times[-1]})
    model.eval()
    if dev.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dev), "cuda_max_allocated"
    else:
        peak, kind = peak_rss_bytes(), "process_peak_rss"
    return FinetuneResult(losses, times, peak, kind, sum(p.numel() for p in params))
