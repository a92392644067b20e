"""CUDA kernels against the CPU kernels (the spec's executable form), on every backend that
runs them: "emu" (the SIMT emulator, lqlora_ext._emu: the same kernel sources and host glue
on CPU tensors) always, and "cuda" (a real GPU) when one is present.

- quantize / unpack_scales / dequantize: bit-exact (torch.equal) with the CPU over every
  bit width, block size, scale width, scale block size and scale dtype, on real and ragged
  shapes;
- qmatmul / qmatmul_t: within twice torch's own matmul error at the activation's precision
  (the baseline), on both the fused small-M kernels and the large-M dequantize + cuBLAS
  path, including LoRA, non-contiguous and misaligned inputs, and an exact identity check;
- torch.library.opcheck, torch.compile, autograd and bad input;
- schedule independence: the emulator resumes threads forward, in reverse and in seeded
  random orders, and over several OS threads; a race-free kernel gives identical bits.

What needs real hardware (CUDA graphs, streams, GPU vs emulator bit for bit) is in
test_cuda_hw.py.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.library import opcheck

import lqlora_ext
from lqlora_ext import QuantConfig

import grid
import shapes

from lqlora_ext.ops import emu

BACKENDS = ["emu"] + (["cuda"] if torch.cuda.is_available() else [])


class Backend:
    """Where a case runs: the operator namespace and the device its tensors live on."""

    def __init__(self, name: str):
        self.name = name
        self.ops = emu.ops_for(name)
        self.dev = emu.device() if name == "emu" else torch.device("cuda")

    def is_backend_tensor(self, t: torch.Tensor) -> bool:
        return t.device.type == self.dev.type


@pytest.fixture(params=BACKENDS, scope="module")
def be(request):
    return Backend(request.param)

EPS32 = torch.finfo(torch.float32).eps
FP = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SMALL_M = 16  # the fused decode path's limit (csrc/cuda/launch.h kSmallM)
CPU = torch.ops.lqlora  # the CPU kernels: the oracle


def _args(c: QuantConfig):
    return (c.bits, c.block_size, c.scale_bits, c.scale_block_size)


def _quant_cpu(w: torch.Tensor, c: QuantConfig):
    return CPU.quantize(w, lqlora_ext.nf_code(c.bits), *_args(c), c.scale_dtype)


def _to(ts, device):
    return tuple(t.to(device) for t in ts)


def _assert_equal(got, want, what):
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, \
        f"{what}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}"
    if not torch.equal(got, want):
        bad = (got != want).nonzero()
        raise AssertionError(f"{what}: {bad.shape[0]} mismatches, first at {bad[0].tolist()}: "
                             f"{got[tuple(bad[0])]} vs {want[tuple(bad[0])]}")


# ------------------------------------------------------------------ bit-exact: the format
QUANT_CASES = (
    # every config on the ragged 53x100 (n = 5300: ragged last block and group for every B0/B1)
    [(shapes.BY_NAME["odd"], c) for c in grid.FULL if c.bits in (2, 3, 4, 8)]
    # a diagonal walk over the real and awkward shapes
    + [(s, grid.diagonal(i)) for i, s in enumerate(shapes.ALL_FAST * 3)]
    + [(shapes.BY_NAME["smollm2-q"], grid.DEFAULT), (shapes.BY_NAME["smollm2-up"], grid.DEFAULT)]
)


@pytest.mark.parametrize("shape,c", QUANT_CASES,
                         ids=[f"{s.id}-{c.name}" for s, c in QUANT_CASES])
def test_quantize_unpack_dequantize_bit_exact(shape, c, be):
    w = grid.make_weight(shape.rows, shape.cols, seed=shape.rows + c.bits)
    want = _quant_cpu(w, c)
    got = be.ops.quantize(w.to(be.dev), lqlora_ext.nf_code(c.bits).to(be.dev), *_args(c),
                          c.scale_dtype)
    for g, t, name in zip(got, want, ("qcodes", "qscales", "scale2", "offset")):
        assert be.is_backend_tensor(g), name
        _assert_equal(g, t, f"quantize {name}")

    nb = -(-shape.numel // c.block_size)
    _assert_equal(be.ops.unpack_scales(*_to(want[1:], be.dev), nb, c.scale_bits,
                                       c.scale_block_size),
                  CPU.unpack_scales(*want[1:], nb, c.scale_bits, c.scale_block_size),
                  "unpack_scales")
    lv = lqlora_ext.nf_code(c.bits)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        _assert_equal(be.ops.dequantize(*_to(want, be.dev), lv.to(be.dev), *shape, *_args(c), dt),
                      CPU.dequantize(*want, lv, *shape, *_args(c), dt), f"dequantize {dt}")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("wdt", list(FP), ids=list(FP))
def test_quantize_every_width_and_input_dtype(bits, wdt, be):
    c = QuantConfig(bits, 16 if bits % 2 else 64, 3 if bits > 4 else 8, 16, torch.bfloat16)
    w = grid.make_weight(576, 577, dtype=FP[wdt], seed=bits)  # K = 577: blocks straddle rows
    want = _quant_cpu(w, c)
    got = be.ops.quantize(w.to(be.dev), lqlora_ext.nf_code(bits).to(be.dev), *_args(c),
                          c.scale_dtype)
    for g, t, name in zip(got, want, ("qcodes", "qscales", "scale2", "offset")):
        _assert_equal(g, t, f"quantize {name}")
    lv = lqlora_ext.nf_code(bits)
    _assert_equal(be.ops.dequantize(*_to(want, be.dev), lv.to(be.dev), 576, 577, *_args(c),
                                    torch.float64),
                  CPU.dequantize(*want, lv, 576, 577, *_args(c), torch.float64),
                  "dequantize float64")


def test_quantize_special_values(be):
    # All-zero rows (scale 0 -> the exact-0 level's code), a zero matrix and subnormal
    # weights: same as the CPU, bit for bit.
    w = grid.make_weight(64, 96)
    w[3:5] = 0.0
    cases = [w, torch.zeros(8, 40), w * 1e-40, w * 1e30]
    for i, x in enumerate(cases):
        for c in (grid.DEFAULT, QuantConfig(3, 16, 2, 16, torch.float16)):
            if i == 3 and c.scale_dtype == torch.float16:
                continue  # overflow: test_quantize_refuses_scale2_overflow
            want = _quant_cpu(x, c)
            got = be.ops.quantize(x.to(be.dev), lqlora_ext.nf_code(c.bits).to(be.dev),
                                  *_args(c), c.scale_dtype)
            for g, t, name in zip(got, want, ("qcodes", "qscales", "scale2", "offset")):
                _assert_equal(g, t, f"case {i} {c.name}: quantize {name}")


def test_quantize_refuses_scale2_overflow(be):
    # A second-level scale beyond fp16's range would be stored as inf and decode to NaN
    # scales: both devices refuse it, with the same message.
    w = grid.make_weight(64, 96) * 1e30
    c = QuantConfig(3, 16, 2, 16, torch.float16)
    lv = lqlora_ext.nf_code(3)
    with pytest.raises(ValueError, match="second-level scale overflows"):
        _quant_cpu(w, c)
    with pytest.raises(ValueError, match="second-level scale overflows"):
        be.ops.quantize(w.to(be.dev), lv.to(be.dev), *_args(c), c.scale_dtype)


def test_quantize_rejects_nonfinite_naming_the_index(be):
    w = grid.make_weight(20, 30).to(be.dev)
    w[7, 11] = float("nan")
    w[9, 2] = float("inf")
    with pytest.raises(ValueError, match=r"\[7, 11\]"):
        be.ops.quantize(w, lqlora_ext.nf_code(4).to(be.dev), 4, 64, 8, 256, torch.float32)


@pytest.mark.parametrize("block_size", [16, 32, 64, 256])
def test_quantize_finds_a_lone_nonfinite_in_any_block(be, block_size):
    """The CUDA op finds NaN/Inf through its block absmax (NaN-propagating max): a lone NaN
    next to larger values, a lone -Inf, and a NaN in the ragged last block, for the
    shuffle (B0 <= 32) and the shared-memory (B0 > 32) reductions."""
    rows, cols = 9, 70  # 630 elements: the last block is partial for every block size
    for pos, val in (((0, 0), float("nan")), ((4, 33), float("-inf")), ((8, 69), float("nan")),
                     ((3, 1), float("inf"))):
        w = grid.make_weight(rows, cols) * 10
        w[pos] = val
        with pytest.raises(ValueError, match=rf"first at \[{pos[0]}, {pos[1]}\]"):
            be.ops.quantize(w.to(be.dev), lqlora_ext.nf_code(3).to(be.dev), 3, block_size, 8,
                            16, torch.float32)


def test_bad_input_raises(be):
    c = grid.DEFAULT
    packed = _to(_quant_cpu(grid.make_weight(64, 64), c), be.dev)
    lv = lqlora_ext.nf_code(4).to(be.dev)
    with pytest.raises(ValueError, match="qcodes"):
        be.ops.dequantize(packed[0][:-1], *packed[1:], lv, 64, 64, *_args(c), torch.float32)
    if be.name == "cuda":  # the emulator has one device: nothing to mix
        with pytest.raises(ValueError, match="levels"):
            be.ops.dequantize(*packed, lv.cpu(), 64, 64, *_args(c), torch.float32)
    with pytest.raises(ValueError, match="inner size"):
        be.ops.qmatmul(torch.randn(2, 63, device=be.dev), *packed, lv, 64, *_args(c), None, None,
                       1.0)
    with pytest.raises(ValueError, match="block_size"):
        be.ops.qmatmul(torch.randn(2, 64, device=be.dev), *packed, lv, 64, 4, 48, 8, 256,
                       None, None, 1.0)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        be.ops.qmatmul(torch.ones(2, 64, device=be.dev, dtype=torch.int32), *packed, lv, 64,
                       *_args(c), None, None, 1.0)


# ------------------------------------------------------------- matmuls: baseline tolerances
def _packed(be, rows, cols, c, seed=0):
    """Packed weight on the backend (quantized on the CPU) and its exact fp32
    dequantization."""
    w = grid.make_weight(rows, cols, seed=seed)
    packed = _quant_cpu(w, c)
    wdq = CPU.dequantize(*packed, lqlora_ext.nf_code(c.bits), rows, cols, *_args(c),
                          torch.float32)
    return _to(packed, be.dev) + (lqlora_ext.nf_code(c.bits).to(be.dev),), wdq.to(be.dev)


def _dense(x, w, a=None, b=None, s=1.0):
    """torch's own computation at x's precision on x's device: the tolerance baseline."""
    dt = x.dtype
    y = x @ w.to(dt).t()
    if a is not None:
        y = y + s * (x @ a.to(dt).t()) @ b.to(dt).t()
    return y


