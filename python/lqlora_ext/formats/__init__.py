"""The storage layer: quantization configs, NormalFloat code books, the packed ``NFTensor``
(whose docstring is the storage contract) and the functional ops on it."""
from .functional import qmatmul
from .nf import (BLOCK_SIZES, FORMAT_NAME, FORMAT_VERSION, SCALE_BITS, SCALE_BLOCK_SIZES,
                 NFTensor, QuantConfig, nf_code, packed_sizes, quantize)

__all__ = ["BLOCK_SIZES", "FORMAT_NAME", "FORMAT_VERSION", "SCALE_BITS", "SCALE_BLOCK_SIZES",
           "NFTensor", "QuantConfig", "nf_code", "packed_sizes", "quantize", "qmatmul"]
