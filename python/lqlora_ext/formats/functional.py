"""User-facing functional ops on :class:`~lqlora_ext.formats.NFTensor` weights."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import ops
from .nf import NFTensor

_ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def qmatmul(x: Tensor, qw: NFTensor, lora_a: Optional[Tensor] = None,
            lora_b: Optional[Tensor] = None, lora_scale: float = 1.0) -> Tensor:
    """``x @ W.T (+ lora_scale * (x @ lora_a.T) @ lora_b.T)`` with ``W = qw.dequantize()``.

    x: ``[..., K]`` fp32/bf16/fp16 (any leading dims); qw: ``[N, K]``; lora_a ``[r, K]``;
    lora_b ``[N, r]``. Returns ``[..., N]`` in x's dtype. Differentiable in x, lora_a and
    lora_b (not in the frozen quantized weight). Backed by ``torch.ops.lqlora.qmatmul``.

    Under ``torch.autocast`` it behaves like ``F.linear`` (a lower-precision op): x and the
    LoRA factors are cast to the autocast dtype and so is the result; the packed weight and
    its scales are never cast.
    """
    if not isinstance(qw, NFTensor):
        raise TypeError(f"qmatmul: qw must be an NFTensor, got {type(qw).__name__}")
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"qmatmul: x must be float32, bfloat16 or float16, got {x.dtype}")
    n, k = qw.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"qmatmul: x's last dim must be K={k} (weight {tuple(qw.shape)}), "
                         f"got x of shape {tuple(x.shape)}")
    if x.device != qw.device:
        raise ValueError(f"qmatmul: x is on {x.device} but the weight is on {qw.device}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("qmatmul: lora_a and lora_b must be given together")
    if lora_a is not None:
        if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[1] != k or \
                lora_b.shape[0] != n or lora_b.shape[1] != lora_a.shape[0]:
            raise ValueError(f"qmatmul: LoRA shapes must be lora_a [r, {k}] and lora_b "
                             f"[{n}, r], got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
        if lora_a.device != x.device or lora_b.device != x.device:
            raise ValueError(f"qmatmul: LoRA factors are on {lora_a.device}/{lora_b.device}, "
                             f"x is on {x.device}")
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        if dt in _ACT_DTYPES:
            x = x.to(dt)
            if lora_a is not None:
                lora_a, lora_b = lora_a.to(dt), lora_b.to(dt)
    lead = x.shape[:-1]
    c = qw.config
    y = ops.qmatmul(x.reshape(-1, k), *qw._args(), n, c.bits, c.block_size, c.scale_bits,
                    c.scale_block_size, lora_a, lora_b, lora_scale)
    return y.reshape(*lead, n)