def _check(got, x, w, a=None, b=None, s=1.0, factor=2.0, what="qmatmul", transpose=False):
    """max |got - exact| <= factor * max(|torch - exact|, eps32 * max(|x| @ |w|^T))."""
    if transpose:  # g @ W == (W^T applied as a linear layer)
        w = w.t()
    d = torch.float64
    exact = _dense(x.to(d), w.to(d), None if a is None else a.to(d),
                   None if b is None else b.to(d), s)
    base = (_dense(x, w, a, b, s).to(d) - exact).abs().max().item()
    mag = _dense(x.abs().to(d), w.abs().to(d), None if a is None else a.abs().to(d),
                 None if b is None else b.abs().to(d), abs(s)).abs().max().item()
    # Floors: one fp32 rounding of the largest |x| @ |w| term (tiny K makes torch exact) and
    # one output ulp (a single output may round either way under any summation order).
    ulp = torch.finfo(x.dtype).eps * exact.abs().max().item()
    tol = factor * max(base, EPS32 * mag, ulp)
    assert got.dtype == x.dtype and got.shape == exact.shape
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    err = (got.to(d) - exact).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3e} > {factor} x baseline {base:.3e} " \
                       f"(floor {EPS32 * mag:.3e})"


MM_SHAPES = [shapes.BY_NAME[n] for n in ("smollm2-q", "smollm2-up", "smollm2-down", "odd",
                                         "smollm2-q+1", "k64", "row", "tiny")]
