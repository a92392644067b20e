"""lqlora::rsvd's CUDA implementation (csrc/cuda/ops_rsvd.cpp + the batched Jacobi kernel of
csrc/cuda/rsvd.cu) on every backend that runs it: "emu" (the SIMT emulator: the same kernel
and glue on CPU tensors) always, "cuda" when a GPU is present.

- accuracy: the rank-r reconstruction error against the optimal one (torch.linalg.svd), within
  what torch.svd_lowrank reaches with the same oversampling and power iterations; singular
  values against torch.linalg.svd; agreement with the CPU op (same sketch, same seed);
- orthonormal U and V, fp32 and fp64, batch dimensions, m < n, odd k, the global-memory path
  of the kernel (k > 76);
- degenerate inputs: rank-deficient and zero matrices (the Householder fallback);
- warm start (`init`), seeds, determinism over emulator schedules and workers, bad input.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

import lqlora_ext  # noqa: F401  (registers torch.ops.lqlora)
from lqlora_ext.ops import emu

BACKENDS = ["emu"] + (["cuda"] if torch.cuda.is_available() else [])
CPU = torch.ops.lqlora  # the CPU op: same algorithm through LAPACK
DT = {"fp32": torch.float32, "fp64": torch.float64}
OVERSAMPLE, NITER = 10, 2
# (m, n, rank): real-shaped and small enough for the emulator; m < n; rank + oversample odd.
CASES = [(256, 192, 16), (64, 300, 12), (96, 64, 7)]


class Backend:
    def __init__(self, name: str):
        self.name = name
        self.ops = emu.ops_for(name)
        self.dev = emu.device() if name == "emu" else torch.device("cuda")

    def rsvd(self, a, rank, oversample=OVERSAMPLE, niter=NITER, seed=0, init=None):
        out = self.ops.rsvd(a.to(self.dev), rank, oversample, niter, seed,
                            None if init is None else init.to(self.dev))
        assert all(t.device.type == self.dev.type for t in out)
        return tuple(t.cpu() for t in out)


@pytest.fixture(params=BACKENDS, scope="module")
def be(request):
    return Backend(request.param)


def _eps(dt):
    return torch.finfo(dt).eps


def _matrix(m, n, dt, seed, decay=0.05, batch=()):
    """[*batch, m, n] with singular values exp(-decay * i): a spectrum like a weight
    residual's, decaying but with a tail the rank-r truncation leaves behind."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    qu = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64)).Q
    qv = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64)).Q
    s = torch.exp(-decay * torch.arange(k, dtype=torch.float64))
    return ((qu * s) @ qv.mT).to(dt)


def _err(a, u, s, v):
    a = a.double()
    low = (u.double() * s.double().unsqueeze(-2)) @ v.double().mT
    return float(torch.linalg.matrix_norm(a - low))


def _opt_err(a, rank):
    sv = torch.linalg.svdvals(a.double())
    return float(sv[..., rank:].norm()), sv


def _orth_err(x):
    eye = torch.eye(x.shape[-1], dtype=torch.float64)
    return float((x.double().mT @ x.double() - eye).abs().max())


def _lowrank_worst(a, rank, k, sv, seeds=8):
    """The worst reconstruction error and singular-value error torch.svd_lowrank reaches
    over `seeds` sketches with the same oversampling and power iterations."""
    errs, s_errs = [], []
    state = torch.random.get_rng_state()
    try:
        for seed in range(seeds):
            torch.manual_seed(seed)
            ul, sl, vl = torch.svd_lowrank(a, q=k, niter=NITER)
            errs.append(_err(a, ul[:, :rank], sl[:rank], vl[:, :rank]))
            s_errs.append(float((sl[:rank].double() - sv[:rank]).abs().max()))
    finally:
        torch.random.set_rng_state(state)
    return max(errs), max(s_errs)


