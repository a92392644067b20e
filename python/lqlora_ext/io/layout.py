"""What an LQ-LoRA checkpoint must contain, checked strictly both ways, and tensor digests.

Shared by every writer and reader of quantized models (lqlora's own checkpoint format,
the Hugging Face format, streaming writers): they describe each LQLinear by a *module
entry* ``{"shape": [out, in], "rank", "scaling", "bias", "quant": QuantConfig.to_dict()}``
and pass the names, dtypes and shapes of the tensors they found to :func:`check_layout`.

Tensors of the LQLinear named ``m`` (docs/format.md): ``m.qcodes`` int32, ``m.qscales``
int32, ``m.scale2`` (the config's scale dtype), ``m.offset`` fp32 ``[1]``; when rank > 0
``m.lora_A [rank, in]`` and ``m.lora_B [out, rank]`` (any float dtype); ``m.bias [out]``
when bias. The Hugging Face format adds the placeholder ``m.weight`` (uint8 ``[0]``) that
makes a loader without lqlora_ext fail instead of leaving a random dense weight.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import torch

from ..formats.nf import FORMAT_VERSION, QuantConfig, packed_sizes

PACKED = ("qcodes", "qscales", "scale2", "offset")
# Leaf names only an LQLinear has: a tensor so named outside the listed modules means a
# module entry was deleted from (or never written to) the config.
_DISTINCTIVE = ("qcodes", "qscales", "scale2")
PLACEHOLDER = "weight"
PLACEHOLDER_DTYPE = torch.uint8
PLACEHOLDER_SHAPE = (0,)
_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

Found = Mapping[str, Tuple[Optional[torch.dtype], Tuple[int, ...]]]


class LayoutError(ValueError):
    """A checkpoint whose tensors or config are corrupt or do not match (named)."""


def _int(v: Any, what: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise LayoutError(f"{what} must be an integer >= {lo}, got {v!r}")
    return v


def validate_entry(name: Any, e: Any, where: str) -> Dict[str, Any]:
    """The module entry ``e`` of module ``name`` checked field by field and normalized;
    a :class:`LayoutError` names ``where`` (the file), the module and the field."""
    if not isinstance(name, str) or not name:
        raise LayoutError(f"{where}: module names must be non-empty strings, got {name!r}")
    pre = f"{where}: module {name!r}:"
    if not isinstance(e, dict):
        raise LayoutError(f"{pre} entry must be an object, got {type(e).__name__}")
    missing = [k for k in ("shape", "rank", "scaling", "bias", "quant") if k not in e]
    if missing:
        raise LayoutError(f"{pre} entry lacks {missing}")
    try:
        shape = e["shape"]
        if not isinstance(shape, (list, tuple)) or len(shape) != 2:
            raise LayoutError(f"shape must be [out, in], got {shape!r}")
        out, inp = (_int(v, "shape", 1) for v in shape)
        rank = _int(e["rank"], "rank", 0)
        if rank >= min(out, inp):
            raise LayoutError(f"rank {rank} must be < min(out, in) = {min(out, inp)}")
        scaling = e["scaling"]
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or \
                not math.isfinite(scaling):
            raise LayoutError(f"scaling must be a finite number, got {scaling!r}")
        if not isinstance(e["bias"], bool):
            raise LayoutError(f"bias must be true or false, got {e['bias']!r}")
        quant = QuantConfig.from_dict(e["quant"]).to_dict()
    except (LayoutError, ValueError, TypeError) as err:
        raise LayoutError(f"{pre} {err}") from None
    return {"shape": [out, inp], "rank": rank, "scaling": float(scaling), "bias": e["bias"],
            "quant": quant}


def validate_modules(modules: Any, where: str) -> Dict[str, Dict[str, Any]]:
    """Every entry of ``modules`` ({name: entry}) via :func:`validate_entry`; refuses an
    empty or non-object ``modules``."""
    if not isinstance(modules, dict) or not modules:
        raise LayoutError(f"{where}: 'modules' must be a non-empty object of module entries, "
                          f"got {type(modules).__name__ if not isinstance(modules, dict) else '{}'}")
    return {n: validate_entry(n, e, where) for n, e in modules.items()}


def expected_tensors(modules: Mapping[str, dict], placeholders: bool = False
                     ) -> Dict[str, Tuple[Optional[torch.dtype], Tuple[int, ...]]]:
    """``{key: (dtype, shape)}`` of every tensor the (validated) entries imply; dtype None
    means any float dtype."""
    out: Dict[str, Tuple[Optional[torch.dtype], Tuple[int, ...]]] = {}
    for name, e in modules.items():
        cfg = QuantConfig.from_dict(e["quant"])
        rows, cols = e["shape"]
        nc, ns, ng = packed_sizes(rows * cols, cfg)
        out.update({f"{name}.qcodes": (torch.int32, (nc,)),
                    f"{name}.qscales": (torch.int32, (ns,)),
                    f"{name}.scale2": (cfg.scale_dtype, (ng,)),
                    f"{name}.offset": (torch.float32, (1,))})
        if e["rank"]:
            out[f"{name}.lora_A"] = (None, (e["rank"], cols))
            out[f"{name}.lora_B"] = (None, (rows, e["rank"]))
        if e["bias"]:
            out[f"{name}.bias"] = (None, (rows,))
        if placeholders:
            out[f"{name}.{PLACEHOLDER}"] = (PLACEHOLDER_DTYPE, PLACEHOLDER_SHAPE)
    return out


def _fmt(dtype, shape) -> str:
    return f"{'float' if dtype is None else str(dtype).replace('torch.', '')} {list(shape)}"


def check_layout(modules: Mapping[str, dict], found: Found, *, where: str,
                 prefixes: Iterable[str] = ("",), placeholders: bool = False) -> None:
    """Strict matching of a checkpoint's tensors (``found``: key -> (dtype, shape), dtype
    None when unknown) against its module entries, both ways:

    - every tensor an entry implies is there, with its dtype and shape;
    - no tensor of a listed module is left over (e.g. adapters of a rank-0 entry);
    - no LQ-LoRA tensor (qcodes/qscales/scale2) belongs to a module the entries omit.

    ``prefixes``: key prefixes under which a module may be stored (a base-model prefix).
    """
    prefixes = tuple(prefixes)
    want = expected_tensors(modules, placeholders)
    for key, (dtype, shape) in want.items():
        hit = next((found[p + key] for p in prefixes if p + key in found), None)
        if hit is None:
            raise LayoutError(f"{where}: checkpoint lacks tensor {key!r} that its config "
                              f"describes (mismatched or corrupt checkpoint)")
        ok_dtype = hit[0] in _FLOAT if dtype is None else hit[0] == dtype
        if tuple(hit[1]) != tuple(shape) or not ok_dtype:
            raise LayoutError(f"{where}: tensor {key!r} is {_fmt(hit[0], hit[1])} in the "
                              f"checkpoint, but its config implies {_fmt(dtype, shape)} "
                              f"(mismatched config: edited, or tensors of another model?)")
    for key in found:
        bare = next((key[len(p):] for p in prefixes if p and key.startswith(p)
                     and key[len(p):].rpartition(".")[0] in modules), key)
        mod, _, leaf = bare.rpartition(".")
        if mod in modules and bare not in want and (
                leaf in PACKED or leaf in ("lora_A", "lora_B", "bias", PLACEHOLDER)):
            raise LayoutError(f"{where}: tensor {key!r} is not part of module {mod!r} as its "
                              f"config describes it (rank {modules[mod]['rank']}, bias "
                              f"{modules[mod]['bias']}): config edited?")
        if mod not in modules and leaf in _DISTINCTIVE:
            raise LayoutError(f"{where}: tensor {key!r} belongs to an LQ-LoRA layer {mod!r} "
                              f"that the config does not list (module entry deleted?)")


# ---------------------------------------------------------------------------- digests
def tensor_digest(t: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's dtype, shape and raw bytes (row-major, little-endian)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h = hashlib.sha256(f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def config_digest(obj: Any) -> str:
    """sha256 (hex) of a JSON-able object in canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"),
                                     allow_nan=False).encode()).hexdigest()


