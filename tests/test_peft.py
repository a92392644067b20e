"""PEFT integration: PEFT LoRA layers over LQLinear start from the LQ-LoRA factors (same
function), train, save and load with PEFT's own methods, fold back into LQLinear exactly,
refuse a lossy merge, and work under Trainer."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lqlora_ext  # noqa: E402,F401
import lqlora_ext.integrations.peft as lqp  # noqa: E402
from lqlora_ext import LQLinear  # noqa: E402

import tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(m, x):
    with torch.no_grad():
        return m(x).logits


def _train(model, x, steps=5, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("alpha", [None, 16])
def test_wrapping_keeps_the_function_and_trains_only_adapters(alpha):
    m = tiny.quantized_llama()
    x = tiny.tokens()
    ref = _logits(m, x)
    kw = {} if alpha is None else {"lora_alpha": alpha}
    pm = peft.get_peft_model(m, lqp.lora_config(m, **kw))
    layers = [mod for mod in pm.modules() if isinstance(mod, lqp.LQLoraLinear)]
    assert len(layers) == 14
    assert all(lay.get_base_layer().lora_A is None for lay in layers)  # base keeps Q only
    torch.testing.assert_close(_logits(pm, x), ref, rtol=1e-5, atol=1e-5)
    train = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert train and all(".lora_A." in n or ".lora_B." in n for n in train)
    losses = _train(pm, x)
    assert losses[-1] < losses[0]


def test_fused_forward_equals_peft_generic_path():
    m = tiny.quantized_llama()
    pm = peft.get_peft_model(m, lqp.lora_config(m))
    lay = pm.base_model.model.model.layers[0].mlp.down_proj
    with torch.no_grad():  # make B nonzero and distinct from the LQ init
        lay.lora_B["default"].weight.normal_()
    x = torch.randn(3, 5, lay.in_features)
    fused = lay(x)
    assert lay._fusable(None) == "default"
    generic = super(lqp.LQLoraLinear, lay).forward(x)
    torch.testing.assert_close(fused, generic, rtol=1e-5, atol=1e-5)
    with pm.disable_adapter():  # Q only
        torch.testing.assert_close(lay(x), lay.get_base_layer()(x), rtol=0, atol=0)


def test_adapter_save_load_round_trip_and_fold(tmp_path):
    m = tiny.quantized_llama()
    m.save_pretrained(tmp_path / "base")
    x = tiny.tokens()
    pm = peft.get_peft_model(m, lqp.lora_config(m, lora_dropout=0.1))
    _train(pm, x)
    trained = _logits(pm, x)
    pm.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    pm2 = lqp.from_pretrained(base, str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(pm2, x), trained, rtol=0, atol=0)

    folded = lqp.fold_adapters(pm2)
    assert not any(isinstance(mod, lqp.LQLoraLinear) for mod in folded.modules())
    torch.testing.assert_close(_logits(folded, x), trained, rtol=1e-5, atol=1e-5)
    folded.save_pretrained(tmp_path / "folded")  # quantization_config follows the fold
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "folded")
    torch.testing.assert_close(_logits(again, x), _logits(folded, x), rtol=0, atol=0)


def test_merge_refused_with_guidance_and_requantize_path():
    m = tiny.quantized_llama()
    pm = peft.get_peft_model(m, lqp.lora_config(m))
    with pytest.raises(NotImplementedError, match="fold_adapters"):
        pm.merge_and_unload()
    folded = lqp.fold_adapters(pm)
    lay = folded.model.layers[0].self_attn.q_proj
    dense = lay.merge_lowrank()
    x = torch.randn(4, lay.in_features)
    torch.testing.assert_close(dense(x), lay(x), rtol=1e-5, atol=1e-5)
    re = lay.requantize()
    assert isinstance(re, LQLinear) and re.rank == lay.rank
    err_re = (re.dense_weight() - lay.dense_weight()).norm()
    err_q = (lay.qweight.dequantize() - lay.dense_weight()).norm()
    assert err_re < err_q  # a fresh decomposition beats dropping the adapter


def test_rank_mismatch_and_non_lq_model_refused():
    m = tiny.quantized_llama()
    with pytest.raises(ValueError, match="rank 4 but LoraConfig asks r=8"):
        peft.get_peft_model(m, lqp.lora_config(m, r=8))
    with pytest.raises(ValueError, match="no LQLinear layers"):
        lqp.lora_config(tiny.llama())


def test_trainer_on_peft_model(tmp_path):
    m = tiny.quantized_llama()
    pm = peft.get_peft_model(m, lqp.lora_config(m))
    seqs = tiny.tokens(16, 16, seed=3)
    seqs[:, 1::2] = seqs[:, ::2]
    data = [{"input_ids": s, "labels": s} for s in seqs]
    args = transformers.TrainingArguments(str(tmp_path), per_device_train_batch_size=8,
                                          num_train_epochs=6, learning_rate=2e-2,
                                          logging_steps=1, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    tr = transformers.Trainer(model=pm, args=args, train_dataset=data)
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert sum(losses[-2:]) < sum(losses[:2]) - 0.1, losses
