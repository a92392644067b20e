"""Saving and loading LQ-LoRA models: one safetensors file plus a JSON manifest.

Layout of a checkpoint directory:

- ``model.safetensors``: the model's whole state dict (LQLinear buffers qcodes/qscales/
  scale2/offset, lora_A/lora_B, every other parameter and buffer), tied tensors stored
  once.
- ``lqlora.json``: ``{"format": "lqlora-checkpoint", "version": 2, "nf_format_version",
  "modules": {name: {shape, rank, scaling, bias, quant}}, "aliases": {key: stored key},
  "sha256", "nbytes", "digest"}``; ``sha256``/``nbytes`` describe model.safetensors and
  ``digest`` is the sha256 of every other field in canonical JSON, so an edited manifest
  (a block size, a rank, a deleted module) is refused rather than loaded wrong.
- ``.lqlora-output.json``: the files this save wrote (see :mod:`lqlora_ext.io.atomic`).

Writes go through :func:`~lqlora_ext.io.atomic.atomic_dir`: a failed or killed save leaves
the previous checkpoint or the new one, a user's other files are never removed, and a
non-empty directory that is not an lqlora output is refused unless ``overwrite=True``.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List

import torch
from torch import nn

from ..formats.nf import FORMAT_VERSION, NFTensor, QuantConfig, _DTYPE_CODES
from ..integrations.hf_hook import attach_hf
from ..nn.linear import LQLinear
from .atomic import atomic_dir  # noqa: F401  (re-exported: the CLI uses it)
from .layout import (LayoutError, check_finite, check_layout, config_digest, lq_keys,
                     validate_modules)

CKPT_FORMAT = "lqlora-checkpoint"
CKPT_VERSION = 2  # 2: manifest digest, strict layout
WEIGHTS = "model.safetensors"
MANIFEST = "lqlora.json"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def lq_modules(model: nn.Module) -> Dict[str, dict]:
    """Manifest entries for every LQLinear in ``model``."""
    return {name: {"shape": [m.out_features, m.in_features], "rank": m.rank,
                   "scaling": m.scaling, "bias": m.bias is not None,
                   "quant": m.quant_config.to_dict()}
            for name, m in model.named_modules() if isinstance(m, LQLinear)}


def check_lq_finite(state: Dict[str, torch.Tensor], modules: Dict[str, dict],
                    where: str) -> None:
    """Refuse NaN/Inf in the adapters, biases and scales of the LQLinear layers (a diverged
    training run, or a corrupted file), naming the tensor and position."""
    for key, is_float in lq_keys(modules).items():
        if key in state and (is_float or key.endswith((".offset", ".scale2"))):
            check_finite(key, state[key], where)


def input_paths(model: nn.Module) -> List[str]:
    """Where ``model`` was loaded from, if a local path (Hugging Face ``name_or_path``):
    a save must not overwrite its own input."""
    p = getattr(getattr(model, "config", None), "name_or_path", None) or \
        getattr(model, "name_or_path", None)
    return [p] if isinstance(p, str) and p and os.path.exists(p) else []


def _dedup(state: Dict[str, torch.Tensor]):
    tensors, aliases, seen = {}, {}, {}
    for k, t in state.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
        else:
            if key is not None:
                seen[key] = k
            tensors[k] = t.detach().contiguous().cpu()
    return tensors, aliases


def save_quantized(model: nn.Module, path: str, *, overwrite: bool = False) -> None:
    """Save a model quantized by :func:`~lqlora_ext.quantize_model` to directory ``path``.

    Atomic (a failure leaves any previous ``path`` untouched and no partial one); refuses a
    non-empty directory that is not an lqlora output unless ``overwrite`` (then only files
    of the same names are replaced), the directory the model was loaded from, and
    non-finite adapters or scales (a diverged run would not load back)."""
    from safetensors.torch import save_file

    modules = lq_modules(model)
    if not modules:
        raise ValueError("save_quantized: the model has no LQLinear layers (run "
                         "lqlora_ext.quantize_model first)")
    state = model.state_dict()
    check_lq_finite(state, modules, "save_quantized")
    with atomic_dir(path, overwrite=overwrite, protect=input_paths(model),
                    who="save_quantized") as tmp:
        tensors, aliases = _dedup(state)
        wpath = os.path.join(tmp, WEIGHTS)
        save_file(tensors, wpath, metadata={"format": CKPT_FORMAT})
        manifest = {"format": CKPT_FORMAT, "version": CKPT_VERSION,
                    "nf_format_version": FORMAT_VERSION, "modules": modules,
                    "aliases": aliases, "nbytes": os.path.getsize(wpath),
                    "sha256": _sha256(wpath)}
        manifest["digest"] = config_digest(manifest)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)


def save_pretrained_atomic(model: nn.Module, path: str, *extras,
                           overwrite: bool = False) -> None:
    """``model.save_pretrained(path)`` (plus ``x.save_pretrained`` for each of ``extras``,
    e.g. a tokenizer), written atomically and with the same refusals as
    :func:`save_quantized`."""
    with atomic_dir(path, overwrite=overwrite, protect=input_paths(model),
                    who="save_pretrained") as tmp:
        model.save_pretrained(tmp)
        for x in extras:
            x.save_pretrained(tmp)


def read_manifest(path: str) -> dict:
    """The checkpoint's manifest, validated field by field and against its digest."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise ValueError(f"load_quantized: {path!r} is not an lqlora checkpoint (no {MANIFEST})")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"load_quantized: corrupt manifest {mpath}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CKPT_FORMAT:
        raise ValueError(f"load_quantized: {mpath} is not an lqlora checkpoint manifest")
    if manifest.get("version") != CKPT_VERSION or \
            manifest.get("nf_format_version") != FORMAT_VERSION:
        raise ValueError(f"load_quantized: checkpoint version {manifest.get('version')!r} / NF "
                         f"format {manifest.get('nf_format_version')!r} not supported (this "
                         f"lqlora_ext reads {CKPT_VERSION} / {FORMAT_VERSION}; a checkpoint "
                         f"from an earlier lqlora_ext must be saved again)")
    where = f"load_quantized: corrupt manifest {mpath}"
    try:
        modules = validate_modules(manifest.get("modules"), where)
    except LayoutError as e:
        raise ValueError(str(e)) from None
    aliases = manifest.get("aliases")
    if not isinstance(aliases, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise ValueError(f"{where}: 'aliases' must map tensor names to tensor names")
    nbytes, sha = manifest.get("nbytes"), manifest.get("sha256")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not isinstance(sha, str):
        raise ValueError(f"{where}: 'nbytes' must be an integer and 'sha256' a string")
    body = {k: v for k, v in manifest.items() if k != "digest"}
    try:
        digest_ok = manifest.get("digest") == config_digest(body)
    except ValueError:  # NaN/Infinity in the JSON
        digest_ok = False
    if not digest_ok:
        raise ValueError(f"load_quantized: {mpath} was modified after saving (its digest does "
                         f"not match its contents); refusing a checkpoint whose description "
                         f"may not match its tensors")
    return {**manifest, "modules": modules}


def load_state(path: str, manifest: dict) -> Dict[str, torch.Tensor]:
    """The checkpoint's full state dict, after verifying size, checksum and layout."""
    from safetensors.torch import load_file

    wpath = os.path.join(path, WEIGHTS)
    if not os.path.isfile(wpath):
        raise ValueError(f"load_quantized: missing {wpath}")
    size = os.path.getsize(wpath)
    if size != manifest.get("nbytes") or _sha256(wpath) != manifest.get("sha256"):
        raise ValueError(f"load_quantized: {wpath} is corrupt or truncated ({size} bytes, "
                         f"checksum mismatch with {MANIFEST})")
    try:
        state = load_file(wpath)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"load_quantized: cannot read {wpath}: {e}") from None
    for k, src in manifest.get("aliases", {}).items():
        if src not in state:
            raise ValueError(f"load_quantized: alias {k} -> {src} points at a missing tensor")
        state[k] = state[src]
    try:
        check_layout(manifest["modules"], {k: (t.dtype, tuple(t.shape)) for k, t in state.items()},
                     where=f"load_quantized: {path}")
        check_lq_finite(state, manifest["modules"], f"load_quantized: {wpath}")
    except LayoutError as e:
        raise ValueError(str(e)) from None
    return state


