"""Pure-PyTorch reference of every lqlora operator: the test oracle and the spec in code.

Same signatures and outputs as :mod:`lqlora_ext.ops`; slow, simple, device-agnostic.
Numerics follow docs/format.md exactly (fp32, round-half-even, midpoint code search).
"""
from __future__ import annotations

import math
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


_M32 = 0xFFFFFFFF


def _mulhilo32(a: int, c: Tensor):
    """(hi, lo) 32-bit words of the 64-bit product of the constant ``a`` and uint32 values
    ``c`` (int64 tensors), in 16-bit pieces so that no int64 product overflows."""
    ah, al = a >> 16, a & 0xFFFF
    ch, cl = c >> 16, c & 0xFFFF
    t = al * cl
    mid = ah * cl + al * ch + (t >> 16)
    return ah * ch + (mid >> 16), ((mid & 0xFFFF) << 16) | (t & 0xFFFF)


def _philox4x32_10(counter: Tensor, seed: int):
    """Philox4x32-10 (Salmon et al. 2011) of the 64-bit ``counter`` (int64 tensor, with zero
    upper words) under the 64-bit key ``seed``: four uint32 words as int64 tensors."""
    c0, c1 = counter & _M32, counter >> 32
    c2 = c3 = torch.zeros_like(counter)
    key = seed & 0xFFFFFFFFFFFFFFFF
    k0, k1 = key & _M32, key >> 32
    for _ in range(10):
        h0, l0 = _mulhilo32(0xD2511F53, c0)
        h1, l1 = _mulhilo32(0xCD9E8D57, c2)
        c0, c1, c2, c3 = h1 ^ c1 ^ k0, l1, h0 ^ c3 ^ k1, l0
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def _horner(z: Tensor, coeffs) -> Tensor:
    """sum_j coeffs[j] z^j, one rounding per multiply and per add (no fused multiply-add)."""
    p = torch.full_like(z, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        p = p * z + c
    return p


_LOG_C = [1 / (2 * j + 1) for j in range(11)]
_SIN_C = [float.fromhex(h) for h in (
    "-0x1.5555555555555p-3", "0x1.1111111111111p-7", "-0x1.a01a01a01a01ap-13",
    "0x1.71de3a556c734p-19", "-0x1.ae64567f544e4p-26", "0x1.6124613a86d09p-33",
    "-0x1.ae7f3e733b81fp-41", "0x1.952c77030ad4ap-49")]
_COS_C = [float.fromhex(h) for h in (
    "-0x1.0p-1", "0x1.5555555555555p-5", "-0x1.6c16c16c16c17p-10", "0x1.a01a01a01a01ap-16",
    "-0x1.27e4fb7789f5cp-22", "0x1.1eed8eff8d898p-29", "-0x1.93974a8c07c9dp-37",
    "0x1.ae7f3e733b81fp-45", "-0x1.6827863b97d97p-53")]


def rsvd_sketch(a: Tensor, k: int, seed: int = 0) -> Tensor:
    """The Gaussian sketch ``[..., n, k]`` of ``a [..., m, n]``, bit for bit as
    csrc/include/lqlora/gaussian.h draws it (Philox4x32-10 counters, Box-Muller with the
    same series for ln and sin/cos, fp64, each operation rounded on its own)."""
    shape = (*a.shape[:-2], a.shape[-1], k)
    count = math.prod(shape)
    pair = torch.arange((count + 1) // 2, dtype=torch.int64)
    x0, x1, x2, x3 = _philox4x32_10(pair, seed)
    v = ((x0 << 21) | (x1 >> 11)) + 1                              # [1, 2^53]
    mant, ex = torch.frexp(v.to(torch.float64))                    # v = mant 2^ex, [0.5, 1)
    m, e = mant * 2, ex.to(torch.int64) - 1
    big = m > float.fromhex("0x1.6a09e667f3bcdp+0")
    m, e = torch.where(big, m * 0.5, m), e + big.to(torch.int64)
    s = (m - 1) / (m + 1)
    ln = (e - 53).to(torch.float64) * float.fromhex("0x1.62e42fefa39efp-1") + \
        (s * 2) * _horner(s * s, _LOG_C)
    # math.sqrt, not torch.sqrt: torch's vectorized fp64 sqrt is not correctly rounded.
    rad = torch.tensor([math.sqrt(t) for t in (ln * -2.0).tolist()], dtype=torch.float64)
    octant = x2 >> 29
    f = (((x2 & 0x1FFFFFFF) << 24) | (x3 >> 8)).to(torch.float64) * 2.0 ** -53
    odd = (octant & 1).bool()
    x = torch.where(odd, 1.0 - f, f) * float.fromhex("0x1.921fb54442d18p-1")
    z = x * x
    sn = x + (x * z) * _horner(z, _SIN_C)
    cs = z * _horner(z, _COS_C) + 1.0
    sp, cp = torch.where(odd, cs, sn), torch.where(odd, sn, cs)   # sin, cos of phi
    q = octant >> 1
    ct = torch.where(q == 0, cp, torch.where(q == 1, -sp, torch.where(q == 2, -cp, sp)))
    st = torch.where(q == 0, sp, torch.where(q == 1, cp, torch.where(q == 2, -sp, -cp)))
    out = torch.stack([rad * ct, rad * st], dim=-1).reshape(-1)[:count]
    return out.reshape(shape).to(a.dtype).to(a.device)


def rsvd(a: Tensor, rank: int, oversample: int = 10, niter: int = 2, seed: int = 0,
         init: Optional[Tensor] = None):
    """Halko et al. randomized SVD with QR-stabilized power iterations, from the sketch of
    :func:`rsvd_sketch` (so results do not depend on the device)."""
    *batch, m, n = a.shape
    k = min(rank + oversample, m, n)
    if init is None:
        init = rsvd_sketch(a, k, seed)
    omega = init.to(a.device, a.dtype)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(niter):
        q = torch.linalg.qr(a @ torch.linalg.qr(a.mT @ q).Q).Q
    ub, s, vh = torch.linalg.svd(q.mT @ a, full_matrices=False)
    return q @ ub[..., :rank], s[..., :rank], vh[..., :rank, :].mT
