"""save_quantized / load_quantized: round trips on tiny Llama and BERT, atomic replacement,
failed saves, and refusal of corrupt, truncated, foreign-version or mismatched checkpoints."""
from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lqlora_ext import (LQLinear, LQLoRAConfig, QuantConfig, load_quantized,  # noqa: E402
                        quantize_model, save_quantized)
from lqlora_ext.io import checkpoint as ckpt  # noqa: E402
from lqlora_ext.io.atomic import OUTPUT_MARKER  # noqa: E402

GRID = [QuantConfig(2, 64, 8, 256), QuantConfig(3, 32, 4, 64, torch.bfloat16),
        QuantConfig(4, 64, 8, 256, torch.float16)]


pytestmark = pytest.mark.usefixtures("one_thread")


def llama_config(hidden=64, **kw):
    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=128,
                                    max_position_embeddings=64, **kw)


def bert_config(hidden=64):
    return transformers.BertConfig(hidden_size=hidden, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=2 * hidden,
                                   vocab_size=128, max_position_embeddings=64)


def fresh_llama(seed=1, **kw):
    torch.manual_seed(seed)  # a different init than the quantized one
    return transformers.LlamaForCausalLM(llama_config(**kw)).eval()


def fresh_bert(seed=1, hidden=64):
    torch.manual_seed(seed)
    return transformers.BertForMaskedLM(bert_config(hidden)).eval()


def quantized(model, **kw):
    c = dict(budget_bits=3.2, rank=4, grid=GRID, workers=1, progress=False, lora_alpha=8.0)
    c.update(kw)
    quantize_model(model, LQLoRAConfig(**c))
    return model


@pytest.fixture(scope="module")
def q_llama():
    return quantized(fresh_llama(seed=0))


@pytest.fixture(scope="module")
def q_bert():
    return quantized(fresh_bert(seed=0))


@pytest.fixture(scope="module")
def saved_llama(q_llama, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ck") / "llama")
    save_quantized(q_llama, path)
    return path


IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(5))


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_round_trip(arch, q_llama, q_bert, tmp_path):
    src = q_llama if arch == "llama" else q_bert
    path = str(tmp_path / "ckpt")
    save_quantized(src, path)
    assert sorted(os.listdir(path)) == [OUTPUT_MARKER, ckpt.MANIFEST, ckpt.WEIGHTS]
    dst = fresh_llama() if arch == "llama" else fresh_bert()
    out = load_quantized(path, dst)
    assert out is dst
    assert_same_state(src, dst)
    for (n1, m1), (n2, m2) in zip(src.named_modules(), dst.named_modules()):
        assert n1 == n2 and type(m1) is type(m2)
        if isinstance(m1, LQLinear):
            assert m1.quant_config == m2.quant_config and m1.scaling == m2.scaling == 2.0
            assert m1.rank == m2.rank
    with torch.no_grad():
        if arch == "llama":
            a, b = src(IDS).logits, dst(IDS).logits
        else:
            a, b = src(IDS).logits, dst(IDS).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    if arch == "bert":  # the tied decoder stays tied after loading
        assert dst.cls.predictions.decoder.weight is dst.bert.embeddings.word_embeddings.weight
    else:
        assert dst.lm_head.weight is not dst.model.embed_tokens.weight


def test_manifest_contents(saved_llama, q_llama):
    with open(os.path.join(saved_llama, ckpt.MANIFEST)) as f:
        man = json.load(f)
    assert man["format"] == ckpt.CKPT_FORMAT and man["version"] == ckpt.CKPT_VERSION
    lq = {n: m for n, m in q_llama.named_modules() if isinstance(m, LQLinear)}
    assert set(man["modules"]) == set(lq)
    for n, info in man["modules"].items():
        m = lq[n]
        assert info["shape"] == [m.out_features, m.in_features] and info["rank"] == 4
        assert QuantConfig.from_dict(info["quant"]) == m.quant_config
    assert man["nbytes"] == os.path.getsize(os.path.join(saved_llama, ckpt.WEIGHTS))


