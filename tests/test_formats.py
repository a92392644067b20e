"""Storage format (docs/format.md): NF tables, QuantConfig, the quantize / unpack_scales /
dequantize kernels bit-exact against lqlora_ext.ops.reference, packing, the packed-size bound,
NFTensor serialization and refusal of bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch

import lqlora_ext as L
from lqlora_ext import ops
from lqlora_ext.ops import reference as R
from lqlora_ext.formats import NFTensor

import grid
import shapes

# bitsandbytes' NF4 table (bitsandbytes/functional.py, get_4bit_type("nf4")), fp32.
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]

# METHOD.md §1 known values (7 decimals).
KNOWN = {
    2: [-1, 0, 0.3379152, 1],
    3: [-1, -0.4786292, -0.2171418, 0, 0.1609302, 0.3379152, 0.5626169, 1],
    4: [-1, -0.6961929, -0.5250730, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0,
        0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626169, 0.7229568, 1],
}



def _config_args(c):
    return (c.bits, c.block_size, c.scale_bits, c.scale_block_size)


def _assert_packed_equal(got, want):
    for name, g, w in zip(("qcodes", "qscales", "scale2", "offset"), got, want):
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != reference {w.dtype}"
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != reference {tuple(w.shape)}"
        if not torch.equal(g, w):
            bad = (g != w).nonzero()[:5].flatten().tolist()
            raise AssertionError(f"{name} differs from the reference at indices {bad}")


def _quantize_both(w, c):
    lv = L.nf_code(c.bits)
    args = (lv, *_config_args(c), c.scale_dtype)
    return ops.quantize(w, *args), R.quantize(w, *args), lv


# ------------------------------------------------------------------------------- NF tables
@pytest.mark.parametrize("bits", [2, 3, 4], ids=lambda b: f"nf{b}")
def test_nf_code_known_values(bits):
    torch.testing.assert_close(L.nf_code(bits), torch.tensor(KNOWN[bits]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", range(2, 9), ids=lambda b: f"nf{b}")
def test_nf_code_structure(bits):
    v = L.nf_code(bits)
    assert v.dtype == torch.float32 and v.shape == (2**bits,)
    assert v[0] == -1 and v[-1] == 1 and (v == 0).sum() == 1
    assert (v[1:] > v[:-1]).all(), "levels must be strictly ascending"
    assert (v > 0).sum() == (v < 0).sum() + 1, "one more positive level than negative ones"
    v[0] = 5  # nf_code hands out a copy: the cached table must not change
    assert L.nf_code(bits)[0] == -1


def test_nf4_bit_identical_to_bitsandbytes_table():
    assert torch.equal(L.nf_code(4), torch.tensor(BNB_NF4, dtype=torch.float32))


def test_nf4_bitsandbytes_table_transcribed_correctly():
    """The hard-coded table above is bitsandbytes' own (checked when it is installed)."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(bnbf.get_4bit_type("nf4", device="cpu").float(),
                       torch.tensor(BNB_NF4, dtype=torch.float32))


@pytest.mark.parametrize("bad", [1, 9, 4.0, "4"])
def test_nf_code_rejects_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        L.nf_code(bad)


# ----------------------------------------------------------------------------- QuantConfig
def test_bits_per_param_default():
    assert grid.DEFAULT.bits_per_param == 4.126953125
    assert L.QuantConfig(3).bits_per_param == 3.126953125