def check_finite(key: str, t: torch.Tensor, where: str) -> None:
    """Refuse a floating tensor with NaN/Inf, naming the first bad position."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise LayoutError(f"{where}: tensor {key!r} has a non-finite value "
                          f"({float(t[pos])}) at {list(pos)}")


def lq_keys(modules: Mapping[str, dict], placeholders: bool = False) -> Dict[str, bool]:
    """``{key: is_float}`` for every tensor of the listed modules."""
    return {k: dt is None for k, (dt, _) in expected_tensors(modules, placeholders).items()}


# ------------------------------------------------ the Hugging Face format, for every writer
# A top-level tensor whose name is the instruction, shown in the load report of a
# transformers that does not know quant_method "lqlora".
HINT_KEY = "lqlora__import_lqlora_ext_before_from_pretrained"


def quantization_digest(format_version: int, modules: Mapping[str, dict],
                        digests: Optional[Mapping[str, str]]) -> str:
    """The ``digest`` field of an HF ``quantization_config``: sha256 of the format version,
    the (validated, normalized) module entries and the tensor digests, canonical JSON."""
    return config_digest({"format_version": format_version, "modules": modules,
                          "digests": digests})


def hf_quantization_config(modules: Mapping[str, dict], digests: Mapping[str, str],
                           format_version: int, freeze_base: bool = True) -> Dict[str, Any]:
    """The ``quantization_config`` dict for ``config.json`` (writers that do not go through
    ``save_pretrained``, e.g. a streaming writer): entries validated, digest computed."""
    mods = validate_modules(dict(modules), "quantization_config")
    return {"quant_method": "lqlora", "format_version": format_version,
            "freeze_base": bool(freeze_base), "modules": mods, "digests": dict(digests),
            "digest": quantization_digest(format_version, mods, dict(digests))}


def placeholder_tensor() -> torch.Tensor:
    return torch.zeros(PLACEHOLDER_SHAPE, dtype=PLACEHOLDER_DTYPE)


def file_digests(path: str) -> Dict[str, str]:
    """:func:`tensor_digest` of every tensor of a safetensors file, from its bytes in
    chunks (no tensor is materialized: for writers of checkpoints bigger than memory)."""
    from .streaming import read_header

    infos, _ = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for key, info in infos.items():
            h = hashlib.sha256(f"{str(info.torch_dtype).replace('torch.', '')}"
                               f"{list(info.shape)}".encode())
            f.seek(info.start)
            left = info.nbytes
            while left:
                buf = f.read(min(16 << 20, left))
                if not buf:
                    raise LayoutError(f"{path}: truncated inside tensor {key!r}")
                h.update(buf)
                left -= len(buf)
            out[key] = h.hexdigest()
    return out


def verify_hf(modules: Mapping[str, dict], digests: Optional[Mapping[str, str]],
              digest: Optional[str], format_version: int, found: Found, read_tensor=None,
              prefixes: Iterable[str] = ("",), where: str = "lqlora") -> None:
    """Everything a reader of the HF format must refuse, in one place (from_pretrained,
    load_quantized, any other reader): given the tensors' names, dtypes and shapes
    (``found``), strict layout both ways with the placeholders; the config's digest; and,
    when ``read_tensor(key) -> Tensor`` is given, every tensor's digest and finite
    adapters/scales. Raises :class:`LayoutError` naming the tensor."""
    prefixes = tuple(prefixes)
    if format_version != FORMAT_VERSION or isinstance(format_version, bool):
        raise LayoutError(f"{where}: checkpoint uses NF format version {format_version!r}; "
                          f"this lqlora_ext reads version {FORMAT_VERSION}")
    check_layout(modules, found, where=where, prefixes=prefixes, placeholders=True)
    if digests is not None and (not isinstance(digests, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in digests.items())):
        raise LayoutError(f"{where}: corrupt quantization_config: 'digests' must map tensor "
                          f"names to sha256 hex strings")
    if digests is None or digest is None:
        raise LayoutError(f"{where}: quantization_config has no digests (written by an earlier "
                          f"lqlora_ext, or edited); load it with that version and save it again")
    if digest != quantization_digest(format_version, modules, digests):
        raise LayoutError(f"{where}: quantization_config was modified after saving (its digest "
                          f"does not match its module entries and tensor digests); refusing a "
                          f"checkpoint whose description may not match its tensors")
    lq = {}
    for key, is_float in lq_keys(modules, placeholders=True).items():
        for p in prefixes:
            if p + key in found:
                lq[p + key] = is_float or key.endswith((".offset", ".scale2"))
    for key in found:
        if key in lq and key not in digests:
            raise LayoutError(f"{where}: tensor {key!r} has no digest in quantization_config "
                              f"(tensor added or config edited after saving)")
    if read_tensor is None:
        return
    for key in found:
        want = digests.get(key)
        if want is None:
            continue  # a tensor the writer did not list (not an LQ one: checked above)
        t = read_tensor(key)
        if tensor_digest(t) != want:
            raise LayoutError(f"{where}: tensor {key!r} does not match its digest (bytes "
                              f"changed after saving: corrupt or edited checkpoint)")
        if lq.get(key):
            check_finite(key, t, where)