MM_CONFIGS = [grid.DEFAULT, QuantConfig(3, 16, 4, 64, torch.bfloat16),
              QuantConfig(2, 32, 2, 16, torch.float16), QuantConfig(8, 128, 3, 256)]


@pytest.mark.parametrize("xdt", list(FP), ids=list(FP))
@pytest.mark.parametrize("m", [1, 2, 5, 16, 17, 53])
@pytest.mark.parametrize("shape", MM_SHAPES, ids=[s.id for s in MM_SHAPES])
def test_qmatmul(shape, m, xdt, be):
    c = MM_CONFIGS[(m + shape.rows) % len(MM_CONFIGS)]
    packed, w = _packed(be, *shape, c)
    x = torch.randn(m, shape.cols, device=be.dev).to(FP[xdt])
    got = be.ops.qmatmul(x, *packed, shape.rows, *_args(c), None, None, 1.0)
    _check(got, x, w, what=f"qmatmul {c.name}")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("m", [1, 3, 9])
def test_qmatmul_every_width(bits, m, be):
    # K = 4096 -> 128 groups per row: four warps split K; B0 = 16 -> two scales per group.
    for c in (QuantConfig(bits, 16, 8, 64, torch.bfloat16), QuantConfig(bits, 256, 2, 16)):
        packed, w = _packed(be, 96, 4096, c, seed=bits)
        x = torch.randn(m, 4096, device=be.dev, dtype=torch.bfloat16)
        _check(be.ops.qmatmul(x, *packed, 96, *_args(c), None, None, 1.0), x, w,
               what=f"qmatmul {c.name}")


