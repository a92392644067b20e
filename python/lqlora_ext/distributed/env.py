"""The process group of a ``torchrun`` launch (or of any ``RANK``/``WORLD_SIZE``/
``MASTER_ADDR``/``MASTER_PORT`` environment) and the few collectives the sharded jobs need.

A single process is a world of size 1: every helper works without torch.distributed, so the
sharded code paths are the single-process ones with ``world_size == 1``.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any, List, Optional, Sequence

import torch

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def in_torchrun() -> bool:
    """True when this process was started by torchrun (or another launcher that sets the
    ``env://`` variables) with more than one process in the world."""
    if not all(v in os.environ for v in _TORCHRUN_VARS):
        return False
    try:
        return int(os.environ["WORLD_SIZE"]) > 1
    except ValueError:
        return False


@dataclasses.dataclass
class World:
    """``rank`` of ``world_size`` processes; ``local_rank`` on this node; ``backend`` of the
    torch.distributed default group (None for a single process). ``owns_group``: :func:`init`
    formed that group, so :meth:`close` destroys it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # -- collectives (no-ops for one process) --------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (any picklable object)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_ok(self, ok: bool) -> bool:
        """True on every rank iff ``ok`` on every rank (so all ranks raise together)."""
        return all(self.all_gather(bool(ok)))

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


class RendezvousError(RuntimeError):
    """The process group could not be formed (unreachable or missing peers)."""


def _int_env(name: str) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        raise RendezvousError(f"lqlora: environment variable {name}={os.environ.get(name)!r} "
                              f"must be an integer (set by torchrun)") from None


def init(device: str = "cpu", connect_timeout: float = 300.0,
         job_timeout: float = 7 * 24 * 3600.0) -> World:
    """Join the torchrun world, or return a one-process :class:`World` outside torchrun.

    Backend: gloo for ``device="cpu"``, nccl for cuda (each rank takes GPU ``LOCAL_RANK``).
    ``connect_timeout`` (seconds) bounds reaching the rendezvous store and the peers: an
    unreachable ``MASTER_ADDR:MASTER_PORT`` or a peer that never starts raises
    :class:`RendezvousError` naming them instead of hanging. ``job_timeout`` bounds each
    later collective (ranks wait at barriers while others finish long decompositions).
    A group someone else initialized is reused as it is.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(),
                     int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend())
    if not in_torchrun():
        return World()
    if not dist.is_available():
        raise RendezvousError("lqlora: this torch build has no torch.distributed")
    rank, world = _int_env("RANK"), _int_env("WORLD_SIZE")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    host, port = os.environ["MASTER_ADDR"], _int_env("MASTER_PORT")
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RendezvousError("lqlora: --device cuda under torchrun, but CUDA is not "
                                  "available on this node")
        torch.cuda.set_device(local % torch.cuda.device_count())
    # torchrun's agent hosts the store itself; a hand-made environment needs rank 0 to.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    where = f"{host}:{port}"
    try:
        store = dist.TCPStore(host, port, world_size=None if agent_store else world,
                              is_master=(rank == 0 and not agent_store),
                              timeout=datetime.timedelta(seconds=connect_timeout),
                              wait_for_workers=False)
    except Exception as e:  # RuntimeError/DistStoreError/TimeoutError, by torch version
        raise RendezvousError(f"lqlora: rank {rank} of {world} cannot reach the rendezvous "
                              f"at {where} within {connect_timeout:g} s ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); check "
                              f"MASTER_ADDR/MASTER_PORT (torchrun --rdzv-endpoint / "
                              f"--master-addr) and that the port is open") from None
    # Keys of an earlier attempt of the same torchrun job must not be read as this one's.
    prefix = f"lqlora/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    store = dist.PrefixStore(prefix, store)
    _connect_barrier(store, rank, world, connect_timeout, where)  # before the backend waits
    try:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=job_timeout))
    except Exception as e:
        raise RendezvousError(f"lqlora: rank {rank} of {world} could not form the {backend} "
                              f"process group through {where}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return World(rank, world, local, backend, owns_group=True)


def _connect_barrier(store, rank: int, world: int, timeout: float, where: str) -> None:
    """Wait, at most ``timeout`` seconds, until every rank has joined (a store counter):
    the backend's own connection waits up to ``job_timeout``, far too long for a missing
    peer."""
    import time

    store.add("joined", 1)
    deadline = time.monotonic() + timeout
    while int(store.add("joined", 0)) < world:
        if time.monotonic() > deadline:
            raise RendezvousError(f"lqlora: rank {rank}: only {int(store.add('joined', 0))} "
                                  f"of {world} ranks joined the rendezvous at {where} within "
                                  f"{timeout:g} s (did every node start?)")
        time.sleep(0.05)


def assign(weights: Sequence[float], world_size: int) -> List[int]:
    """Owner rank of each item: greedy longest-processing-time balancing of ``weights``
    (deterministic: ties go to the lower index and the lower rank)."""
    load = [0.0] * world_size
    owner = [0] * len(weights)
    for i in sorted(range(len(weights)), key=lambda i: (-float(weights[i]), i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += float(weights[i])
    return owner


def contiguous_chunks(weights: Sequence[float], world_size: int) -> List[int]:
    """Owner rank of each item when items are cut, in order, into ``world_size`` runs of
    about equal total weight (keeps neighbouring items, e.g. one matrix's configs, on one
    rank)."""
    total = float(sum(weights)) or 1.0
    owner, acc = [], 0.0
    for w in weights:
        mid = acc + float(w) / 2  # an item goes to the chunk holding its midpoint
        owner.append(min(int(mid / total * world_size), world_size - 1))
        acc += float(w)
    return owner