def install_lq_layers(model: nn.Module, modules: Dict[str, dict],
                      state: Dict[str, torch.Tensor]) -> None:
    """Replace each named ``nn.Linear`` by an LQLinear built from ``state``."""
    for name, info in modules.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"load_quantized: the model has no module {name!r} "
                             "(checkpoint from a different architecture?)") from None
        shape = tuple(info["shape"])
        if not isinstance(old, (nn.Linear, LQLinear)) or \
                (old.out_features, old.in_features) != shape:
            raise ValueError(f"load_quantized: {name} is {old.__class__.__name__} "
                             f"{getattr(old, 'out_features', '?')}x"
                             f"{getattr(old, 'in_features', '?')}, the checkpoint has a "
                             f"{shape[0]}x{shape[1]} LQLinear")
        cfg = QuantConfig.from_dict(info["quant"])
        p = name + "."
        try:
            sd = {k: state[p + k] for k in ("qcodes", "qscales", "scale2", "offset")}
            a, b = (state[p + "lora_A"], state[p + "lora_B"]) if info["rank"] else (None, None)
        except KeyError as e:
            raise ValueError(f"load_quantized: checkpoint lacks tensor {e}") from None
        sd["meta"] = torch.tensor([FORMAT_VERSION, *shape, cfg.bits, cfg.block_size,
                                   cfg.scale_bits, cfg.scale_block_size,
                                   _DTYPE_CODES[cfg.scale_dtype]])
        q = NFTensor.from_state_dict(sd)
        bias = state.get(p + "bias") if info["bias"] else None
        dev = next((t.device for t in old.parameters()), torch.device("cpu"))
        layer = LQLinear(q, a, b, info["scaling"], bias).to(dev)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)