@pytest.mark.parametrize("b0", [32, 64, 128, 256])
@pytest.mark.parametrize("rows,cols", [(24, 16384), (40, 4128), (33, 1056)],
                         ids=["k16384", "k4128", "k1056"])
def test_qmatmul_scale_window(rows, cols, b0, be):
    # The fused kernel keeps a 32-scale window per row and warp: many steps per warp
    # (K = 16384), rows that start mid-block (4128 % 64 = 32), a last warp with a partial
    # step (1056 / 32 = 33 groups), a ragged last block and rows past N in the last tile.
    c = QuantConfig(4, b0, 3, 16, torch.float16)
    packed, w = _packed(be, rows, cols, c, seed=b0)
    for m in (1, 6):
        x = torch.randn(m, cols, device=be.dev)
        _check(be.ops.qmatmul(x, *packed, rows, *_args(c), None, None, 1.0), x, w,
               what=f"qmatmul {rows}x{cols} {c.name} M={m}")


def test_qmatmul_llama_shape_decode(be):
    c = grid.DEFAULT
    packed, w = _packed(be, 4096, 4096, c)
    for dt in FP.values():
        x = torch.randn(1, 4096, device=be.dev, dtype=dt)
        _check(be.ops.qmatmul(x, *packed, 4096, *_args(c), None, None, 1.0), x, w,
               what=f"qmatmul 4096x4096 {dt}")


@pytest.mark.parametrize("m", [1, 16, 17])
def test_qmatmul_identity_is_exact(m, be):
    # x = rows of the identity: out[i, n] = W[n, i] with one exact product per output, so the
    # result is the dequantized weight itself, bit for bit (FLUTE's identity test).
    c = QuantConfig(4, 16, 8, 64, torch.bfloat16)
    packed, w = _packed(be, 320, 256, c)
    x = torch.eye(m, 256, device=be.dev)
    got = be.ops.qmatmul(x, *packed, 320, *_args(c), None, None, 1.0)
    _assert_equal(got, w[:, :m].t().contiguous().cpu(), "qmatmul(identity)")


TC_CONFIGS = [QuantConfig(b, b0, sb, 64, torch.bfloat16)
              for b, b0, sb in ((2, 32, 8), (3, 16, 4), (4, 64, 8), (5, 128, 2), (6, 16, 3),
                                (7, 256, 8), (8, 32, 4))]


@pytest.mark.parametrize("xdt", ["bf16", "fp16"])
@pytest.mark.parametrize("m", [5, 16, 17, 40, 128])
@pytest.mark.parametrize("c", TC_CONFIGS, ids=grid.ids(TC_CONFIGS))
def test_qmatmul_tensor_cores_pick_exact_columns(c, m, xdt, be):
    # One-hot rows of x at random columns: every output is one product, exact on any
    # hardware, so the result must equal the weight decoded in x's dtype bit for bit. This
    # pins the MMA fragment indexing and the k permutation of the tensor-core kernel (16-bit
    # x, 4 < M <= 128, K % 32 == 0), over every bit width and M tile count.
    rows, cols = 72, 4128  # 129 groups per row: four warps, a partial last chunk
    packed, _ = _packed(be, rows, cols, c, seed=m)
    dt = FP[xdt]
    wd = CPU.dequantize(*_quant_cpu(grid.make_weight(rows, cols, seed=m), c),
                        lqlora_ext.nf_code(c.bits), rows, cols, *_args(c), dt)
    pick = torch.randperm(cols, generator=torch.Generator().manual_seed(m))[:m]
    x = torch.zeros(m, cols, dtype=dt)
    x[torch.arange(m), pick] = 1
    got = be.ops.qmatmul(x.to(be.dev), *packed, rows, *_args(c), None, None, 1.0)
    _assert_equal(got, wd[:, pick].t().contiguous(), f"qmatmul(one-hot) {c.name} M={m}")


PAIR_CONFIGS = [c for c in TC_CONFIGS if c.block_size >= 64]


