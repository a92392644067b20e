"""Checkpoints of quantized models in lqlora's own format (safetensors + JSON manifest) for
any ``nn.Module``; the Hugging Face format lives in :mod:`lqlora_ext.integrations.hf`."""
from .checkpoint import load_quantized, save_quantized

__all__ = ["load_quantized", "save_quantized"]
