"""A Fisher directory: the diagonal Fisher of a checkpoint's targeted weights on disk, so
that a model too large for one process can be quantized data-aware by the streaming
quantizer (``lqlora fisher`` writes it, ``lqlora quantize --fisher-dir`` reads it).

Layout:

- ``fisher.safetensors`` (or ``fisher-00001-of-0000n.safetensors`` shards): one fp32 tensor
  per targeted weight, under the weight's own checkpoint key (``...q_proj.weight``), shaped
  like it.
- ``fisher.json``: ``{"format": "lqlora-fisher", "version": 1, "tensors": {key: {"file",
  "shape", "fingerprint"}}, "sequences", "seq_len", "model_dtype", ...}``, where each
  fingerprint is :meth:`CheckpointDir.fingerprint` of the weight it was estimated for: a
  Fisher directory from another model (or another version of it) is refused by name.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, Optional

import torch

from .checkpoint import atomic_dir
from .streaming import (CheckpointDir, CheckpointError, Entry, pack_shards, read_header,
                        shard_names, write_safetensors)

FISHER_FORMAT = "lqlora-fisher"
FISHER_VERSION = 1
FISHER_MANIFEST = "fisher.json"


def save_fisher(fishers: Dict[str, torch.Tensor], out: str, source: CheckpointDir,
                info: Optional[dict] = None, max_shard_bytes: int = 4 << 30,
                overwrite: bool = False) -> None:
    """Write ``{checkpoint weight key: fp32 Fisher}`` to the directory ``out``
    (atomically, with :func:`~lqlora_ext.io.atomic.atomic_dir`'s refusals: never the
    model's directory, never a user's non-empty one unless ``overwrite``),
    fingerprinting each key's weight in ``source``."""
    keys = list(fishers)
    for k in keys:
        w = source.info(k)
        if tuple(fishers[k].shape) != w.shape:
            raise ValueError(f"save_fisher: Fisher of {k!r} is {tuple(fishers[k].shape)}, the "
                             f"weight is {w.shape}")
    shard = pack_shards([fishers[k].numel() * 4 for k in keys], max_shard_bytes)
    names = shard_names(max(shard) + 1 if shard else 1, "fisher")
    with atomic_dir(out, overwrite=overwrite, protect=[source.path], who="save_fisher") as tmp:
        tensors = {}
        for s, fname in enumerate(names):
            entries = [Entry(k, torch.float32, tuple(fishers[k].shape),
                             fishers[k].detach().to("cpu", torch.float32).contiguous())
                       for k, sk in zip(keys, shard) if sk == s]
            write_safetensors(os.path.join(tmp, fname), entries,
                              metadata={"format": FISHER_FORMAT})
            for e in entries:
                tensors[e.key] = {"file": fname, "shape": list(e.shape),
                                  "fingerprint": source.fingerprint(e.key)}
        manifest = {"format": FISHER_FORMAT, "version": FISHER_VERSION,
                    "model": source.path, **(info or {}), "tensors": tensors}
        with open(os.path.join(tmp, FISHER_MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)


class FisherDir:
    """A Fisher directory opened for reading; :meth:`check` it against the model first."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        mpath = os.path.join(self.path, FISHER_MANIFEST)
        if not os.path.isfile(mpath):
            raise CheckpointError(f"{path}: not a Fisher directory (no {FISHER_MANIFEST}; "
                                  f"make one with `lqlora fisher --model DIR --out {path}`)")
        try:
            with open(mpath) as f:
                self.manifest = json.load(f)
            self.entries: Dict[str, dict] = dict(self.manifest["tensors"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{mpath}: corrupt Fisher manifest ({e})") from None
        if self.manifest.get("format") != FISHER_FORMAT or \
                self.manifest.get("version") != FISHER_VERSION:
            raise CheckpointError(f"{mpath}: not an lqlora Fisher manifest of version "
                                  f"{FISHER_VERSION}")
        self._infos = {}
        for fname in sorted({e["file"] for e in self.entries.values()}):
            fpath = os.path.join(self.path, fname)
            if not os.path.isfile(fpath):
                raise CheckpointError(f"{fpath}: missing Fisher shard (listed in "
                                      f"{FISHER_MANIFEST})")
            infos, _ = read_header(fpath)
            self._infos.update(infos)
        for k, e in self.entries.items():
            i = self._infos.get(k)
            if i is None or e["file"] != os.path.basename(i.file) or list(i.shape) != \
                    list(e["shape"]) or i.dtype != "F32":
                raise CheckpointError(f"{self.path}: Fisher tensor {k!r} is missing from "
                                      f"{e['file']} or disagrees with {FISHER_MANIFEST}")

    def check(self, source: CheckpointDir, keys: Iterable[str]) -> None:
        """Refuse this Fisher directory unless it holds, for every weight key, a Fisher of
        the weight's shape estimated on this very weight (fingerprint)."""
        for k in keys:
            e = self.entries.get(k)
            w = source.info(k)
            if e is None:
                raise CheckpointError(f"{self.path} does not match the model {source.path}: "
                                      f"no Fisher for {k!r} (estimated for other target "
                                      f"modules or another model)")
            if tuple(e["shape"]) != w.shape:
                raise CheckpointError(f"{self.path} does not match the model {source.path}: "
                                      f"Fisher of {k!r} is {e['shape']}, the weight "
                                      f"{list(w.shape)}")
            if e.get("fingerprint") != source.fingerprint(k):
                raise CheckpointError(f"{self.path} does not match the model {source.path}: "
                                      f"weight {k!r} differs from the one its Fisher was "
                                      f"estimated on (another model or another version)")

    def load(self, key: str) -> torch.Tensor:
        """The fp32 Fisher of weight ``key`` (CPU; the file's memory map closed after)."""
        from safetensors import safe_open

        i = self._infos[key]
        try:
            with safe_open(i.file, framework="pt", device="cpu") as f:
                return f.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{i.file}: cannot read Fisher tensor {key!r} ({e})") from None

    def fingerprint(self) -> str:
        """Identity of the whole directory (its manifest), for resume checks."""
        import hashlib
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()[:32]
