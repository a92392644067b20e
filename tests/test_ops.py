"""Operators (STYLE.md's four checks per op): qmatmul / qmatmul_t against the reference with
baseline-derived tolerances, exact identity, gradients, torch.library.opcheck,
torch.compile(fullgraph=True), bad input, and the seeded randomized SVD."""
from __future__ import annotations

import functools

import pytest
import torch
from torch.library import opcheck

import lqlora_ext as L
from lqlora_ext import ops
from lqlora_ext.ops import reference as R

import grid
import shapes

FP = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EPS32 = torch.finfo(torch.float32).eps


@functools.lru_cache(maxsize=None)
def _qweight(rows, cols, config, seed=0):
    """Cached NFTensor and its exact fp32 dequantization (the matrix qmatmul multiplies by)."""
    qw = L.quantize(grid.make_weight(rows, cols, seed=seed), config)
    return qw, qw.dequantize()


def _cfg_args(qw):
    c = qw.config
    return (c.bits, c.block_size, c.scale_bits, c.scale_block_size)


def _torch_dense(x, w, a=None, b=None, s=1.0):
    """torch's own computation at x's precision: the baseline every tolerance derives from."""
    dt = x.dtype
    y = x @ w.to(dt).t()
    if a is not None:
        y = y + s * (x @ a.to(dt).t()) @ b.to(dt).t()
    return y


def _exact(x, w, a=None, b=None, s=1.0):
    """float64 result for the given (already rounded) inputs."""
    return _torch_dense(x.double(), w.double(), None if a is None else a.double(),
                        None if b is None else b.double(), s)


def _assert_within_baseline(got, x, w, a=None, b=None, s=1.0, factor=2.0, what="qmatmul"):
    """|got - exact| <= factor * |torch_dense - exact| (max-abs), floored at one fp32 rounding
    of the largest |x| @ |w|^T term so tiny K (exact torch results) cannot force 0 error."""
    exact = _exact(x, w, a, b, s)
    base = (_torch_dense(x, w, a, b, s).double() - exact).abs().max().item()
    mag = _torch_dense(x.float().abs(), w.float().abs(), None if a is None else a.float().abs(),
                       None if b is None else b.float().abs(), abs(s)).max().item() \
        if x.numel() else 0.0
    tol = factor * max(base, EPS32 * mag)
    err = (got.double() - exact).abs().max().item() if got.numel() else 0.0
    assert err <= tol, f"{what}: max error {err:.3e} > {factor} x baseline {base:.3e} " \
                       f"(floor {EPS32 * mag:.3e})"


def _shape_m_params():
    """Every cheap shape x every M, each with its own diagonal-walk config."""
    out = []
    for i, s in enumerate(shapes.ALL_FAST):
        for j, m in enumerate(shapes.M_VALUES):
            c = grid.diagonal(i * len(shapes.M_VALUES) + j)
            out.append(pytest.param(s, m, c, id=f"{s.id}-M{m}-{c.name}"))
    return out


# ------------------------------------------------------------------ qmatmul vs the reference
@pytest.mark.parametrize("shape, m, config", _shape_m_params())
def test_qmatmul_fp32(shape, m, config):
    qw, w = _qweight(*shape, config)
    x = torch.randn(m, shape.cols)
    y = L.qmatmul(x, qw)
    assert y.shape == (m, shape.rows) and y.dtype == torch.float32
    _assert_within_baseline(y, x, w)
    ref = R.qmatmul(x, *qw._args(), shape.rows, *_cfg_args(qw))
    _assert_within_baseline(ref, x, w, what="reference")  # the oracle meets the same bar


LOWP_SHAPES = [shapes.BY_NAME[n] for n in ("smollm2-q", "smollm2-down", "odd", "tiny", "row")]


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 7, 17, 53])
@pytest.mark.parametrize("shape", shapes.params(LOWP_SHAPES))
def test_qmatmul_low_precision_activations(shape, m, dt):
    """bf16/fp16 x: the kernel computes in fp32 and rounds once, so against the exact result
    for the same rounded x it must be within 2x torch's own bf16/fp16 matmul error."""
    qw, w = _qweight(*shape, grid.DEFAULT)
    x = torch.randn(m, shape.cols).to(FP[dt])
    y = L.qmatmul(x, qw)
    assert y.dtype == FP[dt]
    _assert_within_baseline(y, x, w)
    ref = R.qmatmul(x, *qw._args(), shape.rows, *_cfg_args(qw))
    _assert_within_baseline(ref, x, w, what="reference")


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("m", [1, 7, 17, 53])
@pytest.mark.parametrize("shape", shapes.params([shapes.BY_NAME["smollm2-kv"],
                                                 shapes.BY_NAME["odd"]]))
