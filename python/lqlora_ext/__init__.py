"""lqlora_ext: LQ-LoRA (low-bit NormalFloat + low-rank) for PyTorch, with C++/CUDA kernels.

Public API (stable names): QuantConfig, nf_code, quantize, NFTensor, qmatmul.
"""
from .formats import FORMAT_VERSION, NFTensor, QuantConfig, nf_code, quantize
from .functional import qmatmul

__version__ = "0.1.0"

__all__ = ["FORMAT_VERSION", "NFTensor", "QuantConfig", "nf_code", "quantize", "qmatmul"]
