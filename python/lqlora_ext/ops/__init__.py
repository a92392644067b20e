"""Thin typed wrappers over the ``torch.ops.lqlora`` operators, their fake (meta) kernels
and autograd registration. Nothing above this module touches the compiled library.

Packed-weight arguments follow docs/format.md (format version 1):

- ``qcodes``  int32 ``[ceil(rows*cols/32) * bits]``: weight codes, 32-code groups.
- ``qscales`` int32 ``[ceil(nblocks/32) * scale_bits]``: first-level scale codes.
- ``scale2``  fp32/fp16/bf16 ``[ngroups]``: second-level scales.
- ``offset``  fp32 ``[1]``.
- ``levels``  fp32 ``[2**bits]``: the NormalFloat table.

with ``nblocks = ceil(rows*cols / block_size)`` and
``ngroups = ceil(nblocks / scale_block_size)``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (registers torch.ops.lqlora.*)

_ops = torch.ops.lqlora


def _cdiv(a, b):
    return (a + b - 1) // b


def _same_device(op: str, **tensors) -> None:
    """Fake kernels run whenever any argument is a meta/fake tensor; the real kernels check
    devices, so the fake ones must too (or a mixed call would return garbage shapes)."""
    devs = {k: t.device for k, t in tensors.items() if t is not None}
    first = next(iter(devs.values()))
    for k, d in devs.items():
        torch._check(d == first, lambda: f"lqlora.{op}: {k} is on {d}, expected {first} "
                                         f"(all tensors must be on one device)")


# ---------------------------------------------------------------------------- quantize
def quantize(w: Tensor, levels: Tensor, bits: int, block_size: int, scale_bits: int,
             scale_block_size: int, scale_dtype: torch.dtype):
    """Quantize a dense ``w [rows, cols]`` (fp32/bf16/fp16) to the packed format.

    Returns ``(qcodes, qscales, scale2, offset)``.
    """
    return _ops.quantize(w, levels, bits, block_size, scale_bits, scale_block_size, scale_dtype)


def _quantize_fake(w, levels, bits, block_size, scale_bits, scale_block_size, scale_dtype):
    _same_device("quantize", w=w, levels=levels)
    torch._check(w.dim() == 2, lambda: f"lqlora.quantize: weight must be 2-D, got {w.dim()}-D")
    torch._check(w.dtype.is_floating_point,
                 lambda: f"lqlora.quantize: weight must be floating, got {w.dtype}")
    n = w.shape[0] * w.shape[1]
    nb = _cdiv(n, block_size)
    return (w.new_empty((_cdiv(n, 32) * bits,), dtype=torch.int32),
            w.new_empty((_cdiv(nb, 32) * scale_bits,), dtype=torch.int32),
            w.new_empty((_cdiv(nb, scale_block_size),), dtype=scale_dtype),
            w.new_empty((1,), dtype=torch.float32))


# ------------------------------------------------------------------------ unpack_scales
def unpack_scales(qscales: Tensor, scale2: Tensor, offset: Tensor, nblocks: int,
                  scale_bits: int, scale_block_size: int) -> Tensor:
    """Decode double-quantized scales to fp32 first-level scales ``[nblocks]``."""
    return _ops.unpack_scales(qscales, scale2, offset, nblocks, scale_bits, scale_block_size)


def _unpack_scales_fake(qscales, scale2, offset, nblocks, scale_bits, scale_block_size):
    _same_device("unpack_scales", qscales=qscales, scale2=scale2, offset=offset)
    torch._check(qscales.numel() == _cdiv(nblocks, 32) * scale_bits,
                 lambda: "lqlora.unpack_scales: qscales does not match nblocks")
    return qscales.new_empty((nblocks,), dtype=torch.float32)


# --------------------------------------------------------------------------- dequantize
def dequantize(qcodes: Tensor, qscales: Tensor, scale2: Tensor, offset: Tensor, levels: Tensor,
               rows: int, cols: int, bits: int, block_size: int, scale_bits: int,
               scale_block_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Packed weight -> dense ``[rows, cols]`` in ``dtype``."""
    return _ops.dequantize(qcodes, qscales, scale2, offset, levels, rows, cols, bits, block_size,
                           scale_bits, scale_block_size, dtype)