def test_qmatmul_lora(shape, m, dt):
    qw, w = _qweight(*shape, grid.DEFAULT)
    r, s = 8, 0.25
    x = torch.randn(m, shape.cols).to(FP[dt])
    a = (torch.randn(r, shape.cols) / shape.cols**0.5).to(FP[dt])
    b = torch.randn(shape.rows, r).to(FP[dt])
    y = L.qmatmul(x, qw, a, b, s)
    assert y.dtype == FP[dt]
    _assert_within_baseline(y, x, w, a, b, s)
    ref = R.qmatmul(x, *qw._args(), shape.rows, *_cfg_args(qw), a, b, s)
    _assert_within_baseline(ref, x, w, a, b, s, what="reference")


@pytest.mark.parametrize("lead", [(2, 3), (4, 1, 5), (1,)], ids=["2x3", "4x1x5", "1"])
def test_qmatmul_leading_batch_dims(lead):
    shape = shapes.BY_NAME["odd"]
    qw, w = _qweight(*shape, grid.DEFAULT)
    a, b = torch.randn(4, shape.cols), torch.randn(shape.rows, 4)
    x = torch.randn(*lead, shape.cols)
    for args in ((), (a, b, 0.5)):
        y = L.qmatmul(x, qw, *args)
        assert y.shape == (*lead, shape.rows)
        assert torch.equal(y, L.qmatmul(x.reshape(-1, shape.cols), qw, *args).reshape(y.shape))


@pytest.mark.parametrize("xshape", [(0, 100), (2, 0, 100), (0, 3, 100)],
                         ids=["0xK", "2x0xK", "0x3xK"])
def test_qmatmul_empty_batch(xshape):
    shape = shapes.BY_NAME["odd"]
    qw, _ = _qweight(*shape, grid.DEFAULT)
    x = torch.randn(xshape, requires_grad=True)
    a = torch.randn(4, 100, requires_grad=True)
    b = torch.randn(53, 4, requires_grad=True)
    for args in ((), (a, b, 0.5)):
        y = L.qmatmul(x, qw, *args)
        assert y.shape == (*xshape[:-1], 53)
        y.sum().backward()
        assert x.grad.shape == x.shape
    assert (a.grad == 0).all() and (b.grad == 0).all()
    g = ops.qmatmul_t(torch.randn(0, 53), *qw._args(), 100, *_cfg_args(qw))
    assert g.shape == (0, 100)


def test_qmatmul_non_contiguous_x():
    shape = shapes.BY_NAME["k64"]
    qw, w = _qweight(*shape, grid.DEFAULT)
    x = torch.randn(shape.cols, 20).t()  # [20, K], transposed view
    assert torch.equal(L.qmatmul(x, qw), L.qmatmul(x.contiguous(), qw))


# ----------------------------------------------------------------------------------- qmatmul_t
@pytest.mark.parametrize("m", [1, 17, 53])
@pytest.mark.parametrize("i, shape", [pytest.param(i, s, id=s.id)
                                      for i, s in enumerate(shapes.ALL_FAST)])
def test_qmatmul_t(i, shape, m):
    qw, w = _qweight(*shape, grid.diagonal(i))
    g = torch.randn(m, shape.rows)
    out = ops.qmatmul_t(g, *qw._args(), shape.cols, *_cfg_args(qw))
    assert out.shape == (m, shape.cols) and out.dtype == torch.float32
    _assert_within_baseline(out, g, w.t().contiguous(), what="qmatmul_t")
    gb = g.bfloat16()
    out = ops.qmatmul_t(gb, *qw._args(), shape.cols, *_cfg_args(qw))
    assert out.dtype == torch.bfloat16
    _assert_within_baseline(out, gb, w.t().contiguous(), what="qmatmul_t bf16")


# ------------------------------------------------------------------------ exact identity
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", shapes.params([shapes.BY_NAME[n] for n in
                                                  ("tiny", "row", "odd", "k64", "smollm2-kv")]))
