"""Several quantization configs of one matrix decomposed together (the cost profile's
inner loop: METHOD.md §4 needs every config's error for every matrix).

Two things are shared across the configs:

- the first low-rank step: every config starts from Q = 0, so its first randomized SVD
  is of the same matrix W (Fisher-scaled) with the same seed; it is computed once. This
  alone keeps each config's result bit-identical to :func:`decompose` (``batched=False``,
  the default on CPU).
- with ``batched=True`` (the default on CUDA), every later low-rank step of the configs
  still running is one ``lqlora::rsvd`` call on their stacked residuals ``[A, out, in]``:
  on a GPU one batched launch sequence (CholeskyQR, the shared-memory eigensolver)
  instead of one per config. The configs run in lockstep, each stopping on its own rule;
  the batch shrinks as they stop. A config's result then depends, in rounding only, on
  which configs shared its batch: the batches are fixed by the config list and
  ``max_batch`` (consecutive chunks), so the same call gives the same bits.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from ..formats import QuantConfig
from .decomposition import (Decomposition, _check, _finish, _Problem, _rank0, _Run,
                            check_settings, intra_op_threads, lowrank)

# Working memory the batched path may hold per chunk (the stacked residuals and every
# running config's dequantized iterate): the chunk size follows from it and the shape.
BATCH_BYTES = 2 << 30


def batch_size(shape: Sequence[int], n_configs: int, max_batch: Optional[int] = None) -> int:
    """Configs per batched chunk for an ``[out, in]`` matrix: ``max_batch`` if given, else
    as many as fit :data:`BATCH_BYTES` (two fp32 matrices per config), at least 1."""
    if max_batch is not None:
        return max(1, min(int(max_batch), n_configs))
    per = 2 * 4 * int(shape[0]) * int(shape[1])
    return max(1, min(n_configs, BATCH_BYTES // max(per, 1)))


def chunks(n_configs: int, size: int) -> List[range]:
    """The fixed consecutive chunks ``decompose_many`` batches together."""
    return [range(i, min(i + size, n_configs)) for i in range(0, n_configs, size)]


def decompose_many(w: Tensor, configs: Sequence[QuantConfig], rank: int, *,
                   fisher: Optional[Tensor] = None, max_iters: int = 100, seed: int = 0,
                   exact_svd: bool = False, tol: float = 5e-4, warm_start: bool = True,
                   threads: Optional[int] = 1, batched: Optional[bool] = None,
                   max_batch: Optional[int] = None,
                   on_done: Optional[Callable[[int, Decomposition], None]] = None
                   ) -> List[Decomposition]:
    """:func:`~lqlora_ext.method.decomposition.decompose` of ``w [out, in]`` under every
    config of ``configs``: one :class:`Decomposition` per config, in order.

    Settings as in ``decompose``. batched: stack the configs' low-rank steps into one
    ``lqlora::rsvd`` call each iteration (None: on CUDA tensors only; False keeps each
    result bit-identical to ``decompose``). max_batch: configs per batched chunk (default
    from :data:`BATCH_BYTES`). on_done(index, decomposition): called as each config
    finishes (e.g. to record its cost at once).
    """
    _check(w, rank, fisher)
    configs = list(configs)
    for c in configs:
        if not isinstance(c, QuantConfig):
            raise TypeError(f"decompose_many: configs must be QuantConfigs, got "
                            f"{type(c).__name__}")
    check_settings("decompose_many", max_iters, threads)
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int)
                                  or max_batch < 1):
        raise ValueError(f"decompose_many: max_batch must be None or an integer >= 1, got "
                         f"{max_batch!r}")
    if batched is None:
        batched = w.device.type == "cuda"
    out: List[Optional[Decomposition]] = [None] * len(configs)

    def finish(i: int, d: Decomposition) -> None:
        out[i] = d
        if on_done is not None:
            on_done(i, d)

    with intra_op_threads(threads):
        p = _Problem(w, fisher)
        if rank == 0:
            for i, c in enumerate(configs):
                finish(i, _rank0(p, c))
            return out
        if not configs:
            return []
        # The first low-rank step, the same for every config (Q = 0).
        first = lowrank(p.scaled(p.W), rank, seed=seed, exact=exact_svd)
        if not batched:
            for i, c in enumerate(configs):
                run = _Run(p, c, max_iters, tol)
                run.advance(*(t.clone() for t in first))  # each result owns its factors
                finish(i, _finish(run, rank, seed, exact_svd, warm_start))
            return out
        size = batch_size(p.W.shape, len(configs), max_batch)
        for chunk in chunks(len(configs), size):
            runs = {i: _Run(p, configs[i], max_iters, tol) for i in chunk}
            for run in runs.values():
                run.advance(*(t.clone() for t in first))
            while True:
                for i in [i for i, r in runs.items() if r.done]:
                    finish(i, runs.pop(i).best)
                if not runs:
                    break
                live = list(runs.values())
                l1, l2, v = lowrank(
                    torch.stack([r.residual() for r in live]), rank, seed=seed,
                    exact=exact_svd,
                    warm=torch.stack([r.warm for r in live]) if warm_start else None)
                for b, run in enumerate(live):
                    run.advance(l1[b], l2[b], v[b])
    return out