def test_load_into_quantized_model(saved_llama, q_llama):
    """Loading over an already-quantized model (different configs) replaces its layers."""
    dst = quantized(fresh_llama(seed=3), grid=[QuantConfig(8)], rank=2)
    load_quantized(saved_llama, dst)
    assert_same_state(q_llama, dst)


def test_tied_llama_round_trip(tmp_path):
    src = quantized(fresh_llama(seed=0, tie_word_embeddings=True), grid=[GRID[2]])
    path = str(tmp_path / "tied")
    save_quantized(src, path)
    with open(os.path.join(path, ckpt.MANIFEST)) as f:
        assert f'"lm_head.weight"' in f.read()  # stored once, as an alias
    dst = fresh_llama(seed=4, tie_word_embeddings=True)
    load_quantized(path, dst)
    assert_same_state(src, dst)
    assert dst.lm_head.weight is dst.model.embed_tokens.weight


def test_save_replaces_previous_checkpoint(tmp_path, q_llama):
    path = tmp_path / "ckpt"
    save_quantized(q_llama, str(path))
    other = quantized(fresh_llama(seed=7), grid=[GRID[0]])
    save_quantized(other, str(path))  # over a real checkpoint: the newest model wins
    assert sorted(os.listdir(path)) == [OUTPUT_MARKER, ckpt.MANIFEST, ckpt.WEIGHTS]
    dst = fresh_llama()
    load_quantized(str(path), dst)
    assert_same_state(other, dst)
    # no temporary siblings are left behind
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_failed_save_leaves_nothing_and_keeps_previous(tmp_path, monkeypatch, q_llama):
    import safetensors.torch

    def fail(*a, **k):
        raise OSError("disk full (simulated)")

    # no previous checkpoint: nothing at all is left
    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="simulated"):
        save_quantized(q_llama, str(tmp_path / "new"))
    assert os.listdir(tmp_path) == []

    # a previous checkpoint stays intact
    monkeypatch.undo()
    path = str(tmp_path / "ckpt")
    save_quantized(q_llama, path)
    before = {f: open(os.path.join(path, f), "rb").read() for f in os.listdir(path)}
    other = quantized(fresh_llama(seed=7), grid=[GRID[0]])
    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="simulated"):
        save_quantized(other, path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert {f: open(os.path.join(path, f), "rb").read() for f in os.listdir(path)} == before
    monkeypatch.undo()
    dst = fresh_llama()
    load_quantized(path, dst)
    assert_same_state(q_llama, dst)


def test_save_needs_lq_layers(tmp_path):
    with pytest.raises(ValueError, match="no LQLinear"):
        save_quantized(fresh_llama(), str(tmp_path / "x"))
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------- refusing bad input
def copy_ckpt(src, dst):
    os.makedirs(dst)
    for f in os.listdir(src):
        with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
            b.write(a.read())
    return dst


def assert_untouched_refusal(path, match):
    model = fresh_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_quantized(path, model)
    # a refused load changes nothing
    assert not any(isinstance(m, LQLinear) for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_truncated_weights(saved_llama, tmp_path):
    path = copy_ckpt(saved_llama, str(tmp_path / "c"))
    w = os.path.join(path, ckpt.WEIGHTS)
    data = open(w, "rb").read()
    open(w, "wb").write(data[: len(data) // 2])
    assert_untouched_refusal(path, "corrupt or truncated")


def test_corrupted_byte(saved_llama, tmp_path):
    path = copy_ckpt(saved_llama, str(tmp_path / "c"))
    w = os.path.join(path, ckpt.WEIGHTS)
    data = bytearray(open(w, "rb").read())
    data[len(data) - 100] ^= 0x40  # inside the tensor data, same size
    open(w, "wb").write(bytes(data))
    assert_untouched_refusal(path, "checksum")


def test_missing_weights(saved_llama, tmp_path):
    path = copy_ckpt(saved_llama, str(tmp_path / "c"))
    os.unlink(os.path.join(path, ckpt.WEIGHTS))
    assert_untouched_refusal(path, "missing")


def edit_manifest(saved, tmp_path, fn):
    path = copy_ckpt(saved, str(tmp_path / "c"))
    mpath = os.path.join(path, ckpt.MANIFEST)
    with open(mpath) as f:
        man = json.load(f)
    fn(man)
    with open(mpath, "w") as f:
        json.dump(man, f)
    return path


@pytest.mark.parametrize("key,value", [("version", 1), ("version", 3), ("version", None),
                                       ("nf_format_version", 99)])
def test_wrong_version(saved_llama, tmp_path, key, value):
    path = edit_manifest(saved_llama, tmp_path, lambda m: m.__setitem__(key, value))
    assert_untouched_refusal(path, "not supported")


def test_wrong_format_name(saved_llama, tmp_path):
    path = edit_manifest(saved_llama, tmp_path, lambda m: m.__setitem__("format", "other"))
    assert_untouched_refusal(path, "not an lqlora checkpoint")


def test_missing_manifest(saved_llama, tmp_path):
    path = copy_ckpt(saved_llama, str(tmp_path / "c"))
    os.unlink(os.path.join(path, ckpt.MANIFEST))
    assert_untouched_refusal(path, "not an lqlora checkpoint")
    assert_untouched_refusal(str(tmp_path / "does-not-exist"), "not an lqlora checkpoint")


def test_corrupt_manifest(saved_llama, tmp_path):
    path = copy_ckpt(saved_llama, str(tmp_path / "c"))
    with open(os.path.join(path, ckpt.MANIFEST), "w") as f:
        f.write('{"format": "lqlora-checkp')
    assert_untouched_refusal(path, "corrupt manifest")


def assert_refused_unchanged(path, model, match):
    """A refused load leaves the model exactly as it was (no half-converted layers)."""
    mods = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_quantized(path, model)
    assert dict(model.named_modules()) == mods
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(state[k], after[k]) for k in state)


def test_different_shape_model(saved_llama):
    assert_refused_unchanged(saved_llama, fresh_llama(hidden=32),
                             r"q_proj is Linear 32x32, the checkpoint has a 64x64 LQLinear")


def test_later_module_mismatch_leaves_model_unchanged(saved_llama):
    """Attention shapes match, the MLP does not: the attention layers replaced before the
    mismatch was found are put back."""
    torch.manual_seed(0)
    cfg = llama_config()
    cfg.intermediate_size = 96
    assert_refused_unchanged(saved_llama, transformers.LlamaForCausalLM(cfg),
                             r"gate_proj is Linear 96x64, the checkpoint has a 128x64")


def test_different_architecture(saved_llama):
    assert_refused_unchanged(saved_llama, fresh_bert(), "no module .*different architecture")


def test_different_shape_bert(tmp_path, q_bert):
    path = str(tmp_path / "b")
    save_quantized(q_bert, path)
    with pytest.raises(ValueError, match="checkpoint"):
        load_quantized(path, fresh_bert(hidden=32))


def test_extra_layers_refused(saved_llama):
    """A model with more layers than the checkpoint: missing keys are named."""
    torch.manual_seed(0)
    cfg = llama_config()
    cfg.num_hidden_layers = 3
    assert_refused_unchanged(saved_llama, transformers.LlamaForCausalLM(cfg),
                             r"does not match the model: missing \['model\.layers\.2\.")


# ----------------------------------------------------------- data loss and hand edits
def test_save_refuses_a_foreign_directory_and_overwrite_keeps_its_files(tmp_path, q_llama):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty.*not an lqlora output.*overwrite"):
        save_quantized(q_llama, str(d))
    assert os.listdir(d) == ["notes.txt"]
    save_quantized(q_llama, str(d), overwrite=True)
    assert (d / "notes.txt").read_text() == "keep me"
    dst = fresh_llama()
    load_quantized(str(d), dst)
    assert_same_state(q_llama, dst)
    save_quantized(q_llama, str(d))  # now an lqlora output: no overwrite needed
    assert sorted(os.listdir(d)) == [OUTPUT_MARKER, ckpt.MANIFEST, ckpt.WEIGHTS, "notes.txt"]


def test_save_refuses_the_directory_the_model_came_from(tmp_path, q_llama):
    src = tmp_path / "models" / "hf"
    fresh_llama().save_pretrained(src)
    m = transformers.AutoModelForCausalLM.from_pretrained(src)
    quantized(m)
    for out in (src, src.parent):
        with pytest.raises(ValueError, match="input model"):
            save_quantized(m, str(out), overwrite=True)
    assert sorted(os.listdir(src)) == ["config.json", "generation_config.json",
                                       "model.safetensors"]


def test_save_refuses_non_finite_adapters(tmp_path):
    m = quantized(fresh_llama(seed=0))
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.lora_B[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"q_proj.lora_B.*non-finite value \(nan\) at \[3, 1\]"):
        save_quantized(m, str(tmp_path / "x"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("edit", ["block_size", "rank0", "delete_module", "scaling"])
def test_hand_edited_manifest_refused(saved_llama, tmp_path, edit):
    def fn(man):
        mods = man["modules"]
        name = "model.layers.1.self_attn.k_proj"
        if edit == "block_size":  # the digest is checked first: any edit is caught
            mods[name]["quant"]["block_size"] = 128
        elif edit == "rank0":
            mods[name]["rank"] = 0
        elif edit == "delete_module":
            del mods[name]
        else:
            mods[name]["scaling"] = 4.0
    path = edit_manifest(saved_llama, tmp_path, fn)
    assert_untouched_refusal(path, "modified after saving")


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.__setitem__("modules", []), "'modules' must be a non-empty object"),
    (lambda m: m.__setitem__("aliases", {"a": 1}), "'aliases' must map"),
    (lambda m: m.__setitem__("nbytes", "12"), "'nbytes' must be an integer"),
    (lambda m: m["modules"]["model.layers.0.mlp.up_proj"]["quant"].__setitem__("bits", 4.7),
     "model.layers.0.mlp.up_proj.*bits must be an int"),
    (lambda m: m["modules"]["model.layers.0.mlp.up_proj"].pop("rank"), r"lacks \['rank'\]"),
], ids=["modules", "aliases", "nbytes", "bits-float", "no-rank"])
def test_corrupt_manifest_fields_named(saved_llama, tmp_path, edit, match):
    path = edit_manifest(saved_llama, tmp_path, edit)
    assert_untouched_refusal(path, "corrupt manifest.*" + match)


def test_unexpected_lq_tensor_refused_with_valid_manifest(tmp_path, q_llama):
    """Strict both ways: a tensor the manifest does not describe is refused even when the
    manifest's and the file's checksums are consistent (written by another tool)."""
    from safetensors.torch import load_file, save_file
    path = str(tmp_path / "c")
    save_quantized(q_llama, path)
    w = os.path.join(path, ckpt.WEIGHTS)
    state = load_file(w)
    state["model.layers.0.mlp.up_proj.lora_C"] = torch.zeros(2)
    state["model.layers.9.mlp.up_proj.qcodes"] = torch.zeros(2, dtype=torch.int32)
    save_file(state, w, metadata={"format": ckpt.CKPT_FORMAT})

    def fix(man):
        man["nbytes"], man["sha256"] = os.path.getsize(w), ckpt._sha256(w)
        man.pop("digest")
        man["digest"] = ckpt.config_digest(man)
    mpath = os.path.join(path, ckpt.MANIFEST)
    with open(mpath) as f:
        man = json.load(f)
    fix(man)
    with open(mpath, "w") as f:
        json.dump(man, f)
    assert_untouched_refusal(path, "model.layers.9.mlp.up_proj.qcodes.*does not list")
