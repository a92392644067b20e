"""lqlora::rsvd_sketch, the Gaussian sketch rsvd starts from (csrc/include/lqlora/gaussian.h):

- the same bits on the CPU op, the pure-PyTorch reference, the emulated CUDA kernel and a GPU
  when present, for awkward shapes (odd counts, batches, empty), both dtypes, any 64-bit seed;
- Philox4x32-10 against Random123's known answer; Box-Muller's ln and sin/cos series against
  libm; the samples' moments and distribution against N(0, 1); no correlation within pairs,
  between neighbours or between seeds;
- rsvd without `init` equals rsvd with the sketch as `init`;
- bad input refused by name; torch.library.opcheck.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

import lqlora_ext  # noqa: F401  (registers torch.ops.lqlora)
from lqlora_ext.ops import emu
from lqlora_ext.ops import reference as ref

CPU = torch.ops.lqlora
BACKENDS = ["emu"] + (["cuda"] if torch.cuda.is_available() else [])
DT = {"fp32": torch.float32, "fp64": torch.float64}
# (input shape, k, seed): odd element counts, batch dims, 1 x 1, empty, negative / large seeds.
CASES = [((7, 5), 3, 0), ((3, 4, 37), 11, 5), ((2, 1, 1), 1, -7), ((4, 0), 3, 1),
         ((5, 9), 0, 2), ((64, 300), 22, 2**63 - 1), ((2, 2, 3, 17), 9, 12345)]


def _draw(backend: str, shape, k, seed, dt):
    ops = emu.ops_for(backend)
    dev = emu.device() if backend == "emu" else torch.device(backend)
    out = ops.rsvd_sketch(torch.empty(shape, dtype=dt, device=dev), k, seed)
    assert out.device.type == dev.type and out.dtype == dt
    return out.cpu()


@pytest.mark.parametrize("dt", DT)
@pytest.mark.parametrize("shape,k,seed", CASES)
def test_same_bits_on_every_backend(shape, k, seed, dt):
    dt = DT[dt]
    a = torch.empty(shape, dtype=dt)
    want = ref.rsvd_sketch(a, k, seed)
    assert want.shape == (*shape[:-2], shape[-1], k)
    got = CPU.rsvd_sketch(a, k, seed)
    assert torch.equal(got, want)
    for backend in BACKENDS:
        assert torch.equal(_draw(backend, shape, k, seed, dt), want), backend


def test_fp32_is_the_fp64_sketch_rounded():
    a = torch.empty(50, 40)
    assert torch.equal(CPU.rsvd_sketch(a, 13, 3), CPU.rsvd_sketch(a.double(), 13, 3).float())


def test_batch_entries_are_slices_of_one_flat_stream():
    # Element t of the flat [..., n, k] tensor depends on (seed, t) only.
    big = CPU.rsvd_sketch(torch.empty(6, 4, 30), 7, 9).reshape(-1)
    flat = CPU.rsvd_sketch(torch.empty(1, 6 * 30 * 7), 1, 9).reshape(-1)
    assert torch.equal(big, flat)


def test_philox_known_answer():
    # Random123's kat_vectors: philox4x32-10, counter 0, key 0.
    words = ref._philox4x32_10(torch.zeros(1, dtype=torch.int64), 0)
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_box_muller_series_match_libm():
    """The sketch against sqrt(-2 ln u1) (cos, sin)(2 pi u2) with torch's log/cos/sin on the
    same uniforms: the series are accurate to a few ulp of fp64."""
    n = 20000
    x0, x1, x2, x3 = ref._philox4x32_10(torch.arange(n, dtype=torch.int64), 4)
    u1 = (((x0 << 21) | (x1 >> 11)) + 1).double() * 2.0**-53
    th = ((x2 >> 29).double() + (((x2 & 0x1FFFFFFF) << 24) | (x3 >> 8)).double() * 2.0**-53) \
        * (math.pi / 4)
    r = torch.sqrt(-2 * torch.log(u1))
    want = torch.stack([r * torch.cos(th), r * torch.sin(th)], -1).reshape(-1)
    got = CPU.rsvd_sketch(torch.empty(1, 2 * n, dtype=torch.float64), 1, 4).reshape(-1)
    # ln u1's absolute error ~1e-16 |ln u1| becomes ~1e-16 r in z; the angle's ~1e-16.
    assert float(((got - want).abs() / (1 + want.abs())).max()) <= 1e-14


def test_distribution_is_standard_normal():
    n = 1 << 20
    z = CPU.rsvd_sketch(torch.empty(1, n, dtype=torch.float64), 1, 11).reshape(-1)
    se = 1 / math.sqrt(n)
    # Moments: standard errors sqrt(1/n), sqrt(2/n), sqrt(6/n), sqrt(96/n); 6 sigma.
    assert abs(float(z.mean())) <= 6 * se
    assert abs(float(z.var()) - 1) <= 6 * math.sqrt(2) * se
    assert abs(float((z**3).mean())) <= 6 * math.sqrt(6) * se
    assert abs(float((z**4).mean()) - 3) <= 6 * math.sqrt(96) * se
    # Kolmogorov-Smirnov against N(0, 1): D below the 0.1% critical value 1.95 / sqrt(n).
    zs = torch.sort(z).values
    cdf = torch.special.ndtr(zs)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max()
    assert float(d) <= 1.95 * se
    # Tails: P(|z| > 4) = 6.3e-5; a bad log near u1 = 1 or a lost sign would skew these.
    assert abs(float((z > 4).double().mean()) - 3.17e-5) <= 6 * math.sqrt(3.17e-5 / n)
    assert abs(float((z < -4).double().mean()) - 3.17e-5) <= 6 * math.sqrt(3.17e-5 / n)


def test_no_correlation_within_pairs_neighbours_or_seeds():
    n = 1 << 18
    z = CPU.rsvd_sketch(torch.empty(1, 2 * n, dtype=torch.float64), 1, 3).reshape(-1)
    other = CPU.rsvd_sketch(torch.empty(1, 2 * n, dtype=torch.float64), 1, 4).reshape(-1)
    bound = 6 / math.sqrt(n)

    def corr(x, y):
        return float(torch.corrcoef(torch.stack([x, y]))[0, 1])

    assert abs(corr(z[0::2], z[1::2])) <= bound            # the two samples of a pair
    assert abs(corr(z[1:-1:2], z[2::2])) <= bound          # across neighbouring pairs
    assert abs(corr(z[0::2] ** 2, z[1::2] ** 2)) <= 3 * bound  # Box-Muller's radius is shared
    assert abs(corr(z[: 2 * n], other[: 2 * n])) <= bound / math.sqrt(2)  # seeds 3 and 4


@pytest.mark.parametrize("dt", DT)
def test_rsvd_starts_from_the_sketch(dt):
    dt = DT[dt]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 40, 30, generator=g, dtype=dt)
    rank, over = 6, 5
    init = CPU.rsvd_sketch(a, rank + over, 17)
    for x, y in zip(CPU.rsvd(a, rank, over, 1, 17, None), CPU.rsvd(a, rank, over, 1, 17, init)):
        assert torch.equal(x, y)
    for backend in BACKENDS:
        ops = emu.ops_for(backend)
        dev = emu.device() if backend == "emu" else torch.device(backend)
        no_init = ops.rsvd(a.to(dev), rank, over, 1, 17, None)
        with_init = ops.rsvd(a.to(dev), rank, over, 1, 17, init.to(dev))
        for x, y in zip(no_init, with_init):
            assert torch.equal(x, y), backend


@pytest.mark.parametrize("backend", ["cpu"] + BACKENDS)
def test_bad_input_is_refused_by_name(backend):
    ops = emu.ops_for(backend)
    dev = emu.device() if backend == "emu" else torch.device(backend)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.rsvd_sketch(torch.empty(4, 4, dtype=torch.int32, device=dev), 2, 0)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.rsvd_sketch(torch.empty(4, 4, dtype=torch.bfloat16, device=dev), 2, 0)
    with pytest.raises(ValueError, match=r"\[\.\.\., m, n\]"):
        ops.rsvd_sketch(torch.empty(4, device=dev), 2, 0)
    with pytest.raises(ValueError, match="k must be non-negative"):
        ops.rsvd_sketch(torch.empty(4, 4, device=dev), -1, 0)


def test_opcheck():
    opcheck(torch.ops.lqlora.rsvd_sketch.default, (torch.empty(3, 5, 6), 4, 7))
    opcheck(torch.ops.lqlora.rsvd_sketch.default, (torch.empty(5, 6, dtype=torch.float64), 2, 0))