def test_identity_reproduces_weight(shape, dt):
    """x = I gives W^T exactly on both kernel paths (fused M <= 16 and dequantize + GEMM),
    and qmatmul_t(I) gives W (FLUTE's identity test)."""
    qw, w = _qweight(*shape, grid.DEFAULT)
    eye = torch.eye(shape.cols, dtype=FP[dt])
    want = w.t().to(FP[dt])
    assert torch.equal(L.qmatmul(eye, qw), want), "GEMM path (M = K)"
    for r0 in range(0, shape.cols, 16):  # fused path: 16-row slices of the identity
        assert torch.equal(L.qmatmul(eye[r0:r0 + 16], qw), want[r0:r0 + 16]), f"rows {r0}.."
    got = ops.qmatmul_t(torch.eye(shape.rows, dtype=FP[dt]), *qw._args(), shape.cols,
                        *_cfg_args(qw))
    assert torch.equal(got, w.to(FP[dt]))


# ----------------------------------------------------------------------------------- gradients
def _grads(f, *tensors):
    out = f(*tensors)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return torch.autograd.grad(out, [t for t in tensors if t.requires_grad], gy)


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("m", [1, 17, 53])
@pytest.mark.parametrize("shape", shapes.params([shapes.BY_NAME["odd"],
                                                 shapes.BY_NAME["smollm2-kv"]]))
def test_qmatmul_gradients(shape, m, lora):
    """Gradients wrt x, lora_a, lora_b vs dense autograd on the dequantized W: fp64 dense is
    the truth, fp32 dense autograd the baseline (error at most 2x, floored at fp32 eps)."""
    qw, w = _qweight(*shape, grid.DEFAULT)
    r, s = 4, 0.5
    x0 = torch.randn(m, shape.cols)
    a0, b0 = torch.randn(r, shape.cols) / 10, torch.randn(shape.rows, r) / 10
    leaves = lambda dt: [t.to(dt).requires_grad_() for t in ((x0, a0, b0) if lora else (x0,))]

    def dense(x, a=None, b=None):
        return _torch_dense(x, w.to(x.dtype), a, b, s)

    got = _grads(lambda x, a=None, b=None: L.qmatmul(x, qw, a, b, s), *leaves(torch.float32))
    exact = _grads(dense, *leaves(torch.float64))
    base = _grads(dense, *leaves(torch.float32))
    for name, g, e, bl in zip(("x", "lora_a", "lora_b"), got, exact, base):
        assert g.dtype == torch.float32 and g.shape == bl.shape
        tol = 2 * max((bl.double() - e).abs().max().item(), EPS32 * e.abs().max().item())
        err = (g.double() - e).abs().max().item()
        assert err <= tol, f"grad {name}: {err:.3e} > {tol:.3e}"


def test_qmatmul_gradients_partial_requires_grad():
    """Only the LoRA factors train (the fine-tuning case) and only x trains."""
    shape = shapes.BY_NAME["odd"]
    qw, w = _qweight(*shape, grid.DEFAULT)
    x = torch.randn(7, shape.cols)
    a = torch.randn(4, shape.cols, requires_grad=True)
    b = torch.randn(shape.rows, 4, requires_grad=True)
    L.qmatmul(x, qw, a, b, 2.0).sum().backward()
    a2, b2 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    (x.double() @ w.double().t() + 2.0 * (x.double() @ a2.t()) @ b2.t()).sum().backward()
    torch.testing.assert_close(a.grad.double(), a2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), b2.grad, rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_()
    L.qmatmul(xg, qw, a.detach(), b.detach(), 2.0).sum().backward()
    assert xg.grad is not None and a.grad is not None


def test_qmatmul_gradient_bf16():
    shape = shapes.BY_NAME["smollm2-kv"]
    qw, w = _qweight(*shape, grid.DEFAULT)
    x = torch.randn(17, shape.cols).bfloat16().requires_grad_()
    (gx,) = _grads(lambda x: L.qmatmul(x, qw), x)
    assert gx.dtype == torch.bfloat16
    gy = torch.randn(17, shape.rows, generator=torch.Generator().manual_seed(1)).bfloat16()
    _assert_within_baseline(gx, gy, w.t().contiguous(), what="bf16 grad x")


# ------------------------------------------------------------------------------------ opcheck
def _packed(shape, config):
    qw, _ = _qweight(*shape, config)
    return qw


OPCHECK_CONFIGS = [grid.DEFAULT, L.QuantConfig(3, 32, 4, 16, torch.bfloat16),
                   L.QuantConfig(5, 16, 2, 64, torch.float16)]