@pytest.mark.parametrize("dt", DT)
@pytest.mark.parametrize("m,n,rank", CASES)
def test_accuracy_against_svd_and_svd_lowrank(be, dt, m, n, rank):
    dt = DT[dt]
    a = _matrix(m, n, dt, seed=m + n)
    u, s, v = be.rsvd(a, rank)
    assert (u.shape, s.shape, v.shape) == ((m, rank), (rank,), (n, rank))
    assert u.dtype == s.dtype == v.dtype == dt
    eps = _eps(dt)
    opt, sv = _opt_err(a, rank)
    k = min(rank + OVERSAMPLE, m, n)
    lr_err, lr_s_err = _lowrank_worst(a, rank, k, sv)
    err = _err(a, u, s, v)
    # The yardstick: the worst excess over the optimum torch.svd_lowrank shows with the
    # same oversampling and power iterations over 8 seeds (~1e-3 here); 2x of it for the
    # luck of this op's own sketch (the CPU op, same sketch, shows the same excess).
    excess, lr_excess = err / opt - 1, lr_err / opt - 1
    assert excess <= 2 * lr_excess + 100 * eps, (excess, lr_excess)
    s_err = float((s.double() - sv[:rank]).abs().max())
    assert s_err <= 2 * lr_s_err + 100 * eps * float(sv[0]), (s_err, lr_s_err)
    # Descending, non-negative.
    assert bool((s[:-1] >= s[1:]).all()) and bool((s >= 0).all())
    # The CPU op draws the same sketch from the same seed: same factors up to rounding.
    uc, sc, vc = CPU.rsvd(a, rank, OVERSAMPLE, NITER, 0, None)
    tol = 1e-4 if dt == torch.float32 else 1e-11
    assert float((s - sc).abs().max()) <= tol * float(sc[0])
    assert abs(err - _err(a, uc, sc, vc)) <= tol * opt
    # Leading singular vectors, well separated here, agree with the CPU op's up to sign
    # (the CPU op leaves LAPACK's signs; this one fixes them).
    top = min(rank, 4)
    cos_u = (u[:, :top].double() * uc[:, :top].double()).sum(0).abs()
    cos_v = (v[:, :top].double() * vc[:, :top].double()).sum(0).abs()
    assert float((1 - cos_u).abs().max()) <= 100 * tol
    assert float((1 - cos_v).abs().max()) <= 100 * tol


@pytest.mark.parametrize("decay", [0.02, 0.3])
@pytest.mark.parametrize("dt", DT)
@pytest.mark.parametrize("m,n,rank", CASES)
def test_orthonormal_factors_and_sign_rule(be, dt, m, n, rank, decay):
    """Slow decay (0.02): a hard sketch; steep decay (0.3, singular values down to ~1e-10):
    ill-conditioned sketches, where one CholeskyQR pass is not orthonormal enough and the
    fp32 path must take the second."""
    dt = DT[dt]
    a = _matrix(m, n, dt, seed=7 * m + n, decay=decay)
    u, s, v = be.rsvd(a, rank)
    bound = 30 * _eps(dt) * math.sqrt(max(m, n))
    assert _orth_err(u) <= bound and _orth_err(v) <= bound
    # Sign rule: every column of U has its largest-magnitude entry positive.
    top = u.gather(0, u.abs().argmax(0, keepdim=True))
    assert bool((top > 0).all())
    # U and V belong together: A V = U S column by column.
    av = a.double() @ v.double()
    assert float((av - u.double() * s.double()).abs().max()) <= 1e3 * _eps(dt) * float(s[0]) + \
        float(torch.linalg.svdvals(a.double())[rank])


@pytest.mark.parametrize("dt", DT)
def test_batch_dims_match_per_entry_runs(be, dt):
    dt = DT[dt]
    m, n, rank, batch = 96, 80, 8, (2, 3)
    a = _matrix(m, n, dt, seed=3, batch=batch)
    k = rank + OVERSAMPLE
    before = emu.stats() if be.name == "emu" else None
    u, s, v = be.rsvd(a, rank, seed=5)
    if before is not None:
        # The glue's two kernels: the sketch (256 threads, one per pair of elements), then
        # the batched eigensolver, one block per matrix.
        after = emu.stats()
        assert after["launches"] - before["launches"] == 2
        sketch_blocks = math.ceil(math.prod(batch) * n * k / 2 / 256)
        assert after["blocks"] - before["blocks"] == sketch_blocks + math.prod(batch)
    assert (u.shape, s.shape, v.shape) == ((*batch, m, rank), (*batch, rank), (*batch, n, rank))
    # The op's sketch for seed 5, drawn as the op draws it; entry (i, j) run alone with its
    # slice as `init` gives the same factors up to rounding.
    omega = CPU.rsvd_sketch(a, k, 5)
    tol = 1e-4 if dt == torch.float32 else 1e-11
    for i in range(batch[0]):
        for j in range(batch[1]):
            ui, si, vi = be.rsvd(a[i, j], rank, init=omega[i, j])
            assert float((si - s[i, j]).abs().max()) <= tol * float(si[0])
            assert float((ui - u[i, j]).abs().max()) <= 100 * tol
            assert float((vi - v[i, j]).abs().max()) <= 100 * tol
            opt, _ = _opt_err(a[i, j], rank)
            assert _err(a[i, j], u[i, j], s[i, j], v[i, j]) <= opt * 1.05


