"""Sharded finetuning of LQ-LoRA models with FSDP2 (``torch.distributed.fsdp.fully_shard``).

LQLinear's packed codes, scale codes, second-level scales and offset are frozen parameters
backed by :class:`~lqlora_ext.nn.packed.PackedTensor`, so FSDP2 shards them like any other
parameter (per-rank memory of the frozen part ~1/N), layers of different configs and packed
lengths in one FSDP unit, and all-gathers them bit-identically: int32 codes and scales in
their own dtypes, never cast by a ``MixedPrecisionPolicy`` (see nn/packed.py). A plain
``fully_shard`` per decoder layer (by hand, by accelerate, by the HF Trainer) therefore
works; the functions here add what FSDP2 cannot know:

- :func:`shard_model`: ``fully_shard`` per decoder layer and on the root, after checking
  that every rank holds the same quantization (:func:`check_layout`).
- :func:`save_sharded` / :func:`load_sharded`: ``torch.distributed.checkpoint`` of the
  model (and optimizer) plus a layout manifest; loading refuses a checkpoint of another
  quantization or architecture, and reshards one written by another world size.
- :func:`full_state_dict`, :func:`save_pretrained`: the whole model on rank 0, as a plain
  state dict or as a Hugging Face directory that ``from_pretrained`` loads in one process.
- :func:`local_bytes`: this rank's bytes of packed, other frozen and trainable tensors.

Every function here is collective (all ranks call it) unless it says otherwise.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from ..nn.linear import _PACKED, LQLinear, _describe_fingerprint

MANIFEST = "lqlora_fsdp.json"
CKPT_FORMAT = "lqlora-fsdp-checkpoint"
CKPT_VERSION = 1

__all__ = ["shard_model", "check_layout", "decoder_layers", "local_bytes", "save_sharded",
           "load_sharded", "full_state_dict", "save_pretrained"]


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def _rank_world(group=None) -> Tuple[int, int]:
    dist = _dist()
    if dist is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _lq_layers(model: nn.Module) -> Dict[str, LQLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LQLinear)}


def _layout(model: nn.Module) -> Dict[str, List[int]]:
    return {n: m.layout_fingerprint() for n, m in _lq_layers(model).items()}


def _layout_diff(a: Dict[str, List[int]], b: Dict[str, List[int]]) -> Optional[str]:
    """First difference between two layouts, in words (None if equal)."""
    for name in list(a) + [n for n in b if n not in a]:
        fa, fb = a.get(name), b.get(name)
        if fa != fb:
            da = "absent" if fa is None else _describe_fingerprint(fa)
            db = "absent" if fb is None else _describe_fingerprint(fb)
            return f"module {name!r}: {da} vs {db}"
    return None


def check_layout(model: nn.Module, group=None) -> None:
    """Raise ``ValueError`` on every rank unless all ranks of ``group`` hold the same
    LQLinear layers (names, shapes, ranks, bias, quantization configs): FSDP2 would
    otherwise all-gather codes of different quantizations into one tensor. No-op for a
    single process."""
    dist = _dist()
    rank, world = _rank_world(group)
    if world == 1:
        return
    mine = _layout(model)
    everyone: List[Any] = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    for r, other in enumerate(everyone):
        diff = _layout_diff(everyone[0], other)
        if diff:
            raise ValueError(f"check_layout: rank {r} holds a different quantization than "
                             f"rank 0 ({diff}, rank 0 first); every rank must load the same "
                             f"quantized model (quantize once, save, and load it on every "
                             f"rank)")


def decoder_layers(model: nn.Module,
                   layer_cls: Union[None, str, Type[nn.Module], Sequence] = None
                   ) -> List[nn.Module]:
    """The modules that become one FSDP unit each: instances of ``layer_cls`` (classes or
    class names), else of the model's ``_no_split_modules`` (Hugging Face decoder layers),
    else the children of the largest ``nn.ModuleList``. Not collective."""
    if layer_cls is None:
        names = set(getattr(model, "_no_split_modules", None) or ())
    else:
        items = layer_cls if isinstance(layer_cls, (list, tuple, set)) else [layer_cls]
        names = {c if isinstance(c, str) else c.__name__ for c in items}
    found = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if layer_cls is not None and not found:
        raise ValueError(f"decoder_layers: the model has no module of class "
                         f"{sorted(names)} (layer_cls)")
    if found:
        # Outermost matches only: a unit nested inside another unit is not a decoder layer.
        ids = {id(m) for m in found}
        inner = {id(c) for m in found for c in m.modules() if c is not m and id(c) in ids}
        return [m for m in found if id(m) not in inner]
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return []
    best = max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters()))
    return list(best)


def shard_model(model: nn.Module, *, mesh=None, layer_cls=None, mp_policy=None,
                reshard_after_forward: bool = True, offload_policy=None) -> nn.Module:
    """FSDP2 over ``model`` in place: :func:`check_layout`, then ``fully_shard`` on every
    decoder layer (see :func:`decoder_layers`), on the input embedding and the output head
    (units of their own), and on the root, with the given
    ``mesh`` (default: all ranks, this process's device type), ``mp_policy``
    (a ``MixedPrecisionPolicy``; it never casts the packed tensors), ``reshard_after_forward``
    and ``offload_policy``. Returns the model (now an ``FSDPModule``).

    Quantize first: LQLinear layers are created by ``quantize_model`` or loaded by
    ``from_pretrained``/``load_quantized`` on every rank, then sharded."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if _dist() is None:
        raise RuntimeError("shard_model: torch.distributed is not initialized (call "
                           "torch.distributed.init_process_group, e.g. under torchrun)")
    if isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("shard_model: the model is already sharded (fully_shard was applied)")
    group = mesh.get_group() if mesh is not None else None
    check_layout(model, group)
    kw = dict(mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy(),
              reshard_after_forward=reshard_after_forward)
    if offload_policy is not None:
        kw["offload_policy"] = offload_policy
    for layer in decoder_layers(model, layer_cls):
        fully_shard(layer, **kw)
    for unit, reshard in _embedding_units(model):
        fully_shard(unit, **{**kw, "reshard_after_forward": reshard and reshard_after_forward})
    fully_shard(model, **kw)
    return model


def _embedding_units(model: nn.Module):
    """The input embedding and the output head as FSDP units of their own (as accelerate
    does): in the root unit they would be all-gathered for the whole forward, i.e. the
    full vocabulary matrices on every rank. Tied ones form one unit. The head is kept
    gathered from its forward to its backward, which follow each other."""
    from torch.distributed.fsdp import FSDPModule

    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    units = [m for m in (emb, head) if isinstance(m, nn.Module) and not isinstance(m, FSDPModule)
             and any(True for _ in m.parameters())]
    if len(units) == 2 and getattr(emb, "weight", None) is getattr(head, "weight", 0):
        return [(units, False)]
    return [(m, m is not head) for m in units]


def local_bytes(model: nn.Module) -> Dict[str, int]:
    """This rank's storage in bytes: ``packed`` (LQLinear codes, scale codes, second-level
    scales, offsets), ``frozen`` (other parameters without grad, e.g. embeddings, norms,
    biases), ``trainable``; ``*_full`` the same for the whole (unsharded) model. A sharded
    parameter counts its local shard (FSDP2 pads each shard to ceil(n / world) rows).
    Not collective."""
    from ..nn.packed import is_sharded

    lq = {id(getattr(m, k)) for m in _lq_layers(model).values() for k in _PACKED}
    out = {k: 0 for k in ("packed", "frozen", "trainable", "packed_full", "frozen_full",
                          "trainable_full")}
    for p in model.parameters():
        kind = "packed" if id(p) in lq else "trainable" if p.requires_grad else "frozen"
        local = p.to_local() if is_sharded(p) else p
        out[kind] += local.numel() * local.element_size()
        out[kind + "_full"] += p.numel() * p.element_size()
    return out


# -- checkpoints ------------------------------------------------------------------------
def _app_state(model: nn.Module, optimizer) -> Dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def _manifest(model: nn.Module, optimizer, extra) -> dict:
    from ..io.checkpoint import lq_modules

    _, world = _rank_world()
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_sharded: extra must be JSON-serializable ({e})") from None
    return {"format": CKPT_FORMAT, "version": CKPT_VERSION, "world_size": world,
            "has_optimizer": optimizer is not None, "modules": lq_modules(model),
            "layout": _layout(model), "extra": extra}


def save_sharded(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 *, extra: Optional[dict] = None) -> None:
    """Write a sharded checkpoint of ``model`` (and ``optimizer``) to directory ``path``
    with ``torch.distributed.checkpoint``: every rank writes its own shards, rank 0 adds
    ``lqlora_fsdp.json`` (the LQ layout, world size, ``extra``: any JSON-able dict, e.g. the
    step). Atomic: the directory replaces ``path`` only once every rank has written (rank 0
    commits), so a failed save leaves the previous checkpoint in place."""
    import torch.distributed.checkpoint as dcp

    from ..io.checkpoint import atomic_dir

    dist = _dist()
    rank, world = _rank_world()
    manifest = _manifest(model, optimizer, extra)
    state = _app_state(model, optimizer)
    cm, tmp, err = None, None, None
    if rank == 0:
        try:
            cm = atomic_dir(path)
            tmp = cm.__enter__()
        except Exception as e:  # every rank must learn of it, or the others wait forever
            err = f"{type(e).__name__}: {e}"
    if world > 1:
        box = [(tmp, err)]
        dist.broadcast_object_list(box, src=0)
        tmp, err = box[0]
    if err:
        raise ValueError(f"save_sharded: cannot write {path}: {err}")
    try:
        dcp.save(state, checkpoint_id=tmp)  # raises on every rank if any rank failed
        if rank == 0:
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump(manifest, f, indent=1)
    except BaseException as e:
        if cm is not None:
            cm.__exit__(type(e), e, e.__traceback__)
        raise
    if cm is not None:
        cm.__exit__(None, None, None)
    if world > 1:
        dist.barrier()  # nobody reads `path` before rank 0 committed it


def read_manifest(path: str) -> dict:
    """The ``lqlora_fsdp.json`` of a sharded checkpoint, validated. Not collective."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise ValueError(f"load_sharded: {path!r} is not a directory")
    if not os.path.isfile(mpath):
        raise ValueError(f"load_sharded: {path!r} is not an lqlora sharded checkpoint (no "
                         f"{MANIFEST}; written by save_sharded)")
    try:
        with open(mpath) as f:
            m = json.load(f)
    except ValueError as e:
        raise ValueError(f"load_sharded: corrupt manifest {mpath}: {e}") from None
    if not isinstance(m, dict) or m.get("format") != CKPT_FORMAT:
        raise ValueError(f"load_sharded: {mpath} is not an lqlora sharded checkpoint manifest")
    if m.get("version") != CKPT_VERSION:
        raise ValueError(f"load_sharded: {mpath} has version {m.get('version')!r}; this "
                         f"lqlora_ext reads version {CKPT_VERSION}")
    if not isinstance(m.get("layout"), dict):
        raise ValueError(f"load_sharded: {mpath} has no valid 'layout'")
    return m


def load_sharded(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None
                 ) -> dict:
    """Load a checkpoint written by :func:`save_sharded` into ``model`` (and
    ``optimizer``) in place; returns its ``extra``. The model must hold the same LQ layout
    (names, shapes, ranks, configs) as the saved one, else ``ValueError`` names the first
    difference before anything is read. Any world size works, including one process
    without torch.distributed (DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    m = read_manifest(path)
    saved = {k: list(v) for k, v in m["layout"].items()}
    diff = _layout_diff(saved, _layout(model))
    if diff:
        raise ValueError(f"load_sharded: {path} holds another quantization than the model "
                         f"({diff}; checkpoint first)")
    if optimizer is not None and not m.get("has_optimizer"):
        raise ValueError(f"load_sharded: {path} holds no optimizer state (saved without "
                         f"optimizer=)")
    state = _app_state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as e:  # DCP reports per-rank tracebacks; name the checkpoint
        raise ValueError(f"load_sharded: cannot load {path} into this model "
                         f"(architecture or non-LQ parameters differ?): "
                         f"{type(e).__name__}: {str(e)[:2000]}") from e
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
    for lay in _lq_layers(model).values():
        lay.reset_levels()
    return m.get("extra")


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's whole state dict as plain CPU tensors on rank 0 (``{}`` on the other
    ranks): FSDP2 shards are gathered one tensor at a time."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    rank, _ = _rank_world()
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                              cpu_offload=True))
    return sd if rank == 0 else {}


