"""CUDA kernels against the CPU kernels (the spec's executable form).

- quantize / unpack_scales / dequantize: bit-exact (torch.equal) with the CPU over every
  bit width, block size, scale width, scale block size and scale dtype, on real and ragged
  shapes;
- qmatmul / qmatmul_t: within twice torch's own matmul error at the activation's precision
  (the baseline), on both the fused small-M kernels and the large-M dequantize + cuBLAS
  path, including LoRA, non-contiguous and misaligned inputs, and an exact identity check;
- CUDA-graph capture of the decode path, torch.library.opcheck on CUDA, and bad input.

Skipped (not failed) without a GPU: CI compiles the kernels but cannot run them.
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

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

_ops = torch.ops.lqlora
DEV = "cuda"
EPS32 = torch.finfo(torch.float32).eps
FP = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SMALL_M = 16  # the fused decode path's limit (csrc/cuda/launch.h kSmallM)


def _args(c: QuantConfig):
    return (c.bits, c.block_size, c.scale_bits, c.scale_block_size)


def _quant_cpu(w: torch.Tensor, c: QuantConfig):
    return _ops.quantize(w, lqlora_ext.nf_code(c.bits), *_args(c), c.scale_dtype)


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
def test_quantize_unpack_dequantize_bit_exact(shape, c):
    w = grid.make_weight(shape.rows, shape.cols, seed=shape.rows + c.bits)
    want = _quant_cpu(w, c)
    got = _ops.quantize(w.to(DEV), lqlora_ext.nf_code(c.bits).to(DEV), *_args(c), c.scale_dtype)
    for g, t, name in zip(got, want, ("qcodes", "qscales", "scale2", "offset")):
        assert g.device.type == "cuda", name
        _assert_equal(g, t, f"quantize {name}")

    nb = -(-shape.numel // c.block_size)
    _assert_equal(_ops.unpack_scales(*_to(want[1:], DEV), nb, c.scale_bits, c.scale_block_size),
                  _ops.unpack_scales(*want[1:], nb, c.scale_bits, c.scale_block_size),
                  "unpack_scales")
    lv = lqlora_ext.nf_code(c.bits)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        _assert_equal(_ops.dequantize(*_to(want, DEV), lv.to(DEV), *shape, *_args(c), dt),
                      _ops.dequantize(*want, lv, *shape, *_args(c), dt), f"dequantize {dt}")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("wdt", list(FP), ids=list(FP))
def test_quantize_every_width_and_input_dtype(bits, wdt):
    c = QuantConfig(bits, 16 if bits % 2 else 64, 3 if bits > 4 else 8, 16, torch.bfloat16)
    w = grid.make_weight(576, 577, dtype=FP[wdt], seed=bits)  # K = 577: blocks straddle rows
    want = _quant_cpu(w, c)
    got = _ops.quantize(w.to(DEV), lqlora_ext.nf_code(bits).to(DEV), *_args(c), c.scale_dtype)
    for g, t, name in zip(got, want, ("qcodes", "qscales", "scale2", "offset")):
        _assert_equal(g, t, f"quantize {name}")
    lv = lqlora_ext.nf_code(bits)
    _assert_equal(_ops.dequantize(*_to(want, DEV), lv.to(DEV), 576, 577, *_args(c),
                                  torch.float64),
                  _ops.dequantize(*want, lv, 576, 577, *_args(c), torch.float64),
                  "dequantize float64")


def test_quantize_special_values():
    # All-zero rows (scale 0 -> the exact-0 level's code), a zero matrix, values whose
    # second-level scale overflows fp16 (c = inf) and subnormal weights: same as the CPU.
    w = grid.make_weight(64, 96)
    w[3:5] = 0.0
    cases = [w, torch.zeros(8, 40), w * 1e30, w * 1e-40]
    for i, x in enumerate(cases):
        for c in (grid.DEFAULT, QuantConfig(3, 16, 2, 16, torch.float16)):
            want = _quant_cpu(x, c)
            got = _ops.quantize(x.to(DEV), lqlora_ext.nf_code(c.bits).to(DEV), *_args(c),
                                c.scale_dtype)
            for g, t, name in zip(got, want, ("qcodes", "qscales", "scale2", "offset")):
                _assert_equal(g, t, f"case {i} {c.name}: quantize {name}")


def test_quantize_rejects_nonfinite_naming_the_index():
    w = grid.make_weight(20, 30).to(DEV)
    w[7, 11] = float("nan")
    w[9, 2] = float("inf")
    with pytest.raises(ValueError, match=r"\[7, 11\]"):
        _ops.quantize(w, lqlora_ext.nf_code(4).to(DEV), 4, 64, 8, 256, torch.float32)


def test_bad_input_raises():
    c = grid.DEFAULT
    packed = _to(_quant_cpu(grid.make_weight(64, 64), c), DEV)
    lv = lqlora_ext.nf_code(4).to(DEV)
    with pytest.raises(ValueError, match="qcodes"):
        _ops.dequantize(packed[0][:-1], *packed[1:], lv, 64, 64, *_args(c), torch.float32)
    with pytest.raises(ValueError, match="levels"):
        _ops.dequantize(*packed, lv.cpu(), 64, 64, *_args(c), torch.float32)
    with pytest.raises(ValueError, match="inner size"):
        _ops.qmatmul(torch.randn(2, 63, device=DEV), *packed, lv, 64, *_args(c), None, None, 1.0)
    with pytest.raises(ValueError, match="block_size"):
        _ops.qmatmul(torch.randn(2, 64, device=DEV), *packed, lv, 64, 4, 48, 8, 256,
                     None, None, 1.0)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        _ops.qmatmul(torch.ones(2, 64, device=DEV, dtype=torch.int32), *packed, lv, 64,
                     *_args(c), None, None, 1.0)


# ------------------------------------------------------------- matmuls: baseline tolerances
def _packed(rows, cols, c, seed=0):
    """CUDA packed weight (quantized on the CPU) and its exact fp32 dequantization."""
    w = grid.make_weight(rows, cols, seed=seed)
    packed = _quant_cpu(w, c)
    wdq = _ops.dequantize(*packed, lqlora_ext.nf_code(c.bits), rows, cols, *_args(c),
                          torch.float32)
    return _to(packed, DEV) + (lqlora_ext.nf_code(c.bits).to(DEV),), wdq.to(DEV)


def _dense(x, w, a=None, b=None, s=1.0):
    """torch's own computation at x's precision on the GPU: the tolerance baseline."""
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
def test_qmatmul(shape, m, xdt):
    c = MM_CONFIGS[(m + shape.rows) % len(MM_CONFIGS)]
    packed, w = _packed(*shape, c)
    x = torch.randn(m, shape.cols, device=DEV).to(FP[xdt])
    got = _ops.qmatmul(x, *packed, shape.rows, *_args(c), None, None, 1.0)
    _check(got, x, w, what=f"qmatmul {c.name}")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("m", [1, 3, 9])
def test_qmatmul_every_width(bits, m):
    # K = 4096 -> 128 groups per row: four warps split K; B0 = 16 -> two scales per group.
    for c in (QuantConfig(bits, 16, 8, 64, torch.bfloat16), QuantConfig(bits, 256, 2, 16)):
        packed, w = _packed(96, 4096, c, seed=bits)
        x = torch.randn(m, 4096, device=DEV, dtype=torch.bfloat16)
        _check(_ops.qmatmul(x, *packed, 96, *_args(c), None, None, 1.0), x, w,
               what=f"qmatmul {c.name}")


@pytest.mark.parametrize("b0", [32, 64, 128, 256])
@pytest.mark.parametrize("rows,cols", [(24, 16384), (40, 4128), (33, 1056)],
                         ids=["k16384", "k4128", "k1056"])
def test_qmatmul_scale_window(rows, cols, b0):
    # The fused kernel keeps a 32-scale window per row and warp: many steps per warp
    # (K = 16384), rows that start mid-block (4128 % 64 = 32), a last warp with a partial
    # step (1056 / 32 = 33 groups), a ragged last block and rows past N in the last tile.
    c = QuantConfig(4, b0, 3, 16, torch.float16)
    packed, w = _packed(rows, cols, c, seed=b0)
    for m in (1, 6):
        x = torch.randn(m, cols, device=DEV)
        _check(_ops.qmatmul(x, *packed, rows, *_args(c), None, None, 1.0), x, w,
               what=f"qmatmul {rows}x{cols} {c.name} M={m}")


def test_qmatmul_llama_shape_decode():
    c = grid.DEFAULT
    packed, w = _packed(4096, 4096, c)
    for dt in FP.values():
        x = torch.randn(1, 4096, device=DEV, dtype=dt)
        _check(_ops.qmatmul(x, *packed, 4096, *_args(c), None, None, 1.0), x, w,
               what=f"qmatmul 4096x4096 {dt}")


@pytest.mark.parametrize("m", [1, 16, 17])
def test_qmatmul_identity_is_exact(m):
    # x = rows of the identity: out[i, n] = W[n, i] with one exact product per output, so the
    # result is the dequantized weight itself, bit for bit (FLUTE's identity test).
    c = QuantConfig(4, 16, 8, 64, torch.bfloat16)
    packed, w = _packed(320, 256, c)
    x = torch.eye(m, 256, device=DEV)
    got = _ops.qmatmul(x, *packed, 320, *_args(c), None, None, 1.0)
    _assert_equal(got, w[:, :m].t().contiguous().cpu(), "qmatmul(identity)")


@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("xdt", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", [shapes.BY_NAME["smollm2-q"], shapes.BY_NAME["odd"]],
                         ids=["576x576", "53x100"])
def test_qmatmul_lora(shape, m, xdt):
    c = grid.DEFAULT
    packed, w = _packed(*shape, c)
    r = 8
    x = torch.randn(m, shape.cols, device=DEV).to(FP[xdt])
    a = (torch.randn(r, shape.cols, device=DEV) / shape.cols ** 0.5).to(FP[xdt])
    b = torch.randn(shape.rows, r, device=DEV).to(torch.float32)  # mixed dtypes are allowed
    got = _ops.qmatmul(x, *packed, shape.rows, *_args(c), a, b, 0.5)
    _check(got, x, w, a, b, 0.5, what="qmatmul+lora")


def test_qmatmul_noncontiguous_and_misaligned_inputs():
    c = grid.DEFAULT
    packed, w = _packed(576, 576, c)
    for m in (1, 5, 40):
        xt = torch.randn(576, m, device=DEV, dtype=torch.bfloat16).t()  # transposed view
        _check(_ops.qmatmul(xt, *packed, 576, *_args(c), None, None, 1.0), xt, w,
               what="transposed x")
        buf = torch.randn(m * 576 + 1, device=DEV, dtype=torch.bfloat16)
        xm = buf[1:].view(m, 576)  # contiguous but 2 bytes off a 16-byte boundary
        _check(_ops.qmatmul(xm, *packed, 576, *_args(c), None, None, 1.0), xm, w,
               what="misaligned x")
    # qcodes as a misaligned view of a larger buffer
    qc = packed[0]
    big = torch.empty(qc.numel() + 1, dtype=qc.dtype, device=DEV)
    big[1:] = qc
    x = torch.randn(1, 576, device=DEV)
    got = _ops.qmatmul(x, big[1:], *packed[1:], 576, *_args(c), None, None, 1.0)
    _check(got, x, w, what="misaligned qcodes")
    _assert_equal(_ops.dequantize(big[1:], *packed[1:], 576, 576, *_args(c), torch.float32),
                  w.cpu(), "dequantize misaligned qcodes")


@pytest.mark.parametrize("gdt", list(FP), ids=list(FP))
@pytest.mark.parametrize("m", [1, 4, 16, 17, 40])
@pytest.mark.parametrize("shape", MM_SHAPES[:5], ids=[s.id for s in MM_SHAPES[:5]])
def test_qmatmul_t(shape, m, gdt):
    c = MM_CONFIGS[(m + shape.cols) % len(MM_CONFIGS)]
    packed, w = _packed(*shape, c)
    g = torch.randn(m, shape.rows, device=DEV).to(FP[gdt])
    got = _ops.qmatmul_t(g, *packed, shape.cols, *_args(c))
    _check(got, g, w, what=f"qmatmul_t {c.name}", transpose=True)


def test_qmatmul_t_large_k_and_noncontiguous_g():
    c = QuantConfig(3, 32, 4, 16, torch.float16)
    packed, w = _packed(64, 8192, c)
    g = torch.randn(64, 3, device=DEV).t()
    _check(_ops.qmatmul_t(g, *packed, 8192, *_args(c)), g, w, what="qmatmul_t", transpose=True)


def test_qmatmul_matches_cpu_kernel():
    # Same packed tensors through both backends: the two fp32 results agree to fp32 rounding.
    c = grid.DEFAULT
    w = grid.make_weight(576, 1536)
    packed = _quant_cpu(w, c)
    lv = lqlora_ext.nf_code(4)
    for m in (1, 16, 17):
        x = torch.randn(m, 1536)
        want = _ops.qmatmul(x, *packed, lv, 576, *_args(c), None, None, 1.0)
        got = _ops.qmatmul(x.to(DEV), *_to(packed, DEV), lv.to(DEV), 576, *_args(c),
                           None, None, 1.0).cpu()
        scale = (x.abs() @ _ops.dequantize(*packed, lv, 576, 1536, *_args(c),
                                           torch.float32).abs().t())
        assert ((got - want).abs() <= 64 * EPS32 * scale).all()


# ------------------------------------------------------------------ graphs, opcheck, streams
@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_qmatmul_cuda_graph_capture(lora):
    c = grid.DEFAULT
    packed, w = _packed(1536, 576, c)
    x = torch.randn(1, 576, device=DEV, dtype=torch.bfloat16)
    a = torch.randn(8, 576, device=DEV, dtype=torch.bfloat16) / 24 if lora else None
    b = torch.randn(1536, 8, device=DEV, dtype=torch.bfloat16) if lora else None

    def step():
        return _ops.qmatmul(x, *packed, 1536, *_args(c), a, b, 2.0)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()  # warm-up outside the graph (allocator, lazy module load)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, step()), "graph replay differs from eager"
        _check(out, x, w, a, b, 2.0, what="graph replay")


def test_runs_on_current_stream():
    c = grid.DEFAULT
    packed, w = _packed(576, 576, c)
    x = torch.randn(3, 576, device=DEV)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x2 = x * 1.0
        out = _ops.qmatmul(x2, *packed, 576, *_args(c), None, None, 1.0)
    s.synchronize()
    _check(out, x, w, what="side stream")


OPCHECK_CONFIGS = [grid.DEFAULT, QuantConfig(3, 16, 2, 16, torch.bfloat16)]


@pytest.mark.parametrize("c", OPCHECK_CONFIGS, ids=grid.ids(OPCHECK_CONFIGS))
def test_opcheck_cuda(c):
    w = grid.make_weight(53, 100).to(DEV)
    lv = lqlora_ext.nf_code(c.bits).to(DEV)
    opcheck(_ops.quantize.default, (w, lv, *_args(c), c.scale_dtype))
    qc, qs, s2, off = _ops.quantize(w, lv, *_args(c), c.scale_dtype)
    nb = -(-5300 // c.block_size)
    opcheck(_ops.unpack_scales.default, (qs, s2, off, nb, c.scale_bits, c.scale_block_size))
    for dt in FP.values():
        opcheck(_ops.dequantize.default, (qc, qs, s2, off, lv, 53, 100, *_args(c), dt))
    base = (qc, qs, s2, off, lv, 53, *_args(c))
    a = torch.randn(4, 100, device=DEV, requires_grad=True)
    b = torch.randn(53, 4, device=DEV, requires_grad=True)
    for m in (1, 20):
        x = torch.randn(m, 100, device=DEV, requires_grad=True)
        opcheck(_ops.qmatmul.default, (x, *base, None, None, 1.0))
        opcheck(_ops.qmatmul.default, (x, *base, a, b, 0.5))
        opcheck(_ops.qmatmul.default, (x.detach().bfloat16(), *base, None, None, 1.0))
        g = torch.randn(m, 53, device=DEV)
        opcheck(_ops.qmatmul_t.default, (g, qc, qs, s2, off, lv, 100, *_args(c)))


def test_qmatmul_torch_compile_fullgraph():
    c = grid.DEFAULT
    packed, w = _packed(576, 576, c)
    a = torch.randn(8, 576, device=DEV) / 24
    b = torch.randn(576, 8, device=DEV)

    def f(x):
        return torch.relu(lqlora_ext.ops.qmatmul(x, *packed, 576, *_args(c), a, b, 0.5)) * 2

    compiled = torch.compile(f, fullgraph=True)
    for m in (1, 4, 32):
        x = torch.randn(m, 576, device=DEV)
        torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)


def test_qmatmul_backward_on_cuda():
    # The autograd formula (lqlora_ext.ops) runs qmatmul_t on CUDA; compare with dense autograd.
    c = grid.DEFAULT
    packed, w = _packed(576, 576, c)
    x = torch.randn(3, 576, device=DEV, requires_grad=True)
    a = (torch.randn(8, 576, device=DEV) / 24).requires_grad_()
    b = torch.randn(576, 8, device=DEV).requires_grad_()
    y = _ops.qmatmul(x, *packed, 576, *_args(c), a, b, 0.5)
    gy = torch.randn_like(y)
    gx, ga, gb = torch.autograd.grad(y, (x, a, b), gy)
    xd, ad, bd = (t.detach().double().requires_grad_() for t in (x, a, b))
    yd = xd @ w.double().t() + 0.5 * (xd @ ad.t()) @ bd.t()
    ex, ea, eb = torch.autograd.grad(yd, (xd, ad, bd), gy.double())
    for got, want, name in ((gx, ex, "x"), (ga, ea, "a"), (gb, eb, "b")):
        rel = ((got.double() - want).norm() / want.norm()).item()
        assert rel < 1e-5, f"grad {name}: relative error {rel:.2e}"


@pytest.mark.parametrize("bits,b0", list(itertools.product([2, 4, 8], [16, 256])))
def test_quantize_large_matrix(bits, b0):
    # Many thread blocks in every quantize kernel (n = 4M), against the CPU bit for bit.
    c = QuantConfig(bits, b0, 8, 256, torch.float32)
    w = grid.make_weight(2048, 2048, seed=bits)
    want = _quant_cpu(w, c)
    got = _ops.quantize(w.to(DEV), lqlora_ext.nf_code(bits).to(DEV), *_args(c), c.scale_dtype)
    for g, t, name in zip(got, want, ("qcodes", "qscales", "scale2", "offset")):
        _assert_equal(g, t, f"quantize {name}")
