"""Hugging Face transformers integration: ``quant_method = "lqlora"``.

After :func:`~lqlora_ext.quantize_model` on a ``PreTrainedModel``, ``model.save_pretrained``
writes the usual safetensors shards plus ``config.json`` with a ``quantization_config``
(quant_method "lqlora", the NF format version and one entry per LQLinear: shape, rank,
scaling, bias, quant config). With lqlora_ext imported, ``AutoModel*.from_pretrained``
reads it, swaps the named ``nn.Linear`` skeletons for :class:`~lqlora_ext.LQLinear`
before the weights are read (on the meta device, so nothing dense is materialized) and
loads the packed buffers and adapters as they were saved. The quantizer reports itself
trainable (QAT-style: the adapters live inside LQLinear), so ``Trainer`` accepts the model
without PEFT.

Importing this module imports transformers; ``lqlora_ext`` registers it lazily (see
``_hf_hook``), so ``import lqlora_ext`` stays cheap for kernel-only users.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from torch import nn
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING,
                                          AUTO_QUANTIZER_MAPPING)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..formats import FORMAT_VERSION, QuantConfig, packed_sizes
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
    (docs/format.md); freeze_base: after loading, only ``lora_A``/``lora_B`` train.
    """

    def __init__(self, modules: Optional[Dict[str, dict]] = None,
                 format_version: int = FORMAT_VERSION, freeze_base: bool = True,
                 quant_method: str = QUANT_METHOD, **kwargs):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"LQLoRAQuantizationConfig: quant_method must be "
                             f"{QUANT_METHOD!r}, got {quant_method!r}")
        if format_version != FORMAT_VERSION:
            raise ValueError(f"lqlora: checkpoint uses NF format version {format_version}; "
                             f"this lqlora_ext reads version {FORMAT_VERSION}")
        self.quant_method = QUANT_METHOD
        self.format_version = int(format_version)
        self.freeze_base = bool(freeze_base)
        self.modules = {}
        for name, e in (modules or {}).items():
            try:
                out, inp = (int(v) for v in e["shape"])
                entry = {"shape": [out, inp], "rank": int(e["rank"]),
                         "scaling": float(e["scaling"]), "bias": bool(e["bias"]),
                         "quant": QuantConfig.from_dict(e["quant"]).to_dict()}
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"lqlora: corrupt quantization_config entry for module "
                                 f"{name!r}: {err}") from None
            self.modules[name] = entry
        for k, v in kwargs.items():  # fields a newer writer added: keep them round-trippable
            setattr(self, k, v)

    @classmethod
    def from_model(cls, model: nn.Module, freeze_base: bool = True):
        return cls({n: _module_entry(m) for n, m in model.named_modules()
                    if isinstance(m, LQLinear)}, freeze_base=freeze_base)


def _expected_tensors(modules: Dict[str, dict]) -> Dict[str, tuple]:
    """``{state-dict key: (dtype or None for float, shape)}`` every LQLinear must load."""
    out = {}
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
    return out


_ST_DTYPES = {"I32": torch.int32, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16}


def check_checkpoint_files(files, modules: Dict[str, dict], prefixes=("",)) -> None:
    """Refuse, before anything is loaded, safetensors files that are unreadable (truncated,
    corrupt) or whose LQ tensors are missing or disagree with ``quantization_config``:
    transformers would otherwise warn and leave those buffers uninitialized."""
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
            import json
            header = json.loads(fh.read(n))
        end = 8 + n + max((v["data_offsets"][1] for k, v in header.items()
                           if k != "__metadata__"), default=0)
        if size < end:
            raise ValueError(f"lqlora: checkpoint file {f} is truncated ({size} bytes, its "
                             f"header describes {end})")
    for key, (dtype, shape) in _expected_tensors(modules).items():
        hit = next((found[p + key] for p in prefixes if p + key in found), None)
        if hit is None:
            raise ValueError(f"lqlora: checkpoint lacks tensor {key!r} that its "
                             f"quantization_config describes (mismatched or corrupt checkpoint)")
        if hit[1] != shape or (dtype is not None and hit[0] != dtype):
            raise ValueError(f"lqlora: tensor {key!r} is {hit[0]} {list(hit[1])} in the "
                             f"checkpoint, but quantization_config implies "
                             f"{dtype or 'float'} {list(shape)} (mismatched config)")


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
        modules = self.quantization_config.modules
        if not modules:
            raise ValueError("lqlora: quantization_config lists no modules (corrupt config)")
        prefix = getattr(model, "base_model_prefix", "")
        check_checkpoint_files(checkpoint_files, modules,
                               prefixes=("", f"{prefix}.") if prefix else ("",))
        install_skeletons(model, modules)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for m in model.modules():
            if isinstance(m, LQLinear):
                m.reset_levels()
                if not torch.isfinite(m.offset).all() or not torch.isfinite(m.scale2.float()).all():
                    raise ValueError("lqlora: non-finite scales after loading (corrupt checkpoint)")
        if self.quantization_config.freeze_base:
            freeze_base(model)
        return model

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
