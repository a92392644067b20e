"""PEFT integration: PEFT-owned LoRA adapters on LQ-LoRA quantized layers.

Workflow (the adapters save and load with PEFT's own methods)::

    quantize_model(model, LQLoRAConfig(2.75, rank=64))      # LQLinear: Q + L1 L2
    model.save_pretrained("lq-base")                         # quantized base (HF format)
    peft_model = get_peft_model(model, lqlora_ext.integrations.peft.lora_config(model, lora_dropout=0.05))
    ...train (Trainer or your loop)...
    peft_model.save_pretrained("adapter")                    # adapter_model.safetensors

    base = AutoModelForCausalLM.from_pretrained("lq-base")   # after `import lqlora_ext`
    peft_model = lqlora_ext.integrations.peft.from_pretrained(base, "adapter")

When PEFT wraps an :class:`~lqlora_ext.LQLinear`, the layer's own factors L1 L2 become the
new adapter's initial weights (LQ-LoRA's initialization, METHOD.md §5; rescaled to PEFT's
``lora_alpha / r``) and the base keeps only Q, so the wrapped model computes exactly what it
did before. With ``init_lora_weights`` other than True the factors are dropped and PEFT's
own init applies (the model then starts from Q alone).

Merging: an adapter cannot be added into a packed low-bit weight without re-quantizing, so
``merge()``/``merge_and_unload()`` refuse. :func:`fold_adapters` puts the (trained) adapters
back into plain LQLinear layers, exactly; from there ``LQLinear.merge_lowrank()`` gives a
dense ``nn.Linear`` and ``LQLinear.requantize()`` a fresh Q' + L1' L2' decomposition of
``Q + s·B·A``.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as _PeftLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer

from ..formats.functional import qmatmul
from ..nn.linear import LQLinear
from .hf_hook import attach_hf


def _lq_base(layer: nn.Module) -> LQLinear:
    base = layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer
    if not isinstance(base, LQLinear):
        raise TypeError(f"lqlora_ext.integrations.peft: expected an LQLinear base layer, got "
                        f"{type(base).__name__}")
    return base


class LQLoraLinear(_PeftLoraLinear):
    """PEFT LoRA layer over an :class:`~lqlora_ext.LQLinear` base (which keeps only Q).

    Forward with one active plain adapter (no dropout, no variant): one fused
    ``lqlora.qmatmul`` with the LoRA term; otherwise PEFT's generic path (Q, then each
    adapter).
    """

    def __init__(self, base_layer, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs):
        base = _lq_base(base_layer)
        super().__init__(base_layer, adapter_name, config, r=r, lora_alpha=lora_alpha, **kwargs)
        a, b = base.pop_lowrank()
        if a is None:
            return
        if config.init_lora_weights is not True:
            warnings.warn(f"lqlora_ext.integrations.peft: init_lora_weights={config.init_lora_weights!r}: "
                          f"the LQ-LoRA factors of this layer are dropped (the model starts "
                          f"from Q alone)", stacklevel=2)
            return
        if a.shape[0] != r:
            raise ValueError(f"lqlora_ext.integrations.peft: the LQ-LoRA layer has rank {a.shape[0]} but "
                             f"LoraConfig asks r={r}; use the quantization rank "
                             f"(lqlora_ext.integrations.peft.lora_config(model) sets it)")
        with torch.no_grad():
            self.lora_A[adapter_name].weight.copy_(a)
            self.lora_B[adapter_name].weight.copy_(b * (base.scaling / self.scaling[adapter_name]))

    # PEFT's generic probes look for a dense `weight`; LQLinear has none by design.
    def _get_in_out_features(self, module):
        base = _lq_base(module)
        return base.in_features, base.out_features

    def _get_base_layer_device_and_dtype(self, base_layer):
        return base_layer.qcodes.device, None  # adapters keep their own (fp32) dtype

    def _fusable(self, adapter_names) -> Optional[str]:
        if self.disable_adapters or self.merged or adapter_names is not None:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1:
            return None
        a = active[0]
        if a in self.lora_variant or self.lora_bias.get(a, False) or \
                not isinstance(self.lora_dropout[a], nn.Identity):
            return None
        return a

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        name = self._fusable(kwargs.get("adapter_names"))
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if A.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            A, B = A.to(x.dtype), B.to(x.dtype)
        y = qmatmul(x, base.qweight, A, B, self.scaling[name])
        if base.bias is not None:
            y = y + base.bias.to(y.dtype)
        return y

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError(
            "lqlora_ext: a LoRA adapter cannot be merged into a packed low-bit weight without "
            "re-quantization. Use lqlora_ext.integrations.peft.fold_adapters(peft_model) to get LQLinear "
            "layers (Q + adapter, exact), then LQLinear.merge_lowrank() for a dense layer or "
            "LQLinear.requantize() for a new low-bit decomposition.")

    def unmerge(self) -> None:
        return None  # nothing is ever merged

    def __repr__(self) -> str:
        return "lqlora." + super().__repr__()


def register(config: LoraConfig) -> LoraConfig:
    """Teach a LoraConfig to wrap LQLinear layers with :class:`LQLoraLinear` (PEFT's custom
    module mechanism; the mapping lives on the config, so loading needs it too)."""
    config._register_custom_module({LQLinear: LQLoraLinear})
    return config


def lora_config(model: nn.Module, **kwargs) -> LoraConfig:
    """A LoraConfig targeting every LQLinear of ``model``, with ``r`` and ``lora_alpha``
    matching the quantization (so the LQ-LoRA factors carry over unchanged). Other keyword
    arguments go to LoraConfig (lora_dropout, task_type, ...)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LQLinear)}
    if not layers:
        raise ValueError("lqlora_ext.integrations.peft.lora_config: the model has no LQLinear layers "
                         "(run lqlora_ext.quantize_model first)")
    ranks = {m.rank for m in layers.values()}
    scalings = {m.scaling for m in layers.values()}
    if len(ranks) != 1 or len(scalings) != 1:
        raise ValueError(f"lqlora_ext.integrations.peft.lora_config: LQLinear layers disagree on rank "
                         f"{sorted(ranks)} / scaling {sorted(scalings)}; pass r, lora_alpha "
                         f"and target_modules yourself")
    r, s = ranks.pop(), scalings.pop()
    kwargs.setdefault("r", r)
    kwargs.setdefault("lora_alpha", s * kwargs["r"])
    kwargs.setdefault("target_modules", sorted(layers))
    return register(LoraConfig(**kwargs))