@pytest.mark.parametrize("m", [16, 40])
@pytest.mark.parametrize("c", PAIR_CONFIGS, ids=grid.ids(PAIR_CONFIGS))
def test_qmatmul_tensor_cores_paired_scales_exact(c, m, be):
    # B0 >= 64 and an even group count per row: lanes t and t^1 of the tensor-core kernel
    # share their scales (each decodes half the n-tiles and shuffles the rest over). 130
    # groups per row: a partial last chunk whose active lanes are one pair. One-hot rows,
    # so any scale taken from the wrong lane or n-tile shows as a mismatch.
    rows, cols = 72, 4160
    packed, _ = _packed(be, rows, cols, c, seed=m + 1)
    wd = CPU.dequantize(*_quant_cpu(grid.make_weight(rows, cols, seed=m + 1), c),
                        lqlora_ext.nf_code(c.bits), rows, cols, *_args(c), torch.bfloat16)
    pick = torch.randperm(cols, generator=torch.Generator().manual_seed(m))[:m]
    pick[0] = cols - 1  # the partial chunk
    x = torch.zeros(m, cols, dtype=torch.bfloat16)
    x[torch.arange(m), pick] = 1
    got = be.ops.qmatmul(x.to(be.dev), *packed, rows, *_args(c), None, None, 1.0)
    _assert_equal(got, wd[:, pick].t().contiguous(), f"qmatmul(one-hot, pairs) {c.name} M={m}")


@pytest.mark.parametrize("m", [2, 3, 4])
def test_qmatmul_tall_small_m_on_tensor_cores(m, be):
    # M = 2 of a matrix with >= 8192 rows, and M = 3, 4 with >= 4096, go to the tensor-core
    # kernel for NF2-NF4 (launch.h qmatmul_use_mma), NF5+ stays on the decode kernel:
    # one-hot rows are exact on both, random rows (+ LoRA) within the baseline tolerance.
    # 8200 and 4104 rows: just past each threshold, a partial last block of 32 rows.
    rows, cols = (8200 if m == 2 else 4104), 160  # 5 groups per row: one chunk and a partial one
    for c in (grid.DEFAULT, QuantConfig(2, 32, 8, 64), QuantConfig(3, 16, 4, 64),
              QuantConfig(5, 64, 8, 64)):
        packed, w = _packed(be, rows, cols, c, seed=m)
        wd = CPU.dequantize(*_quant_cpu(grid.make_weight(rows, cols, seed=m), c),
                            lqlora_ext.nf_code(c.bits), rows, cols, *_args(c), torch.bfloat16)
        pick = torch.randperm(cols, generator=torch.Generator().manual_seed(m))[:m]
        x = torch.zeros(m, cols, dtype=torch.bfloat16)
        x[torch.arange(m), pick] = 1
        got = be.ops.qmatmul(x.to(be.dev), *packed, rows, *_args(c), None, None, 1.0)
        _assert_equal(got, wd[:, pick].t().contiguous(), f"qmatmul(one-hot) {c.name} M={m}")
        x = torch.randn(m, cols, device=be.dev).to(torch.bfloat16)
        # Which kernel ran shows in the numbers: the tensor-core kernel multiplies weights
        # decoded to bf16 (its outputs are x @ wd^T rounded once, up to fp32 summation
        # order), the decode kernel fp32 weights.
        got = be.ops.qmatmul(x, *packed, rows, *_args(c), None, None, 1.0).cpu()
        ref = (x.cpu().double() @ (wd if c.bits <= 4 else w.cpu()).double().t()).bfloat16()
        assert (got == ref).double().mean() > 0.9, f"{c.name} M={m}: not the expected kernel"
        a = (torch.randn(16, cols, device=be.dev) / cols ** 0.5).to(torch.bfloat16)
        b = torch.randn(rows, 16, device=be.dev).to(torch.bfloat16)
        _check(be.ops.qmatmul(x, *packed, rows, *_args(c), a, b, 0.5), x, w, a, b, 0.5,
               what=f"qmatmul+lora {c.name} M={m} tall")


@pytest.mark.parametrize("m", [6, 32, 77, 128])
@pytest.mark.parametrize("shape", [shapes.BY_NAME["smollm2-up"], shapes.BY_NAME["smollm2-down"]],
                         ids=["1536x576", "576x1536"])