def load_quantized(path: str, model: nn.Module) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized` into ``model`` (an instance of
    the same architecture, dense or already quantized), in place; returns ``model``.
    Refuses corrupt/truncated files and checkpoints that do not match the model. Also reads
    the Hugging Face format (``save_pretrained`` or ``lqlora quantize`` output, sharded
    or not)."""
    if not os.path.isfile(os.path.join(path, MANIFEST)) and \
            os.path.isfile(os.path.join(path, "config.json")):
        from .streaming import read_hf_quantized
        manifest, state = read_hf_quantized(path, model)
    else:
        manifest = read_manifest(path)
        state = load_state(path, manifest)
    # The modules install_lq_layers replaces, put back if the checkpoint turns out not to
    # match (a later module's shape, missing/unexpected keys): a refused load leaves the
    # model as it was, not half-converted.
    originals = {}
    for name in manifest["modules"]:
        try:
            originals[name] = model.get_submodule(name)
        except AttributeError:
            pass
    try:
        install_lq_layers(model, manifest["modules"], state)
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise ValueError(f"load_quantized: checkpoint does not match the model: missing "
                             f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                             f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        for k, t in own.items():
            if t.shape != state[k].shape:
                raise ValueError(f"load_quantized: {k} has shape {tuple(state[k].shape)} in "
                                 f"the checkpoint, {tuple(t.shape)} in the model")
    except BaseException:
        for name, old in originals.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, old)
        raise
    model.load_state_dict(state, strict=True)
    attach_hf(model, freeze=False)  # save_pretrained works; trainability left as it was
    return model
