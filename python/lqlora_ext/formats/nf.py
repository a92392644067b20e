"""Quantization configs, NormalFloat code books and the packed ``NFTensor`` storage class.

The storage contract is docs/format.md (format version 1); :class:`NFTensor` documents it.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from .. import ops

FORMAT_NAME = "lqlora-nf"
FORMAT_VERSION = 1

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPE_BITS = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 16}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
BLOCK_SIZES = (16, 32, 64, 128, 256)
SCALE_BITS = (2, 3, 4, 8)
SCALE_BLOCK_SIZES = (16, 64, 256)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """One quantization configuration (b, B0, b0, B1, b1) of METHOD.md §1.

    bits: bits per weight code (2..8). block_size: weights sharing one absmax scale (B0).
    scale_bits: bits per quantized first-level scale (b0). scale_block_size: first-level
    scales sharing one second-level scale (B1). scale_dtype: storage dtype of the
    second-level scales (b1).
    """

    bits: int
    block_size: int = 64
    scale_bits: int = 8
    scale_block_size: int = 256
    scale_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        # Exact types: 64.0 == 64 and True == 1 in Python, so a membership test alone would
        # accept QuantConfig(block_size=64.0) and fail much later in a kernel.
        for field in ("bits", "block_size", "scale_bits", "scale_block_size"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"QuantConfig: {field} must be an int, got "
                                 f"{type(v).__name__} {v!r}")
            object.__setattr__(self, field, int(v))  # numpy ints: a plain int, hashable alike
        if not 2 <= self.bits <= 8:
            raise ValueError(f"QuantConfig: bits must be an integer in 2..8, got {self.bits!r}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"QuantConfig: block_size must be one of {BLOCK_SIZES}, "
                             f"got {self.block_size!r}")
        if self.scale_bits not in SCALE_BITS:
            raise ValueError(f"QuantConfig: scale_bits must be one of {SCALE_BITS}, "
                             f"got {self.scale_bits!r}")
        if self.scale_block_size not in SCALE_BLOCK_SIZES:
            raise ValueError(f"QuantConfig: scale_block_size must be one of "
                             f"{SCALE_BLOCK_SIZES}, got {self.scale_block_size!r}")
        if not isinstance(self.scale_dtype, torch.dtype) or self.scale_dtype not in _DTYPE_BITS:
            raise ValueError("QuantConfig: scale_dtype must be torch.float32, torch.float16 or "
                             f"torch.bfloat16, got {self.scale_dtype!r}")

    @property
    def bits_per_param(self) -> float:
        """Storage in bits per weight: b + b0/B0 + bits(b1)/(B0*B1)."""
        return (self.bits + self.scale_bits / self.block_size
                + _DTYPE_BITS[self.scale_dtype] / (self.block_size * self.scale_block_size))

    @property
    def name(self) -> str:
        """Short readable id, e.g. ``nf4-b64-s8x256-fp32``."""
        dt = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[
            _DTYPE_NAMES[self.scale_dtype]]
        return f"nf{self.bits}-b{self.block_size}-s{self.scale_bits}x{self.scale_block_size}-{dt}"

    def to_dict(self) -> Dict[str, Any]:
        return {"bits": self.bits, "block_size": self.block_size, "scale_bits": self.scale_bits,
                "scale_block_size": self.scale_block_size,
                "scale_dtype": _DTYPE_NAMES[self.scale_dtype]}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "QuantConfig":
        """Inverse of :meth:`to_dict`. Strict: every field present with its exact JSON type
        (``bits: 4.7`` or ``"4"`` is refused, not rounded), no unknown fields."""
        fields = ("bits", "block_size", "scale_bits", "scale_block_size", "scale_dtype")
        if not isinstance(d, dict):
            raise ValueError(f"QuantConfig.from_dict: expected an object with fields "
                             f"{list(fields)}, got {type(d).__name__}")
        missing = [k for k in fields if k not in d]
        unknown = sorted(set(d) - set(fields))
        if missing or unknown:
            raise ValueError(f"QuantConfig.from_dict: "
                             + (f"missing fields {missing}" if missing else "")
                             + ("; " if missing and unknown else "")
                             + (f"unknown fields {unknown}" if unknown else ""))
        if d["scale_dtype"] not in _NAME_DTYPES:
            raise ValueError(f"QuantConfig.from_dict: scale_dtype must be one of "
                             f"{sorted(_NAME_DTYPES)}, got {d['scale_dtype']!r}")
        try:
            return cls(d["bits"], d["block_size"], d["scale_bits"], d["scale_block_size"],
                       _NAME_DTYPES[d["scale_dtype"]])
        except ValueError as e:
            raise ValueError(str(e).replace("QuantConfig:", "QuantConfig.from_dict:")) from None


@functools.lru_cache(maxsize=None)
def _nf_code_cpu(bits: int) -> Tensor:
    # bitsandbytes' create_normal_map, generalized to any width and reproduced operation by
    # operation (float32 quantile grids from p down to 0.5, the inverse normal CDF in
    # float64, the negative half as -ppf of the upper quantiles, the normalization in
    # float32), so that NF4 is bit-identical to its table, not merely close.
    # Explicit device: the first call may happen under a default-device context (e.g.
    # transformers building a model on "meta"), and the cached table must be real.
    p, cpu = 0.9677083, torch.device("cpu")
    half = 2 ** (bits - 1)
    pos = torch.linspace(p, 0.5, half + 1, dtype=torch.float32, device=cpu)[:-1]
    neg = torch.linspace(p, 0.5, half, dtype=torch.float32, device=cpu)[:-1]
    ppf = lambda q: torch.special.ndtri(q.to(torch.float64)).to(torch.float32)  # noqa: E731
    v = torch.cat([ppf(pos), torch.zeros(1, device=cpu), -ppf(neg)]).sort().values
    return v / v.max()


def nf_code(bits: int) -> Tensor:
    """The ``2**bits`` NormalFloat levels (fp32, ascending, exact 0, in [-1, 1]).

    QLoRA's construction generalized to any width (METHOD.md §1); NF4 equals the
    bitsandbytes table.
    """
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"nf_code: bits must be an integer in 2..8, got {bits!r}")
    return _nf_code_cpu(bits).clone()


def packed_sizes(numel: int, config: QuantConfig):
    """Element counts ``(qcodes, qscales, scale2)`` of a packed weight with ``numel``
    elements (docs/format.md): 32-code groups of ``bits`` int32 words, likewise for the
    scale codes, one second-level scale per ``scale_block_size`` blocks."""
    nb = -(-numel // config.block_size)
    return (-(-numel // 32) * config.bits, -(-nb // 32) * config.scale_bits,
            -(-nb // config.scale_block_size))


class NFTensor:
    """A 2-D weight ``[rows, cols]`` stored as blockwise NormalFloat with double-quantized
    scales (docs/format.md, format version 1).

    Fields (all on one device): ``qcodes`` int32 ``[ceil(rows*cols/32)*bits]``,
    ``qscales`` int32 ``[ceil(nblocks/32)*scale_bits]``, ``scale2`` ``[ngroups]`` in
    ``config.scale_dtype``, ``offset`` fp32 ``[1]``, and ``levels`` fp32 ``[2**bits]``
    (derived from ``bits``; not part of the serialized state). Frozen: it carries no
    gradient. ``nbytes`` counts the four stored tensors.
    """

    __slots__ = ("qcodes", "qscales", "scale2", "offset", "levels", "shape", "config")

    def __init__(self, qcodes: Tensor, qscales: Tensor, scale2: Tensor, offset: Tensor,
                 shape, config: QuantConfig, levels: Optional[Tensor] = None):
        self.qcodes, self.qscales, self.scale2, self.offset = qcodes, qscales, scale2, offset
        self.shape = torch.Size(shape)
        self.config = config
        self.levels = (nf_code(config.bits).to(qcodes.device) if levels is None else levels)

    # -- geometry -----------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.config.block_size)

    @property
    def device(self) -> torch.device:
        return self.qcodes.device

    @property
    def nbytes(self) -> int:
        """True storage in bytes of the packed tensors."""
        return sum(t.numel() * t.element_size()
                   for t in (self.qcodes, self.qscales, self.scale2, self.offset))

    def _args(self):
        return (self.qcodes, self.qscales, self.scale2, self.offset, self.levels)

    # -- conversion ---------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense ``[rows, cols]`` reconstruction in ``dtype``."""
        c = self.config
        return ops.dequantize(*self._args(), self.shape[0], self.shape[1], c.bits, c.block_size,
                              c.scale_bits, c.scale_block_size, dtype)

    def scales(self) -> Tensor:
        """Decoded fp32 first-level scales ``[nblocks]``."""
        c = self.config
        return ops.unpack_scales(self.qscales, self.scale2, self.offset, self.nblocks,
                                 c.scale_bits, c.scale_block_size)

    def to(self, device) -> "NFTensor":
        return NFTensor(*(t.to(device) for t in (self.qcodes, self.qscales, self.scale2,
                                                 self.offset)),
                        self.shape, self.config, self.levels.to(device))

    def __repr__(self) -> str:
        return (f"NFTensor(shape={tuple(self.shape)}, config={self.config.name}, "
                f"bits_per_param={self.config.bits_per_param:.4f}, nbytes={self.nbytes}, "
                f"device={self.device})")

    # -- serialization ------------------------------------------------------------------
    def metadata(self) -> Dict[str, Any]:
        """JSON-able description (format, version, shape, config)."""
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "shape": list(self.shape),
                **self.config.to_dict()}

    def state_dict(self) -> Dict[str, Tensor]:
        """Plain tensors (safetensors-friendly). ``meta`` is an int64 tensor
        ``[version, rows, cols, bits, block_size, scale_bits, scale_block_size, dtype_bits]``
        so a state dict describes itself; :meth:`metadata` gives the same as JSON."""
        c = self.config
        meta = torch.tensor([FORMAT_VERSION, self.shape[0], self.shape[1], c.bits, c.block_size,
                             c.scale_bits, c.scale_block_size,
                             _DTYPE_CODES[c.scale_dtype]], dtype=torch.int64)
        return {"qcodes": self.qcodes, "qscales": self.qscales, "scale2": self.scale2,
                "offset": self.offset, "meta": meta}

    @classmethod
    def from_state_dict(cls, state: Dict[str, Tensor],
                        metadata: Optional[Dict[str, Any]] = None) -> "NFTensor":
        """Rebuild from :meth:`state_dict` output, refusing other format versions and any
        tensor whose dtype or length disagrees with the described shape/config."""
        missing = [k for k in ("qcodes", "qscales", "scale2", "offset", "meta") if k not in state]
        if missing:
            raise ValueError(f"NFTensor.from_state_dict: missing keys {missing}")
        meta = state["meta"].tolist()
        if len(meta) != 8:
            raise ValueError(f"NFTensor.from_state_dict: corrupt 'meta' tensor {meta}")
        version, rows, cols, bits, bs, sbits, sbs, dcode = meta
        if version != FORMAT_VERSION:
            raise ValueError(f"NFTensor.from_state_dict: format version {version} is not "
                             f"supported (this lqlora_ext reads version {FORMAT_VERSION})")
        if dcode not in _CODE_DTYPES:
            raise ValueError(f"NFTensor.from_state_dict: unknown scale dtype code {dcode}")
        config = QuantConfig(bits, bs, sbits, sbs, _CODE_DTYPES[dcode])
        if metadata is not None:
            want = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "shape": [rows, cols],
                    **config.to_dict()}
            diff = {k: (metadata.get(k), v) for k, v in want.items() if metadata.get(k) != v}
            if diff:
                raise ValueError(f"NFTensor.from_state_dict: metadata disagrees with the "
                                 f"tensors: {diff}")
        n_codes, n_scales, n_groups = packed_sizes(rows * cols, config)
        expect = {"qcodes": (torch.int32, n_codes), "qscales": (torch.int32, n_scales),
                  "scale2": (config.scale_dtype, n_groups), "offset": (torch.float32, 1)}
        for k, (dt, length) in expect.items():
            t = state[k]
            if t.dtype != dt or t.dim() != 1 or t.numel() != length:
                raise ValueError(
                    f"NFTensor.from_state_dict: '{k}' should be {dt} with {length} elements "
                    f"for a [{rows}, {cols}] {config.name} weight, got {t.dtype} "
                    f"{tuple(t.shape)} (corrupt or mismatched checkpoint)")
        if not torch.isfinite(state["offset"]).all() or not torch.isfinite(
                state["scale2"].float()).all():
            raise ValueError("NFTensor.from_state_dict: non-finite scales (corrupt checkpoint)")
        return cls(state["qcodes"].contiguous(), state["qscales"].contiguous(),
                   state["scale2"].contiguous(), state["offset"].contiguous(), (rows, cols),
                   config)


