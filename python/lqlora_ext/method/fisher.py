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
    saved_grads = {id(w): w.grad for w in weights.values()}
    fisher = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device)
              for name, w in weights.items()}
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
        bar = tqdm(total=total, disable=not progress, desc="Fisher", unit="seq")
        with torch.enable_grad(), bar:
            source = [batches] if isinstance(batches, Tensor) else batches
            for bi, batch in enumerate(source):
                for inputs, r in _rows(batch, bi):
                    _check_ids(inputs["input_ids"], vocab, bi, r)
                    inputs = {k: v.to(device) if isinstance(v, Tensor) else v
                              for k, v in inputs.items()}
                    out = model(**inputs)
                    loss = getattr(out, "loss", None)
                    if loss is None and isinstance(out, Mapping):
                        loss = out.get("loss")
                    if loss is None:
                        raise ValueError("estimate_fisher: the model returned no loss; it must "
                                         "accept labels=... and return .loss (a *ForCausalLM "
                                         "or *ForMaskedLM model)")
                    if not torch.isfinite(loss.detach()).all():
                        raise ValueError(f"estimate_fisher: non-finite loss "
                                         f"({loss.item()}) on batch {bi}, row {r} (a sequence "
                                         f"with no labelled tokens?)")
                    loss.backward()
                    del out, loss
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
    return {name: f.cpu() for name, f in fisher.items()}
