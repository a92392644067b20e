"""Hugging Face transformers integration: ``quant_method = "lqlora"``.

After :func:`~lqlora_ext.quantize_model` on a ``PreTrainedModel``, ``model.save_pretrained``
writes the usual safetensors shards plus ``config.json`` with a ``quantization_config``:
quant_method "lqlora", the NF format version, one entry per LQLinear (shape, rank, scaling,
bias, quant config), ``digests`` (the sha256 of every tensor written, by name) and
``digest`` (the sha256 of the format version, the entries and the digests, so a hand-edited
entry is refused rather than loaded wrong). Each LQLinear also gets a placeholder
``<module>.weight`` (uint8, shape [0]): a transformers without lqlora_ext registered would
otherwise ignore the unknown quant_method and hand back random dense projections; with the
placeholder it stops with a size-mismatch error, and the checkpoint's
``lqlora__import_lqlora_ext_before_from_pretrained`` tensor in its load report says what
to do.

With lqlora_ext imported, ``AutoModel*.from_pretrained`` reads the config, refuses (before
anything is loaded) files that are truncated or whose tensors do not match the entries
exactly, both ways, or their digests, or hold non-finite adapters; then swaps the named
``nn.Linear`` skeletons for :class:`~lqlora_ext.LQLinear` (on the meta device, so nothing
dense is materialized) and loads the packed buffers and adapters as they were saved. The
quantizer reports itself trainable (QAT-style: the adapters live inside LQLinear), so
``Trainer`` accepts the model without PEFT.

Importing this module imports transformers; ``lqlora_ext`` registers it lazily (see
``_hf_hook``), so ``import lqlora_ext`` stays cheap for kernel-only users.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Iterable, Optional

import torch
from torch import nn
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING,
                                          AUTO_QUANTIZER_MAPPING)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..formats import FORMAT_VERSION, QuantConfig
from ..io.layout import (HINT_KEY, PLACEHOLDER, LayoutError, check_finite, lq_keys,
                         placeholder_tensor, quantization_digest, tensor_digest,
                         validate_modules, verify_hf)
from ..nn.linear import LQLinear, freeze_base

QUANT_METHOD = "lqlora"
_PACKED = ("qcodes", "qscales", "scale2", "offset")


def _module_entry(m: LQLinear) -> Dict[str, Any]:
    return {"shape": [m.out_features, m.in_features], "rank": m.rank, "scaling": m.scaling,
            "bias": m.bias is not None, "quant": m.quant_config.to_dict()}


class LQLoRAQuantizationConfig(QuantizationConfigMixin):
    """``config.quantization_config`` of an LQ-LoRA model.

    modules: ``{module name: {"shape": [out, in], "rank", "scaling", "bias",
    "quant": QuantConfig.to_dict()}}``; format_version: the NF packed format
    (docs/format.md); freeze_base: after loading, only ``lora_A``/``lora_B`` train;
    digests: ``{tensor name: sha256 hex}`` of the saved tensors (filled at save time);
    digest: as read from a checkpoint (``to_dict`` computes the current one).
    """

    def __init__(self, modules: Optional[Dict[str, dict]] = None,
                 format_version: int = FORMAT_VERSION, freeze_base: bool = True,
                 quant_method: str = QUANT_METHOD, digests: Optional[Dict[str, str]] = None,
                 digest: Optional[str] = None, **kwargs):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"LQLoRAQuantizationConfig: quant_method must be "
                             f"{QUANT_METHOD!r}, got {quant_method!r}")
        if format_version != FORMAT_VERSION or isinstance(format_version, bool):
            raise ValueError(f"lqlora: checkpoint uses NF format version {format_version!r}; "
                             f"this lqlora_ext reads version {FORMAT_VERSION}")
        self.quant_method = QUANT_METHOD
        self.format_version = int(format_version)
        self.freeze_base = bool(freeze_base)
        try:
            self.modules = validate_modules(modules, "quantization_config") if modules else {}
        except LayoutError as e:
            raise ValueError(f"lqlora: corrupt quantization_config entry: {e}") from None
        if digests is not None and (not isinstance(digests, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)
                for k, v in digests.items())):
            raise ValueError("lqlora: corrupt quantization_config: 'digests' must map tensor "
                             "names to sha256 hex strings")
        self.digests = digests
        self.loaded_digest = digest
        for k, v in kwargs.items():  # fields a newer writer added: keep them round-trippable
            setattr(self, k, v)

    @classmethod
    def from_model(cls, model: nn.Module, freeze_base: bool = True):
        return cls({n: _module_entry(m) for n, m in model.named_modules()
                    if isinstance(m, LQLinear)}, freeze_base=freeze_base)

    def current_digest(self) -> str:
        return quantization_digest(self.format_version, self.modules, self.digests)

    def to_dict(self) -> Dict[str, Any]:
        d = {k: v for k, v in super().to_dict().items() if k != "loaded_digest"}
        d["digest"] = self.current_digest()
        return d


_ST_DTYPES = {"I32": torch.int32, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "F64": torch.float64, "U8": torch.uint8,
              "I8": torch.int8, "I16": torch.int16, "I64": torch.int64, "BOOL": torch.bool}


def read_file_layout(files: Iterable[str]) -> Dict[str, tuple]:
    """``{key: (dtype, shape)}`` of every tensor in safetensors ``files`` (headers only),
    refusing unreadable or truncated files by name."""
    from safetensors import safe_open

    found: Dict[str, tuple] = {}
    for f in files or []:
        if not str(f).endswith(".safetensors"):
            raise ValueError(f"lqlora: checkpoint file {f} is not safetensors (lqlora models "
                             f"are saved with save_pretrained(safe_serialization=True))")
        size = os.path.getsize(f)
        try:
            with safe_open(f, framework="pt") as sf:
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    found[k] = (_ST_DTYPES.get(sl.get_dtype()), tuple(sl.get_shape()))
        except Exception as err:  # safetensors raises its own types
            raise ValueError(f"lqlora: cannot read checkpoint file {f} ({size} bytes): {err} "
                             f"(truncated or corrupt?)") from None
        # safetensors validates the header but reads data lazily: a file cut inside the
        # data section still opens. Its header's offsets give the true length.
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        end = 8 + n + max((v["data_offsets"][1] for k, v in header.items()
                           if k != "__metadata__"), default=0)
        if size < end:
            raise ValueError(f"lqlora: checkpoint file {f} is truncated ({size} bytes, its "
                             f"header describes {end})")
    return found


def verify_checkpoint(qc: LQLoRAQuantizationConfig, found: Dict[str, tuple],
                      read_tensor=None, prefixes=("",), where: str = "lqlora") -> None:
    """:func:`lqlora_ext.io.layout.verify_hf` for a parsed config (the one function every
    reader of the HF format goes through); raises ValueError naming the tensor."""
    try:
        verify_hf(qc.modules, qc.digests, qc.loaded_digest, qc.format_version, found,
                  read_tensor, prefixes, where)
    except LayoutError as e:
        raise ValueError(str(e)) from None


def check_checkpoint_files(files, qc: LQLoRAQuantizationConfig, prefixes=("",)) -> None:
    """Refuse, before anything is loaded, safetensors files that are unreadable (truncated,
    corrupt), whose tensors do not match ``quantization_config`` (both ways) or their
    digests, or that hold non-finite adapters or scales: transformers would otherwise warn
    and leave those buffers uninitialized, or load them wrong."""
    from safetensors import safe_open

    files = list(files or [])
    found = read_file_layout(files)
    where_of = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            where_of.update({k: f for k in sf.keys()})
    handles = {}

    def read(key):
        f = where_of[key]
        if f not in handles:
            handles[f] = safe_open(f, framework="pt").__enter__()
        return handles[f].get_tensor(key)

    try:
        verify_checkpoint(qc, found, read, prefixes, where="lqlora")
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)


def hf_state_dict(model: nn.Module, qc: LQLoRAQuantizationConfig) -> Dict[str, torch.Tensor]:
    """The state dict save_pretrained writes for an lqlora model: the model's own plus the
    placeholders and the hint; fills ``qc.modules`` from the model and ``qc.digests``.
    Refuses non-finite adapters or scales (such a model would not load back), and a
    model sharded by FSDP2, whose state dict holds only this rank's shards."""
    sd = dict(model.state_dict())
    sharded = next((k for k, t in sd.items() if _is_dtensor(t)), None)
    if sharded is not None:
        raise ValueError(f"save_pretrained: {sharded!r} is a DTensor (the model is sharded by "
                         f"FSDP2; each rank holds only its shards); save it with "
                         f"lqlora_ext.distributed.fsdp.save_pretrained(model, path), which "
                         f"gathers the full tensors first")
    qc.modules = validate_modules({n: _module_entry(m) for n, m in model.named_modules()
                                   if isinstance(m, LQLinear)}, "save_pretrained")
    for key, is_float in lq_keys(qc.modules).items():
        if key in sd and (is_float or key.endswith((".offset", ".scale2"))):
            try:
                check_finite(key, sd[key], "save_pretrained")
            except LayoutError as e:
                raise ValueError(f"{e} (diverged training?); not saving a model that would "
                                 f"not load back") from None
    for name in qc.modules:
        sd[f"{name}.{PLACEHOLDER}"] = placeholder_tensor()
    sd[HINT_KEY] = placeholder_tensor()
    qc.digests = {k: tensor_digest(t) for k, t in sd.items()}
    return sd


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def install_skeletons(model: nn.Module, modules: Dict[str, dict]) -> None:
    """Replace each named ``nn.Linear`` by an uninitialized :class:`LQLinear` of the
    recorded shape/config on the same device and dtype (meta during from_pretrained)."""
    for name, e in modules.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"lqlora: quantization_config names module {name!r}, which the "
                             f"model does not have (config from another architecture?)") from None
        if not isinstance(old, (nn.Linear, LQLinear)) or \
                [old.out_features, old.in_features] != e["shape"]:
            raise ValueError(f"lqlora: {name} is {type(old).__name__} "
                             f"{getattr(old, 'out_features', '?')}x"
                             f"{getattr(old, 'in_features', '?')}, quantization_config has a "
                             f"{e['shape'][0]}x{e['shape'][1]} LQLinear")
        ref = old.lora_A if isinstance(old, LQLinear) and old.lora_A is not None else \
            getattr(old, "weight", None)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        device = ref.device if ref is not None else None
        layer = LQLinear.empty(*e["shape"], QuantConfig.from_dict(e["quant"]), e["rank"],
                               e["scaling"], e["bias"], dtype=dtype, device=device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)