@pytest.mark.parametrize("c", OPCHECK_CONFIGS, ids=grid.ids(OPCHECK_CONFIGS))
def test_opcheck_quantize_unpack_dequantize(c):
    w = grid.make_weight(53, 100)
    lv = L.nf_code(c.bits)
    args = (c.bits, c.block_size, c.scale_bits, c.scale_block_size)
    opcheck(torch.ops.lqlora.quantize.default, (w, lv, *args, c.scale_dtype))
    opcheck(torch.ops.lqlora.quantize.default, (w.bfloat16(), lv, *args, c.scale_dtype))
    qc, qs, s2, off = ops.quantize(w, lv, *args, c.scale_dtype)
    nb = -(-w.numel() // c.block_size)
    opcheck(torch.ops.lqlora.unpack_scales.default,
            (qs, s2, off, nb, c.scale_bits, c.scale_block_size))
    for dt in (torch.float32, torch.float16):
        opcheck(torch.ops.lqlora.dequantize.default, (qc, qs, s2, off, lv, 53, 100, *args, dt))


@pytest.mark.parametrize("c, m", [(OPCHECK_CONFIGS[0], 3), (OPCHECK_CONFIGS[1], 20)],
                         ids=[f"{OPCHECK_CONFIGS[0].name}-M3", f"{OPCHECK_CONFIGS[1].name}-M20"])
def test_opcheck_qmatmul(c, m):
    qw = _packed(shapes.BY_NAME["odd"], c)
    base = (*qw._args(), 53, *_cfg_args(qw))
    x = torch.randn(m, 100, requires_grad=True)
    a = torch.randn(4, 100, requires_grad=True)
    b = torch.randn(53, 4, requires_grad=True)
    opcheck(torch.ops.lqlora.qmatmul.default, (x, *base, None, None, 1.0))
    opcheck(torch.ops.lqlora.qmatmul.default, (x, *base, a, b, 0.5))
    opcheck(torch.ops.lqlora.qmatmul.default, (x.detach(), *base, a, b, 0.5))
    opcheck(torch.ops.lqlora.qmatmul.default, (x.detach().bfloat16(), *base, None, None, 1.0))
    g = torch.randn(m, 53)
    opcheck(torch.ops.lqlora.qmatmul_t.default, (g, *qw._args(), 100, *_cfg_args(qw)))


def test_opcheck_rsvd():
    a = torch.randn(40, 30)
    opcheck(torch.ops.lqlora.rsvd.default, (a, 5, 10, 2, 0, None))
    opcheck(torch.ops.lqlora.rsvd.default, (torch.randn(2, 30, 40, dtype=torch.float64),
                                            4, 3, 1, 7, None))
    opcheck(torch.ops.lqlora.rsvd.default, (a, 5, 3, 2, 0, torch.randn(30, 8)))


# ------------------------------------------------------------------------------ torch.compile
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_qmatmul(backend, fresh_dynamo):
    qw, _ = _qweight(53, 100, grid.DEFAULT)

    def f(x):
        return torch.nn.functional.gelu(L.qmatmul(x, qw)) * 2

    cf = torch.compile(f, fullgraph=True, backend=backend, dynamic=True)
    for m in (3, 17, 40):  # both kernel paths, one dynamic-shape graph
        x = torch.randn(2, m, 100)
        torch.testing.assert_close(cf(x), f(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_qmatmul_lora_backward(backend, fresh_dynamo):
    qw, _ = _qweight(53, 100, grid.DEFAULT)
    a = torch.randn(4, 100, requires_grad=True)
    b = torch.randn(53, 4, requires_grad=True)

    def loss(x, a, b):
        return L.qmatmul(x, qw, a, b, 0.5).square().mean()

    x = torch.randn(7, 100, requires_grad=True)
    want = torch.autograd.grad(loss(x, a, b), (x, a, b))
    cl = torch.compile(loss, fullgraph=True, backend=backend)
    got = torch.autograd.grad(cl(x, a, b), (x, a, b))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_compile_fullgraph_inductor(fresh_dynamo):
    qw, _ = _qweight(53, 100, grid.DEFAULT)

    def f(x):
        return L.qmatmul(x, qw) + 1.0

    x = torch.randn(5, 100)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------- bad input
def _kw():
    return _qweight(53, 100, grid.DEFAULT)[0]


def _op_qmatmul(x, a=None, b=None):
    qw = _kw()
    return ops.qmatmul(x, *qw._args(), 53, *_cfg_args(qw), a, b, 1.0)


def test_qmatmul_rejects_k_mismatch():
    with pytest.raises(ValueError, match="K=100"):
        L.qmatmul(torch.randn(3, 99), _kw())
    with pytest.raises(ValueError, match="inner size"):
        _op_qmatmul(torch.randn(3, 99))
    with pytest.raises(ValueError, match="inner size"):
        ops.qmatmul_t(torch.randn(3, 52), *_kw()._args(), 100, 4, 64, 8, 256)


@pytest.mark.parametrize("dt", [torch.int32, torch.int64, torch.float64, torch.bool])
def test_qmatmul_rejects_activation_dtype(dt):
    x = torch.ones(3, 100, dtype=dt)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        L.qmatmul(x, _kw())
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        _op_qmatmul(x)


def test_qmatmul_rejects_non_2d_at_op_level_and_scalar_x():
    with pytest.raises(ValueError, match="2-D"):
        _op_qmatmul(torch.randn(2, 3, 100))
    with pytest.raises(ValueError, match="last dim"):
        L.qmatmul(torch.tensor(1.0), _kw())
    with pytest.raises(TypeError, match="NFTensor"):
        L.qmatmul(torch.randn(3, 100), torch.randn(53, 100))


@pytest.mark.parametrize("ashape, bshape", [
    ((4, 99), (53, 4)), ((4, 100), (52, 4)), ((4, 100), (53, 5)), ((100,), (53, 1)),
    ((4, 100, 1), (53, 4))], ids=["a-K", "b-N", "rank", "a-1d", "a-3d"])
def test_qmatmul_rejects_wrong_lora_shapes(ashape, bshape):
    x, a, b = torch.randn(3, 100), torch.randn(ashape), torch.randn(bshape)
    with pytest.raises(ValueError, match="LoRA shapes|lora_a"):
        L.qmatmul(x, _kw(), a, b)
    with pytest.raises(ValueError, match="LoRA shapes|lora_a"):
        _op_qmatmul(x, a, b)


def test_qmatmul_rejects_single_lora_factor():
    x = torch.randn(3, 100)
    for a, b in ((torch.randn(4, 100), None), (None, torch.randn(53, 4))):
        with pytest.raises(ValueError, match="together"):
            L.qmatmul(x, _kw(), a, b)
        with pytest.raises(ValueError, match="together"):
            _op_qmatmul(x, a, b)


def test_qmatmul_rejects_integer_lora():
    with pytest.raises(TypeError, match="lora_a"):
        _op_qmatmul(torch.randn(3, 100), torch.ones(4, 100, dtype=torch.int32),
                    torch.randn(53, 4))


def test_qmatmul_rejects_tensors_on_different_devices():
    """'meta' stands in for a second device."""
    qw = _kw()
    x = torch.randn(3, 100)
    with pytest.raises(ValueError, match="meta"):
        L.qmatmul(x.to("meta"), qw)
    with pytest.raises(ValueError, match="meta"):
        L.qmatmul(x, qw, torch.randn(4, 100, device="meta"), torch.randn(53, 4))
    with pytest.raises(ValueError, match="meta"):
        L.qmatmul(x, qw, torch.randn(4, 100), torch.randn(53, 4, device="meta"))
    with pytest.raises(ValueError, match="meta"):
        L.qmatmul(x.to("meta"), qw.to("meta"), torch.randn(4, 100), torch.randn(53, 4))




@pytest.mark.parametrize("where", ["x", "lora_a", "qscales"])
def test_ops_qmatmul_rejects_tensors_on_different_devices(where):
    qw = _kw()
    args = dict(x=torch.randn(3, 100), lora_a=torch.randn(4, 100), lora_b=torch.randn(53, 4),
                qscales=qw.qscales)
    args[where] = args[where].to("meta")
    with pytest.raises((ValueError, RuntimeError), match="device|meta"):
        ops.qmatmul(args["x"], qw.qcodes, args["qscales"], qw.scale2, qw.offset, qw.levels, 53,
                    *_cfg_args(qw), args["lora_a"], args["lora_b"], 1.0)


# --------------------------------------------------------------------------------------- rsvd
def _low_rank_plus_noise(m, n, dtype=torch.float32, batch=()):
    g = torch.Generator().manual_seed(5)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64)).Q
    s = 0.7 ** torch.arange(k, dtype=torch.float64) + 1e-3  # decaying spectrum, flat tail
    return ((u * s) @ v.mT).to(dtype)


def test_rsvd_deterministic_per_seed():
    a = torch.randn(80, 60)
    r1, r2, r3 = ops.rsvd(a, 6, seed=11), ops.rsvd(a, 6, seed=11), ops.rsvd(a, 6, seed=12)
    for t1, t2 in zip(r1, r2):
        assert torch.equal(t1, t2)
    assert not torch.equal(r1[0], r3[0]), "a different seed must draw a different sketch"


@pytest.mark.parametrize("shape, dtype, init", [
    ((60, 40), torch.float32, False), ((40, 60), torch.float64, False),
    ((3, 50, 70), torch.float32, False), ((576, 577), torch.float32, False),
    ((60, 40), torch.float32, True)], ids=["60x40-fp32", "40x60-fp64", "batch3-50x70",
                                            "576x577", "warm-start"])
def test_rsvd_matches_reference(shape, dtype, init):
    """Same CPU generator and the same ATen calls: the op equals reference.rsvd exactly."""
    a = torch.randn(shape, dtype=dtype)
    k = min(8 + 10, shape[-1], shape[-2])
    iv = torch.randn(*shape[:-2], shape[-1], k, dtype=dtype) if init else None
    got = ops.rsvd(a, 8, 10, 2, 3, iv)
    want = R.rsvd(a, 8, 10, 2, 3, iv)
    for name, g, w in zip("USV", got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert torch.equal(g, w), f"{name} differs from reference.rsvd"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("batch", [(), (2,)], ids=["single", "batch2"])
def test_rsvd_accuracy_vs_svd(dtype, batch):
    """Against torch.linalg.svd: top singular values to 1e-4 relative and a rank-r residual
    within 1% of the optimal (Eckart-Young) one; U and V orthonormal."""
    a = _low_rank_plus_noise(120, 90, dtype, batch)
    r = 10
    u, s, v = ops.rsvd(a, r)
    s_true = torch.linalg.svdvals(a.double())[..., :r]
    torch.testing.assert_close(s.double(), s_true, rtol=1e-4, atol=0)
    resid = torch.linalg.matrix_norm((a - (u * s.unsqueeze(-2)) @ v.mT).double())
    best = torch.linalg.svdvals(a.double())[..., r:].pow(2).sum(-1).sqrt()
    assert (resid <= 1.01 * best).all(), (resid, best)
    eye = torch.eye(r, dtype=torch.float64)
    tol = 100 * torch.finfo(dtype).eps
    torch.testing.assert_close((u.mT @ u).double(), eye.expand(*batch, r, r), atol=tol, rtol=0)
    torch.testing.assert_close((v.mT @ v).double(), eye.expand(*batch, r, r), atol=tol, rtol=0)


def test_rsvd_rejects_bad_input():
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.rsvd(torch.ones(5, 5, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="rank"):
        ops.rsvd(torch.randn(5, 6), 6)
    with pytest.raises(ValueError, match="rank"):
        ops.rsvd(torch.randn(5, 6), 0)
    with pytest.raises(ValueError, match=r"\[\.\.\., m, n\]"):
        ops.rsvd(torch.randn(5), 1)
    with pytest.raises(ValueError, match="init"):
        ops.rsvd(torch.randn(20, 10), 2, 3, 2, 0, torch.randn(10, 4))
    with pytest.raises(ValueError, match="non-negative"):
        ops.rsvd(torch.randn(20, 10), 2, -1)
    # NaN/Inf named, as the CUDA op does (shared checks: csrc/include/lqlora/rsvd_args.h)
    bad = torch.randn(2, 20, 10)
    bad[1, 4, 7] = float("inf")
    with pytest.raises(ValueError, match=r"input contains NaN/Inf; first at \[1, 4, 7\]"):
        ops.rsvd(bad, 2)
    init = torch.randn(10, 5)
    init[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"init contains NaN/Inf; first at \[3, 0\]"):
        ops.rsvd(torch.randn(20, 10), 2, 3, 2, 0, init)
    with pytest.raises(ValueError, match=r"A @ Omega overflows Float"):
        ops.rsvd(torch.full((20, 10), 3e38), 2)
    # A is checked through Y = A Omega: a NaN behind a zero row of `init` still reaches Y.
    init = torch.randn(10, 5)
    init[6] = 0
    bad = torch.randn(20, 10)
    bad[13, 6] = float("nan")
    with pytest.raises(ValueError, match=r"input contains NaN/Inf; first at \[13, 6\]"):
        ops.rsvd(bad, 2, 3, 2, 0, init)
