"""``PackedTensor``: the storage of LQLinear's frozen packed tensors (``qcodes``,
``qscales``, ``scale2``, ``offset``), so that they can be sharded by FSDP2 bit-exactly.

A ``PackedTensor`` wraps one plain tensor ``_data`` of the same shape, dtype and device and
behaves like it, with three differences:

- Structural ops (views, slices, splits, copies, device moves, ``detach``, ``clone``,
  ``new_zeros``/``empty_like``) keep the wrapper, as FSDP2 needs when it cuts a parameter
  into padded shards; every other op (kernels, arithmetic, dtype casts, comparisons) returns
  plain tensors, so nothing downstream ever sees the wrapper.
- FSDP2 all-gather extension (``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``, the
  hooks torchao's NF4Tensor uses): the shard is all-gathered as it is stored and the
  unsharded parameter is the plain gathered tensor. ``MixedPrecisionPolicy(param_dtype=...)``
  casts floating parameters before the all-gather; here it never applies, so the fp32
  offset and fp16/fp32 second-level scales are not rounded (the codes are int32 and could
  not be cast anyway; no float view of packed bits exists, so NaN canonicalization of float
  storage, bitsandbytes#1945, cannot happen).
- Before the first all-gather of each LQLinear, its layout (shape, rank, quant config) is
  compared across the ranks of the shard group; ranks holding different quantizations of
  the same layer get a clear error on every rank instead of silently mixed codes.

State dicts never contain the wrapper: ``LQLinear`` saves the plain ``_data`` (sharing
storage, so ``torch.distributed.checkpoint`` loads in place), and torch.save/safetensors/
DCP see ordinary tensors.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map_only

aten = torch.ops.aten

# Ops that only re-describe, move or copy storage: their results stay PackedTensors when
# the dtype is unchanged (what FSDP2 applies to a parameter while sharding it).
_STRUCTURAL = {
    aten.detach.default, aten.alias.default, aten.view.default, aten._unsafe_view.default,
    aten.slice.Tensor, aten.narrow.default, aten.split.Tensor, aten.split_with_sizes.default,
    aten.chunk.default, aten.unbind.int, aten.select.int, aten.as_strided.default,
    aten.new_zeros.default, aten.new_empty.default, aten.new_empty_strided.default,
    aten.empty_like.default, aten.zeros_like.default, aten.clone.default,
    aten._to_copy.default, aten._pin_memory.default, aten.cat.default,
}
_REQUIRES_GRAD_SET = Tensor.requires_grad.__set__
_DATA_SET = Tensor.data.__set__
_INPLACE = {aten.copy_.default, aten.zero_.default, aten.fill_.Scalar}


class PackedTensor(Tensor):
    """A frozen packed tensor of an :class:`~lqlora_ext.LQLinear` (see the module doc).

    ``PackedTensor(data)``: ``data`` is a plain (or packed) tensor; it is not copied.
    ``requires_grad`` is always False (the packed parts of Q carry no gradient).
    """

    _data: Tensor

    @staticmethod
    def __new__(cls, data: Tensor, requires_grad: Optional[bool] = None, **_ignored):
        # Loaders re-create parameters the nn.Parameter way, type(p)(value,
        # requires_grad=..., **p.__dict__) (accelerate's set_module_tensor_to_device): that
        # call gives a (frozen) parameter; structural ops give plain PackedTensors.
        if isinstance(data, PackedTensor):
            data = data._data
        if not isinstance(data, Tensor):
            raise TypeError(f"PackedTensor: expected a torch.Tensor, got {type(data).__name__}")
        r = Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(),
                                          storage_offset=data.storage_offset(),
                                          dtype=data.dtype, device=data.device,
                                          requires_grad=False)
        r._data = data
        if requires_grad is not None:
            r._is_param = True
        return r

    def __init__(self, *args, **kwargs):
        pass

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"PackedTensor({self._data!r})"

    def __reduce_ex__(self, protocol):
        return (PackedTensor, (self._data,))

    # -- PT2 (torch.compile): a traceable wrapper subclass -----------------------------
    def __tensor_flatten__(self):
        return ["_data"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return PackedTensor(inner["_data"])

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Frozen by contract: model.requires_grad_(True) trains everything trainable and
        # leaves the packed tensors as they are (int tensors could not require grad, and
        # a float scale requiring grad would be up-cast as a "trainable" parameter).
        if func is Tensor.requires_grad_ or func == _REQUIRES_GRAD_SET:
            return args[0] if func is Tensor.requires_grad_ else None
        if func == _DATA_SET:  # `p.data = t` would otherwise change only the wrapper
            return _set_data(args[0], args[1])
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        a, k = tree_map_only(PackedTensor, lambda t: t._data, (args, kwargs))
        out = func(*a, **k)
        if func in _INPLACE:
            return args[0]
        if func in _STRUCTURAL:
            src = next(t for t in tree_leaves(args) if isinstance(t, PackedTensor))
            return tree_map_only(Tensor, lambda t: PackedTensor(t) if t.dtype == src.dtype
                                 else t, out)
        return out

    # -- FSDP2 all-gather extension -----------------------------------------------------
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """All-gather input: the padded local shard as stored (no mixed-precision cast)."""
        check = getattr(module, "_check_layout_across_ranks", None)
        if check is not None:
            check(mesh.get_group())
        world = mesh.size()
        padded = -(-outer_size[0] // world) if outer_size[0] else 0
        d = self._data
        if d.shape[0] != padded:
            # FSDP2 keeps each shard as a narrow view of a padded buffer: extend the view
            # over the (zero) padding when the storage holds it, else pad a copy.
            room = d.untyped_storage().nbytes() // d.element_size() - d.storage_offset()
            if d.dim() == 1 and room >= padded:
                d = torch.as_strided(d, (padded,), (1,), d.storage_offset())
            else:
                p = d.new_zeros((padded, *d.shape[1:]))
                p[:d.shape[0]].copy_(d)
                d = p
        return (d,), None

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *,
                             out: Optional[Tensor] = None):
        """The unsharded parameter: the gathered tensor itself, plain, in its own dtype."""
        (t,) = all_gather_outputs
        if out is not None:  # FSDP2 re-uses the first call's output storage
            return
        return t, (t,)


def _set_data(p: "PackedTensor", t: Tensor) -> None:
    new = unwrap(t).detach()
    if (new.dtype, new.shape, new.device, new.stride()) != (p.dtype, p.shape, p.device,
                                                           p.stride()):
        raise TypeError(f"PackedTensor.data: cannot replace {p.dtype} {list(p.shape)} on "
                        f"{p.device} by {new.dtype} {list(new.shape)} on {new.device} (packed "
                        f"tensors keep their dtype and length; assign the whole parameter, "
                        f"e.g. load_state_dict, or move the module with .to(device))")
    p._data = new


def unwrap(t: Optional[Tensor]) -> Optional[Tensor]:
    """The plain tensor behind ``t`` (``t`` itself if it is not a PackedTensor)."""
    return t._data if isinstance(t, PackedTensor) else t


def packed_parameter(t: Tensor):
    """``t`` as a frozen ``nn.Parameter`` whose storage is a PackedTensor. A DTensor (a
    shard from FSDP2 or DCP) keeps its placements, with a PackedTensor local shard."""
    from torch import nn

    dt = _dtensor_type()
    if dt is not None and isinstance(t, dt):
        local = t._local_tensor
        if not isinstance(local, PackedTensor):
            t = dt.from_local(PackedTensor(unwrap(local).detach()), t.device_mesh, t.placements,
                              run_check=False, shape=t.shape, stride=t.stride())
        return t if isinstance(t, nn.Parameter) and not t.requires_grad else \
            nn.Parameter(t.detach(), requires_grad=False)
    if isinstance(t, PackedTensor):
        return t if isinstance(t, nn.Parameter) and not t.requires_grad else \
            nn.Parameter(PackedTensor(t._data), requires_grad=False)
    return nn.Parameter(PackedTensor(t.detach()), requires_grad=False)


def plain_view(t: Tensor) -> Tensor:
    """``t`` without any PackedTensor, sharing storage: a plain tensor, or a DTensor with a
    plain local shard (what state dicts hold)."""
    dt = _dtensor_type()
    if dt is not None and isinstance(t, dt):
        local = t._local_tensor
        if isinstance(local, PackedTensor):
            return dt.from_local(local._data, t.device_mesh, t.placements, run_check=False,
                                 shape=t.shape, stride=t.stride())
        return t.detach()
    return unwrap(t).detach()


def is_sharded(t: Tensor) -> bool:
    dt = _dtensor_type()
    return dt is not None and isinstance(t, dt)


_DTENSOR: Any = False


def _dtensor_type():
    global _DTENSOR
    if _DTENSOR is False:
        _DTENSOR = None
        if torch.distributed.is_available():
            from torch.distributed.tensor import DTensor
            _DTENSOR = DTensor
    return _DTENSOR


def guarded_apply_fn(fn: Callable[[Tensor], Tensor], frozen_ids,
                     rebuild: Optional[Dict[int, Callable[[torch.device], Tensor]]] = None
                     ) -> Callable[[Tensor], Tensor]:
    """``fn`` for ``nn.Module._apply``, except that the tensors in ``frozen_ids`` only ever
    move device: a module cast (``.half()``, ``.bfloat16()``, ``.double()``,
    ``.to(dtype)``) must not change packed codes or scales (like bitsandbytes' Params4bit).
    ``rebuild[id(t)](device)`` recomputes a derived tensor on the target device instead
    (exact even after ``to_empty``, which would leave it uninitialized)."""
    rebuild = rebuild or {}

    def apply(t: Tensor) -> Tensor:
        new = fn(t)
        if id(t) in rebuild and new.device.type != "meta":
            return rebuild[id(t)](new.device)
        if id(t) not in frozen_ids or new.dtype == t.dtype:
            return new
        if t.is_meta:
            return torch.empty_like(t, device=new.device)
        return t.to(new.device)
    return apply
