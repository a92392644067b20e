"""Pure-PyTorch reference of every lqlora operator: the test oracle and the spec in code.

Same signatures and outputs as :mod:`lqlora_ext.ops`; slow, simple, device-agnostic.
Numerics follow docs/format.md exactly (fp32, round-half-even, midpoint code search).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack 1-D integer ``codes`` (< 2**bits) into int32 words, 32-code groups
    (docs/format.md)."""
    n = codes.numel()
    ng = _cdiv(n, 32)
    c = torch.zeros(ng * 32, dtype=torch.int64, device=codes.device)
    c[:n] = codes.to(torch.int64)
    idx = torch.arange(ng * 32, device=codes.device)
    bitpos = (idx % 32) * bits
    word = (idx // 32) * bits + bitpos // 32
    sh = bitpos % 32
    words = torch.zeros(ng * bits + 1, dtype=torch.int64, device=codes.device)
    words.scatter_add_(0, word, (c << sh) & 0xFFFFFFFF)
    spill = (sh + bits > 32)
    words.scatter_add_(0, word[spill] + 1, c[spill] >> (32 - sh[spill]))
    words = words[:-1]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(words: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack`: the first ``n`` codes as int64."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, w.new_zeros(1)])
    idx = torch.arange(n, device=words.device)
    bitpos = (idx % 32) * bits
    word = (idx // 32) * bits + bitpos // 32
    sh = bitpos % 32
    pair = w[word] | (w[word + 1] << 32)
    return (pair >> sh) & ((1 << bits) - 1)


def quantize(w: Tensor, levels: Tensor, bits: int, block_size: int, scale_bits: int,
             scale_block_size: int, scale_dtype: torch.dtype):
    wf = w.detach().to(torch.float32).reshape(-1)
    n = wf.numel()
    nb = _cdiv(n, block_size)
    ng = _cdiv(nb, scale_block_size)
    s1 = torch.nn.functional.pad(wf.abs(), (0, nb * block_size - n)).view(nb, block_size).amax(1)
    offset = s1.min()
    s2 = s1 - offset
    c = torch.nn.functional.pad(s2, (0, ng * scale_block_size - nb)).view(ng, -1).amax(1)
    c = c.to(scale_dtype).to(torch.float32)
    cj = c.repeat_interleave(scale_block_size)[:nb]
    L = float(2**scale_bits - 1)
    safe = torch.where(cj == 0, torch.ones_like(cj), cj)
    qs = torch.where(cj == 0, torch.zeros_like(cj), torch.round((s2 * L) / safe)).clamp(0, L)
    shat = (qs * cj) / L + offset
    sj = shat.repeat_interleave(block_size)[:n]
    x = torch.where(sj == 0, torch.zeros_like(wf), wf / torch.where(sj == 0, 1.0, sj))
    mids = (levels[1:] + levels[:-1]) / 2
    codes = torch.searchsorted(mids, x)  # = number of midpoints strictly below x
    return (pack(codes, bits), pack(qs.to(torch.int64), scale_bits), c.to(scale_dtype),
            offset.reshape(1))


def unpack_scales(qscales: Tensor, scale2: Tensor, offset: Tensor, nblocks: int,
                  scale_bits: int, scale_block_size: int) -> Tensor:
    qs = unpack(qscales, scale_bits, nblocks).to(torch.float32)
    cj = scale2.to(torch.float32).repeat_interleave(scale_block_size)[:nblocks]
    return (qs * cj) / float(2**scale_bits - 1) + offset.to(torch.float32)


def dequantize(qcodes, qscales, scale2, offset, levels, rows, cols, bits, block_size,
               scale_bits, scale_block_size, dtype=torch.float32) -> Tensor:
    n = rows * cols
    nb = _cdiv(n, block_size)
    s = unpack_scales(qscales, scale2, offset, nb, scale_bits, scale_block_size)
    codes = unpack(qcodes, bits, n)
    w = levels[codes] * s.repeat_interleave(block_size)[:n]
    return w.view(rows, cols).to(dtype)


def qmatmul(x, qcodes, qscales, scale2, offset, levels, rows, bits, block_size, scale_bits,
            scale_block_size, lora_a: Optional[Tensor] = None, lora_b: Optional[Tensor] = None,
            lora_scale: float = 1.0) -> Tensor:
    w = dequantize(qcodes, qscales, scale2, offset, levels, rows, x.shape[1], bits, block_size,
                   scale_bits, scale_block_size)
    xf = x.to(torch.float32)
    y = xf @ w.t()
    if lora_a is not None:
        y = y + lora_scale * (xf @ lora_a.float().t()) @ lora_b.float().t()
    return y.to(x.dtype)


def qmatmul_t(g, qcodes, qscales, scale2, offset, levels, cols, bits, block_size, scale_bits,
              scale_block_size) -> Tensor:
    w = dequantize(qcodes, qscales, scale2, offset, levels, g.shape[1], cols, bits, block_size,
                   scale_bits, scale_block_size)
    return (g.to(torch.float32) @ w).to(g.dtype)


def rsvd(a: Tensor, rank: int, oversample: int = 10, niter: int = 2, seed: int = 0,
         init: Optional[Tensor] = None):
    """Halko et al. randomized SVD with QR-stabilized power iterations; the Gaussian sketch
    is drawn on the CPU from ``seed`` (so results do not depend on the device)."""
    *batch, m, n = a.shape
    k = min(rank + oversample, m, n)
    if init is None:
        gen = torch.Generator().manual_seed(seed)
        init = torch.randn(*batch, n, k, generator=gen, dtype=a.dtype)
    omega = init.to(a.device, a.dtype)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(niter):
        q = torch.linalg.qr(a @ torch.linalg.qr(a.mT @ q).Q).Q
    ub, s, vh = torch.linalg.svd(q.mT @ a, full_matrices=False)
    return q @ ub[..., :rank], s[..., :rank], vh[..., :rank, :].mT