_DTYPE_CODES = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 17}
_MAX_ABS = torch.finfo(torch.float32).max / 512
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


def quantize(w: Tensor, config: QuantConfig) -> NFTensor:
    """Quantize a 2-D floating weight ``[rows, cols]`` to an :class:`NFTensor`.

    Raises ``ValueError``/``TypeError`` naming the problem for non-2-D, empty, integer or
    non-finite weights (NaN/Inf: the message gives the first bad position).
    """
    if not isinstance(w, Tensor):
        raise TypeError(f"quantize: expected a torch.Tensor, got {type(w).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"quantize: config must be a QuantConfig, got {type(config).__name__}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"quantize: weight must be a floating tensor, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"quantize: weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"quantize: weight is empty, shape {tuple(w.shape)}")
    if w.device.type != "meta":
        # One pass, no |w| temporary (aminmax: ~9x faster than abs().max() on the CPU, a
        # third of the bytes on a GPU); NaN propagates.
        lo, hi = torch.stack(torch.aminmax(w.detach())).tolist()  # one sync
        amax = max(-lo, hi)
        # The scale arithmetic multiplies by up to 255 (2^8 - 1) in fp32.
        if amax > _MAX_ABS and amax != float("inf"):  # NaN/Inf: the kernel names the spot
            raise ValueError(f"quantize: weight magnitude {amax:.4g} is too large for fp32 "
                             f"scale arithmetic (limit {_MAX_ABS:.4g})")
    levels = nf_code(config.bits).to(w.device)
    c = config
    packed = ops.quantize(w.detach(), levels, c.bits, c.block_size, c.scale_bits,
                          c.scale_block_size, c.scale_dtype)
    if w.device.type != "meta" and c.scale_dtype != torch.float32 and \
            not bool(torch.isfinite(packed[2]).all()):
        raise ValueError(f"quantize: a second-level scale overflows {c.scale_dtype} (block "
                         f"absmax spread {float(w.detach().abs().max()):.4g}); use "
                         "scale_dtype=torch.bfloat16 or torch.float32")
    return NFTensor(*packed, w.shape, config, levels)


