"""lqlora_ext: LQ-LoRA (low-bit NormalFloat + low-rank) for PyTorch, with C++/CUDA kernels.

Stable public names: QuantConfig, nf_code, quantize, NFTensor, qmatmul, decompose,
Decomposition, estimate_fisher, solve_allocation, config_grid, LQLoRAConfig,
quantize_model, AllocationReport, LQLinear, save_quantized, load_quantized.
"""
from ._compat import check_build as _check_build
_check_build()  # before anything loads _C: a clear ImportError if torch is not the built-for one
from .formats import FORMAT_VERSION, NFTensor, QuantConfig, nf_code, qmatmul, quantize
from .io import load_quantized, save_quantized
from .method.decomposition import Decomposition, decompose
from .nn import AllocationReport, LQLinear, LQLoRAConfig, quantize_model

from .integrations import hf_hook as _hf_hook

__version__ = "0.1.0"
_hf_hook.install()  # quant_method "lqlora" for transformers' from_pretrained, lazily

# Imported on first use: they pull in highspy / autograd-heavy code not every user needs.
_LAZY = {"estimate_fisher": "method.fisher", "solve_allocation": "method.allocation",
         "config_grid": "method.allocation", "profile_costs": "method.profiling",
         "select_linear_modules": "method.targets"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lqlora_ext' has no attribute {name!r}")


__all__ = ["FORMAT_VERSION", "NFTensor", "QuantConfig", "nf_code", "quantize", "qmatmul",
           "Decomposition", "decompose", "LQLoRAConfig", "quantize_model", "AllocationReport",
           "LQLinear", "save_quantized", "load_quantized", *_LAZY]