def _unsharded_class(model: nn.Module) -> type:
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def save_pretrained(model: nn.Module, path: str, *extras) -> None:
    """``save_pretrained`` of an FSDP2-sharded Hugging Face model: the shards are gathered
    to rank 0, which writes ``path`` (atomically; ``extras`` such as a tokenizer are saved
    beside it); ``AutoModelForCausalLM.from_pretrained(path)`` then loads it in one process.
    (``model.save_pretrained`` itself would write this rank's shards.)"""
    from transformers import PreTrainedModel

    from ..integrations.hf import install_skeletons
    from ..integrations.hf_hook import attach_hf
    from ..io.checkpoint import lq_modules, save_pretrained_atomic

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"save_pretrained: expected a transformers PreTrainedModel, got "
                        f"{type(model).__name__} (use full_state_dict for other modules)")
    dist = _dist()
    rank, world = _rank_world()
    modules = lq_modules(model)
    qc = getattr(model.config, "quantization_config", None)
    freeze = bool(getattr(qc, "freeze_base", True))
    sd = full_state_dict(model)
    err = None
    if rank == 0:
        try:
            # An unsharded twin built on the meta device, its tensors assigned from the
            # gathered state dict (no copy), saved the ordinary way.
            with torch.device("meta"):
                twin = _unsharded_class(model)._from_config(model.config)
            install_skeletons(twin, modules)
            twin.load_state_dict(sd, strict=True, assign=True)
            for lay in _lq_layers(twin).values():
                lay.reset_levels()
            attach_hf(twin, freeze)
            save_pretrained_atomic(twin, path, *extras)
        except Exception as e:
            err = e
    if world > 1:
        box = [None if err is None else f"{type(err).__name__}: {err}"]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and err is None:
            raise RuntimeError(f"save_pretrained: rank 0 failed to write {path}: {box[0]}")
    if err is not None:
        raise err
