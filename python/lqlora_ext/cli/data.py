"""Built-in text for calibration and evaluation that needs no download: the docstrings of
a fixed list of standard-library modules (every Python install has them), split by module
into calibration and held-out parts so near-duplicate text never straddles the split."""
from __future__ import annotations

import importlib
import inspect
from typing import List, Sequence, Tuple

import torch

STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email.message", "enum", "fractions", "functools", "glob", "gzip", "hashlib",
    "heapq", "html.parser", "http.client", "inspect", "io", "ipaddress", "itertools", "json",
    "logging", "mailbox", "math", "mimetypes", "operator", "os", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "shlex", "shutil", "socket", "sqlite3", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "traceback", "typing", "unittest", "urllib.parse", "uuid",
    "warnings", "weakref", "xml.etree.ElementTree", "zipfile",
)


def module_docs(name: str) -> str:
    """Docstrings of a module, its public classes (with methods) and functions."""
    mod = importlib.import_module(name)
    docs, seen = [], set()

    def add(obj):
        d = inspect.getdoc(obj)
        if d and d not in seen:
            seen.add(d)
            docs.append(d)

    add(mod)
    for attr in sorted(dir(mod)):
        if attr.startswith("_"):
            continue
        obj = getattr(mod, attr, None)
        if getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isclass(obj):
            add(obj)
            for mname in sorted(vars(obj)):
                if not mname.startswith("_") and inspect.isfunction(vars(obj)[mname]):
                    add(vars(obj)[mname])
        elif inspect.isfunction(obj):
            add(obj)
    return "\n\n".join(docs)


def stdlib_texts(heldout_every: int = 4) -> Tuple[str, str]:
    """(calibration text, held-out text): every ``heldout_every``-th module is held out."""
    calib, held = [], []
    for i, name in enumerate(STDLIB_MODULES):
        (held if i % heldout_every == heldout_every - 1 else calib).append(module_docs(name))
    return "\n\n".join(calib), "\n\n".join(held)


def token_batches(tokenizer, text: str, seq_len: int = 256, max_seqs: int = 32,
                  batch_size: int = 1) -> List[torch.Tensor]:
    """Cut ``text``'s tokens into non-overlapping ``[batch_size, seq_len]`` LongTensors
    (at most ``max_seqs`` sequences; the ragged end is dropped)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = min(max_seqs, ids.numel() // seq_len)
    if n == 0:
        raise ValueError(f"token_batches: text has {ids.numel()} tokens, fewer than one "
                         f"sequence of {seq_len}")
    seqs = ids[: n * seq_len].view(n, seq_len)
    return [seqs[i:i + batch_size] for i in range(0, n, batch_size)]


@torch.no_grad()
def perplexity(model, batches: Sequence[torch.Tensor]) -> float:
    """exp(mean next-token NLL) over all predicted tokens of ``batches``."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    nll, count = 0.0, 0
    for b in batches:
        b = b.to(dev)
        logits = model(b).logits[:, :-1].float()
        tgt = b[:, 1:]
        nll += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum"))
        count += tgt.numel()
    model.train(was_training)
    return float(torch.exp(torch.tensor(nll / count)))
