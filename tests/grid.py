"""Quantization-config grids and test weights shared by the test files.

The full grid is bits {2,3,4,5,8} x block sizes {16..256} x scale_bits {2,3,4,8} x
B1 {16,64,256} x scale dtypes {fp32,bf16,fp16} = 900 configs; it runs in full on one small
awkward shape, and a coprime "diagonal" walks it across the real and awkward shapes so each
shape meets a different config without the suite multiplying out.
"""
from __future__ import annotations

import itertools
import math

import torch

from lqlora_ext import QuantConfig

BITS = (2, 3, 4, 5, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)
SCALE_BITS = (2, 3, 4, 8)
SCALE_BLOCK_SIZES = (16, 64, 256)
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

FULL = tuple(QuantConfig(*c) for c in itertools.product(
    BITS, BLOCK_SIZES, SCALE_BITS, SCALE_BLOCK_SIZES, SCALE_DTYPES))
DEFAULT = QuantConfig(4)  # NF4, B0=64, 8-bit scales, B1=256, fp32: 4.127 bits/param


def diagonal(i: int) -> QuantConfig:
    """The i-th config of a walk that moves every axis each step (coprime strides)."""
    return QuantConfig(BITS[i % 5], BLOCK_SIZES[(2 * i + 1) % 5], SCALE_BITS[(i + 1) % 4],
                       SCALE_BLOCK_SIZES[i % 3], SCALE_DTYPES[(i + 2) % 3])


# A small set touching every value of every axis at least once (for the slower checks).
SAMPLE = tuple({diagonal(i).name: diagonal(i) for i in range(15)}.values()) + (DEFAULT,)


def make_weight(rows: int, cols: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Gaussian weight with log-normal per-row scales and a few outliers, so block absmax
    values (hence scale codes) spread over their whole range as in real checkpoints."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    # The row scales' exp through math.exp: torch's CPU exp (fp32 and fp64) does not always
    # take the same vectorized path here, its results differ in the last bit from one
    # process to the next, and tests that build a weight twice (packed, then dequantized to
    # compare with) need it bit-stable.
    z = torch.randn(rows, 1, generator=g)
    w = w * torch.tensor([[math.exp(0.5 * v)] for v in z.flatten().tolist()], dtype=torch.float32)
    n = rows * cols
    idx = torch.randint(0, n, (max(1, n // 1000),), generator=g)
    w.view(-1)[idx] *= 8.0
    return w.to(dtype)


def ids(configs):
    return [c.name for c in configs]