@pytest.mark.parametrize("c", grid.SAMPLE, ids=grid.ids(grid.SAMPLE))
def test_bits_per_param_formula_and_dict_round_trip(c):
    dbits = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 16}[c.scale_dtype]
    assert c.bits_per_param == c.bits + c.scale_bits / c.block_size + dbits / (
        c.block_size * c.scale_block_size)
    assert L.QuantConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize("kwargs, field", [
    (dict(bits=1), "bits"), (dict(bits=9), "bits"), (dict(bits=4.0), "bits"),
    (dict(bits=4, block_size=48), "block_size"), (dict(bits=4, block_size=512), "block_size"),
    (dict(bits=4, scale_bits=5), "scale_bits"), (dict(bits=4, scale_bits=16), "scale_bits"),
    (dict(bits=4, scale_block_size=32), "scale_block_size"),
    (dict(bits=4, scale_dtype=torch.float64), "scale_dtype"),
    (dict(bits=4, scale_dtype=torch.int8), "scale_dtype"),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={v}" for k, v in v.items()))
def test_quant_config_rejects_unsupported(kwargs, field):
    with pytest.raises(ValueError, match=field):
        L.QuantConfig(**kwargs)


def test_quant_config_from_dict_missing_field():
    d = grid.DEFAULT.to_dict()
    del d["scale_bits"]
    with pytest.raises(ValueError, match="scale_bits"):
        L.QuantConfig.from_dict(d)


# ------------------------------------------------------------- kernels vs reference, bit-exact
FULL_SHAPE = shapes.BY_NAME["odd"]  # 53x100: ragged last block and group for every config


@pytest.mark.parametrize("c", grid.FULL, ids=grid.ids(grid.FULL))
def test_quantize_dequantize_bit_exact_full_grid(c):
    w = grid.make_weight(*FULL_SHAPE, seed=c.bits)
    got, want, lv = _quantize_both(w, c)
    _assert_packed_equal(got, want)
    if c.bits == 4:  # unpack_scales does not depend on bits: check it once per scale config
        nb = -(-w.numel() // c.block_size)
        assert torch.equal(ops.unpack_scales(got[1], got[2], got[3], nb, c.scale_bits,
                                             c.scale_block_size),
                           R.unpack_scales(got[1], got[2], got[3], nb, c.scale_bits,
                                           c.scale_block_size))
    dense = ops.dequantize(*got, lv, *FULL_SHAPE, *_config_args(c))
    assert torch.equal(dense, R.dequantize(*got, lv, *FULL_SHAPE, *_config_args(c)))


@pytest.mark.parametrize("i, shape", [
    pytest.param(i, s, id=s.id, marks=[pytest.mark.slow] if s.slow else [])
    for i, s in enumerate(shapes.ALL)])
def test_quantize_dequantize_bit_exact_shapes(i, shape):
    """Default NF4 on every shape, plus one diagonal-walk config on each cheap one."""
    configs = [grid.DEFAULT] + ([grid.diagonal(i)] if shape.numel <= 4 << 20 and
                                shape not in shapes.LLAMA2_7B else [])
    w = grid.make_weight(*shape, seed=i)
    for c in configs:
        got, want, lv = _quantize_both(w, c)
        _assert_packed_equal(got, want)
        out_dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
        dense = ops.dequantize(*got, lv, *shape, *_config_args(c), out_dtype)
        assert dense.dtype == out_dtype
        assert torch.equal(dense, R.dequantize(*got, lv, *shape, *_config_args(c), out_dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_quantize_low_precision_weights_bit_exact(dtype):
    w = grid.make_weight(96, 80, dtype=dtype)
    for c in grid.SAMPLE[:4]:
        got, want, _ = _quantize_both(w, c)
        _assert_packed_equal(got, want)


def test_quantize_non_contiguous_and_requires_grad():
    w = grid.make_weight(80, 96).t().requires_grad_()  # transposed view, a leaf with grad
    got, want, _ = _quantize_both(w, grid.DEFAULT)
    _assert_packed_equal(got, want)
    qw = L.quantize(w, grid.DEFAULT)
    _assert_packed_equal((qw.qcodes, qw.qscales, qw.scale2, qw.offset), want)


@pytest.mark.parametrize("name, make", [
    ("zeros", lambda: torch.zeros(40, 64)),
    ("constant", lambda: torch.full((40, 64), -0.75)),
    ("one-zero-block", lambda: torch.cat([torch.zeros(1, 64), torch.randn(39, 64)])),
    ("tiny-values", lambda: torch.randn(40, 64) * 1e-30),
    ("subnormal", lambda: torch.randn(40, 64) * 1e-40),
], ids=lambda v: v if isinstance(v, str) else "")
def test_quantize_degenerate_weights_bit_exact(name, make):
    w = make()
    for c in (grid.DEFAULT, L.QuantConfig(3, 16, 2, 16, torch.bfloat16)):
        got, want, lv = _quantize_both(w, c)
        _assert_packed_equal(got, want)
        dense = ops.dequantize(*got, lv, *w.shape, *_config_args(c))
        assert torch.isfinite(dense).all()
        if name in ("zeros", "constant"):
            assert torch.equal(dense, w), "exactly representable weights must round-trip"


@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"nf{b}")
def test_code_search_nearest_level_ties_to_lower(bits):
    """Every block's absmax is exactly 1, so the decoded scale is exactly 1 (offset 1, c 0)
    and w / scale == w: levels map to themselves, midpoints to the lower level, and values
    just above a midpoint to the upper one."""
    lv = L.nf_code(bits)
    mids = (lv[1:] + lv[:-1]) / 2
    above = torch.nextafter(mids, torch.tensor(2.0))
    vals = torch.cat([lv, mids, above])
    want_codes = torch.cat([torch.arange(lv.numel()), torch.arange(mids.numel()),
                            torch.arange(1, lv.numel())])
    block = 16
    per = block - 1  # each block: one -1 (pins absmax to 1) + 15 test values
    nblk = -(-vals.numel() // per)
    vals = torch.cat([vals, torch.zeros(nblk * per - vals.numel())])
    want_codes = torch.cat([want_codes, torch.full((nblk * per - want_codes.numel(),),
                                                   int((lv == 0).nonzero()))])
    w = torch.cat([-torch.ones(nblk, 1), vals.view(nblk, per)], 1)
    want = torch.cat([torch.zeros(nblk, 1, dtype=torch.long), want_codes.view(nblk, per)], 1)
    qc, qs, s2, off = ops.quantize(w, lv, bits, block, 8, 16, torch.float32)
    assert off.item() == 1.0 and (s2 == 0).all()
    codes = R.unpack(qc, bits, w.numel()).view_as(want)
    assert torch.equal(codes, want)
    dense = ops.dequantize(qc, qs, s2, off, lv, *w.shape, bits, block, 8, 16)
    assert torch.equal(dense, lv[want])


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_quality_improves_with_bits(bits):
    """SQNR on Gaussian weights grows by >= 4 dB per extra bit (about 6 dB in theory) and NF4
    clears 19 dB (blockwise NF4 on a Gaussian gives ~20.5 dB)."""
    w = grid.make_weight(256, 256)

    def sqnr(b):
        d = L.quantize(w, L.QuantConfig(b)).dequantize()
        return 10 * math.log10(w.pow(2).sum() / (w - d).pow(2).sum())

    if bits == 4:
        assert sqnr(4) > 19
    if bits < 8:
        assert sqnr(bits + 1) > sqnr(bits) + 4


# ----------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 31, 32, 33, 100, 1000])
def test_reference_pack_unpack_round_trip(bits, n):
    codes = torch.randint(0, 2**bits, (n,))
    words = R.pack(codes, bits)
    assert words.dtype == torch.int32 and words.numel() == -(-n // 32) * bits
    assert torch.equal(R.unpack(words, bits, n), codes)


def test_pack_layout_matches_format_doc():
    """Code i of a 32-code group sits at bits [i*k, i*k+k) of the group's little-endian
    32k-bit integer (docs/format.md), checked for k = 3 where codes straddle words."""
    codes = torch.arange(32) % 8
    words = R.pack(codes, 3)
    big = sum((int(wd) & 0xFFFFFFFF) << (32 * j) for j, wd in enumerate(words.tolist()))
    assert [(big >> (3 * i)) & 7 for i in range(32)] == codes.tolist()


# ----------------------------------------------------------------------- packed-size bound
@pytest.mark.parametrize("shape", shapes.params(shapes.REAL_FAST + shapes.LLAMA2_7B[:1]))
def test_nbytes_within_bound(shape):
    """Storage is bits_per_param * numel / 8 within 2% + 64 bytes (no row padding)."""
    w = grid.make_weight(*shape)
    for c in ([grid.DEFAULT, L.QuantConfig(3), L.QuantConfig(2, 16, 2, 16, torch.bfloat16),
               L.QuantConfig(8, 256, 8, 16, torch.float16)]
              if shape.numel < 4 << 20 else [grid.DEFAULT]):
        qw = L.quantize(w, c)
        ideal = c.bits_per_param * shape.numel / 8
        assert abs(qw.nbytes - ideal) <= 0.02 * ideal + 64, (c.name, qw.nbytes, ideal)


# ----------------------------------------------------------------------- NFTensor and state
def _nf(shape=(53, 100), c=grid.DEFAULT):
    return L.quantize(grid.make_weight(*shape), c)


@pytest.mark.parametrize("c", grid.SAMPLE, ids=grid.ids(grid.SAMPLE))
def test_state_dict_round_trip(c):
    qw = _nf(c=c)
    back = NFTensor.from_state_dict(qw.state_dict(), metadata=qw.metadata())
    assert back.config == c and back.shape == qw.shape
    for k in ("qcodes", "qscales", "scale2", "offset", "levels"):
        assert torch.equal(getattr(back, k), getattr(qw, k)), k
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert torch.equal(back.scales(), qw.scales())


def test_state_dict_round_trip_through_safetensors_file(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    qw = _nf(c=L.QuantConfig(3, 32, 4, 64, torch.bfloat16))
    path = tmp_path / "w.safetensors"
    st.save_file(qw.state_dict(), str(path), metadata={"lqlora": json.dumps(qw.metadata())})
    with open(path, "rb") as f:  # safetensors header: u64 length + JSON with __metadata__
        hlen = int.from_bytes(f.read(8), "little")
        meta = json.loads(json.loads(f.read(hlen))["__metadata__"]["lqlora"])
    back = NFTensor.from_state_dict(st.load_file(str(path)), metadata=meta)
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert meta == {"format": "lqlora-nf", "version": 1, "shape": [53, 100], "bits": 3,
                    "block_size": 32, "scale_bits": 4, "scale_block_size": 64,
                    "scale_dtype": "bfloat16"}


def _corrupt(edit):
    sd = dict(_nf().state_dict())
    edit(sd)
    return sd


def _set_meta(i, v):
    def edit(sd):
        m = sd["meta"].clone()
        m[i] = v
        sd["meta"] = m
    return edit


@pytest.mark.parametrize("name, edit, match", [
    ("version-2", _set_meta(0, 2), "version 2"),
    ("version-0", _set_meta(0, 0), "version 0"),
    ("bad-bits", _set_meta(3, 9), "bits"),
    ("bad-block-size", _set_meta(4, 48), "block_size"),
    ("bad-dtype-code", _set_meta(7, 64), "dtype"),
    ("shape-changed", _set_meta(1, 54), "qcodes"),
    ("missing-qscales", lambda sd: sd.pop("qscales"), "qscales"),
    ("missing-meta", lambda sd: sd.pop("meta"), "meta"),
    ("short-meta", lambda sd: sd.update(meta=sd["meta"][:7]), "meta"),
    ("truncated-qcodes", lambda sd: sd.update(qcodes=sd["qcodes"][:-1]), "qcodes"),
    ("qcodes-int64", lambda sd: sd.update(qcodes=sd["qcodes"].long()), "qcodes"),
    ("qscales-2d", lambda sd: sd.update(qscales=sd["qscales"].view(1, -1)), "qscales"),
    ("scale2-bf16", lambda sd: sd.update(scale2=sd["scale2"].bfloat16()), "scale2"),
    ("offset-nan", lambda sd: sd.update(offset=torch.tensor([float("nan")])), "non-finite"),
    ("scale2-inf", lambda sd: sd.update(scale2=torch.full_like(sd["scale2"], float("inf"))),
     "non-finite"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_from_state_dict_refuses(name, edit, match):
    with pytest.raises(ValueError, match=match):
        NFTensor.from_state_dict(_corrupt(edit))


@pytest.mark.parametrize("key, value", [
    ("format", "gguf"), ("version", 2), ("shape", [100, 53]), ("bits", 3),
    ("scale_dtype", "float16")])
def test_from_state_dict_refuses_disagreeing_metadata(key, value):
    qw = _nf()
    meta = {**qw.metadata(), key: value}
    with pytest.raises(ValueError, match=key):
        NFTensor.from_state_dict(qw.state_dict(), metadata=meta)


def test_nftensor_repr_and_to():
    qw = _nf()
    assert "nf4-b64-s8x256-fp32" in repr(qw) and "53, 100" in repr(qw)
    m = qw.to("meta")
    assert m.device.type == "meta" and m.levels.device.type == "meta" and m.config == qw.config


# ------------------------------------------------------------------------------ bad input
def test_quantize_rejects_integer_weights():
    for dt in (torch.int32, torch.int8, torch.bool):
        with pytest.raises(TypeError, match="floating"):
            L.quantize(torch.ones(4, 64, dtype=dt), grid.DEFAULT)
    with pytest.raises(TypeError, match="floating"):
        ops.quantize(torch.ones(4, 64, dtype=torch.int32), L.nf_code(4), 4, 64, 8, 256,
                     torch.float32)


@pytest.mark.parametrize("shape", [(64,), (2, 4, 8), ()], ids=["1d", "3d", "0d"])
def test_quantize_rejects_non_2d(shape):
    with pytest.raises(ValueError, match="2-D"):
        L.quantize(torch.randn(shape), grid.DEFAULT)
    with pytest.raises(ValueError, match="2-D"):
        ops.quantize(torch.randn(shape), L.nf_code(4), 4, 64, 8, 256, torch.float32)


@pytest.mark.parametrize("shape", [(0, 64), (64, 0)])
def test_quantize_rejects_empty(shape):
    with pytest.raises(ValueError, match="empty"):
        L.quantize(torch.randn(shape), grid.DEFAULT)
    with pytest.raises(ValueError, match="empty"):
        ops.quantize(torch.randn(shape), L.nf_code(4), 4, 64, 8, 256, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")],
                         ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("pos", [(0, 0), (37, 91), (52, 99)], ids=["first", "mid", "last"])
def test_quantize_rejects_non_finite_with_position(dtype, value, pos):
    w = grid.make_weight(53, 100, dtype=dtype)
    w[pos] = value
    later = pos[0] * 100 + pos[1] + 3
    if later < w.numel():
        w.view(-1)[later] = value  # a later bad value must not be the one reported
    with pytest.raises(ValueError, match=rf"NaN/Inf.*\[{pos[0]}, {pos[1]}\]"):
        L.quantize(w, grid.DEFAULT)


@pytest.mark.parametrize("args, match", [
    ((9, 64, 8, 256), "bits"), ((1, 64, 8, 256), "bits"),
    ((4, 48, 8, 256), "block_size"), ((4, 512, 8, 256), "block_size"),
    ((4, 64, 5, 256), "scale_bits"), ((4, 64, 8, 32), "scale_block_size"),
], ids=["bits9", "bits1", "bs48", "bs512", "sbits5", "sbs32"])
def test_ops_reject_unsupported_config(args, match):
    w = torch.randn(8, 64)
    lv = L.nf_code(min(max(args[0], 2), 8))
    with pytest.raises(ValueError, match=match):
        ops.quantize(w, lv, *args, torch.float32)
    qw = _nf((8, 64))
    with pytest.raises(ValueError, match=match):
        ops.dequantize(*qw._args(), 8, 64, *args)


def test_ops_reject_bad_scale_dtype_and_levels():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="scale_dtype"):
        ops.quantize(w, L.nf_code(4), 4, 64, 8, 256, torch.float64)
    with pytest.raises(ValueError, match="levels"):
        ops.quantize(w, L.nf_code(3), 4, 64, 8, 256, torch.float32)
    with pytest.raises(TypeError, match="levels"):
        ops.quantize(w, L.nf_code(4).double(), 4, 64, 8, 256, torch.float32)


def test_dequantize_rejects_mismatched_packed_tensors():
    qw = _nf((8, 64))
    args = list(qw._args())
    with pytest.raises(ValueError, match="qcodes"):
        ops.dequantize(*args, 8, 65, 4, 64, 8, 256)
    with pytest.raises(ValueError, match="qscales"):
        ops.dequantize(args[0], args[1][:-1], *args[2:], 8, 64, 4, 64, 8, 256)
    with pytest.raises(TypeError, match="scale2"):
        ops.dequantize(*args[:2], args[2].double(), *args[3:], 8, 64, 4, 64, 8, 256)
    with pytest.raises(TypeError, match="dtype"):
        ops.dequantize(*args, 8, 64, 4, 64, 8, 256, torch.int32)


def test_unpack_scales_rejects_bad_nblocks():
    qw = _nf((8, 64))
    with pytest.raises(ValueError, match="nblocks"):
        ops.unpack_scales(qw.qscales, qw.scale2, qw.offset, 0, 8, 256)
    with pytest.raises(ValueError, match="nblocks"):
        ops.unpack_scales(qw.qscales, qw.scale2, qw.offset, 1000, 8, 256)




def test_ops_quantize_rejects_levels_on_another_device():
    with pytest.raises((ValueError, RuntimeError), match="device|meta"):
        ops.quantize(torch.randn(8, 64), L.nf_code(4).to("meta"), 4, 64, 8, 256, torch.float32)


def test_ops_dequantize_rejects_tensors_on_different_devices():
    qw = _nf((8, 64))
    with pytest.raises((ValueError, RuntimeError), match="device|meta"):
        ops.dequantize(qw.qcodes, qw.qscales.to("meta"), qw.scale2, qw.offset, qw.levels,
                       8, 64, 4, 64, 8, 256)


def test_quantize_on_meta_gives_shapes_only():
    qw = L.quantize(torch.empty(53, 100, device="meta"), grid.DEFAULT)
    ref = _nf()
    for k in ("qcodes", "qscales", "scale2", "offset"):
        t, r = getattr(qw, k), getattr(ref, k)
        assert t.device.type == "meta" and t.shape == r.shape and t.dtype == r.dtype, k


def test_fp16_scale_overflow_is_refused_or_finite():
    w = grid.make_weight(64, 64)
    w[0, 0] = 1e5
    try:
        qw = L.quantize(w, L.QuantConfig(4, 64, 8, 256, torch.float16))
    except ValueError:
        return
    assert torch.isfinite(qw.dequantize()).all(), "silent NaN/Inf in the reconstruction"


@pytest.mark.parametrize("big", [1e37, 3e38], ids=["1e37", "3e38"])
def test_huge_weights_are_refused_or_finite(big):
    w = grid.make_weight(64, 64)
    w[0, 0] = big
    try:
        qw = L.quantize(w, grid.DEFAULT)
    except ValueError:
        return
    assert torch.isfinite(qw.dequantize()).all(), "silent NaN/Inf in the reconstruction"


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=4, block_size=64.0), "block_size must be an int, got float 64.0"),
    (dict(bits=True), "bits must be an int, got bool"),
    (dict(bits=4, scale_bits="8"), "scale_bits must be an int, got str"),
    (dict(bits=4, scale_dtype="float32"), "scale_dtype must be torch.float32"),
])
def test_quant_config_types_validated_at_the_boundary(kwargs, match):
    with pytest.raises(ValueError, match=match):
        L.QuantConfig(**kwargs)
    import numpy as np
    c = L.QuantConfig(np.int64(4), np.int32(64))  # integral numbers are fine, stored as int
    assert type(c.bits) is int and type(c.block_size) is int and c == L.QuantConfig(4, 64)


@pytest.mark.parametrize("field,value,match", [
    ("bits", 4.7, "bits must be an int, got float 4.7"),
    ("bits", "4", "bits must be an int, got str"),
    ("block_size", 64.0, "block_size must be an int"),
    ("scale_dtype", "float64", "scale_dtype must be one of"),
    ("extra", 1, r"unknown fields \['extra'\]"),
])
def test_quant_config_from_dict_is_strict(field, value, match):
    d = {**grid.DEFAULT.to_dict(), field: value}
    with pytest.raises(ValueError, match=match):
        L.QuantConfig.from_dict(d)
    with pytest.raises(ValueError, match="expected an object"):
        L.QuantConfig.from_dict([4, 64])
