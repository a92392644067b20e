"""decompose_many: the configs of one matrix decomposed together (method/batched.py).

- unbatched (the CPU default): every result bit-identical to decompose, first step shared;
- batched: one lqlora::rsvd call per lockstep iteration, on the CPU op and on the CUDA
  implementation through the SIMT emulator; results as good as decompose's, the same bits
  on every call, fixed chunks;
- on_done, rank 0, bad input.
"""
from __future__ import annotations

import math

import pytest
import torch

import lqlora_ext
from lqlora_ext import QuantConfig, decompose, ops
from lqlora_ext.method.batched import batch_size, chunks, decompose_many
from lqlora_ext.ops import emu

CONFIGS = [QuantConfig(2, 64), QuantConfig(3, 64), QuantConfig(4, 32), QuantConfig(8, 64)]


def _weight(m=48, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g)
    return low + 0.3 * torch.randn(m, n, generator=g)


def _fisher(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) + 0.05


def _same(a, b):
    return (a.error == b.error and a.iters == b.iters and a.history == b.history
            and torch.equal(a.l1, b.l1) and torch.equal(a.l2, b.l2)
            and torch.equal(a.q.dequantize(), b.q.dequantize()))


@pytest.mark.parametrize("fisher", [False, True])
def test_unbatched_is_bit_identical_to_decompose(fisher):
    w = _weight()
    f = _fisher(w.shape) if fisher else None
    many = decompose_many(w, CONFIGS, 4, fisher=f, tol=1e-3, batched=False)
    assert len(many) == len(CONFIGS)
    for c, d in zip(CONFIGS, many):
        ref = decompose(w, c, 4, fisher=f, tol=1e-3)
        assert _same(d, ref), c.name
        assert d.iters >= 2  # past the shared first step


def test_results_own_their_factors():
    many = decompose_many(_weight(), CONFIGS[:2], 4, max_iters=1, batched=False)
    many[0].l1.zero_()
    assert many[1].l1.abs().sum() > 0


@pytest.mark.parametrize("fisher", [False, True])
def test_batched_matches_decompose_quality_and_is_deterministic(fisher):
    w = _weight(seed=2)
    f = _fisher(w.shape) if fisher else None
    a = decompose_many(w, CONFIGS, 4, fisher=f, tol=1e-3, batched=True)
    b = decompose_many(w, CONFIGS, 4, fisher=f, tol=1e-3, batched=True)
    for c, da, db in zip(CONFIGS, a, b):
        assert _same(da, db), c.name
        ref = decompose(w, c, 4, fisher=f, tol=1e-3)
        # The same algorithm with the batch's rounding: the stopping iteration may move, the
        # error stays within a few percent of the single path's.
        assert abs(da.error - ref.error) <= 0.05 * ref.error, (c.name, da.error, ref.error)
        rec = da.reconstruct()
        e = rec - w
        exp = float((e.square() * f).sum()) if fisher else float(e.square().sum())
        assert abs(exp - da.error) <= 1e-4 * exp


def test_batched_chunks_are_fixed():
    w = _weight(seed=3)
    whole = decompose_many(w, CONFIGS, 4, batched=True, max_batch=2)
    for ch in chunks(len(CONFIGS), 2):
        alone = decompose_many(w, [CONFIGS[i] for i in ch], 4, batched=True)
        for k, i in enumerate(ch):
            assert _same(whole[i], alone[k])


def test_batch_size_from_memory():
    assert batch_size((4096, 4096), 18) == 16  # 2 GiB / (2 fp32 x 64 MiB)
    assert batch_size((576, 1536), 18) == 18
    assert batch_size((8192, 28672), 432) == 1
    assert batch_size((4096, 4096), 18, max_batch=3) == 3
    assert batch_size((64, 64), 2, max_batch=5) == 2
    assert [list(r) for r in chunks(5, 2)] == [[0, 1], [2, 3], [4]]


def test_on_done_and_rank_zero():
    w = _weight()
    seen = []
    many = decompose_many(w, CONFIGS, 4, batched=True, on_done=lambda i, d: seen.append((i, d)))
    assert sorted(i for i, _ in seen) == list(range(len(CONFIGS)))
    assert all(many[i] is d for i, d in seen)
    zero = decompose_many(w, CONFIGS, 0)
    for c, d in zip(CONFIGS, zero):
        assert _same(d, decompose(w, c, 0))
    assert decompose_many(w, [], 4) == []


def test_bad_input():
    w = _weight()
    with pytest.raises(ValueError, match="max_batch"):
        decompose_many(w, CONFIGS, 4, max_batch=0)
    with pytest.raises(TypeError, match="QuantConfig"):
        decompose_many(w, [CONFIGS[0], "nf4"], 4)
    with pytest.raises(ValueError, match="rank"):
        decompose_many(w, CONFIGS, 48)
    with pytest.raises(ValueError, match="max_iters"):
        decompose_many(w, CONFIGS, 4, max_iters=0)
    bad = w.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        decompose_many(bad, CONFIGS, 4)


@pytest.mark.skipif(not emu.available(), reason="SIMT emulator module not built")
def test_batched_through_the_cuda_rsvd_on_the_emulator(monkeypatch):
    """The CUDA rsvd (emulated) batches the configs: one eigensolver launch per lockstep
    iteration, one block per running config, where decompose would launch once per config
    and iteration; the results are as good as the single path's on the same op."""
    emu_ops = emu.ops_for("emu")
    dev = emu.device()

    def rsvd(a, rank, oversample, niter, seed, init):
        out = emu_ops.rsvd(a.to(dev), rank, oversample, niter, seed,
                           None if init is None else init.to(dev))
        return tuple(t.to(a.device) for t in out)

    monkeypatch.setattr(ops, "rsvd", rsvd)
    w = _weight(m=40, n=56, seed=4)
    configs = CONFIGS[:3]
    singles = [decompose(w, c, 4, tol=1e-3) for c in configs]
    before = emu.stats()
    many = decompose_many(w, configs, 4, tol=1e-3, batched=True)
    after = emu.stats()
    steps = max(d.iters for d in many)
    # The shared first step draws its sketch (one launch, 256 threads per block, a thread per
    # pair of elements) and solves once; each of the steps - 1 batched ones solves once
    # (their sketches are warm starts).
    k = min(4 + 10, *w.shape)
    sketch_blocks = math.ceil(w.shape[1] * k / 2 / 256)
    assert after["launches"] - before["launches"] == 1 + steps
    assert after["blocks"] - before["blocks"] == sketch_blocks + 1 + sum(d.iters - 1 for d in many)
    for c, d, ref in zip(configs, many, singles):
        assert abs(d.error - ref.error) <= 0.05 * ref.error, (c.name, d.error, ref.error)
    assert lqlora_ext.decompose is decompose
