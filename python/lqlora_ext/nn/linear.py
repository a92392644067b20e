"""``LQLinear``: a linear layer whose weight is a frozen NFTensor Q plus a trainable
low-rank adapter, computing ``y = x Q^T + scaling * (x A^T) B^T + bias`` (PEFT's LoRA
semantics, METHOD.md §5)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..formats import NFTensor, QuantConfig, nf_code, packed_sizes
from ..formats.functional import qmatmul

_PACKED = ("qcodes", "qscales", "scale2", "offset")


class LQLinear(nn.Module):
    """Quantized linear layer with a LoRA adapter.

    Buffers (frozen, move with ``.to()``, broadcast by DDP): the NFTensor's ``qcodes``,
    ``qscales``, ``scale2``, ``offset`` (docs/format.md) and the non-persistent
    ``levels``. Parameters: ``lora_A [r, in_features]``, ``lora_B [out_features, r]``
    (trainable; both ``None`` after :meth:`pop_lowrank`), ``bias [out_features]`` (frozen,
    optional). ``scaling`` = lora_alpha / r. ``qweight`` is an :class:`NFTensor` view of
    the buffers. There is deliberately no dense ``weight`` attribute: frameworks that probe
    ``module.weight`` would silently dequantize every layer; use :meth:`dense_weight`.
    """

    def __init__(self, qweight: NFTensor, lora_A: Optional[Tensor], lora_B: Optional[Tensor],
                 scaling: float = 1.0, bias: Optional[Tensor] = None):
        super().__init__()
        out_features, in_features = qweight.shape
        self.in_features, self.out_features = in_features, out_features
        self.quant_config: QuantConfig = qweight.config
        self.scaling = float(scaling)
        for k in _PACKED:
            self.register_buffer(k, getattr(qweight, k))
        self.register_buffer("levels", qweight.levels, persistent=False)
        if (lora_A is None) != (lora_B is None):
            raise ValueError("LQLinear: lora_A and lora_B must be given together")
        if lora_A is None:
            self.rank = 0
            self.lora_A = self.lora_B = None
        else:
            r = lora_A.shape[0]
            if lora_A.shape != (r, in_features) or lora_B.shape != (out_features, r):
                raise ValueError(f"LQLinear: lora_A must be [r, {in_features}] and lora_B "
                                 f"[{out_features}, r], got {tuple(lora_A.shape)} and "
                                 f"{tuple(lora_B.shape)}")
            self.rank = r
            self.lora_A = nn.Parameter(lora_A.detach().clone(memory_format=torch.contiguous_format))
            self.lora_B = nn.Parameter(lora_B.detach().clone(memory_format=torch.contiguous_format))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    @classmethod
    def empty(cls, out_features: int, in_features: int, config: QuantConfig, rank: int,
              scaling: float = 1.0, bias: bool = False, dtype: torch.dtype = torch.float32,
              device=None) -> "LQLinear":
        """An uninitialized layer with every tensor at its final shape and dtype (for
        loaders that fill the state dict afterwards, e.g. Hugging Face from_pretrained on
        the meta device). ``levels`` is exact; everything else is garbage until loaded."""
        n_codes, n_scales, n_groups = packed_sizes(out_features * in_features, config)
        q = NFTensor(torch.empty(n_codes, dtype=torch.int32, device=device),
                     torch.empty(n_scales, dtype=torch.int32, device=device),
                     torch.empty(n_groups, dtype=config.scale_dtype, device=device),
                     torch.empty(1, dtype=torch.float32, device=device),
                     (out_features, in_features), config,
                     nf_code(config.bits).to(device if device is not None else "cpu"))
        a = b = None
        if rank:
            a = torch.empty(rank, in_features, dtype=dtype, device=device)
            b = torch.empty(out_features, rank, dtype=dtype, device=device)
        bias_t = torch.empty(out_features, dtype=dtype, device=device) if bias else None
        return cls(q, a, b, scaling, bias_t)

    @property
    def qweight(self) -> NFTensor:
        return NFTensor(self.qcodes, self.qscales, self.scale2, self.offset,
                        (self.out_features, self.in_features), self.quant_config, self.levels)

    def reset_levels(self) -> None:
        """Recompute the non-persistent NormalFloat table on the buffers' device (after a
        loader that created the module on the meta device)."""
        self.levels = nf_code(self.quant_config.bits).to(self.qcodes.device)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense effective weight ``Q + scaling * B A`` ``[out, in]`` (for merging/tests)."""
        w = self.qweight.dequantize()
        if self.lora_A is not None:
            w = w + self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())
        return w.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.lora_A, self.lora_B
        if a is not None and a.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            a, b = a.to(x.dtype), b.to(x.dtype)
        y = qmatmul(x, self.qweight, a, b, self.scaling)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def pop_lowrank(self) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Detach the adapter: returns ``(lora_A, lora_B)`` (data, no grad) and leaves a
        Q-only layer (rank 0). Used when another adapter owner (PEFT) takes over."""
        a, b = self.lora_A, self.lora_B
        self.lora_A = self.lora_B = None
        self.rank = 0
        return (None, None) if a is None else (a.detach(), b.detach())

    def merge_lowrank(self) -> nn.Linear:
        """A dense fp32 ``nn.Linear`` computing the same function (Q + scaling·B·A)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.qcodes.device)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def requantize(self, config: Optional[QuantConfig] = None, rank: Optional[int] = None,
                   **decompose_kwargs) -> "LQLinear":
        """Fold the trained adapter into the weight and decompose ``Q + s·B·A`` afresh
        (METHOD.md §2) into a new Q' + L1' L2' (same config and rank unless given): the
        way to continue training or to ship a merged model at low bits. The result is a
        new layer; this one is unchanged."""
        from ..method.decomposition import decompose

        config = self.quant_config if config is None else config
        rank = self.rank if rank is None else rank
        w = self.dense_weight()
        bias = None if self.bias is None else self.bias.detach()
        if rank == 0:
            from ..formats import quantize
            return LQLinear(quantize(w, config), None, None, self.scaling, bias)
        d = decompose(w, config, rank, **decompose_kwargs)
        root = self.scaling ** 0.5
        return LQLinear(d.q, d.l2 / root, d.l1 / root, self.scaling, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, quant={self.quant_config.name}, scaling={self.scaling:g}")


def freeze_base(model: nn.Module) -> None:
    """Leave only the LQLinear adapters trainable (the QLoRA/PEFT convention): every other
    parameter (embeddings, norms, heads, biases) gets ``requires_grad=False``."""
    adapters = {id(p) for m in model.modules() if isinstance(m, LQLinear)
                for p in (m.lora_A, m.lora_B) if p is not None}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters)
