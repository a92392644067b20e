"""Hugging Face integration: save_pretrained writes quant_method "lqlora", from_pretrained
rebuilds LQLinear layers with identical outputs (Llama and BERT), the packed tensors keep
their dtypes under dtype=..., Trainer accepts the model, and broken checkpoints are refused
with clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lqlora_ext  # noqa: E402,F401  (registers quant_method "lqlora")
from lqlora_ext import LQLinear, quantize_model  # noqa: E402

import tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
AUTO = transformers.AutoModelForCausalLM


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    m = tiny.quantized_llama()
    d = str(tmp_path_factory.mktemp("hf") / "llama")
    m.save_pretrained(d)
    with torch.no_grad():
        ref = m(tiny.tokens()).logits
    return m, d, ref


def _lq_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LQLinear)}


def test_save_pretrained_writes_quantization_config(saved_llama):
    m, d, _ = saved_llama
    with open(os.path.join(d, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc["quant_method"] == "lqlora" and qc["format_version"] == lqlora_ext.FORMAT_VERSION
    layers = _lq_layers(m)
    assert set(qc["modules"]) == set(layers) and len(layers) == 14
    for name, e in qc["modules"].items():
        lay = layers[name]
        assert e["quant"] == lay.quant_config.to_dict()
        assert e["shape"] == [lay.out_features, lay.in_features] and e["rank"] == 4
        assert e["scaling"] == 2.0
    # per-module configs: the ILP mixed several, and each is recorded
    assert len({json.dumps(e["quant"], sort_keys=True) for e in qc["modules"].values()}) > 1


def test_from_pretrained_rebuilds_identical_model(saved_llama):
    m, d, ref = saved_llama
    m2 = AUTO.from_pretrained(d)
    assert set(_lq_layers(m2)) == set(_lq_layers(m))
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert sd1[k].dtype == sd2[k].dtype and torch.equal(sd1[k], sd2[k]), k
    with torch.no_grad():
        torch.testing.assert_close(m2(tiny.tokens()).logits, ref, rtol=0, atol=0)
    # Trainable exactly as after quantize_model: only the adapters.
    train = {n for n, p in m2.named_parameters() if p.requires_grad}
    assert train == {n for n, p in m.named_parameters() if p.requires_grad}
    assert train and all(n.endswith(("lora_A", "lora_B")) for n in train)


def test_from_pretrained_dtype_never_casts_packed_tensors(saved_llama):
    m, d, ref = saved_llama
    m2 = AUTO.from_pretrained(d, dtype=torch.bfloat16)
    for name, lay in _lq_layers(m2).items():
        src = _lq_layers(m)[name]
        assert lay.qcodes.dtype == torch.int32 and lay.offset.dtype == torch.float32
        assert lay.scale2.dtype == lay.quant_config.scale_dtype
        assert torch.equal(lay.scale2, src.scale2) and torch.equal(lay.qcodes, src.qcodes)
        assert lay.lora_A.dtype == torch.bfloat16  # float params follow the requested dtype
        assert lay.levels.device.type == "cpu" and torch.equal(lay.levels, src.levels)
    with torch.no_grad():
        out = m2(tiny.tokens()).logits.float()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_bert_round_trip(tmp_path):
    m = tiny.bert()
    quantize_model(m, tiny.lq_config())
    x = tiny.tokens()
    with torch.no_grad():
        ref = m(x).logits
    m.save_pretrained(tmp_path)
    m2 = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert set(_lq_layers(m2)) == set(_lq_layers(m)) and len(_lq_layers(m)) == 12
    with torch.no_grad():
        torch.testing.assert_close(m2(x).logits, ref, rtol=0, atol=0)


def test_registration_is_lazy_and_works_in_either_import_order(tmp_path, saved_llama):
    _, d, _ = saved_llama
    code = ("import sys, lqlora_ext; assert 'transformers' not in sys.modules, 'eager import'\n"
            "from transformers import AutoModelForCausalLM as A\n"
            f"m = A.from_pretrained({d!r}); print(type(m.model.layers[0].mlp.up_proj).__name__)")
    code2 = ("import transformers.quantizers.auto as a, lqlora_ext\n"
             "print('lqlora' in a.AUTO_QUANTIZER_MAPPING)")
    for c, want in ((code, "LQLinear"), (code2, "True")):
        r = subprocess.run([sys.executable, "-c", c], capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip().splitlines()[-1] == want


def test_trainer_runs_unmodified_and_lowers_loss(tmp_path):
    m = tiny.quantized_llama()
    seqs = tiny.tokens(16, 16, seed=3)
    seqs[:, 1::2] = seqs[:, ::2]  # learnable: every odd token repeats the previous one
    data = [{"input_ids": s, "labels": s} for s in seqs]
    args = transformers.TrainingArguments(str(tmp_path), per_device_train_batch_size=8,
                                          num_train_epochs=6, learning_rate=2e-2,
                                          logging_steps=1, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainer = transformers.Trainer(model=m, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-2:]) < sum(losses[:2]) - 0.1, losses
    for n, p in m.named_parameters():  # only the adapters moved
        assert torch.equal(p, before[n]) != n.endswith(("lora_A", "lora_B")), n


# ------------------------------------------------------------------- broken checkpoints
def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def _edit_config(d, fn):
    p = os.path.join(d, "config.json")
    with open(p) as f:
        cfg = json.load(f)
    fn(cfg["quantization_config"])
    with open(p, "w") as f:
        json.dump(cfg, f)


def test_truncated_weights_refused(saved_llama, tmp_path):
    d = _copy(saved_llama[1], tmp_path / "c")
    w = os.path.join(d, "model.safetensors")
    size = os.path.getsize(w)
    with open(w, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(ValueError, match="truncated"):
        AUTO.from_pretrained(d)
    with open(w, "r+b") as f:
        f.truncate(100)  # inside the header
    with pytest.raises(ValueError, match="cannot read checkpoint file"):
        AUTO.from_pretrained(d)


def test_config_bits_mismatch_refused(saved_llama, tmp_path):
    d = _copy(saved_llama[1], tmp_path / "c")
    name = "model.layers.1.self_attn.o_proj"

    def flip(qc):
        q = qc["modules"][name]["quant"]
        q["bits"] = 8 if q["bits"] != 8 else 2
    _edit_config(d, flip)
    with pytest.raises(ValueError, match=f"{name}.qcodes.*mismatched config"):
        AUTO.from_pretrained(d)


def test_config_unknown_module_and_rank_mismatch_refused(saved_llama, tmp_path):
    d = _copy(saved_llama[1], tmp_path / "c")
    _edit_config(d, lambda qc: qc["modules"].__setitem__(
        "model.layers.7.mlp.up_proj", qc["modules"]["model.layers.0.mlp.up_proj"]))
    with pytest.raises(ValueError, match="model.layers.7.mlp.up_proj"):
        AUTO.from_pretrained(d)
    d2 = _copy(saved_llama[1], tmp_path / "c2")
    _edit_config(d2, lambda qc: qc["modules"]["model.layers.0.mlp.up_proj"].__setitem__(
        "rank", 8))
    with pytest.raises(ValueError, match="lora_A"):
        AUTO.from_pretrained(d2)


def test_foreign_format_version_and_corrupt_entry_refused(saved_llama, tmp_path):
    d = _copy(saved_llama[1], tmp_path / "c")
    _edit_config(d, lambda qc: qc.__setitem__("format_version", 99))
    with pytest.raises(ValueError, match="format version 99"):
        AUTO.from_pretrained(d)
    d2 = _copy(saved_llama[1], tmp_path / "c2")
    _edit_config(d2, lambda qc: qc["modules"]["model.layers.0.mlp.up_proj"].pop("quant"))
    with pytest.raises(ValueError, match="corrupt quantization_config entry"):
        AUTO.from_pretrained(d2)


def test_missing_tensor_refused(saved_llama, tmp_path):
    from safetensors.torch import load_file, save_file
    d = _copy(saved_llama[1], tmp_path / "c")
    w = os.path.join(d, "model.safetensors")
    state = load_file(w)
    del state["model.layers.0.self_attn.k_proj.scale2"]
    save_file(state, w, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks tensor 'model.layers.0.self_attn.k_proj.scale2'"):
        AUTO.from_pretrained(d)


def test_sharded_checkpoint_and_device_map(saved_llama, tmp_path):
    m, _, ref = saved_llama
    m.save_pretrained(tmp_path, max_shard_size="50KB")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    for kw in ({}, {"device_map": "cpu"}):
        m2 = AUTO.from_pretrained(tmp_path, **kw)
        with torch.no_grad():
            torch.testing.assert_close(m2(tiny.tokens()).logits, ref, rtol=0, atol=0)


# ------------------------------------------------- silently wrong models (issue classes)
def _lq_state(d):
    from safetensors.torch import load_file
    return load_file(os.path.join(d, "model.safetensors"))


def _write_state(d, state):
    from safetensors.torch import save_file
    save_file(state, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})


def test_loading_without_lqlora_ext_fails_loudly(saved_llama):
    """A transformers that does not know quant_method "lqlora" must not hand back random
    dense projections: the placeholders make it raise, and its report names the fix."""
    _, d, _ = saved_llama
    code = ("import sys, transformers\n"
            "assert 'lqlora_ext' not in sys.modules\n"
            f"m = transformers.AutoModelForCausalLM.from_pretrained({d!r})\n"
            "print('LOADED')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300, cwd="/")
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "LOADED" not in out
    assert "ignore_mismatched_sizes" in out  # transformers' own refusal
    assert "import_lqlora_ext_before_from_pretrained" in out
    assert "q_proj.weight" in out and "MISMATCH" in out


def test_placeholders_are_written_and_ignored_on_load(saved_llama, caplog):
    m, d, _ = saved_llama
    state = _lq_state(d)
    for name in _lq_layers(m):
        assert state[f"{name}.weight"].shape == (0,)
        assert state[f"{name}.weight"].dtype == torch.uint8
    with caplog.at_level("WARNING"):
        AUTO.from_pretrained(d)
    assert "LOAD REPORT" not in caplog.text and "UNEXPECTED" not in caplog.text


def _find_module(qc, shape, block_size):
    return next(n for n, e in qc["modules"].items()
                if e["shape"] == shape and e["quant"]["block_size"] == block_size)


def test_edited_block_size_with_matching_lengths_refused(saved_llama, tmp_path):
    """k_proj is 32x64: block size 64 -> 128 keeps every packed length (one 32-block
    scale group, one second-level group), so only the config digest can tell."""
    from lqlora_ext.integrations import hf
    d = _copy(saved_llama[1], tmp_path / "c")
    with open(os.path.join(d, "config.json")) as f:
        name = _find_module(json.load(f)["quantization_config"], [32, 64], 64)
    _edit_config(d, lambda qc: qc["modules"][name]["quant"].__setitem__("block_size", 128))
    with open(os.path.join(d, "config.json")) as f:
        qc = hf.LQLoRAQuantizationConfig(**json.load(f)["quantization_config"])
    from lqlora_ext.io.layout import check_layout
    check_layout(qc.modules, hf.read_file_layout([os.path.join(d, "model.safetensors")]),
                 where="x", placeholders=True)  # the layout alone cannot see it
    with pytest.raises(ValueError, match="modified after saving"):
        AUTO.from_pretrained(d)


def test_deleted_module_entry_refused(saved_llama, tmp_path):
    d = _copy(saved_llama[1], tmp_path / "c")
    name = "model.layers.1.mlp.down_proj"
    _edit_config(d, lambda qc: qc["modules"].pop(name))
    with pytest.raises(ValueError, match=f"{name}.* that the config does not list"):
        AUTO.from_pretrained(d)


def test_rank_zero_edit_refused(saved_llama, tmp_path):
    d = _copy(saved_llama[1], tmp_path / "c")
    name = "model.layers.0.self_attn.q_proj"
    _edit_config(d, lambda qc: qc["modules"][name].__setitem__("rank", 0))
    with pytest.raises(ValueError, match=f"{name}.lora_A.*is not part of module"):
        AUTO.from_pretrained(d)


@pytest.mark.parametrize("edit", ["qcodes_bytes", "lora_B_inf", "embedding"])
def test_overwritten_tensor_bytes_refused(saved_llama, tmp_path, edit):
    d = _copy(saved_llama[1], tmp_path / "c")
    state = _lq_state(d)
    key = {"qcodes_bytes": "model.layers.1.mlp.up_proj.qcodes",
           "lora_B_inf": "model.layers.0.self_attn.v_proj.lora_B",
           "embedding": "model.embed_tokens.weight"}[edit]
    t = state[key].clone()
    if edit == "qcodes_bytes":
        t[3] ^= 0x5A5A
    elif edit == "lora_B_inf":
        t[2, 1] = float("inf")
    else:
        t[5, 5] += 1.0
    state[key] = t
    _write_state(d, state)
    with pytest.raises(ValueError, match=f"{key}.*does not match its digest"):
        AUTO.from_pretrained(d)


def test_non_finite_adapter_refused_even_with_matching_digests(saved_llama, tmp_path):
    """Digests recomputed by whoever wrote the inf: the finite check still refuses it."""
    from lqlora_ext.io.layout import tensor_digest
    from lqlora_ext.integrations import hf
    d = _copy(saved_llama[1], tmp_path / "c")
    state = _lq_state(d)
    key = "model.layers.0.mlp.gate_proj.lora_B"
    state[key][0, 3] = float("nan")
    _write_state(d, state)

    def redigest(qc):
        qc["digests"][key] = tensor_digest(state[key])
        obj = hf.LQLoRAQuantizationConfig(**{k: v for k, v in qc.items() if k != "digest"})
        qc["digest"] = obj.current_digest()
    _edit_config(d, redigest)
    with pytest.raises(ValueError, match=rf"{key}.*non-finite value \(nan\) at \[0, 3\]"):
        AUTO.from_pretrained(d)


def test_config_without_digests_refused(saved_llama, tmp_path):
    d = _copy(saved_llama[1], tmp_path / "c")
    _edit_config(d, lambda qc: (qc.pop("digests"), qc.pop("digest")))
    with pytest.raises(ValueError, match="no digests.*save it again"):
        AUTO.from_pretrained(d)


@pytest.mark.parametrize("field,value,match", [
    ("bits", 4.7, "bits must be an int"), ("block_size", "64", "block_size must be an int"),
    ("scale_dtype", "float64", "scale_dtype must be one of"),
])
def test_config_types_validated(saved_llama, tmp_path, field, value, match):
    d = _copy(saved_llama[1], tmp_path / "c")
    _edit_config(d, lambda qc: qc["modules"]["model.layers.0.mlp.up_proj"]["quant"]
                 .__setitem__(field, value))
    with pytest.raises(ValueError, match=f"model.layers.0.mlp.up_proj.*{match}"):
        AUTO.from_pretrained(d)


@pytest.mark.parametrize("field,value,match", [
    ("rank", 4.0, "rank must be an integer"), ("rank", -1, "rank must be an integer >= 0"),
    ("shape", [64], r"shape must be \[out, in\]"), ("bias", "no", "bias must be true or false"),
    ("scaling", None, "scaling must be a finite number"),
])
def test_module_entry_fields_validated(saved_llama, tmp_path, field, value, match):
    d = _copy(saved_llama[1], tmp_path / "c")
    _edit_config(d, lambda qc: qc["modules"]["model.layers.0.mlp.up_proj"]
                 .__setitem__(field, value))
    with pytest.raises(ValueError, match=f"corrupt quantization_config entry.*{match}"):
        AUTO.from_pretrained(d)


def test_save_refuses_non_finite_adapters(tmp_path):
    m = tiny.quantized_llama()
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.lora_A[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.lora_A.*\[0, 0\].*diverged"):
        m.save_pretrained(tmp_path / "x")


@pytest.mark.parametrize("edit,match", [
    (lambda qc: qc.__setitem__("modules", ["model.layers.0.mlp.up_proj"]),
     "'modules' must be a non-empty object"),
    (lambda qc: qc.__setitem__("digests", ["x"]), "'digests' must map tensor names"),
    (lambda qc: qc["digests"].__setitem__("lm_head.weight", 7), "'digests' must map"),
    (lambda qc: qc["modules"].__setitem__("model.layers.0.mlp.up_proj", "x"),
     "entry must be an object"),
], ids=["modules-list", "digests-list", "digest-int", "entry-str"])
def test_corrupt_config_structure_named(saved_llama, tmp_path, edit, match):
    d = _copy(saved_llama[1], tmp_path / "c")
    _edit_config(d, edit)
    with pytest.raises(ValueError, match=match):
        AUTO.from_pretrained(d)
