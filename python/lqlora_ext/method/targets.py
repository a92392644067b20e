"""Which ``nn.Linear`` modules of a model LQ-LoRA quantizes (and Fisher estimation covers).

One selector for every algorithm that walks a model, so ``estimate_fisher`` and
``quantize_model`` always agree on the set of matrices and their names.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Sequence, Union

from torch import nn

__all__ = ["select_linear_modules", "HEAD_NAMES"]

# Path components that mark a task head (output projection, MLM/classification heads). A
# Linear under one of these, or a Linear itself named "output" (Meta-style LLaMA head), is
# not a body matrix and "all-linear" leaves it alone.
HEAD_NAMES = ("lm_head", "cls", "classifier", "score", "qa_outputs")

TargetModules = Union[str, Sequence[str]]


def _is_adapter(name: str) -> bool:
    # PEFT LoRA adapters (…q_proj.lora_A.default) are Linear too, but are not base weights.
    return any(part.startswith("lora_") for part in name.split("."))


def _is_head(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] == "output" or any(p in HEAD_NAMES for p in parts)


def _embedding_weights(model: nn.Module) -> List:
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        if emb is not None and getattr(emb, "weight", None) is not None:
            weights.append(emb.weight)
    return weights


def _output_embeddings(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        return get()
    except (NotImplementedError, AttributeError):
        return None


def _same_tensor(a, b) -> bool:
    if a is b:
        return True
    if a.device != b.device or a.device.type == "meta" or a.shape != b.shape:
        return False
    return a.data_ptr() != 0 and a.data_ptr() == b.data_ptr()


def select_linear_modules(model: nn.Module,
                          target_modules: TargetModules = "all-linear") -> Dict[str, nn.Linear]:
    """The ``nn.Linear`` modules to quantize, as ``{name: module}`` in ``named_modules()``
    order (names as there, e.g. ``"model.layers.0.self_attn.q_proj"``).

    ``target_modules``:
      * ``"all-linear"``: every ``nn.Linear`` except the output head: the module returned by
        ``get_output_embeddings()``, any Linear whose weight is tied to an embedding, and
        Linears under a head (a path component in :data:`HEAD_NAMES`: ``lm_head``, ``cls``,
        ``classifier``, ``score``, ``qa_outputs``, or a Linear named ``output``). For BERT
        this keeps attention query/key/value, attention.output.dense, intermediate.dense,
        output.dense and pooler.dense, and drops ``cls.predictions.*`` and classifiers.
      * a list/tuple of name suffixes, PEFT-style: a Linear matches ``s`` when its name is
        ``s`` or ends with ``"." + s`` (``["q_proj", "v_proj"]``, ``["attention.self.query"]``).
        Every entry must match at least one Linear.
      * any other string: a regular expression that must match the full module name
        (``re.fullmatch``, as PEFT does), e.g. ``r".*layers\\.[0-3]\\..*_proj"``.

    Explicit selections may pick heads, but never a Linear whose weight is tied to the input
    embeddings (quantizing it would silently untie or corrupt the embeddings). LoRA adapter
    Linears of a PEFT model (``lora_A``/``lora_B``) are never selected.

    Raises ``ValueError`` when nothing matches, an entry matches nothing, or a tied weight
    is selected explicitly.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"select_linear_modules: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    linears = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n and not _is_adapter(n)]
    emb = _embedding_weights(model)
    out_emb = _output_embeddings(model)

    def tied(m: nn.Linear) -> bool:
        return any(_same_tensor(m.weight, e) for e in emb)

    if isinstance(target_modules, str) and target_modules == "all-linear":
        chosen = {n: m for n, m in linears
                  if m is not out_emb and not tied(m) and not _is_head(n)}
        what = "'all-linear'"
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"select_linear_modules: target_modules {target_modules!r} is "
                             f"neither 'all-linear' nor a valid regular expression ({e}); pass "
                             f"a list for name suffixes") from None
        chosen = {n: m for n, m in linears if pattern.fullmatch(n)}
        what = f"regex {target_modules!r} (matched against full names with re.fullmatch; " \
               f"pass a list for name suffixes)"
    elif isinstance(target_modules, Iterable):
        suffixes = list(target_modules)
        if not suffixes or not all(isinstance(s, str) and s for s in suffixes):
            raise ValueError(f"select_linear_modules: target_modules must be 'all-linear', a "
                             f"regex string or a non-empty list of name suffixes, got "
                             f"{target_modules!r}")
        chosen, unmatched = {}, []
        for s in suffixes:
            hits = [(n, m) for n, m in linears if n == s or n.endswith("." + s)]
            if not hits:
                unmatched.append(s)
            chosen.update(hits)
        chosen = {n: m for n, m in linears if n in chosen}  # named_modules order
        if unmatched and chosen:
            raise ValueError(f"select_linear_modules: {unmatched} matched no nn.Linear; "
                             f"e.g. {_examples(linears)}")
        what = f"suffixes {suffixes}"
    else:
        raise ValueError(f"select_linear_modules: target_modules must be 'all-linear', a "
                         f"regex string or a list of name suffixes, got {target_modules!r}")

    if not chosen:
        raise ValueError(f"select_linear_modules: {what} selected no nn.Linear module; the "
                         f"model's Linear modules are e.g. {_examples(linears)}")
    bad = [n for n, m in chosen.items() if tied(m)]
    if bad:
        raise ValueError(f"select_linear_modules: cannot target {bad}: the weight is tied to "
                         f"the input embeddings")
    return chosen


def _examples(linears, k: int = 6) -> str:
    if not linears:
        return "(none: the model has no nn.Linear)"
    names = [n for n, _ in linears]
    shown = names[:k]
    return ", ".join(shown) + (f", ... ({len(names)} in all)" if len(names) > k else "")