def test_qmatmul_tensor_cores_random_inputs(shape, m, be):
    for c, dt in ((grid.DEFAULT, torch.bfloat16), (QuantConfig(3, 16, 4, 64), torch.float16)):
        packed, w = _packed(be, *shape, c)
        x = torch.randn(m, shape.cols, device=be.dev).to(dt)
        a = (torch.randn(16, shape.cols, device=be.dev) / shape.cols ** 0.5).to(dt)
        b = torch.randn(shape.rows, 16, device=be.dev).to(dt)
        _check(be.ops.qmatmul(x, *packed, shape.rows, *_args(c), None, None, 1.0), x, w,
               what=f"qmatmul {c.name} M={m} {dt}")
        _check(be.ops.qmatmul(x, *packed, shape.rows, *_args(c), a, b, 0.25), x, w, a, b, 0.25,
               what=f"qmatmul+lora {c.name} M={m} {dt}")


@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("xdt", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", [shapes.BY_NAME["smollm2-q"], shapes.BY_NAME["odd"]],
                         ids=["576x576", "53x100"])
def test_qmatmul_lora(shape, m, xdt, be):
    c = grid.DEFAULT
    packed, w = _packed(be, *shape, c)
    r = 8
    x = torch.randn(m, shape.cols, device=be.dev).to(FP[xdt])
    a = (torch.randn(r, shape.cols, device=be.dev) / shape.cols ** 0.5).to(FP[xdt])
    b = torch.randn(shape.rows, r, device=be.dev).to(torch.float32)  # mixed dtypes are allowed
    got = be.ops.qmatmul(x, *packed, shape.rows, *_args(c), a, b, 0.5)
    _check(got, x, w, a, b, 0.5, what="qmatmul+lora")


@pytest.mark.parametrize("rank", [1, 5, 64, 100])
@pytest.mark.parametrize("m", [1, 3, 9, 40])
@pytest.mark.parametrize("xdt", ["fp32", "bf16", "fp16"])
def test_qmatmul_fused_lora_ranks(xdt, m, rank, be):
    # The LoRA term runs in the base product's launch (producer blocks + a counter): ranks
    # that do not fill a producer block (1, 5, 100 % 4 = 0 but 100 % 16 != 0), M tiles,
    # both the CUDA-core (fp32 x, M <= 4) and the tensor-core epilogue.
    c = QuantConfig(4, 32, 8, 64, torch.bfloat16)
    packed, w = _packed(be, 136, 1024, c, seed=rank)
    x = torch.randn(m, 1024, device=be.dev).to(FP[xdt])
    a = (torch.randn(rank, 1024, device=be.dev) / 32).to(FP[xdt])
    b = torch.randn(136, rank, device=be.dev).to(FP[xdt])
    _check(be.ops.qmatmul(x, *packed, 136, *_args(c), a, b, 0.75), x, w, a, b, 0.75,
           what=f"qmatmul+lora r={rank} M={m} {xdt}")


@pytest.mark.parametrize("adt", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 40])
@pytest.mark.parametrize("cols", [544, 4128, 8224])
def test_qmatmul_fused_lora_k_slices_same_bits_in_any_block_order(cols, m, adt, be):
    # Each tile of t = x @ a^T is split over K into producer blocks (2, 9 and the cap of 16
    # slices here, the last one partial); the slice that finishes last adds the planes in
    # slice order. Whichever block that is (block order varies with the emulator's workers
    # and schedules, and on a GPU from run to run), the output has the same bits.
    c = QuantConfig(4, 64, 8, 64, torch.bfloat16)
    packed, w = _packed(be, 72, cols, c, seed=cols)
    x = torch.randn(m, cols, device=be.dev).to(torch.bfloat16)
    # fp32 a: trainable adapters beside bf16 activations
    a = (torch.randn(64, cols, device=be.dev) / cols ** 0.5).to(FP[adt])
    b = torch.randn(72, 64, device=be.dev).to(torch.bfloat16)

    def run():
        return be.ops.qmatmul(x, *packed, 72, *_args(c), a, b, 0.5)

    ref = run()
    _check(ref, x, w, a, b, 0.5, what=f"qmatmul+lora K={cols} M={m} a {adt}")
    if be.name == "emu":
        outs, prev = [], emu.get_workers()
        for workers, order in ((3, "forward"), (2, "random"), (1, "reverse")):
            emu.set_workers(workers)
            try:
                with emu.schedule(order, seed=cols):
                    outs.append(run())
            finally:
                emu.set_workers(prev)
    else:
        outs = [run() for _ in range(5)]
    for o in outs:
        assert torch.equal(o.view(torch.int16), ref.view(torch.int16))


