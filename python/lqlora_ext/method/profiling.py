"""Cost profiling for the ILP: the decomposition error of every (matrix, config) pair.

Resumable: each matrix's costs are cached on disk in ``cache_dir/<key>.json``, where the
key hashes the weight, its Fisher, the rank, every decomposition setting and the numerics
regime (device, intra-op threads), so an interrupted profile picks up where it stopped and
a changed input never reuses a stale cost. Every finished task is written at once
(atomically), so Ctrl-C loses at most the tasks still running; a cache entry that is not a
finite non-negative number is named in a warning and recomputed.

A task is one matrix and a group of its configs, decomposed together by
:func:`~lqlora_ext.method.batched.decompose_many` (their first low-rank step is the same and
computed once). On CPU the groups (at most CPU_GROUP configs) are cut so that every worker
stays busy, and each cost is bit-identical to a lone ``decompose`` call. Work is spread over
processes, each running torch with one intra-op thread: that uses every core far better
than intra-op threading on ~100M-parameter models' small matrices, and since every
decomposition runs with one thread whatever the worker count (see
:func:`~lqlora_ext.method.decomposition.decompose`), the costs are bit-identical for any
number of workers, threads or ranks. On CUDA the groups are the fixed chunks of the config
list (:func:`~lqlora_ext.method.batched.chunks`), each one batched rsvd per iteration; a
chunk with any cost missing is recomputed whole, so every cost comes from the same batch on
every run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import signal
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .batched import batch_size, chunks, decompose_many
from ..formats import QuantConfig

# Configs per CPU task at most: sharing the first low-rank step saves (n - 1) / n of it,
# while a task is what Ctrl-C may lose.
CPU_GROUP = 8
# Bump when the decomposition's numerics change (2: bnb-exact NF tables; 3: one intra-op
# thread for every decomposition, so earlier thread-dependent costs are not reused). CUDA
# costs also carry "batched" (cache_settings): they come from decompose_many's chunks.
PROFILE_VERSION = 3


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
    """Costs ``{config name: error}`` of one matrix under ``configs`` (dicts), decomposed
    together; batched (one rsvd call per iteration, ``configs`` one fixed chunk) on CUDA."""
    cs = [QuantConfig.from_dict(cd) for cd in configs]
    ds = decompose_many(w, cs, rank, fisher=fisher, seed=settings["seed"],
                        max_iters=settings["max_iters"], tol=settings["tol"],
                        threads=settings["threads"], batched=w.device.type == "cuda",
                        max_batch=len(cs))
    return {c.name: d.error for c, d in zip(cs, ds)}


def task_groups(missing: Sequence[Sequence[int]], n_configs: int, shapes: Sequence[tuple],
                device: str, workers: int = 1) -> List[Tuple[int, List[int]]]:
    """The profile's tasks ``(matrix, [config indices])`` for the missing costs
    ``missing[i]`` (config indices of matrix ``i``). CUDA: the fixed chunks of every matrix's
    config list that miss a cost (recomputed whole). CPU: each matrix's missing configs in
    consecutive groups of at most :data:`CPU_GROUP`, cut finer while that keeps fewer than
    about 4 tasks per worker; the grouping does not change a CPU cost."""
    tasks = []
    if torch.device(device).type == "cuda":
        for i, miss in enumerate(missing):
            todo = set(miss)
            for ch in chunks(n_configs, batch_size(shapes[i], n_configs)):
                if todo.intersection(ch):
                    tasks.append((i, list(ch)))
        return tasks
    busy = [i for i, miss in enumerate(missing) if miss]
    pieces = 1 if workers <= 1 or not busy else -(-4 * workers // len(busy))
    for i in busy:
        miss = list(missing[i])
        p = min(max(pieces, -(-len(miss) // CPU_GROUP)), len(miss))
        for k in range(p):
            tasks.append((i, miss[k * len(miss) // p:(k + 1) * len(miss) // p]))
    return tasks


# ------------------------------------------------------------------------ worker pool
# Task lists handed to forked workers by inheritance, by call (two map_matrices generators
# may be alive at once, e.g. interleaved by a caller).
_FORK_TASKS: Dict[int, Tuple[Callable, Sequence[tuple]]] = {}


def _worker_init() -> None:
    # Ctrl-C goes to the whole process group: the parent handles it (cancels, terminates
    # the workers); a worker must neither die mid-write nor print a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def _run_forked(token: int, i: int):
    fn, tasks = _FORK_TASKS[token]
    return fn(*tasks[i])


def _run_pickled(fn, *args):
    return fn(*args)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the workers now (they hold no files open)."""
    pool.shutdown(wait=False, cancel_futures=True)
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)


