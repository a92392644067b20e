"""quantize_model on tiny Llama / BERT models built from configs (no downloads): which
Linears become LQLinear, what each computes (Q + L1 L2, PEFT scaling), the ILP budget, the
report, the Fisher path, and bad input."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import lqlora_ext as lq  # noqa: E402
from lqlora_ext import LQLinear, LQLoRAConfig, QuantConfig, decompose, quantize_model  # noqa: E402
import lqlora_ext.method.allocation as allocation  # noqa: E402
import lqlora_ext.method.profiling as profiling  # noqa: E402

# 4 configs spanning 2..8 bits (bits/param 2.127, 3.127, 4.127, 8.127)
GRID = [QuantConfig(2, 64, 8, 256), QuantConfig(3, 64, 8, 256), QuantConfig(4, 64, 8, 256),
        QuantConfig(8, 64, 8, 256)]
SMALLEST = min(c.bits_per_param for c in GRID)

LLAMA_BODY = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
BERT_BODY = ("attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "intermediate.dense", "output.dense")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64, **kw)
    return transformers.LlamaForCausalLM(cfg).eval()


def bert_config(**kw):
    return transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128, vocab_size=128,
                                   max_position_embeddings=64, **kw)


def tiny_bert(cls="BertModel", seed=0, **kw):
    torch.manual_seed(seed)
    return getattr(transformers, cls)(bert_config(**kw)).eval()


def cfg(**kw):
    base = dict(budget_bits=3.5, rank=4, grid=GRID, workers=1, progress=False)
    base.update(kw)
    return LQLoRAConfig(**base)


def expected_targets(model, body, extra=()):
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return sorted(n for n in names
                  if any(n == b or n.endswith("." + b) for b in body + tuple(extra)))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_layers(model, before, config, report):
    """Every LQLinear holds exactly decompose(W, its config) and computes
    x (Q + L1 L2)^T + bias; returns the LQLinear names."""
    s = config.scaling
    lq_names = []
    entries = {e.name: e for e in report.entries}
    g = torch.Generator().manual_seed(0)
    for name, m in model.named_modules():
        if not isinstance(m, LQLinear):
            continue
        lq_names.append(name)
        W = before[name + ".weight"]
        e = entries[name]
        assert m.quant_config == e.config and e.shape == tuple(W.shape)
        assert m.scaling == pytest.approx(s) and m.rank == config.rank
        d = decompose(W, m.quant_config, config.rank, seed=config.seed,
                      max_iters=config.max_iters, tol=config.tol)
        for k in ("qcodes", "qscales", "scale2", "offset"):
            assert torch.equal(getattr(m, k), getattr(d.q, k)), (name, k)
        # lora_A = L2 / sqrt(s), lora_B = L1 / sqrt(s)
        torch.testing.assert_close(m.lora_A.detach(), d.l2 / math.sqrt(s), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m.lora_B.detach(), d.l1 / math.sqrt(s), rtol=1e-6, atol=1e-7)
        assert e.error == pytest.approx(d.error, rel=1e-6)
        assert e.rel_error == pytest.approx(d.error / float(W.square().sum()), rel=1e-5)
        # forward: x @ (Q + L1 L2)^T + bias
        x = torch.randn(3, 5, m.in_features, generator=g)
        dense = d.q.dequantize() + d.l1 @ d.l2
        want = x @ dense.t()
        bias = before.get(name + ".bias")
        if bias is not None:
            assert m.bias is not None and torch.equal(m.bias.detach(), bias)
            want = want + bias
        else:
            assert m.bias is None
        with torch.no_grad():
            got = m(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.dense_weight(), dense, rtol=1e-5, atol=1e-6)
        assert m.lora_A.requires_grad and m.lora_B.requires_grad
        assert m.bias is None or not m.bias.requires_grad
    return sorted(lq_names)


# ------------------------------------------------------------------------------ Llama
@pytest.mark.parametrize("lora_alpha", [None, 16.0])
def test_llama_targets_layers_and_forward(lora_alpha):
    model = tiny_llama()
    before = snapshot(model)
    targets = expected_targets(model, LLAMA_BODY)
    assert len(targets) == 14
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense_logits = model(ids).logits
    config = cfg(lora_alpha=lora_alpha, workers=2)
    report = quantize_model(model, config)

    assert config.scaling == (1.0 if lora_alpha is None else 4.0)
    assert check_layers(model, before, config, report) == targets
    assert sorted(e.name for e in report.entries) == targets
    # the head and the embeddings are untouched
    assert type(model.lm_head) is nn.Linear
    assert torch.equal(model.lm_head.weight, before["lm_head.weight"])
    assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    assert sum(isinstance(m, LQLinear) for m in model.modules()) == 14
    # the whole model still works and stays close to the dense one
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    rel = (logits - dense_logits).norm() / dense_logits.norm()
    assert rel < 0.2


def test_llama_tied_head_untouched():
    model = tiny_llama(tie_word_embeddings=True)
    quantize_model(model, cfg(grid=[GRID[2]]))
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_report_budget_and_ilp(monkeypatch):
    calls = []
    real = allocation.solve_allocation

    def counting(costs, numels, bpp, budget, **kw):
        out = real(costs, numels, bpp, budget, **kw)
        calls.append((costs.clone(), numels.clone(), bpp.clone(), budget, out.clone()))
        return out

    monkeypatch.setattr(allocation, "solve_allocation", counting)
    model = tiny_llama()
    report = quantize_model(model, cfg(budget_bits=3.5))
    assert len(calls) == 1
    costs, numels, bpp, budget, choice = calls[0]
    assert costs.shape == (14, len(GRID)) and torch.isfinite(costs).all()
    assert budget == 3.5
    # the report is the ILP's choice
    assert [e.config for e in report.entries] == [GRID[k] for k in choice.tolist()]
    assert report.bits_per_param <= 3.5 + 1e-9
    # a mixed allocation (not all at one config) and better than the uniform 3-bit one
    assert len(report.config_counts()) > 1
    chosen_cost = float(costs[torch.arange(14), choice].sum())
    assert chosen_cost <= float(costs[:, 1].sum()) + 1e-9
    assert report.bits_per_param_with_lowrank > report.bits_per_param
    numel = sum(e.shape[0] * e.shape[1] for e in report.entries)
    lowrank = sum(4 * (e.shape[0] + e.shape[1]) for e in report.entries)
    assert report.numel == numel
    assert report.bits_per_param_with_lowrank == pytest.approx(
        report.bits_per_param + 16 * lowrank / numel)
    assert report.rank == 4 and report.budget_bits == 3.5 and report.fisher is False
    assert report.dense_bytes == 4 * numel
    assert 0 < report.quantized_bytes < report.dense_bytes


@pytest.mark.parametrize("budget", [SMALLEST, 2.6, 4.0, 9.0])
def test_budget_respected(budget):
    model = tiny_llama()
    report = quantize_model(model, cfg(budget_bits=budget))
    assert report.bits_per_param <= budget + 1e-9
    if budget == SMALLEST:
        assert report.config_counts() == {GRID[0].name: 14}
    if budget >= GRID[-1].bits_per_param:
        assert report.config_counts() == {GRID[-1].name: 14}


def test_report_str_and_dict():
    model = tiny_llama()
    report = quantize_model(model, cfg())
    text = str(report)
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["matrix", "shape"]
    for e in report.entries:
        row = [ln for ln in lines if ln.split() and ln.split()[0] == e.name]
        assert len(row) == 1, e.name
        assert f"{e.shape[0]}x{e.shape[1]}" in row[0] and e.config.name in row[0]
    assert f"{report.bits_per_param:.4f}" in text
    assert f"{report.bits_per_param_with_lowrank:.4f}" in text
    d = report.to_dict()
    assert [m["name"] for m in d["matrices"]] == [e.name for e in report.entries]
    assert d["bits_per_param"] == report.bits_per_param
    import json
    json.dumps(d)  # JSON-able


def test_uniform_grid_skips_ilp(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("no ILP / profiling for a single-config grid")

    monkeypatch.setattr(allocation, "solve_allocation", boom)
    monkeypatch.setattr(profiling, "profile_costs", boom)
    model = tiny_llama()
    before = snapshot(model)
    config = cfg(grid=[GRID[2]], budget_bits=2.0)  # the budget is moot for one config
    report = quantize_model(model, config)
    assert report.config_counts() == {GRID[2].name: 14}
    assert report.bits_per_param == pytest.approx(GRID[2].bits_per_param)
    check_layers(model, before, config, report)


def test_named_grid():
    model = tiny_llama()
    report = quantize_model(model, cfg(grid="nf4"))
    assert report.config_counts() == {"nf4-b64-s8x256-fp32": 14}


def test_rank_zero():
    model = tiny_llama()
    before = snapshot(model)
    config = cfg(rank=0, grid=[GRID[3]])
    report = quantize_model(model, config)
    assert report.bits_per_param_with_lowrank == report.bits_per_param
    check_layers(model, before, config, report)


def test_target_modules_suffixes():
    model = tiny_llama()
    report = quantize_model(model, cfg(target_modules=["q_proj", "v_proj"]))
    names = [e.name for e in report.entries]
    assert len(names) == 4 and all(re.search(r"\.(q|v)_proj$", n) for n in names)
    assert isinstance(model.model.layers[0].self_attn.k_proj, nn.Linear)
    assert not isinstance(model.model.layers[0].self_attn.k_proj, LQLinear)


def test_fisher_path():
    model = tiny_llama()
    before = snapshot(model)
    g = torch.Generator().manual_seed(3)
    calib = [torch.randint(0, 128, (2, 16), generator=g) for _ in range(2)]
    report = quantize_model(model, cfg(fisher=True), calibration=calib)
    assert report.fisher and report.bits_per_param <= 3.5 + 1e-9
    assert len(report.entries) == 14
    assert all(math.isfinite(e.error) and e.error >= 0 for e in report.entries)
    assert all(isinstance(model.get_submodule(e.name), LQLinear) for e in report.entries)
    # Fisher-weighted errors differ from the plain ones (same model, same grid)
    plain = tiny_llama()
    rp = quantize_model(plain, cfg())
    assert [e.error for e in report.entries] != [e.error for e in rp.entries]
    # the model is left in eval mode with the same forward behaviour as its parts
    with torch.no_grad():
        assert torch.isfinite(model(calib[0]).logits).all()
    # the weights were not touched by the Fisher pass other than being replaced
    assert torch.equal(model.lm_head.weight, before["lm_head.weight"])


def test_fisher_needs_calibration():
    model = tiny_llama()
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(model, cfg(fisher=True))
    assert not any(isinstance(m, LQLinear) for m in model.modules())


def test_budget_below_smallest_config():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"smallest feasible budget is 2\.127"):
        quantize_model(model, cfg(budget_bits=2.0))
    assert not any(isinstance(m, LQLinear) for m in model.modules())


@pytest.mark.parametrize("rank,first", [(32, "k_proj"), (40, "k_proj"), (64, "q_proj"),
                                        (100, "q_proj")])
def test_rank_too_large_names_module(rank, first):
    model = tiny_llama()
    # k_proj / v_proj are 32x64, the others have min(shape) 64: the message names the
    # first module (in model order) that is too small
    with pytest.raises(ValueError, match=rf"rank {rank} .*model\.layers\.0\.self_attn\.{first}"):
        quantize_model(model, cfg(rank=rank))
    assert not any(isinstance(m, LQLinear) for m in model.modules())


@pytest.mark.parametrize("kw,exc,match", [
    (dict(budget_bits=0.0), ValueError, "budget"),
    (dict(budget_bits=float("nan")), ValueError, "budget"),
    (dict(rank=-1), ValueError, "rank"),
    (dict(grid=[]), ValueError, "grid"),
    (dict(grid=["nf4"]), ValueError, "grid"),
    (dict(grid="nope"), ValueError, "nope"),
    (dict(target_modules=["nope_proj"]), ValueError, "nope_proj"),
])
def test_bad_config(kw, exc, match):
    with pytest.raises(exc, match=match):
        quantize_model(tiny_llama(), cfg(**kw))


def test_config_type_checked():
    with pytest.raises(TypeError, match="LQLoRAConfig"):
        quantize_model(tiny_llama(), {"budget_bits": 3, "rank": 4})


# ------------------------------------------------------------------------------- BERT
def test_bert_model():
    model = tiny_bert("BertModel")
    before = snapshot(model)
    targets = expected_targets(model, BERT_BODY, extra=("pooler.dense",))
    assert len(targets) == 13
    config = cfg(lora_alpha=8.0)
    report = quantize_model(model, config)
    assert check_layers(model, before, config, report) == targets
    assert report.bits_per_param <= 3.5 + 1e-9
    for k in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
        assert torch.equal(model.state_dict()[k], before[k])
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert torch.isfinite(model(ids).last_hidden_state).all()


def test_bert_masked_lm_head_untouched():
    model = tiny_bert("BertForMaskedLM")
    before = snapshot(model)
    targets = expected_targets(model, BERT_BODY)
    targets = [t for t in targets if not t.startswith("cls.")]
    assert len(targets) == 12
    config = cfg(workers=2)
    report = quantize_model(model, config)
    assert check_layers(model, before, config, report) == targets
    head = model.cls.predictions
    assert type(head.transform.dense) is nn.Linear
    assert torch.equal(head.transform.dense.weight,
                       before["cls.predictions.transform.dense.weight"])
    assert type(head.decoder) is nn.Linear
    assert head.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_bert_classifier_untouched():
    model = tiny_bert("BertForSequenceClassification", num_labels=3)
    before = snapshot(model)
    report = quantize_model(model, cfg(grid=GRID[1:3]))
    names = [e.name for e in report.entries]
    assert "bert.pooler.dense" in names and not any("classifier" in n for n in names)
    assert type(model.classifier) is nn.Linear
    assert torch.equal(model.classifier.weight, before["classifier.weight"])
    assert torch.equal(model.classifier.bias, before["classifier.bias"])


def test_public_names():
    for name in ("quantize_model", "LQLoRAConfig", "AllocationReport", "LQLinear",
                 "solve_allocation", "config_grid", "profile_costs", "estimate_fisher",
                 "select_linear_modules"):
        assert callable(getattr(lq, name)) or isinstance(getattr(lq, name), type)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_named_before_any_work(value):
    # Before hours of Fisher and profiling (and not a bare SVD error): the module, its
    # shape, the value and its position.
    model = tiny_llama()
    w = model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        w[5, 9] = value
    want = re.escape(f"model.layers.1.mlp.down_proj.weight {tuple(w.shape)} has a non-finite "
                     f"value ({value}) at [5, 9]")
    with pytest.raises(ValueError, match=want):
        quantize_model(model, cfg())
