"""The ILP's cost profile (METHOD.md §4), sharded over the ranks of a :class:`World`.

Tasks are (matrix, config) pairs on CPU, run by each rank as runs of one matrix's configs
through ``decompose_many`` (bit-identical to ``decompose``), and the fixed config chunks of
:func:`~lqlora_ext.method.profiling.task_groups` on CUDA (one batched rsvd per iteration).
Every rank computes exactly what a single process computes for the same task (the same
call, seed and settings), so the profile, hence the ILP's choice, does not depend on the
number of ranks.

The cache is :mod:`lqlora_ext.method.profiling`'s: ``cache_dir/<key>.json`` per matrix
(the key hashes weight, Fisher, rank and settings), which a single-process
``profile_costs`` reads too. While profiling, each rank writes only its own fragment
``<key>.r<rank>.json``, rewritten atomically after every decomposition, so a rank killed
mid-profile loses at most the decomposition it was running; the next run (any number of
ranks) merges the fragments, profiles only what is missing, and rank 0 folds everything
back into ``<key>.json``.
"""
from __future__ import annotations

import glob
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..formats import QuantConfig
from ..method.batched import decompose_many
from ..method.profiling import _atomic_write_json, _key, cache_settings, read_cache, task_groups
from .env import World, assign, contiguous_chunks


def _read_costs(path: str, wanted=()) -> Dict[str, float]:
    # The single-process reader's rules: a torn file or an entry that is not a finite
    # cost >= 0 is named in a warning and recomputed.
    return read_cache(path, wanted)


def _write_costs(path: str, name: str, costs: Dict[str, float]) -> None:
    _atomic_write_json(path, {"name": name, "costs": costs})


def profile_costs_sharded(world: World, names: Sequence[str], numels: Sequence[int],
                          load: Callable[[int], Tensor],
                          load_fisher: Optional[Callable[[int], Tensor]],
                          configs: Sequence[QuantConfig], rank: int, *,
                          cache_dir: Optional[str], seed: int = 0, max_iters: int = 100,
                          tol: float = 1e-3, device: str = "cpu", progress: bool = True,
                          log: Callable[[str], None] = print) -> Tensor:
    """Costs fp64 ``[len(names), len(configs)]``, the same on every rank.

    ``load(i)`` / ``load_fisher(i)``: matrix ``i``'s weight / Fisher ``[out, in]`` (any
    float dtype, CPU), read only by the ranks that need it. ``cache_dir`` must be shared
    by all ranks (one filesystem) for the resume to see every rank's work; None disables
    caching (then nothing survives a kill).
    """
    from tqdm.auto import tqdm

    configs = list(configs)
    n, k = len(names), len(configs)
    # The single-process profiler's key (numerics regime included: device, one thread), so
    # both read and extend the same cache.
    settings = cache_settings(device, rank, seed, max_iters, tol, threads=1)
    wanted = [c.name for c in configs]

    def get(i):
        w = load(i)
        f = load_fisher(i) if load_fisher is not None else None
        return w, f

    # 1. cache keys: hashing reads every weight once, so the ranks split it.
    keys: List[Optional[str]] = [None] * n
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        owner = assign(numels, world.world_size)
        mine = {i: _key(*get(i), settings) for i in range(n) if owner[i] == world.rank}
        for part in world.all_gather(mine):
            for i, key in part.items():
                keys[i] = key
    # 2. what is known: rank 0 reads the cache (merged view of the fragments).
    known: List[Dict[str, float]] = [{} for _ in range(n)]
    if cache_dir is not None and world.is_main:
        for i, key in enumerate(keys):
            known[i] = _read_costs(os.path.join(cache_dir, key + ".json"), wanted)
            for frag in sorted(glob.glob(os.path.join(cache_dir, key + ".r*.json"))):
                known[i].update(_read_costs(frag, wanted))
    known = world.broadcast(known)
    missing = [[j for j, c in enumerate(configs) if c.name not in known[i]] for i in range(n)]
    todo = sum(len(m) for m in missing)
    total = n * k
    if world.is_main and cache_dir is not None:
        log(f"cost profile: {total - todo} of {total} (matrix, config) costs cached, "
            f"{todo} to compute on {world.world_size} process(es)")
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:  # fixed chunks, whole: the same batches for any number of ranks
        # (chunk sizes depend on the element count only)
        tasks = task_groups(missing, k, [(numels[i], 1) for i in range(n)], device)
    else:  # pairs: the grouping below does not change a CPU cost
        tasks = [(i, [j]) for i in range(n) for j in missing[i]]
    # 3. my tasks: contiguous runs of about equal work, so a matrix is loaded by few ranks.
    owner = contiguous_chunks([numels[i] * len(js) for i, js in tasks], world.world_size)
    my_tasks = [t for t, r in zip(tasks, owner) if r == world.rank]
    if not on_cuda:  # one decompose_many call per run of one matrix's configs
        runs: List[tuple] = []
        for i, js in my_tasks:
            if runs and runs[-1][0] == i:
                runs[-1][1].extend(js)
            else:
                runs.append((i, list(js)))
        my_tasks = runs
    results: Dict[int, Dict[str, float]] = {}
    bar = tqdm(total=sum(len(js) for _, js in my_tasks),
               desc=f"profiling (rank {world.rank})" if world.distributed
               else "profiling costs", unit="decomp", disable=not progress)
    try:
        cur, w, f, frag, frag_path = None, None, None, {}, None
        for i, js in my_tasks:
            if i != cur:
                w, f = get(i)
                w = w.to(device, torch.float32)
                f = None if f is None else f.to(device, torch.float32)
                cur = i
                if cache_dir is not None:
                    frag_path = os.path.join(cache_dir, f"{keys[i]}.r{world.rank}.json")
                    frag = _read_costs(frag_path)

            def done(b, d, i=i, js=js):
                name = configs[js[b]].name
                results.setdefault(i, {})[name] = d.error
                if frag_path is not None:
                    frag[name] = d.error
                    _write_costs(frag_path, names[i], frag)
                bar.update(1)

            decompose_many(w, [configs[j] for j in js], rank, fisher=f, seed=seed,
                           max_iters=max_iters, tol=tol, batched=on_cuda, max_batch=len(js),
                           on_done=done)
        del w, f
    finally:
        bar.close()
    # 4. everyone's results, then rank 0 folds the cache back to one file per matrix.
    for part in world.all_gather(results):
        for i, res in part.items():
            known[i].update(res)
    if cache_dir is not None and world.is_main:
        for i, key in enumerate(keys):
            path = os.path.join(cache_dir, key + ".json")
            if _read_costs(path) != known[i]:
                _write_costs(path, names[i], known[i])
            for frag in glob.glob(os.path.join(cache_dir, key + ".r*.json")):
                os.unlink(frag)
    world.barrier()  # no rank reads fragments rank 0 is deleting
    costs = torch.full((n, k), float("nan"), dtype=torch.float64)
    for i in range(n):
        for j, c in enumerate(configs):
            if c.name not in known[i]:
                raise RuntimeError(f"profile: no cost for {names[i]} under {c.name} after "
                                   f"profiling (a rank lost its results)")
            costs[i, j] = known[i][c.name]
    return costs
