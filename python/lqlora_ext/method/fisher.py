"""Diagonal empirical Fisher of a language model's linear weights (METHOD.md §3).

F = sum over calibration sequences of (d loss(sequence) / d W)^2, elementwise, with the loss
of each sequence on its own (batch size 1), as in the reference. F weights the LQ-LoRA
low-rank step and the allocation costs of the data-aware variant.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .targets import TargetModules, select_linear_modules

__all__ = ["estimate_fisher"]


def _rows(batch: Any, index: int) -> Iterator[Tuple[Dict[str, Tensor], int]]:
    """Split one calibration item into single-sequence model inputs."""
    if isinstance(batch, Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(f"estimate_fisher: batch {index} must be a LongTensor of token ids "
                         f"[B, T] or [T], or a mapping with 'input_ids' (optionally "
                         f"'attention_mask', 'labels', ...), got {type(batch).__name__}")
    ids = batch["input_ids"]
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32) or \
            ids.dim() not in (1, 2) or ids.shape[-1] == 0:
        raise ValueError(f"estimate_fisher: batch {index}: input_ids must be a non-empty "
                         f"integer tensor [B, T] or [T], got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} "
                         f"{tuple(getattr(ids, 'shape', ()))}")
    squeeze = ids.dim() == 1
    nrows = 1 if squeeze else ids.shape[0]
    for r in range(nrows):
        row = {}
        for k, v in batch.items():
            if isinstance(v, Tensor) and v.dim() >= 1:
                row[k] = v.unsqueeze(0) if squeeze else v[r:r + 1]
            else:
                row[k] = v
        if "labels" not in row:
            labels = row["input_ids"].clone().long()
            if "attention_mask" in row and isinstance(row["attention_mask"], Tensor):
                labels[row["attention_mask"] == 0] = -100
            row["labels"] = labels
        yield row, r


def _numbered_rows(source) -> Iterator[Tuple[Dict[str, Tensor], int, int]]:
    for bi, batch in enumerate(source):
        for inputs, r in _rows(batch, bi):
            yield inputs, bi, r


def _count_sequences(batches) -> Optional[int]:
    if isinstance(batches, Tensor):
        return 1 if batches.dim() == 1 else batches.shape[0]
    if isinstance(batches, (list, tuple)):
        total = 0
        for b in batches:
            ids = b.get("input_ids") if isinstance(b, Mapping) else b
            if not isinstance(ids, Tensor):
                return None
            total += 1 if ids.dim() == 1 else ids.shape[0]
        return total
    return None


def _model_device(model: nn.Module) -> torch.device:
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
            if emb is not None and getattr(emb, "weight", None) is not None:
                return emb.weight.device
        except (NotImplementedError, AttributeError):
            pass
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _vocab_size(model: nn.Module) -> Optional[int]:
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            return None
        n = getattr(emb, "num_embeddings", None)
        return n if isinstance(n, int) else None
    return None


def _check_ids(ids: Tensor, vocab: Optional[int], bi: int, r: int) -> None:
    """Token ids outside the embedding table would fail deep inside the model (an
    IndexError, or a device assert on a GPU): name the batch, row and position instead."""
    if vocab is None or ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= vocab)
    if bool(bad.any()):
        pos = int(bad.reshape(-1).nonzero()[0])
        raise ValueError(f"estimate_fisher: batch {bi}, row {r}: token id "
                         f"{int(ids.reshape(-1)[pos])} at position {pos} is outside the "
                         f"model's vocabulary (0..{vocab - 1}); was the calibration text "
                         f"tokenized with another model's tokenizer?")


def sequence_loss(model: nn.Module, inputs: Dict[str, Any], device: torch.device, bi: int,
                  r: int) -> Tensor:
    """The LM loss of one calibration sequence, refusing token ids outside the vocabulary,
    models without a loss and non-finite losses (naming the batch and row)."""
    ids = inputs.get("input_ids")
    if isinstance(ids, Tensor):
        _check_ids(ids, _vocab_size(model), bi, r)
    inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    out = model(**inputs)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None:
        raise ValueError("estimate_fisher: the model returned no loss; it must accept "
                         "labels=... and return .loss (a *ForCausalLM or *ForMaskedLM model)")
    if not torch.isfinite(loss.detach()).all():
        raise ValueError(f"estimate_fisher: non-finite loss ({loss.item()}) on batch {bi}, "
                         f"row {r} (a sequence with no labelled tokens?)")
    return loss


def estimate_fisher(model: nn.Module, batches: Iterable,
                    target_modules: TargetModules = "all-linear", *,
                    progress: bool = True) -> Dict[str, Tensor]:
    """Diagonal empirical Fisher of the targeted ``nn.Linear`` weights.

    For every sequence ``s`` of every batch: ``loss_s = model(**inputs_s).loss`` with batch
    size 1 (labels default to the input ids, so a causal LM gets its next-token loss; pass
    ``labels`` for masked LMs), ``backward``, and ``F[W] += grad(W)**2`` in fp32. Only one
    sequence's graph exists at a time, so memory is that of a batch-1 backward plus one fp32
    buffer per targeted weight (on the weight's device).

    Args:
        model: a ``transformers``-style model whose forward accepts ``labels`` and returns an
            object with ``.loss``. Run in eval mode (no dropout) during estimation.
        batches: iterable of LongTensor ``[B, T]`` (or ``[T]``) token ids, or mappings with
            ``input_ids`` and optional ``attention_mask`` (masked positions get label -100),
            ``labels`` and other per-row model inputs. A single ``[N, T]`` tensor is N
            sequences.
        target_modules: which Linears, as in :func:`select_linear_modules` (``"all-linear"``
            = every Linear but the output head).
        progress: show a tqdm bar over sequences.

    Returns:
        ``{module name: fp32 CPU tensor shaped like its weight}``, names as in
        ``model.named_modules()``.

    A targeted module that gets no gradient (e.g. an unused pooler) keeps an all-zero
    entry, with a warning.

    FSDP2-sharded models (weights are DTensor shards, e.g. after ``fully_shard``): every
    rank passes the same ``batches``; the sequences are dealt round-robin to the ranks, each
    rank squares its own per-sequence gradient before FSDP's reduce-scatter sums them, and
    accumulates only its shard. The result equals the single-process Fisher (up to fp32
    summation order) with per-rank memory of one shard; entries are then DTensors sharded
    like their weights (``.full_tensor()`` gathers one, ``.to_local()`` is this rank's).

    The model's ``requires_grad`` flags, existing ``.grad`` of the targeted weights, and each
    submodule's train/eval mode are restored afterwards, also on error.
    """
    modules = select_linear_modules(model, target_modules)
    device = _model_device(model)
    vocab = _vocab_size(model)
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_modes = [(m, m.training) for m in model.modules()]
    weights = {name: m.weight for name, m in modules.items()}
    from .fisher_fsdp import local_zeros, sharded_weights
    sharded = sharded_weights(weights)
    saved_grads = {id(w): w.grad for w in weights.values()}
    fisher = {name: local_zeros(w) for name, w in weights.items()}
    seen = {name: False for name in weights}

    from tqdm.auto import tqdm

    count = 0
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        model.eval()
        total = _count_sequences(batches)
        main_rank = not sharded or torch.distributed.get_rank() == 0  # one bar per job
        bar = tqdm(total=total, disable=not progress or not main_rank, desc="Fisher",
                   unit="seq")
        with torch.enable_grad(), bar:
            source = [batches] if isinstance(batches, Tensor) else batches
            if sharded:
                from .fisher_fsdp import sharded_loop
                count = sharded_loop(model, modules, weights, _numbered_rows(source), fisher,
                                     seen, device, bar)
            else:
                for inputs, bi, r in _numbered_rows(source):
                    loss = sequence_loss(model, inputs, device, bi, r)
                    loss.backward()
                    del loss
                    for name, w in weights.items():
                        if w.grad is not None:
                            fisher[name].add_(w.grad.detach().float().square())
                            seen[name] = True
                    for w in weights.values():
                        w.grad = None
                    count += 1
                    bar.update(1)
    finally:
        for p, flag in zip(params, saved_flags):
            p.requires_grad_(flag)
        for w in weights.values():
            w.grad = saved_grads[id(w)]
        for m, mode in saved_modes:
            m.training = mode
    if count == 0:
        raise ValueError("estimate_fisher: batches contained no sequences")
    unused = [n for n, s in seen.items() if not s]
    if unused:
        warnings.warn(f"estimate_fisher: no gradient reached {len(unused)} targeted module(s) "
                      f"({', '.join(unused[:5])}{', ...' if len(unused) > 5 else ''}); their "
                      f"Fisher is all zeros (not used by the loss on this data)")
    if sharded:
        from .fisher_fsdp import as_sharded
        return {name: as_sharded(f, weights[name]) for name, f in fisher.items()}
    return {name: f.cpu() for name, f in fisher.items()}