def _dequantize_fake(qcodes, qscales, scale2, offset, levels, rows, cols, bits, block_size,
                     scale_bits, scale_block_size, dtype):
    _same_device("dequantize", qcodes=qcodes, qscales=qscales, scale2=scale2, offset=offset,
                 levels=levels)
    torch._check(qcodes.numel() == _cdiv(rows * cols, 32) * bits,
                 lambda: "lqlora.dequantize: qcodes does not match the weight shape")
    return qcodes.new_empty((rows, cols), dtype=dtype)


# ------------------------------------------------------------------------------ qmatmul
def qmatmul(x: Tensor, qcodes: Tensor, qscales: Tensor, scale2: Tensor, offset: Tensor,
            levels: Tensor, rows: int, bits: int, block_size: int, scale_bits: int,
            scale_block_size: int, lora_a: Optional[Tensor] = None,
            lora_b: Optional[Tensor] = None, lora_scale: float = 1.0) -> Tensor:
    """``x [M, K] @ W^T (+ lora_scale * (x @ lora_a^T) @ lora_b^T)`` -> ``[M, rows]`` in
    x's dtype, ``W [rows, K]`` packed. ``lora_a [r, K]``, ``lora_b [rows, r]``."""
    return _ops.qmatmul(x, qcodes, qscales, scale2, offset, levels, rows, bits, block_size,
                        scale_bits, scale_block_size, lora_a, lora_b, float(lora_scale))


def _qmatmul_fake(x, qcodes, qscales, scale2, offset, levels, rows, bits, block_size,
                  scale_bits, scale_block_size, lora_a, lora_b, lora_scale):
    _same_device("qmatmul", x=x, qcodes=qcodes, qscales=qscales, scale2=scale2, offset=offset,
                 levels=levels, lora_a=lora_a, lora_b=lora_b)
    torch._check(x.dim() == 2, lambda: f"lqlora.qmatmul: x must be 2-D [M, K], got {x.dim()}-D")
    torch._check(qcodes.numel() == _cdiv(rows * x.shape[1], 32) * bits,
                 lambda: "lqlora.qmatmul: x's inner size does not match the packed weight")
    torch._check((lora_a is None) == (lora_b is None),
                 lambda: "lqlora.qmatmul: lora_a and lora_b must be given together")
    return x.new_empty((x.shape[0], rows))


def qmatmul_t(g: Tensor, qcodes: Tensor, qscales: Tensor, scale2: Tensor, offset: Tensor,
              levels: Tensor, cols: int, bits: int, block_size: int, scale_bits: int,
              scale_block_size: int) -> Tensor:
    """``g [M, rows] @ W`` -> ``[M, cols]`` in g's dtype (qmatmul's input gradient)."""
    return _ops.qmatmul_t(g, qcodes, qscales, scale2, offset, levels, cols, bits, block_size,
                          scale_bits, scale_block_size)


def _qmatmul_t_fake(g, qcodes, qscales, scale2, offset, levels, cols, bits, block_size,
                    scale_bits, scale_block_size):
    _same_device("qmatmul_t", g=g, qcodes=qcodes, qscales=qscales, scale2=scale2,
                 offset=offset, levels=levels)
    torch._check(g.dim() == 2, lambda: f"lqlora.qmatmul_t: g must be 2-D, got {g.dim()}-D")
    torch._check(qcodes.numel() == _cdiv(g.shape[1] * cols, 32) * bits,
                 lambda: "lqlora.qmatmul_t: g's inner size does not match the packed weight")
    return g.new_empty((g.shape[0], cols))


def _qmatmul_setup(ctx, inputs, output):
    x, qcodes, qscales, scale2, offset, levels, rows, bits, bs, sbits, sbs, a, b, s = inputs
    ctx.meta = (x.shape[1], bits, bs, sbits, sbs, s)
    ctx.save_for_backward(x, qcodes, qscales, scale2, offset, levels, a, b)