def from_pretrained(base: nn.Module, adapter_dir: str, **kwargs) -> PeftModel:
    """``PeftModel.from_pretrained`` for an LQ-LoRA base (registers the custom layer)."""
    config = register(LoraConfig.from_pretrained(adapter_dir))
    return PeftModel.from_pretrained(base, adapter_dir, config=config, **kwargs)


def fold_adapters(model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """Replace every :class:`LQLoraLinear` by its base LQLinear carrying the adapter
    ``adapter_name`` (exact: ``Q + scaling·B·A`` is what the layer computed). Returns the
    underlying model (unwrapped from PeftModel)."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, LQLoraLinear):
            continue
        base = mod.get_base_layer()
        if adapter_name in mod.lora_A:
            if mod.lora_bias.get(adapter_name, False) or adapter_name in mod.lora_variant:
                raise ValueError(f"fold_adapters: {name} uses a LoRA variant/bias that "
                                 f"LQLinear cannot represent")
            A = mod.lora_A[adapter_name].weight.detach()
            B = mod.lora_B[adapter_name].weight.detach()
            base.lora_A = nn.Parameter(A.clone())
            base.lora_B = nn.Parameter(B.clone())
            base.rank, base.scaling = A.shape[0], float(mod.scaling[adapter_name])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, base)
    attach_hf(model, freeze=False)  # the quantization_config now records the adapters
    return model
