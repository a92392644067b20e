"""Checkpoints of quantized models in lqlora's own format (safetensors + JSON manifest) for
any ``nn.Module``; the Hugging Face format lives in :mod:`lqlora_ext.integrations.hf`.
Checkpoints bigger than memory: :mod:`.streaming` (tensor-at-a-time safetensors reader and
writer), :mod:`.fisher_store` (Fisher directories) and :mod:`.stream_quantize` (the
streaming, resumable, optionally sharded quantization job)."""
from .checkpoint import load_quantized, save_quantized

__all__ = ["load_quantized", "save_quantized"]