def map_matrices(fn: Callable, tasks: Sequence[tuple], workers: Optional[int] = None
                 ) -> Iterator[Tuple[int, object]]:
    """Yield ``(index, fn(*tasks[index]))`` as tasks complete, over ``workers`` processes
    (default: all cores) each running torch single-threaded; in this process when
    ``workers <= 1``, there is a single task, or the tensors live on a GPU.

    Why processes: the per-matrix work (small QR/SVD/GEMM calls) scales badly with
    intra-op threads, and OpenMP threads spin when cores are oversubscribed. On
    KeyboardInterrupt (or any error, or the caller closing the generator) the pending
    tasks are cancelled and the workers terminated at once; what was already yielded is
    the caller's to keep.
    """
    if workers is None:
        workers = os.cpu_count() or 1
    on_gpu = any(isinstance(a, Tensor) and a.device.type != "cpu" for t in tasks for a in t)
    if workers <= 1 or len(tasks) <= 1 or on_gpu:
        for i, t in enumerate(tasks):
            yield i, fn(*t)
        return
    # fork: workers inherit the tasks (weights included) without pickling and, unlike
    # spawn, need no `if __name__ == "__main__"` guard in the user's script. Workers run
    # torch single-threaded, so no OpenMP pool is used across the fork.
    import multiprocessing as mp
    fork = "fork" in mp.get_all_start_methods()
    ctx = mp.get_context("fork" if fork else "spawn")
    token = id(tasks)
    if fork:
        _FORK_TASKS[token] = (fn, tasks)
    pool = ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx,
                               initializer=_worker_init)
    try:
        if fork:
            futs = {pool.submit(_run_forked, token, i): i for i in range(len(tasks))}
        else:
            futs = {pool.submit(_run_pickled, fn, *t): i for i, t in enumerate(tasks)}
        pending = set(futs)
        while pending:
            # A bounded wait keeps the main thread responsive to Ctrl-C on every platform.
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                yield futs[fut], fut.result()
    except BaseException:
        _stop(pool)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        _FORK_TASKS.pop(token, None)


