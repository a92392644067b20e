"""``LQLinear``: a linear layer whose weight is a frozen NFTensor Q plus a trainable
low-rank adapter, computing ``y = x Q^T + scaling * (x A^T) B^T + bias`` (PEFT's LoRA
semantics, METHOD.md §5)."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..formats import NFTensor, QuantConfig, nf_code, packed_sizes
from ..formats.functional import qmatmul
from ..formats.nf import _CODE_DTYPES, _DTYPE_CODES
from .packed import guarded_apply_fn, is_sharded, packed_parameter, plain_view, unwrap

_PACKED = ("qcodes", "qscales", "scale2", "offset")


class LQLinear(nn.Module):
    """Quantized linear layer with a LoRA adapter.

    Storage contract:

    - ``qcodes``, ``qscales`` (int32), ``scale2`` (``quant_config.scale_dtype``), ``offset``
      (fp32): the NFTensor's packed tensors (docs/format.md), registered as frozen
      ``nn.Parameter`` s (``requires_grad=False``) whose storage is a
      :class:`~lqlora_ext.nn.packed.PackedTensor`. As parameters they are sharded by FSDP2
      (``fully_shard``), bit-exactly and never cast by its MixedPrecisionPolicy; DDP
      broadcasts them like any parameter. State dicts hold them as plain tensors with
      these names and dtypes.
    - Module casts (``.half()``, ``.bfloat16()``, ``.double()``, ``.float()``,
      ``.to(dtype)``) never change them, nor the fp32 non-persistent ``levels`` buffer (the
      NormalFloat table): only ``lora_A``, ``lora_B`` and ``bias`` are cast; device moves
      apply to everything.
    - Parameters: ``lora_A [r, in_features]``, ``lora_B [out_features, r]`` (trainable;
      both ``None`` after :meth:`pop_lowrank`), ``bias [out_features]`` (frozen, optional).
      ``scaling`` = lora_alpha / r. ``qweight`` is an :class:`NFTensor` view of the packed
      tensors.

    There is deliberately no dense ``weight`` attribute: frameworks that probe
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
            setattr(self, k, getattr(qweight, k))  # -> frozen PackedTensor parameters
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

    # -- packed storage -----------------------------------------------------------------
    def _packed_spec(self, name: str) -> Tuple[torch.dtype, int]:
        nc, ns, ng = packed_sizes(self.out_features * self.in_features, self.quant_config)
        return {"qcodes": (torch.int32, nc), "qscales": (torch.int32, ns),
                "scale2": (self.quant_config.scale_dtype, ng), "offset": (torch.float32, 1)}[name]

    def _packed_problem(self, name: str, t: Tensor) -> Optional[str]:
        dtype, length = self._packed_spec(name)
        if t.dtype != dtype or tuple(t.shape) != (length,):
            return (f"{name}: expected {dtype} [{length}] for a "
                    f"[{self.out_features}, {self.in_features}] {self.quant_config.name} "
                    f"weight, got {t.dtype} {list(t.shape)} (mismatched or corrupt tensor)")
        return None

    def __setattr__(self, name: str, value) -> None:
        if name in _PACKED and isinstance(value, Tensor):
            problem = self._packed_problem(name, value)
            if problem:
                raise ValueError(f"LQLinear.{problem}")
            hf_init = getattr(value, "_is_hf_initialized", None)
            value = packed_parameter(value)
            if hf_init is not None:
                value._is_hf_initialized = hf_init  # transformers' loader bookkeeping
        super().__setattr__(name, value)

    def _apply(self, fn, recurse: bool = True):
        levels = self._buffers.get("levels")
        frozen = {id(t) for t in [self._parameters.get(k) for k in _PACKED] + [levels]
                  if t is not None}
        bits = self.quant_config.bits
        rebuild = {} if levels is None else {id(levels): lambda dev: nf_code(bits).to(dev)}
        return super()._apply(guarded_apply_fn(fn, frozen, rebuild), recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for k in _PACKED:  # plain tensors (or DTensors of plain shards), same storage
            if destination.get(prefix + k) is not None:
                destination[prefix + k] = plain_view(destination[prefix + k])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Refuse a dtype change before torch's default copy_ would convert numerically.
        bad = [p for p in (self._packed_problem(k, state_dict[prefix + k]) for k in _PACKED
                           if isinstance(state_dict.get(prefix + k), Tensor)) if p]
        if bad:
            error_msgs.extend(f"{prefix}{m}" for m in bad)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _check_layout_across_ranks(self, group) -> None:
        """Once per layer, before FSDP2 first all-gathers its packed tensors: every rank
        of ``group`` must hold the same layer layout (shape, rank, bias, quant config),
        else the gathered codes would mix quantizations. Raises on every rank alike."""
        if self.__dict__.get("_layout_checked"):
            return
        import torch.distributed as dist

        mine = self.layout_fingerprint()
        dev = self.qcodes.device
        world = dist.get_world_size(group)
        out = [torch.empty(len(mine), dtype=torch.int64, device=dev) for _ in range(world)]
        dist.all_gather(out, torch.tensor(mine, dtype=torch.int64, device=dev), group=group)
        rows = [t.tolist() for t in out]
        if any(r != rows[0] for r in rows):
            desc = "; ".join(f"rank {i}: {_describe_fingerprint(r)}" for i, r in enumerate(rows))
            raise ValueError(f"LQLinear [{self.out_features}x{self.in_features}]: the ranks of "
                             f"this FSDP group hold different quantizations of this layer "
                             f"({desc}); every rank must hold the same quantized model "
                             f"(quantize once and load the checkpoint on every rank)")
        self.__dict__["_layout_checked"] = True

    def layout_fingerprint(self) -> List[int]:
        """Integers identifying the layer's layout: ``[out, in, rank, bias, bits,
        block_size, scale_bits, scale_block_size, scale dtype code]``."""
        c = self.quant_config
        return [self.out_features, self.in_features, self.rank, int(self.bias is not None),
                c.bits, c.block_size, c.scale_bits, c.scale_block_size,
                _DTYPE_CODES[c.scale_dtype]]

    def _plain_packed(self, name: str) -> Tensor:
        t = getattr(self, name)
        if is_sharded(t):
            raise RuntimeError(
                f"LQLinear [{self.out_features}x{self.in_features}]: its packed tensors are "
                f"FSDP2 shards (DTensor) outside the sharded forward; gather them first "
                f"(FSDPModule.unshard(), or lqlora_ext.distributed.fsdp.full_state_dict)")
        return unwrap(t)

    @property
    def qweight(self) -> NFTensor:
        return NFTensor(*(self._plain_packed(k) for k in _PACKED),
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


def _describe_fingerprint(f: List[int]) -> str:
    out, inp, rank, bias, bits, bs, sb, sbs, dcode = f
    try:
        name = QuantConfig(bits, bs, sb, sbs, _CODE_DTYPES[dcode]).name
    except (KeyError, ValueError):
        name = f"invalid config {f[4:]}"
    return f"{out}x{inp} rank {rank}{' +bias' if bias else ''} {name}"


def freeze_base(model: nn.Module) -> None:
    """Leave only the LQLinear adapters trainable (the QLoRA/PEFT convention): every other
    parameter (embeddings, norms, heads, biases) gets ``requires_grad=False``."""
    adapters = {id(p) for m in model.modules() if isinstance(m, LQLinear)
                for p in (m.lora_A, m.lora_B) if p is not None}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters)