@pytest.mark.parametrize("dt", DT)
@pytest.mark.parametrize("m,n", [(80, 60), (50, 120)])
def test_rank_deficient(be, dt, m, n):
    dt = DT[dt]
    g = torch.Generator().manual_seed(m)
    true_rank, rank = 5, 8
    a = (torch.randn(m, true_rank, generator=g, dtype=torch.float64)
         @ torch.randn(true_rank, n, generator=g, dtype=torch.float64)).to(dt)
    u, s, v = be.rsvd(a, rank)
    eps = _eps(dt)
    sv = torch.linalg.svdvals(a.double())
    assert float((s[:true_rank].double() - sv[:true_rank]).abs().max()) <= 1e3 * eps * float(sv[0])
    assert float(s[true_rank:].abs().max()) <= 1e3 * eps * float(sv[0])
    assert _err(a, u, s, v) <= 1e3 * eps * float(torch.linalg.matrix_norm(a.double()))
    bound = 30 * eps * math.sqrt(max(m, n))
    assert _orth_err(u) <= bound and _orth_err(v) <= bound


@pytest.mark.parametrize("dt", DT)
def test_zero_matrix(be, dt):
    dt = DT[dt]
    a = torch.zeros(40, 30, dtype=dt)
    u, s, v = be.rsvd(a, 6)
    assert bool(torch.isfinite(u).all() and torch.isfinite(v).all())
    assert bool((s == 0).all())
    bound = 30 * _eps(dt) * math.sqrt(40)
    assert _orth_err(u) <= bound and _orth_err(v) <= bound


@pytest.mark.parametrize("dt", DT)
def test_large_k_global_memory_path(be, dt):
    # rank + oversample = 80 > 76: the kernel's working matrix lives in global memory.
    dt = DT[dt]
    m, n, rank = 160, 120, 70
    a = _matrix(m, n, dt, seed=11, decay=0.05)
    u, s, v = be.rsvd(a, rank)
    uc, sc, vc = CPU.rsvd(a, rank, OVERSAMPLE, NITER, 0, None)
    tol = 1e-4 if dt == torch.float32 else 1e-11
    assert float((s - sc).abs().max()) <= tol * float(sc[0])
    opt, _ = _opt_err(a, rank)
    assert abs(_err(a, u, s, v) - _err(a, uc, sc, vc)) <= tol * opt + 100 * _eps(dt)
    bound = 30 * _eps(dt) * math.sqrt(m)
    assert _orth_err(u) <= bound and _orth_err(v) <= bound


def test_order_beyond_the_kernel_uses_eigh(be):
    # rank + oversample = 1030 > 1023, the Jacobi kernel's limit: ATen's eigh takes the
    # Gram matrix instead, with the same results up to rounding.
    m, n, rank = 1100, 1040, 1020
    a = _matrix(m, n, torch.float64, seed=5, decay=0.01)
    u, s, v = be.rsvd(a, rank, niter=0)
    _, sc, _ = CPU.rsvd(a, rank, OVERSAMPLE, 0, 0, None)
    assert float((s - sc).abs().max()) <= 1e-10 * float(sc[0])
    bound = 30 * _eps(torch.float64) * math.sqrt(m)
    assert _orth_err(u) <= bound and _orth_err(v) <= bound


@pytest.mark.parametrize("scale", [1e-140, 1e140])
def test_extreme_scales(be, scale):
    """fp64 inputs far from 1 (Gram entries ~1e-280 / 1e280): the eigensolver's pair pass
    works on power-of-two-scaled pairs, so its squares neither underflow nor overflow; the
    factors are the unscaled input's, S scaled."""
    a = _matrix(96, 80, torch.float64, seed=6)
    u, s, v = be.rsvd(a, 8, seed=2)
    us, ss, vs = be.rsvd(a * scale, 8, seed=2)
    assert bool(torch.isfinite(ss).all()) and bool(torch.isfinite(us).all())
    assert float(((ss / scale) - s).abs().max()) <= 1e-10 * float(s[0])
    assert float((us - u).abs().max()) <= 1e-8 and float((vs - v).abs().max()) <= 1e-8


def test_non_contiguous_input(be):
    a = _matrix(72, 90, torch.float32, seed=8, batch=(2,))
    got = be.rsvd(a.mT, 6, seed=3)
    want = be.rsvd(a.mT.contiguous(), 6, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(got, want))