def _qmatmul_backward_with(qmatmul_t_op):
    """qmatmul's backward, with the input gradient through ``qmatmul_t_op`` of the same
    operator namespace (lqlora, or lqlora_emu for the emulated CUDA kernels)."""
    def backward(ctx, grad):
        return _qmatmul_backward(ctx, grad, qmatmul_t_op)
    return backward


def _qmatmul_backward(ctx, grad, qmatmul_t_op):
    x, qcodes, qscales, scale2, offset, levels, a, b = ctx.saved_tensors
    cols, bits, bs, sbits, sbs, s = ctx.meta
    gx = ga = gb = None
    if ctx.needs_input_grad[0]:
        gx = qmatmul_t_op(grad, qcodes, qscales, scale2, offset, levels, cols, bits, bs, sbits,
                          sbs)
    if a is not None:
        gb_proj = grad @ b.to(grad.dtype)                 # [M, r]
        if ctx.needs_input_grad[0]:
            gx = gx + s * (gb_proj @ a.to(grad.dtype)).to(gx.dtype)
        if ctx.needs_input_grad[11]:
            ga = (s * gb_proj.t() @ x.to(grad.dtype)).to(a.dtype)        # [r, K]
        if ctx.needs_input_grad[12]:
            gb = (s * grad.t() @ (x @ a.to(x.dtype).t()).to(grad.dtype)).to(b.dtype)  # [N, r]
    return gx, None, None, None, None, None, None, None, None, None, None, ga, gb, None




# --------------------------------------------------------------------------------- rsvd
def rsvd(a: Tensor, rank: int, oversample: int = 10, niter: int = 2, seed: int = 0,
         init: Optional[Tensor] = None):
    """Seeded randomized SVD of ``a [..., m, n]`` (fp32/fp64).

    Returns ``U [..., m, rank]``, ``S [..., rank]``, ``V [..., n, rank]`` with
    ``a ≈ U diag(S) V^T``. ``init [..., n, min(rank + oversample, m, n)]`` replaces the
    Gaussian sketch (warm start). Same inputs and seed give the same outputs.
    """
    return _ops.rsvd(a, rank, oversample, niter, seed, init)


def _rsvd_fake(a, rank, oversample, niter, seed, init):
    torch._check(a.dim() >= 2, lambda: "lqlora.rsvd: input must be [..., m, n]")
    *batch, m, n = a.shape
    return (a.new_empty((*batch, m, rank)), a.new_empty((*batch, rank)),
            a.new_empty((*batch, n, rank)))


def rsvd_sketch(a: Tensor, k: int, seed: int = 0) -> Tensor:
    """The Gaussian sketch ``Omega [..., n, k]`` that :func:`rsvd` starts from for
    ``a [..., m, n]`` (``k = min(rank + oversample, m, n)``), in ``a``'s dtype (fp32/fp64)
    on ``a``'s device; ``a``'s values are not read. Philox4x32-10 counters and Box-Muller in
    fp64 (csrc/include/lqlora/gaussian.h): the same bits on every device for one seed.
    """
    return _ops.rsvd_sketch(a, k, seed)


def _rsvd_sketch_fake(a, k, seed):
    torch._check(a.dim() >= 2, lambda: "lqlora.rsvd_sketch: input must be [..., m, n]")
    return a.new_empty((*a.shape[:-2], a.shape[-1], k))


# ------------------------------------------------------------------------- registration
_FAKES = {"quantize": _quantize_fake, "unpack_scales": _unpack_scales_fake,
          "dequantize": _dequantize_fake, "qmatmul": _qmatmul_fake, "qmatmul_t": _qmatmul_t_fake,
          "rsvd": _rsvd_fake, "rsvd_sketch": _rsvd_sketch_fake}


def register_python_parts(namespace: str) -> None:
    """Fake kernels and qmatmul's autograd for the operators of ``namespace``: ``lqlora``
    here, ``lqlora_emu`` (the same schemas, emulated CUDA kernels) from :mod:`.emu`."""
    ops = getattr(torch.ops, namespace)
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"{namespace}::{name}", fake)
    torch.library.register_autograd(f"{namespace}::qmatmul",
                                    _qmatmul_backward_with(ops.qmatmul_t),
                                    setup_context=_qmatmul_setup)


register_python_parts("lqlora")
