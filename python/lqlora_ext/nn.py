"""``LQLinear``: a linear layer whose weight is a frozen NFTensor Q plus a trainable
low-rank adapter, computing ``y = x Q^T + scaling * (x A^T) B^T + bias`` (PEFT's LoRA
semantics, METHOD.md §5)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .formats import NFTensor, QuantConfig
from .functional import qmatmul

_PACKED = ("qcodes", "qscales", "scale2", "offset")


class LQLinear(nn.Module):
    """Quantized linear layer with a LoRA adapter.

    Buffers (frozen, move with ``.to()``/DDP broadcast): the NFTensor's ``qcodes``,
    ``qscales``, ``scale2``, ``offset`` (docs/format.md) and the non-persistent
    ``levels``. Parameters: ``lora_A [r, in_features]``, ``lora_B [out_features, r]``
    (trainable), ``bias [out_features]`` (frozen, optional). ``scaling`` = lora_alpha / r.
    ``qweight`` returns the weight as an :class:`NFTensor` view of the buffers.
    """

    def __init__(self, qweight: NFTensor, lora_A: Tensor, lora_B: Tensor, scaling: float = 1.0,
                 bias: Optional[Tensor] = None):
        super().__init__()
        out_features, in_features = qweight.shape
        r = lora_A.shape[0]
        if lora_A.shape != (r, in_features) or lora_B.shape != (out_features, r):
            raise ValueError(f"LQLinear: lora_A must be [r, {in_features}] and lora_B "
                             f"[{out_features}, r], got {tuple(lora_A.shape)} and "
                             f"{tuple(lora_B.shape)}")
        self.in_features, self.out_features, self.rank = in_features, out_features, r
        self.quant_config: QuantConfig = qweight.config
        self.scaling = float(scaling)
        for k in _PACKED:
            self.register_buffer(k, getattr(qweight, k))
        self.register_buffer("levels", qweight.levels, persistent=False)
        self.lora_A = nn.Parameter(lora_A.detach().clone())
        self.lora_B = nn.Parameter(lora_B.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    @property
    def qweight(self) -> NFTensor:
        return NFTensor(self.qcodes, self.qscales, self.scale2, self.offset,
                        (self.out_features, self.in_features), self.quant_config, self.levels)

    @property
    def weight(self) -> Tensor:
        """Dense effective weight ``Q + scaling * B A`` (fp32; for inspection/merging)."""
        return self.qweight.dequantize() + self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.lora_A, self.lora_B
        if a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        y = qmatmul(x, self.qweight, a, b, self.scaling)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def merge_lowrank(self) -> nn.Linear:
        """A dense ``nn.Linear`` computing the same function (Q + scaling·B·A, fp32)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.qcodes.device)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, quant={self.quant_config.name}, scaling={self.scaling:g}")