def test_large_m_paths_in_row_chunks(be):
    # Beyond the fused kernels, both ops dequantize 2^26 weights at a time: here 2048 of the
    # 2100 rows, then the 52 left. qmatmul writes each chunk's product straight into its
    # columns of out (a strided view), qmatmul_t sums the chunks' products in fp32.
    c = QuantConfig(4, 64, 8, 64, torch.float32)
    rows, cols, m = 2100, 1 << 15, 17  # fp32 x: the fused kernels stop at M = 16
    packed, w = _packed(be, rows, cols, c, seed=3)
    x = torch.randn(m, cols, device=be.dev)
    a = torch.randn(8, cols, device=be.dev) / cols ** 0.5
    b = torch.randn(rows, 8, device=be.dev)
    _check(be.ops.qmatmul(x, *packed, rows, *_args(c), a, b, 0.5), x, w, a, b, 0.5,
           what="qmatmul in row chunks")
    g = torch.randn(m, rows, device=be.dev)
    _check(be.ops.qmatmul_t(g, *packed, cols, *_args(c)), g, w, what="qmatmul_t in row chunks",
           transpose=True)


def test_qmatmul_noncontiguous_and_misaligned_inputs(be):
    c = grid.DEFAULT
    packed, w = _packed(be, 576, 576, c)
    for m in (1, 5, 40):
        xt = torch.randn(576, m, device=be.dev, dtype=torch.bfloat16).t()  # transposed view
        _check(be.ops.qmatmul(xt, *packed, 576, *_args(c), None, None, 1.0), xt, w,
               what="transposed x")
        buf = torch.randn(m * 576 + 1, device=be.dev, dtype=torch.bfloat16)
        xm = buf[1:].view(m, 576)  # contiguous but 2 bytes off a 16-byte boundary
        _check(be.ops.qmatmul(xm, *packed, 576, *_args(c), None, None, 1.0), xm, w,
               what="misaligned x")
    # qcodes as a misaligned view of a larger buffer
    qc = packed[0]
    big = torch.empty(qc.numel() + 1, dtype=qc.dtype, device=be.dev)
    big[1:] = qc
    x = torch.randn(1, 576, device=be.dev)
    got = be.ops.qmatmul(x, big[1:], *packed[1:], 576, *_args(c), None, None, 1.0)
    _check(got, x, w, what="misaligned qcodes")
    _assert_equal(be.ops.dequantize(big[1:], *packed[1:], 576, 576, *_args(c), torch.float32),
                  w.cpu(), "dequantize misaligned qcodes")


@pytest.mark.parametrize("gdt", list(FP), ids=list(FP))
@pytest.mark.parametrize("m", [1, 4, 16, 17, 40])
@pytest.mark.parametrize("shape", MM_SHAPES[:5], ids=[s.id for s in MM_SHAPES[:5]])
def test_qmatmul_t(shape, m, gdt, be):
    c = MM_CONFIGS[(m + shape.cols) % len(MM_CONFIGS)]
    packed, w = _packed(be, *shape, c)
    g = torch.randn(m, shape.rows, device=be.dev).to(FP[gdt])
    got = be.ops.qmatmul_t(g, *packed, shape.cols, *_args(c))
    _check(got, g, w, what=f"qmatmul_t {c.name}", transpose=True)


def test_qmatmul_t_large_k_and_noncontiguous_g(be):
    c = QuantConfig(3, 32, 4, 16, torch.float16)
    packed, w = _packed(be, 64, 8192, c)
    g = torch.randn(64, 3, device=be.dev).t()
    _check(be.ops.qmatmul_t(g, *packed, 8192, *_args(c)), g, w, what="qmatmul_t", transpose=True)


def test_qmatmul_matches_cpu_kernel(be):
    # Same packed tensors through both backends: the two fp32 results agree to fp32 rounding.
    c = grid.DEFAULT
    w = grid.make_weight(576, 1536)
    packed = _quant_cpu(w, c)
    lv = lqlora_ext.nf_code(4)
    for m in (1, 16, 17):
        x = torch.randn(m, 1536)
        want = CPU.qmatmul(x, *packed, lv, 576, *_args(c), None, None, 1.0)
        got = be.ops.qmatmul(x.to(be.dev), *_to(packed, be.dev), lv.to(be.dev), 576, *_args(c),
                             None, None, 1.0).cpu()
        scale = (x.abs() @ CPU.dequantize(*packed, lv, 576, 1536, *_args(c),
                                           torch.float32).abs().t())
        assert ((got - want).abs() <= 64 * EPS32 * scale).all()