@pytest.mark.parametrize("dt", DT)
def test_warm_start(be, dt):
    dt = DT[dt]
    m, n, rank = 128, 96, 8
    k = rank + OVERSAMPLE
    a = _matrix(m, n, dt, seed=21, decay=0.05)
    opt, sv = _opt_err(a, rank)
    # A random init with no power iterations: a plain one-pass sketch.
    cold = torch.randn(n, k, generator=torch.Generator().manual_seed(1), dtype=dt)
    cold_err = _err(a, *be.rsvd(a, rank, niter=0, init=cold))
    # The exact leading right subspace as init: optimal with no power iteration at all.
    vt = torch.linalg.svd(a.double(), full_matrices=False).Vh
    u, s, v = be.rsvd(a, rank, niter=0, init=vt[:k].mT.to(dt))
    err = _err(a, u, s, v)
    assert err <= opt * (1 + 100 * _eps(dt)) < cold_err
    assert float((s.double() - sv[:rank]).abs().max()) <= 100 * _eps(dt) * float(sv[0])
    # `init` replaces the seed's sketch: the seed no longer matters.
    u2, s2, v2 = be.rsvd(a, rank, niter=0, seed=99, init=vt[:k].mT.to(dt))
    assert torch.equal(u, u2) and torch.equal(s, s2) and torch.equal(v, v2)
    # Same init as the CPU op: the same factors up to rounding.
    _, sc, _ = CPU.rsvd(a, rank, OVERSAMPLE, 0, 0, cold)
    _, s3, _ = be.rsvd(a, rank, niter=0, init=cold)
    assert float((s3 - sc).abs().max()) <= (1e-4 if dt == torch.float32 else 1e-11) * float(sc[0])


def test_seeded_and_deterministic(be):
    a = _matrix(64, 48, torch.float32, seed=4, batch=(3,))
    base = be.rsvd(a, 6, seed=1)
    again = be.rsvd(a, 6, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(base, again))
    other = be.rsvd(a, 6, seed=2)
    assert not torch.equal(base[0], other[0])
    if be.name != "emu":
        return
    # The kernel has no order-dependent step: every thread order and any number of OS
    # threads sharing the blocks give the same bits.
    prev = emu.get_workers()
    try:
        for workers in (1, 2):
            emu.set_workers(workers)
            for order in emu.ORDERS:
                with emu.schedule(order, seed=3):
                    got = be.rsvd(a, 6, seed=1)
                assert all(torch.equal(x, y) for x, y in zip(base, got)), (order, workers)
    finally:
        emu.set_workers(prev)


def test_bad_input(be):
    a = torch.randn(20, 16)
    with pytest.raises(TypeError, match="float32 or float64"):
        be.rsvd(a.to(torch.float16), 4)
    with pytest.raises(ValueError, match=r"\[\.\.\., m, n\]"):
        be.rsvd(torch.randn(16), 4)
    with pytest.raises(ValueError, match="rank must be in 1..16"):
        be.rsvd(a, 17)
    with pytest.raises(ValueError, match="rank must be in 1..16"):
        be.rsvd(a, 0)
    with pytest.raises(ValueError, match="non-negative"):
        be.rsvd(a, 4, oversample=-1)
    with pytest.raises(ValueError, match=r"init must have shape \[16, 14\]"):
        be.rsvd(a, 4, init=torch.randn(16, 13))
    bad = a.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"input contains NaN/Inf; first at \[3, 5\]"):
        be.rsvd(bad, 4)
    init = torch.randn(16, 14)
    init[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"init contains NaN/Inf; first at \[2, 1\]"):
        be.rsvd(a, 4, init=init)
    # The check goes through Y = A Omega: an Inf alone in its row, a NaN beside zeros, and a
    # finite input whose Y overflows float32 (named as such, with the largest entry).
    for idx, val in (((15, 0), float("inf")), ((0, 15), float("-inf")), ((7, 7), float("nan"))):
        bad = torch.zeros_like(a)
        bad[idx] = val
        with pytest.raises(ValueError, match=rf"input contains NaN/Inf; first at \[{idx[0]}, "
                                             rf"{idx[1]}\]"):
            be.rsvd(bad, 4)
    with pytest.raises(ValueError, match=r"A @ Omega overflows Float .*3\.3\d*e\+38"):
        be.rsvd(torch.full((16, 16), 3.3e38), 4)
    init = torch.randn(16, 14)
    init[9] = 0
    bad = a.clone()
    bad[2, 9] = float("nan")
    with pytest.raises(ValueError, match=r"input contains NaN/Inf; first at \[2, 9\]"):
        be.rsvd(bad, 4, init=init)


def test_empty_batch(be):
    u, s, v = be.rsvd(torch.randn(0, 12, 10), 3)
    assert (u.shape, s.shape, v.shape) == ((0, 12, 3), (0, 3), (0, 10, 3))


def test_opcheck_and_compile_fullgraph(be):
    a = _matrix(24, 20, torch.float32, seed=2, batch=(2,)).to(be.dev)
    opcheck(be.ops.rsvd.default, (a, 4, 3, 1, 0, None))
    opcheck(be.ops.rsvd.default, (a[0].double(), 4, 3, 0, 0, torch.randn(20, 7).double()))

    def f(x):
        u, s, v = be.ops.rsvd(x * 2, 4, 3, 1, 0, None)
        return (u * s.unsqueeze(-2)) @ v.mT

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(a), f(a), rtol=0, atol=0)