# ------------------------------------------------------------------------------ cache
def _atomic_write_json(path: str, obj) -> None:
    """Replace ``path`` by ``obj`` as JSON in one rename (never a torn file), with the
    usual file mode (0666 minus the umask; mkstemp would give 0600)."""
    for _ in range(100):
        tmp = os.path.join(os.path.dirname(path), f".{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise OSError(f"profile_costs: cannot create a temporary file in {os.path.dirname(path)}")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _valid_cost(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
        and v >= 0


def read_cache(path: str, wanted: Sequence[str]) -> Dict[str, float]:
    """The usable cached costs of one matrix: ``{config name: cost}``. A file that cannot
    be read, or entries that are not finite non-negative numbers, are named in a warning
    and left out (so they are recomputed and the file rewritten)."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as fh:
            data = json.load(fh)
        costs = data["costs"]
        if not isinstance(costs, dict):
            raise TypeError(f"'costs' is {type(costs).__name__}, not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"profile_costs: cost cache file {path} is unreadable ({type(e).__name__}:"
                      f" {e}); recomputing it", RuntimeWarning, stacklevel=3)
        return {}
    bad = {k: v for k, v in costs.items() if k in wanted and not _valid_cost(v)}
    if bad:
        shown = ", ".join(f"{k}={v!r}" for k, v in list(bad.items())[:3])
        warnings.warn(f"profile_costs: cost cache file {path} has {len(bad)} invalid entr"
                      f"{'y' if len(bad) == 1 else 'ies'} ({shown}; a cost must be a finite "
                      f"number >= 0); recomputing them", RuntimeWarning, stacklevel=3)
    return {k: float(v) for k, v in costs.items() if _valid_cost(v)}


def cache_settings(device: str, rank: int, seed: int, max_iters: int, tol: float,
                   threads: Optional[int] = 1) -> dict:
    """Everything besides the tensors that a cached cost depends on (hashed into its key;
    every profiler of this cache, sharded or not, must use it): the decomposition settings
    and the numerics regime (``device``: the type the decompositions run on, "cpu" or
    "cuda"; intra-op threads: the count itself when ``threads`` is None, since the
    results then depend on it)."""
    out = {"v": PROFILE_VERSION, "rank": rank, "seed": seed, "max_iters": max_iters,
           "tol": tol, "device": torch.device(device).type,
           "threads": torch.get_num_threads() if threads is None else threads}
    if out["device"] == "cuda":  # costs from decompose_many's batched chunks
        out["batched"] = 1
    return out


def _one_task(name, w, fisher, cds, rank, settings):
    try:
        return _profile_one(w, fisher, cds, rank, settings)
    except ValueError as e:  # name the matrix: the decomposition's message does not
        which = ", ".join(QuantConfig.from_dict(cd).name for cd in cds)
        raise ValueError(f"profile_costs: {name} ({which}): {e}") from None


def profile_costs(weights: Dict[str, Tensor], configs: Sequence[QuantConfig], rank: int, *,
                  fishers: Optional[Dict[str, Tensor]] = None, cache_dir: Optional[str] = None,
                  seed: int = 0, max_iters: int = 100, tol: float = 1e-3,
                  workers: Optional[int] = None, progress: bool = True,
                  threads: Optional[int] = 1) -> Tensor:
    """Decomposition error for every matrix and config: fp64 ``[len(weights), len(configs)]``.

    weights: name -> ``[out, in]`` weight (row order of the result). fishers: name -> Fisher
    of the same shape (data-aware costs) or None. cache_dir: resumable cache directory
    (created if missing; None disables caching). workers: processes (default: all cores;
    1 = in this process). threads: intra-op threads per decomposition (1, the default,
    makes every cost independent of thread and worker counts; None = torch's setting, in
    this process only, with its own cache entries).
    """
    from tqdm.auto import tqdm

    configs = list(configs)
    if not configs:
        raise ValueError("profile_costs: no configs given")
    names = list(weights)
    if fishers is not None:
        for name in names:
            if fishers.get(name) is None:
                raise ValueError(f"profile_costs: no Fisher estimate for {name!r}")
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
    costs = torch.full((len(names), len(configs)), float("nan"), dtype=torch.float64)
    wanted = [c.name for c in configs]
    rows = []  # per matrix: (name, cache path, cached costs, settings)
    missing = []  # per matrix: the config indices without a cost
    for i, name in enumerate(names):
        w = weights[name]
        f = None if fishers is None else fishers[name]
        settings = {"seed": seed, "max_iters": max_iters, "tol": tol, "threads": threads}
        path = None if cache_dir is None else os.path.join(cache_dir, _key(
            w, f, cache_settings(w.device.type, rank, seed, max_iters, tol, threads)) + ".json")
        cached = {} if path is None else read_cache(path, wanted)
        rows.append((name, path, cached, settings))
        missing.append([j for j, c in enumerate(configs) if c.name not in cached])
        for j, c in enumerate(configs):
            if c.name in cached:
                costs[i, j] = cached[c.name]

    if threads is None:  # torch's own thread setting only means something in this process
        workers = 1
    if workers is None:
        workers = os.cpu_count() or 1
    on_gpu = any(w.device.type == "cuda" for w in weights.values())
    groups = task_groups(missing, len(configs), [tuple(weights[n].shape) for n in names],
                         "cuda" if on_gpu else "cpu", workers)
    n_todo = sum(len(m) for m in missing)
    bar = tqdm(total=len(names) * len(configs), initial=len(names) * len(configs) - n_todo,
               desc="profiling costs", unit="decomp", disable=not progress)
    tasks = [(rows[i][0], weights[rows[i][0]].detach(),
              None if fishers is None else fishers[rows[i][0]],
              [configs[j].to_dict() for j in js], rank, rows[i][3]) for i, js in groups]
    try:
        for idx, result in map_matrices(_one_task, tasks, workers):
            i, js = groups[idx]
            name, path, cached, _ = rows[i]
            new = 0
            for j in js:
                cname = configs[j].name
                new += cname not in cached
                costs[i, j] = cached[cname] = result[cname]
            if path is not None:
                _atomic_write_json(path, {"name": name, "costs": cached})
            bar.update(new)
    finally:
        bar.close()
    return costs
