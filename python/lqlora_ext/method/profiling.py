"""Cost profiling for the ILP: the decomposition error of every (matrix, config) pair.

Resumable: each matrix's costs are cached on disk in ``cache_dir/<key>.json``, where the
key hashes the weight, its Fisher, the rank and every decomposition setting, so an
interrupted profile picks up where it stopped and a changed input never reuses a stale
cost. Work is spread over processes (one torch thread each), which uses every core far
better than intra-op threading on ~100M-parameter models' small matrices.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .decomposition import decompose
from ..formats import QuantConfig

PROFILE_VERSION = 2  # bump when the decomposition's numerics change (2: bnb-exact NF tables)


def _key(w: Tensor, fisher: Optional[Tensor], settings: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    for t in (w, fisher):
        if t is not None:
            t = t.detach().to("cpu", torch.float32).contiguous()
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:32]


def _profile_one(w: Tensor, fisher: Optional[Tensor], configs: List[dict], rank: int,
                 settings: dict) -> Dict[str, float]:
    out = {}
    for cd in configs:
        c = QuantConfig.from_dict(cd)
        d = decompose(w, c, rank, fisher=fisher, seed=settings["seed"],
                      max_iters=settings["max_iters"], tol=settings["tol"])
        out[c.name] = d.error
    return out


def _single_threaded(fn, *args):
    torch.set_num_threads(1)
    return fn(*args)


def map_matrices(fn: Callable, tasks: Sequence[tuple], workers: Optional[int] = None
                 ) -> Iterator[Tuple[int, object]]:
    """Yield ``(index, fn(*tasks[index]))`` as tasks complete, over ``workers`` processes
    (default: all cores) each running torch single-threaded; in this process when
    ``workers <= 1``, there is a single task, or the tensors live on a GPU.

    Why processes: the per-matrix work (small QR/SVD/GEMM calls) scales badly with
    intra-op threads, and OpenMP threads spin when cores are oversubscribed.
    """
    if workers is None:
        workers = os.cpu_count() or 1
    on_gpu = any(isinstance(a, Tensor) and a.device.type != "cpu" for t in tasks for a in t)
    if workers <= 1 or len(tasks) <= 1 or on_gpu:
        for i, t in enumerate(tasks):
            yield i, fn(*t)
        return
    # fork: workers inherit the weights without pickling and, unlike spawn, need no
    # `if __name__ == "__main__"` guard in the user's script. Workers run torch
    # single-threaded, so no OpenMP pool is used across the fork.
    import multiprocessing as mp
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx) as pool:
        futs = {pool.submit(_single_threaded, fn, *t): i for i, t in enumerate(tasks)}
        for fut in as_completed(futs):
            yield futs[fut], fut.result()


def _atomic_write_json(path: str, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def profile_costs(weights: Dict[str, Tensor], configs: Sequence[QuantConfig], rank: int, *,
                  fishers: Optional[Dict[str, Tensor]] = None, cache_dir: Optional[str] = None,
                  seed: int = 0, max_iters: int = 100, tol: float = 1e-3,
                  workers: Optional[int] = None, progress: bool = True) -> Tensor:
    """Decomposition error for every matrix and config: fp64 ``[len(weights), len(configs)]``.

    weights: name -> ``[out, in]`` weight (row order of the result). fishers: name -> Fisher
    of the same shape (data-aware costs) or None. cache_dir: resumable cache directory
    (created if missing; None disables caching). workers: processes (default: all cores;
    1 = in this process).
    """
    from tqdm.auto import tqdm

    configs = list(configs)
    if not configs:
        raise ValueError("profile_costs: no configs given")
    names = list(weights)
    settings = {"v": PROFILE_VERSION, "rank": rank, "seed": seed, "max_iters": max_iters,
                "tol": tol}
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
    costs = torch.full((len(names), len(configs)), float("nan"), dtype=torch.float64)
    todo = []  # (row, name, missing config dicts, cache path, cached dict)
    for i, name in enumerate(names):
        f = None if fishers is None else fishers.get(name)
        if fishers is not None and f is None:
            raise ValueError(f"profile_costs: no Fisher estimate for {name!r}")
        cached, path = {}, None
        if cache_dir is not None:
            path = os.path.join(cache_dir, _key(weights[name], f, settings) + ".json")
            if os.path.exists(path):
                try:
                    with open(path) as fh:
                        cached = json.load(fh)["costs"]
                    if not isinstance(cached, dict) or not all(
                            isinstance(v, (int, float)) for v in cached.values()):
                        cached = {}
                except (OSError, ValueError, KeyError, TypeError):
                    cached = {}  # a torn or foreign file: recompute
        missing = [c.to_dict() for c in configs if c.name not in cached]
        for j, c in enumerate(configs):
            if c.name in cached:
                costs[i, j] = cached[c.name]
        if missing:
            todo.append((i, name, missing, path, cached))

    col = {c.name: j for j, c in enumerate(configs)}
    bar = tqdm(total=len(names), initial=len(names) - len(todo), desc="profiling costs",
               unit="matrix", disable=not progress)

    def finish(item, result):
        i, name, _, path, cached = item
        for cname, e in result.items():
            costs[i, col[cname]] = e
        if path is not None:
            _atomic_write_json(path, {"name": name, "costs": {**cached, **result}})
        bar.update(1)

    get_f = (lambda n: None) if fishers is None else fishers.get
    tasks = [(weights[it[1]].detach(), get_f(it[1]), it[2], rank, settings) for it in todo]
    try:
        for idx, result in map_matrices(_profile_one, tasks, workers):
            finish(todo[idx], result)
    finally:
        bar.close()
    return costs