class LQLoRAHfQuantizer(HfQuantizer):
    """Loads pre-quantized LQ-LoRA checkpoints (quantize with lqlora_ext.quantize_model)."""

    requires_calibration = True  # from_pretrained cannot quantize: the ILP needs the weights

    def validate_environment(self, *args, **kwargs):
        dm = kwargs.get("device_map")
        if isinstance(dm, dict) and "disk" in dm.values():
            raise ValueError("lqlora: disk offload of LQ-LoRA layers is not supported")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        qc = self.quantization_config
        if not qc.modules:
            raise ValueError("lqlora: quantization_config lists no modules (corrupt config)")
        prefix = getattr(model, "base_model_prefix", "")
        check_checkpoint_files(checkpoint_files, qc,
                               prefixes=("", f"{prefix}.") if prefix else ("",))
        install_skeletons(model, qc.modules)
        # The placeholders and the hint are for loaders without lqlora_ext: not reported.
        ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        ignore.add("(" + "|".join(re.escape(f"{n}.{PLACEHOLDER}") for n in qc.modules)
                   + f"|{re.escape(HINT_KEY)})$")
        model._keys_to_ignore_on_load_unexpected = ignore
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for m in model.modules():
            if isinstance(m, LQLinear):
                m.reset_levels()
        if self.quantization_config.freeze_base:
            freeze_base(model)
        return model

    def get_state_dict_and_metadata(self, model):
        """save_pretrained's state dict: placeholders added, digests recorded in the config
        it writes next (transformers saves the config after calling this)."""
        qc = getattr(model.config, "quantization_config", None)
        if not isinstance(qc, LQLoRAQuantizationConfig):
            qc = self.quantization_config
            model.config.quantization_config = qc
        self.quantization_config = qc
        return hf_state_dict(model, qc), {}

    def is_serializable(self, *args, **kwargs):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True  # the trainable adapters live inside LQLinear: no PEFT wrapper needed

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Make ``quant_method "lqlora"`` known to transformers (idempotent)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, LQLoRAQuantizationConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, LQLoRAHfQuantizer)


def attach(model: nn.Module, freeze: bool = True) -> None:
    """Mark a ``PreTrainedModel`` holding LQLinear layers as an lqlora-quantized model, the
    state from_pretrained leaves it in: ``save_pretrained`` then writes the
    quantization_config and ``Trainer`` accepts it. No-op for other modules."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return
    register()
    qc = LQLoRAQuantizationConfig.from_model(model, freeze_base=freeze)
    model.config.quantization_config = qc
    model.hf_quantizer = LQLoRAHfQuantizer(qc, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            m.config._is_quantized = True
