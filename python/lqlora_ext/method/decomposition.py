"""LQ decomposition of one weight matrix: W ≈ Q + L1 @ L2 (METHOD.md §2, §3).

Alternates a rank-r (randomized) SVD of W - Q with NormalFloat quantization of W - L1 L2,
starting from Q = 0, and keeps the best iterate (the reference returns the one whose error
rose). Differences from the reference loop, all measured in bench/decompose.py:

- warm start: each low-rank step sketches with the previous iteration's right singular
  subspace plus `oversample` fresh Gaussian columns and no extra power iteration
  (the subspace moves little between iterations);
- early stop: besides "error rose", stop when the relative improvement falls below `tol`
  (default 5e-4; tol=0 gives the reference's stopping rule);
- Fisher weighting (two-sided row/column scaling of the low-rank step) guards zero rows and
  columns by flooring the scale at 1e-6 of its largest value.

Determinism: CPU BLAS/LAPACK results (MKL's QR, SVD and dot products) depend on the
number of intra-op threads, and the loop amplifies the last-bit differences (the stopping
iteration, hence the error, changes). Every decomposition therefore runs with one intra-op
thread by default (``threads=1``): the result is the same bits for any torch thread
setting, worker count or number of ranks. Parallelism comes from decomposing several
matrices at once in processes (method/profiling.py), which is also faster for the
~100M-parameter models' small matrices; one large matrix in-process on an idle many-core
machine is the case where ``threads=None`` (torch's setting, thread-dependent bits) is
faster (bench/results/decompose_threads.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, List, Optional

import torch
from torch import Tensor

from .. import ops
from ..formats import NFTensor, QuantConfig, quantize


@dataclasses.dataclass
class Decomposition:
    """Result of :func:`decompose`.

    q: the quantized part (NFTensor, ``[out, in]``). l1: ``[out, r]``, l2: ``[r, in]`` fp32
    with ``l1 = U sqrt(S)``, ``l2 = sqrt(S) V^T``. error: final squared reconstruction error
    ``||W - Q - L1 L2||_F^2``, Fisher-weighted (``sum F * E^2``) when a Fisher matrix was
    given. iters: iterations run. history: the error after each iteration.
    """

    q: NFTensor
    l1: Tensor
    l2: Tensor
    error: float
    iters: int
    history: List[float]

    def reconstruct(self) -> Tensor:
        """Dense fp32 ``Q + L1 @ L2``."""
        return self.q.dequantize() + self.l1 @ self.l2


@contextlib.contextmanager
def intra_op_threads(n: Optional[int]) -> Iterator[None]:
    """Run the enclosed torch CPU work with ``n`` intra-op threads (None: leave torch's
    setting), restoring the previous count afterwards. The setting is process-wide."""
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def first_non_finite(t: Tensor) -> Optional[tuple]:
    """``(position, value)`` of the first NaN/Inf of ``t`` in row-major order, or None."""
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return None
    pos = tuple(int(i) for i in bad.nonzero()[0])
    return list(pos), float(t[pos])


def _check(w: Tensor, rank: int, fisher: Optional[Tensor]):
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.dtype.is_floating_point:
        raise ValueError(f"decompose: weight must be a 2-D floating tensor, got "
                         f"{getattr(w, 'dtype', type(w))} {tuple(getattr(w, 'shape', ()))}")
    if w.device.type != "meta":
        bad = first_non_finite(w.detach())
        if bad is not None:
            raise ValueError(f"decompose: weight {tuple(w.shape)} has a non-finite value "
                             f"({bad[1]}) at {bad[0]}")
    if not isinstance(rank, int) or rank < 0 or rank >= min(w.shape):
        raise ValueError(f"decompose: rank must be an integer with 0 <= rank < min(out, in) = "
                         f"{min(w.shape)}, got {rank!r}")
    if fisher is not None:
        if fisher.shape != w.shape:
            raise ValueError(f"decompose: fisher must have the weight's shape {tuple(w.shape)}, "
                             f"got {tuple(fisher.shape)}")
        if not torch.isfinite(fisher).all() or (fisher < 0).any():
            raise ValueError("decompose: fisher must be finite and non-negative")
        if not (fisher > 0).any():
            raise ValueError("decompose: fisher is all zeros (no calibration signal reached "
                             "this weight)")


def fisher_scales(fisher: Tensor):
    """Row/column scales ``d_row [out]``, ``d_col [in]`` = sqrt of the Fisher's row/column
    means, floored at 1e-6 of their maximum so zero rows/columns stay invertible."""
    f = fisher.to(torch.float32)
    d_row = f.mean(1).sqrt()
    d_col = f.mean(0).sqrt()
    return d_row.clamp_min(d_row.max() * 1e-6), d_col.clamp_min(d_col.max() * 1e-6)


def lowrank(r: Tensor, rank: int, *, seed: int = 0, exact: bool = False,
            warm: Optional[Tensor] = None, oversample: int = 10, niter: int = 2):
    """Rank-``rank`` factors of ``r [..., m, n]`` as ``(U sqrt(S) [..., m, rank],
    sqrt(S) V^T [..., rank, n], V [..., n, rank])``, one call for any batch.

    ``warm [..., n, rank]``: previous right subspaces to continue from (no extra power
    iteration); every batch entry gets the same fresh columns.
    """
    if exact:
        u, s, vh = torch.linalg.svd(r, full_matrices=False)
        u, s, v = u[..., :rank], s[..., :rank], vh[..., :rank, :].mT
    else:
        init = None
        m, n = r.shape[-2:]
        k = min(rank + oversample, m, n)
        if warm is not None:
            # rsvd's own Gaussian (drawn on r's device, the same bits everywhere) for any
            # [., n] input: [n, k - rank], shared by the batch (the input's values are unread).
            fresh = ops.rsvd_sketch(r.new_empty((1, n)), k - rank, seed + 1)
            init = torch.cat([warm, fresh.expand(*warm.shape[:-2], n, k - rank)], dim=-1)
            # The previous subspace already went through every earlier iteration's power
            # steps: continuing it with one sketch (no extra power iteration) is enough.
            niter = 0
        u, s, v = ops.rsvd(r, rank, oversample, niter, seed, init)
    rs = s.clamp_min(0).sqrt()
    return u * rs.unsqueeze(-2), rs.unsqueeze(-1) * v.mT, v


def check_settings(who: str, max_iters, threads) -> None:
    """The loop settings ``decompose`` and ``decompose_many`` share, refused by name."""
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"{who}: max_iters must be an integer >= 1, got {max_iters!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ValueError(f"{who}: threads must be None or an integer >= 1, got {threads!r}")


def decompose(w: Tensor, config: QuantConfig, rank: int, *, fisher: Optional[Tensor] = None,
              max_iters: int = 100, seed: int = 0, exact_svd: bool = False, tol: float = 5e-4,
              warm_start: bool = True, threads: Optional[int] = 1) -> Decomposition:
    """Decompose ``w [out, in]`` into a quantized part plus a rank-``rank`` part.

    fisher: optional ``[out, in]`` diagonal Fisher (data-aware variant, METHOD.md §3).
    max_iters: iteration cap. seed: seeds the randomized SVD (same inputs, same outputs).
    exact_svd: use torch.linalg.svd (slow; for checks). tol: stop when the relative error
    improvement is below tol (0 = the reference rule: stop only when the error rises).
    warm_start: continue each randomized SVD from the previous subspace.
    threads: intra-op threads for the CPU work (1, the default: bit-identical results for
    any torch thread setting, and no oversubscription of busy cores; None: torch's
    current setting, whose results depend on it). The setting is process-wide while the
    call runs.
    """
    _check(w, rank, fisher)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"decompose: config must be a QuantConfig, got {type(config).__name__}")
    check_settings("decompose", max_iters, threads)
    with intra_op_threads(threads):
        return _decompose(w, config, rank, fisher, max_iters, seed, exact_svd, tol, warm_start)


class _Problem:
    """One matrix's fixed data: ``W [out, in]`` fp32, its Fisher ``F`` (or None) and the
    Fisher row/column scales of the low-rank step."""

    def __init__(self, w: Tensor, fisher: Optional[Tensor]):
        self.W = w.detach().to(torch.float32)
        self.F = None if fisher is None else fisher.detach().to(self.W.device, torch.float32)
        self.d_row = self.d_col = None
        if self.F is not None:
            self.d_row, self.d_col = fisher_scales(self.F)

    def err_of(self, e: Tensor) -> float:
        """Squared (Fisher-weighted) norm of ``e``; overwrites ``e``."""
        if self.F is not None:
            return float(torch.dot(e.square_().reshape(-1), self.F.reshape(-1)))
        return float(torch.linalg.vector_norm(e).square())

    def scaled(self, r: Tensor, inplace: bool = False) -> Tensor:
        """The low-rank step's input: ``r`` scaled by the Fisher rows/columns (in place if
        ``inplace``: ``r`` is a temporary). ``r`` comes first in each product: with the
        broadcast ``[out, 1]`` operand first, torch's CPU kernel takes a slow loop order
        (~5x slower out of place on 4096^2); the bits are the same either way."""
        if self.d_row is None:
            return r
        if inplace:
            return r.mul_(self.d_row[:, None]).mul_(self.d_col[None, :])
        return r * self.d_row[:, None] * self.d_col[None, :]

    def unscaled(self, l1: Tensor, l2: Tensor):
        if self.d_row is None:
            return l1, l2
        return l1 / self.d_row[:, None], l2 / self.d_col[None, :]


class _Run:
    """One config's alternating loop, advanced one low-rank step at a time, so that several
    configs of one matrix can share steps (:func:`decompose_many`)."""

    def __init__(self, p: _Problem, config: QuantConfig, max_iters: int, tol: float):
        self.p, self.config, self.max_iters, self.tol = p, config, max_iters, tol
        self.Qd: Optional[Tensor] = None  # None: Q = 0 (the first iteration)
        self.warm: Optional[Tensor] = None
        self.best: Optional[Decomposition] = None
        self.history: List[float] = []
        self.done = False

    def residual(self) -> Tensor:
        """The next low-rank step's input, ``scaled(W - Q)``."""
        if self.Qd is None:
            return self.p.scaled(self.p.W)
        return self.p.scaled(self.p.W - self.Qd, inplace=True)

    def advance(self, l1: Tensor, l2: Tensor, v: Tensor) -> None:
        """Take the low-rank factors of :meth:`residual` (scaled space), quantize the rest."""
        p = self.p
        self.warm = v
        l1, l2 = p.unscaled(l1, l2)
        T = torch.addmm(p.W, l1, l2, alpha=-1)  # W - L1 L2 in one fused op
        q = quantize(T, self.config)
        self.Qd = q.dequantize()
        e = p.err_of(T.sub_(self.Qd))  # T is not needed after quantize: reuse it
        self.history.append(e)
        it = len(self.history)
        if self.best is None or e < self.best.error:
            prev = self.best.error if self.best is not None else None
            self.best = Decomposition(q, l1, l2, e, it, self.history)
            if prev is not None and prev - e <= self.tol * prev:
                self.done = True
        else:
            self.done = True  # the error rose: stop, keep the best iterate
        if it >= self.max_iters:
            self.done = True
        if self.done:
            self.best.iters = it
            self.Qd = self.warm = None  # free the iterate's memory


def _rank0(p: _Problem, config: QuantConfig) -> Decomposition:
    W = p.W
    q = quantize(W, config)
    e = p.err_of(W - q.dequantize())
    return Decomposition(q, W.new_zeros(W.shape[0], 0), W.new_zeros(0, W.shape[1]), e, 1, [e])


def _decompose(w, config, rank, fisher, max_iters, seed, exact_svd, tol, warm_start):
    p = _Problem(w, fisher)
    if rank == 0:
        return _rank0(p, config)
    return _finish(_Run(p, config, max_iters, tol), rank, seed, exact_svd, warm_start)


def _finish(run: "_Run", rank, seed, exact_svd, warm_start) -> Decomposition:
    """Run one config's loop to its end, one low-rank step per iteration."""
    while not run.done:
        run.advance(*lowrank(run.residual(), rank, seed=seed, exact=exact_svd,
                             warm=run.warm if warm_start else None))
    return run.best
