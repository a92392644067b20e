"""The Fisher loop of :func:`~lqlora_ext.method.fisher.estimate_fisher` on an FSDP2-sharded
model (targeted weights are DTensor shards).

F = sum over sequences s of g_s**2. The ranks take the sequences round-robin (every rank
passes the same calibration data; each group of ``world`` sequences is checked to be the
same on every rank first, so differing data is an error, not a hang). During a rank's
backward its targeted weights are FSDP's unsharded parameters; a post-accumulate-grad hook
squares that rank's gradient in place *before* FSDP reduce-scatters it, so the shard each
rank receives is the mean over ranks of g_r**2, and ``world`` times it is added to the
rank's own fp32 shard of F. A rank without a sequence in the last group runs a zero-weighted
copy of one (FSDP's collectives need every rank), which adds exactly 0.
"""
from __future__ import annotations

import zlib
from typing import Dict, Iterable, Iterator, List, Tuple

import torch
from torch import Tensor, nn


def _dtensor():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor
    return DTensor


def sharded_weights(weights: Dict[str, Tensor]) -> bool:
    """True if the targeted weights are FSDP2 shards (all of them), False if none is."""
    dt = _dtensor()
    flags = {name: dt is not None and isinstance(w, dt) for name, w in weights.items()}
    if any(flags.values()) and not all(flags.values()):
        plain = [n for n, f in flags.items() if not f]
        raise ValueError(f"estimate_fisher: some targeted weights are FSDP2 shards and some "
                         f"are not ({', '.join(plain[:3])} are not); shard the whole model "
                         f"(fully_shard on the root too) or none of it")
    return bool(flags) and all(flags.values())


def local_zeros(w: Tensor) -> Tensor:
    """An fp32 zero accumulator shaped like ``w`` (its local shard for a DTensor)."""
    dt = _dtensor()
    local = w.to_local() if dt is not None and isinstance(w, dt) else w
    return torch.zeros(local.shape, dtype=torch.float32, device=local.device)


def as_sharded(f: Tensor, w: Tensor) -> Tensor:
    """The local accumulator ``f`` as a DTensor sharded like ``w``."""
    return _dtensor().from_local(f, w.device_mesh, w.placements, run_check=False,
                                 shape=w.shape, stride=w.stride())


def _chunks(rows: Iterable, n: int) -> Iterator[List]:
    chunk: List = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _signature(chunk: List[Tuple[Dict[str, Tensor], int, int]]) -> int:
    crc = 0
    for inputs, _, _ in chunk:
        ids = inputs["input_ids"].detach().to("cpu", torch.int64).contiguous()
        crc = zlib.crc32(ids.numpy().tobytes(), crc)
        crc = zlib.crc32(str(tuple(ids.shape)).encode(), crc)
    return crc


def _raise_if_any(problem, group, device) -> None:
    import torch.distributed as dist

    flag = torch.tensor([0 if problem is None else 1], dtype=torch.int64, device=device)
    dist.all_reduce(flag, group=group)
    if int(flag) == 0:
        return
    everyone: List = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, problem, group=group)
    r, msg = next((r, m) for r, m in enumerate(everyone) if m is not None)
    raise ValueError(msg if problem is not None else f"{msg} (reported by rank {r})")


def sharded_loop(model: nn.Module, modules: Dict[str, nn.Module], weights: Dict[str, Tensor],
                 rows: Iterable, fisher: Dict[str, Tensor], seen: Dict[str, bool],
                 device: torch.device, bar) -> int:
    """Accumulate this rank's shard of F into ``fisher`` (see the module doc); returns the
    number of sequences processed by all ranks together."""
    import torch.distributed as dist

    from .fisher import sequence_loss

    mesh = next(iter(weights.values())).device_mesh
    group = mesh.get_group()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    comm_device = next(iter(weights.values())).to_local().device
    hooked: Dict[int, object] = {}
    handles = []

    def square_before_reduce(p: Tensor) -> None:
        p.grad.mul_(p.grad)

    def pre_forward(module, args):
        w = module.weight  # FSDP's unsharded parameter while the module runs
        if id(w) not in hooked and not isinstance(w, _dtensor()):
            hooked[id(w)] = w.register_post_accumulate_grad_hook(square_before_reduce)

    for m in modules.values():
        handles.append(m.register_forward_pre_hook(pre_forward))
    count = 0
    try:
        for chunk in _chunks(rows, world):
            sig = torch.tensor([len(chunk), _signature(chunk)], dtype=torch.int64,
                               device=comm_device)
            every = [torch.empty_like(sig) for _ in range(world)]
            dist.all_gather(every, sig, group=group)
            if any(not torch.equal(e, every[0]) for e in every):
                bi = chunk[0][1]
                raise ValueError(f"estimate_fisher: the ranks passed different calibration "
                                 f"data (first differing group of {world} sequences starts "
                                 f"in batch {bi} on rank {rank}); on an FSDP-sharded model "
                                 f"every rank must pass the same batches")
            mine = chunk[rank] if rank < len(chunk) else chunk[0]
            inputs, bi, r = mine
            try:
                loss, problem = sequence_loss(model, inputs, device, bi, r), None
            except ValueError as e:  # e.g. a non-finite loss: every rank must stop together
                loss, problem = None, str(e)
            _raise_if_any(problem, group, comm_device)
            if rank >= len(chunk):
                loss = loss * 0.0  # keeps FSDP's collectives in step; adds exactly zero
            loss.backward()
            del loss
            for name, w in weights.items():
                if w.grad is not None:
                    # FSDP averaged the ranks' squared gradients: the sum is world x mean.
                    fisher[name].add_(w.grad.to_local().detach().float(), alpha=world)
                    seen[name] = True
                w.grad = None
            count += len(chunk)
            bar.update(len(chunk))
    finally:
        for h in handles + list(hooked.values()):
            h.remove()
    return count
