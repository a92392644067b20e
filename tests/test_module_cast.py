"""Module casts never touch LQLinear's packed tensors (issue: `.bfloat16()`, `.half()`,
`.double()`, `.to(dtype)` used to cast `offset`/`scale2`): only adapters and bias are cast,
the packed codes and scales keep their dtypes and bits, and a cast there and back leaves Q
bit-identical. Also: the packed tensors stay frozen under `requires_grad_(True)`."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lqlora_ext import LQLinear, QuantConfig, decompose

pytestmark = pytest.mark.usefixtures("one_thread")

PACKED = ("qcodes", "qscales", "scale2", "offset")
# One layer per scale dtype, ragged shapes, with and without bias.
LAYERS = [((40, 72), QuantConfig(3, 32, 4, 64, torch.bfloat16), True),
          ((33, 48), QuantConfig(4, 16, 8, 16, torch.float16), False),
          ((64, 80), QuantConfig(2, 64, 8, 256, torch.float32), True)]

CASTS = {
    "half": lambda m: m.half(),
    "bfloat16": lambda m: m.bfloat16(),
    "double": lambda m: m.double(),
    "float": lambda m: m.float(),
    "to(float16)": lambda m: m.to(torch.float16),
    "to(bfloat16)": lambda m: m.to(torch.bfloat16),
    "to(dtype=float64)": lambda m: m.to(dtype=torch.float64),
    "to(cpu, bfloat16)": lambda m: m.to("cpu", torch.bfloat16),
    "to(tensor)": lambda m: m.to(torch.zeros(1, dtype=torch.float16)),
    "type(float16)": lambda m: m.type(torch.float16),
}
TARGET = {"half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64,
          "float": torch.float32, "to(float16)": torch.float16, "to(bfloat16)": torch.bfloat16,
          "to(dtype=float64)": torch.float64, "to(cpu, bfloat16)": torch.bfloat16,
          "to(tensor)": torch.float16, "type(float16)": torch.float16}


def _model(seed=0):
    torch.manual_seed(seed)
    layers = []
    for (out_f, in_f), cfg, bias in LAYERS:
        w = torch.randn(out_f, in_f)
        d = decompose(w, cfg, 4, max_iters=2)
        layers.append(LQLinear(d.q, d.l2, d.l1, 0.5, torch.randn(out_f) if bias else None))
    return nn.ModuleList(layers)


def _packed(m):
    return [{k: getattr(lay, k).detach().clone() for k in PACKED} for lay in m]


def _assert_bit_identical(before, after):
    for b, a in zip(before, after):
        for k in PACKED:
            assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
            # bit patterns, not values: -0.0 == 0.0 and NaN != NaN would hide changes
            assert torch.equal(a[k].view(torch.uint8) if a[k].dtype.is_floating_point else a[k],
                               b[k].view(torch.uint8) if b[k].dtype.is_floating_point else b[k]), k


@pytest.mark.parametrize("cast", list(CASTS))
def test_cast_keeps_packed_tensors_and_casts_adapters_and_bias(cast):
    m = _model()
    before, dense = _packed(m), [lay.qweight.dequantize() for lay in m]
    assert CASTS[cast](m) is m
    _assert_bit_identical(before, _packed(m))
    want = TARGET[cast]
    for lay, cfg, q in zip(m, (c for _, c, _ in LAYERS), dense):
        assert lay.scale2.dtype == cfg.scale_dtype and lay.offset.dtype == torch.float32
        assert lay.qcodes.dtype == lay.qscales.dtype == torch.int32
        assert lay.levels.dtype == torch.float32
        assert lay.lora_A.dtype == lay.lora_B.dtype == want
        assert lay.bias is None or lay.bias.dtype == want
        assert not any(getattr(lay, k).requires_grad for k in PACKED)
        assert torch.equal(lay.qweight.dequantize(), q)
        # The next forward works (no dtype confusion inside the packed tensors).
        x_dtype = want if want in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        y = lay(torch.randn(3, lay.in_features, dtype=x_dtype))
        assert y.dtype == x_dtype and torch.isfinite(y).all()


@pytest.mark.parametrize("there", [torch.bfloat16, torch.float16, torch.float64])
def test_cast_there_and_back_leaves_q_bit_identical(there):
    m = _model()
    before = _packed(m)
    dense = [lay.qweight.dequantize() for lay in m]
    adapters = [(lay.lora_A.detach().clone(), lay.lora_B.detach().clone()) for lay in m]
    m.to(there).float()
    _assert_bit_identical(before, _packed(m))
    for lay, q in zip(m, dense):
        assert torch.equal(lay.qweight.dequantize(), q)
    if there == torch.float64:  # fp32 -> fp64 -> fp32 is exact for the adapters too
        for lay, (a, b) in zip(m, adapters):
            assert torch.equal(lay.lora_A, a) and torch.equal(lay.lora_B, b)
    y = m[0](torch.randn(5, 72))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


def test_to_empty_from_meta_gives_exact_levels_and_loads_bit_identical():
    src = _model()
    sd = [lay.state_dict() for lay in src]
    for lay, ((out_f, in_f), cfg, bias), s in zip(src, LAYERS, sd):
        skel = LQLinear.empty(out_f, in_f, cfg, 4, 0.5, bias, device="meta")
        skel.to_empty(device="cpu")
        assert torch.equal(skel.levels, lay.levels)  # rebuilt, not uninitialized memory
        skel.load_state_dict(s)
        x = torch.randn(2, in_f)
        assert torch.equal(skel(x), lay(x))


def test_packed_tensors_stay_frozen_under_requires_grad():
    m = _model()
    m.requires_grad_(True)   # would raise for int32 parameters, or make scales trainable
    for lay in m:
        assert not any(getattr(lay, k).requires_grad for k in PACKED)
        assert lay.lora_A.requires_grad and lay.lora_B.requires_grad
        assert lay.bias is None or lay.bias.requires_grad
        lay.scale2.requires_grad = True
        assert not lay.scale2.requires_grad


def test_load_refuses_packed_dtype_change_instead_of_converting():
    m = _model()
    sd = m[0].state_dict()
    sd["scale2"] = sd["scale2"].float()      # a numeric conversion would be silent
    with pytest.raises(RuntimeError, match=r"scale2: expected torch.bfloat16 \[2\]"):
        m[0].load_state_dict(sd)
    with pytest.raises(ValueError, match=r"LQLinear.qcodes: expected torch.int32"):
        m[0].qcodes = torch.zeros(3, dtype=torch.int32)


def test_state_dict_holds_plain_tensors_with_the_format_dtypes():
    m = _model()
    for lay, (_, cfg, _) in zip(m, LAYERS):
        sd = lay.state_dict()
        assert all(type(sd[k]) is torch.Tensor for k in PACKED)
        assert sd["scale2"].dtype == cfg.scale_dtype and sd["qcodes"].dtype == torch.int32
        # shares storage with the module (in-place loaders such as DCP write through it)
        sd["qcodes"][0] += 1
        assert lay.qcodes[0] == sd["qcodes"][0]


def test_hf_model_casts_keep_packed_tensors_and_save_load_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    import tiny

    m = tiny.quantized_llama()
    lq = {n: mod for n, mod in m.named_modules() if isinstance(mod, LQLinear)}
    before = _packed(lq.values())
    x = tiny.tokens(2, 16)
    ref = m(x).logits
    m.to(torch.bfloat16)
    _assert_bit_identical(before, _packed(lq.values()))
    out = m(x).logits
    assert out.dtype == torch.bfloat16
    # Only bf16 compute error: at most twice what bf16 does to the dense model itself.
    dense = tiny.llama()
    base_err = (dense.bfloat16()(x).logits.float() - tiny.llama()(x).logits).abs().max()
    assert (out.float() - ref).abs().max() <= 2 * base_err
    m.double().to(torch.float32)
    _assert_bit_identical(before, _packed(lq.values()))
    m.save_pretrained(tmp_path / "m")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    _assert_bit_identical(before, _packed(mod for n, mod in back.named_modules()
                                          if isinstance(mod, LQLinear)))


def test_data_assignment_and_loader_reconstruction_keep_the_storage_contract():
    from accelerate.utils import set_module_tensor_to_device

    lay = _model()[0]
    codes = lay.qcodes.detach().clone()
    lay.qcodes.data = codes + 1              # replaces the storage, not only the wrapper
    assert torch.equal(lay.qcodes, codes + 1)
    with pytest.raises(TypeError, match="cannot replace torch.int32"):
        lay.qcodes.data = codes.float()
    # accelerate re-creates parameters as type(p)(value, requires_grad=...)
    set_module_tensor_to_device(lay, "qcodes", "cpu", value=codes)
    set_module_tensor_to_device(lay, "scale2", "cpu", value=lay.scale2.detach().clone())
    assert torch.equal(lay.qcodes, codes) and isinstance(lay.qcodes, nn.Parameter)
    assert lay.scale2.dtype == torch.bfloat16 and not lay.scale2.requires_grad
    y = lay(torch.randn(2, lay.in_features))
    assert torch.isfinite(y).all()