# -------------------------------------------------------- opcheck, compile, autograd
OPCHECK_CONFIGS = [grid.DEFAULT, QuantConfig(3, 16, 2, 16, torch.bfloat16)]


@pytest.mark.parametrize("c", OPCHECK_CONFIGS, ids=grid.ids(OPCHECK_CONFIGS))
def test_opcheck(c, be):
    w = grid.make_weight(53, 100).to(be.dev)
    lv = lqlora_ext.nf_code(c.bits).to(be.dev)
    opcheck(be.ops.quantize.default, (w, lv, *_args(c), c.scale_dtype))
    qc, qs, s2, off = be.ops.quantize(w, lv, *_args(c), c.scale_dtype)
    nb = -(-5300 // c.block_size)
    opcheck(be.ops.unpack_scales.default, (qs, s2, off, nb, c.scale_bits, c.scale_block_size))
    for dt in FP.values():
        opcheck(be.ops.dequantize.default, (qc, qs, s2, off, lv, 53, 100, *_args(c), dt))
    base = (qc, qs, s2, off, lv, 53, *_args(c))
    a = torch.randn(4, 100, device=be.dev, requires_grad=True)
    b = torch.randn(53, 4, device=be.dev, requires_grad=True)
    for m in (1, 20):
        x = torch.randn(m, 100, device=be.dev, requires_grad=True)
        opcheck(be.ops.qmatmul.default, (x, *base, None, None, 1.0))
        opcheck(be.ops.qmatmul.default, (x, *base, a, b, 0.5))
        opcheck(be.ops.qmatmul.default, (x.detach().bfloat16(), *base, None, None, 1.0))
        g = torch.randn(m, 53, device=be.dev)
        opcheck(be.ops.qmatmul_t.default, (g, qc, qs, s2, off, lv, 100, *_args(c)))


def test_qmatmul_torch_compile_fullgraph(be):
    c = grid.DEFAULT
    packed, w = _packed(be, 576, 576, c)
    a = torch.randn(8, 576, device=be.dev) / 24
    b = torch.randn(576, 8, device=be.dev)

    def f(x):
        return torch.relu(be.ops.qmatmul(x, *packed, 576, *_args(c), a, b, 0.5)) * 2

    compiled = torch.compile(f, fullgraph=True)
    for m in (1, 4, 32):
        x = torch.randn(m, 576, device=be.dev)
        torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)


def test_qmatmul_backward(be):
    # The autograd formula (lqlora_ext.ops) runs the backend's qmatmul_t; compare with dense
    # autograd.
    c = grid.DEFAULT
    packed, w = _packed(be, 576, 576, c)
    x = torch.randn(3, 576, device=be.dev, requires_grad=True)
    a = (torch.randn(8, 576, device=be.dev) / 24).requires_grad_()
    b = torch.randn(576, 8, device=be.dev).requires_grad_()
    y = be.ops.qmatmul(x, *packed, 576, *_args(c), a, b, 0.5)
    gy = torch.randn_like(y)
    gx, ga, gb = torch.autograd.grad(y, (x, a, b), gy)
    xd, ad, bd = (t.detach().double().requires_grad_() for t in (x, a, b))
    yd = xd @ w.double().t() + 0.5 * (xd @ ad.t()) @ bd.t()
    ex, ea, eb = torch.autograd.grad(yd, (xd, ad, bd), gy.double())
    for got, want, name in ((gx, ex, "x"), (ga, ea, "a"), (gb, eb, "b")):
        rel = ((got.double() - want).norm() / want.norm()).item()
        assert rel < 1e-5, f"grad {name}: relative error {rel:.2e}"


@pytest.mark.parametrize("bits,b0", list(itertools.product([2, 4, 8], [16, 256])))
def test_quantize_large_matrix(bits, b0, be):
    # Many thread blocks in every quantize kernel (n = 4M), against the CPU bit for bit.
    c = QuantConfig(bits, b0, 8, 256, torch.float32)
    w = grid.make_weight(2048, 2048, seed=bits)
    want = _quant_cpu(w, c)
    got = be.ops.quantize(w.to(be.dev), lqlora_ext.nf_code(bits).to(be.dev), *_args(c),
                          c.scale_dtype)
    for g, t, name in zip(got, want, ("qcodes", "qscales", "scale2", "offset")):
        _assert_equal(g, t, f"quantize {name}")
