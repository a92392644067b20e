"""Tiny Hugging Face models built from configs (no downloads) and a quantization recipe
small enough for unit tests; shared by the integration and training tests."""
from __future__ import annotations

import torch
import transformers

from lqlora_ext import LQLinear, LQLoRAConfig, QuantConfig, quantize_model

# Mixed scale dtypes so loaders that cast floats would be caught.
GRID = [QuantConfig(2, 64, 8, 256), QuantConfig(3, 32, 4, 64, torch.bfloat16),
        QuantConfig(4, 64, 8, 256, torch.float16)]


def llama_config(hidden: int = 64, layers: int = 2, **kw) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                    num_hidden_layers=layers, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=128,
                                    max_position_embeddings=64, **kw)


def bert_config(hidden: int = 64, **kw) -> transformers.BertConfig:
    return transformers.BertConfig(hidden_size=hidden, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=2 * hidden,
                                   vocab_size=128, max_position_embeddings=64, **kw)


def llama(seed: int = 0, **kw) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_config(**kw)).eval()


def bert(seed: int = 0, cls: str = "BertForMaskedLM", **kw):
    torch.manual_seed(seed)
    return getattr(transformers, cls)(bert_config(**kw)).eval()


def lq_config(**kw) -> LQLoRAConfig:
    base = dict(budget_bits=3.0, rank=4, grid=GRID, workers=1, progress=False, lora_alpha=8)
    base.update(kw)
    return LQLoRAConfig(**base)


def quantized_llama(seed: int = 0, model_kw=None, **kw):
    m = llama(seed, **(model_kw or {}))
    quantize_model(m, lq_config(**kw))
    return m


def tokens(batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, seq), generator=g)


def mixed_llama(configs=GRID, seed: int = 0):
    """A quantized tiny Llama whose layers cycle through ``configs`` (different bits, block
    sizes and scale dtypes, hence packed lengths, inside every decoder layer), as the ILP
    would mix them but without its cost profile: fast enough for multi-process tests."""
    from lqlora_ext.integrations.hf_hook import attach_hf

    m = quantized_llama(seed, grid=[configs[0]], max_iters=2)
    layers = [(n, lay) for n, lay in m.named_modules() if isinstance(lay, LQLinear)]
    for i, (name, lay) in enumerate(layers):
        cfg = configs[i % len(configs)]
        if cfg != lay.quant_config:
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent), child, lay.requantize(cfg, max_iters=2))
    attach_hf(m)
    return m
