"""estimate_fisher against hand-computed per-sequence gradients; select_linear_modules on
tiny Llama and BERT models built from configs (no downloads)."""
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from lqlora_ext.method.fisher import estimate_fisher  # noqa: E402
from lqlora_ext.method.targets import select_linear_modules  # noqa: E402

LLAMA_BODY = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
BERT_BODY = ["attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "intermediate.dense", "output.dense"]


def tiny_llama(tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                   max_position_embeddings=64, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg)


def bert_config(**kw):
    return transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, vocab_size=64,
                                   max_position_embeddings=64, **kw)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def hand_fisher(model, rows, names, attention_masks=None):
    """sum over sequences of grad**2, one autograd call per sequence."""
    mods = dict(model.named_modules())
    weights = [mods[n].weight for n in names]
    out = {n: torch.zeros_like(w) for n, w in zip(names, weights)}
    was = model.training
    model.eval()
    for r, ids in enumerate(rows):
        ids = ids.unsqueeze(0)
        labels = ids.clone()
        kw = {}
        if attention_masks is not None:
            mask = attention_masks[r].unsqueeze(0)
            labels[mask == 0] = -100
            kw["attention_mask"] = mask
        loss = model(input_ids=ids, labels=labels, **kw).loss
        grads = torch.autograd.grad(loss, weights)
        for n, g in zip(names, grads):
            out[n] += g.float() ** 2
    model.train(was)
    return out


def assert_fisher_equal(got, want):
    assert set(got) == set(want)
    for n in want:
        assert got[n].dtype == torch.float32 and got[n].device.type == "cpu"
        assert got[n].shape == want[n].shape
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-12)


def test_fisher_matches_per_sequence_autograd(llama):
    g = torch.Generator().manual_seed(1)
    b1 = torch.randint(0, 64, (3, 12), generator=g)
    b2 = torch.randint(0, 64, (2, 12), generator=g)
    got = estimate_fisher(llama, [b1, b2], progress=False)
    names = list(select_linear_modules(llama))
    want = hand_fisher(llama, list(b1) + list(b2), names)
    assert_fisher_equal(got, want)
    assert all(got[n].sum() > 0 for n in names)


def test_fisher_is_a_sum_not_a_batch_gradient(llama):
    # squared per-sequence gradients differ from the squared gradient of the batch loss
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    f = estimate_fisher(llama, [ids], target_modules=["q_proj"], progress=False)
    w = llama.model.layers[0].self_attn.q_proj.weight
    llama.eval()
    w.requires_grad_(True)
    (g,) = torch.autograd.grad(llama(input_ids=ids, labels=ids).loss, [w])
    assert not torch.allclose(f["model.layers.0.self_attn.q_proj"], g ** 2, rtol=1e-2)


def test_fisher_dict_batches_with_padding(llama):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding on the second sequence
    one = torch.randint(0, 64, (8,), generator=g)  # a single 1-D sequence
    got = estimate_fisher(llama, [{"input_ids": ids, "attention_mask": mask},
                                  {"input_ids": one}], target_modules=["v_proj", "down_proj"],
                          progress=False)
    names = [n for n in select_linear_modules(llama, ["v_proj", "down_proj"])]
    assert len(names) == 4
    want = hand_fisher(llama, list(ids), names, attention_masks=list(mask))
    extra = hand_fisher(llama, [one], names)
    assert_fisher_equal(got, {n: want[n] + extra[n] for n in names})


def test_fisher_only_targets_and_restores_state():
    model = tiny_llama(seed=4)
    model.train()
    model.model.layers[1].eval()  # a mixed train/eval state must come back as it was
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    q = model.model.layers[0].self_attn.q_proj.weight
    sentinel = torch.full_like(q, 7.0)
    q.grad = sentinel
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}

    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    f = estimate_fisher(model, ids, target_modules=r"model\.layers\.0\.self_attn\.[qk]_proj",
                        progress=False)
    assert list(f) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert q.grad is sentinel
    assert all(p.grad is None for n, p in model.named_parameters() if "q_proj" not in n
               or "layers.0" not in n)

    # also on error, mid-way through the data
    with pytest.raises(ValueError, match="batch 1"):
        estimate_fisher(model, [ids, "not a batch"], progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert q.grad is sentinel


def test_fisher_errors(llama):
    with pytest.raises(ValueError, match="no sequences"):
        estimate_fisher(llama, [], progress=False)
    with pytest.raises(ValueError, match="selected no nn.Linear"):
        estimate_fisher(llama, [torch.zeros(1, 4, dtype=torch.long)], target_modules="nothing.*",
                        progress=False)
    with pytest.raises(ValueError, match="input_ids must be"):
        estimate_fisher(llama, [torch.zeros(1, 4)], progress=False)


def test_select_llama():
    model = tiny_llama()
    sel = select_linear_modules(model)
    assert list(sel) == [f"model.layers.{i}.{s}" for i in range(2) for s in LLAMA_BODY]
    assert all(isinstance(m, nn.Linear) for m in sel.values())
    # suffixes (PEFT-style), dotted suffixes, regex
    assert list(select_linear_modules(model, ["q_proj", "v_proj"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert list(select_linear_modules(model, ("mlp.down_proj",))) == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert len(select_linear_modules(model, r"model\.layers\.1\..*")) == 7
    # an explicit untied head may be chosen; "all-linear" never picks it
    assert list(select_linear_modules(model, ["lm_head"])) == ["lm_head"]
    with pytest.raises(ValueError, match=r"\['v_prj'\] matched no nn.Linear"):
        select_linear_modules(model, ["q_proj", "v_prj"])
    with pytest.raises(ValueError, match="selected no nn.Linear"):
        select_linear_modules(model, "q_proj")  # a regex must match the full name
    with pytest.raises(ValueError, match="selected no nn.Linear"):
        select_linear_modules(model, ["embed_tokens"])
    with pytest.raises(ValueError, match="valid regular expression"):
        select_linear_modules(model, "([")


def test_select_llama_tied_head():
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert len(select_linear_modules(model)) == 14
    with pytest.raises(ValueError, match="tied to the input embeddings"):
        select_linear_modules(model, ["lm_head"])


def test_select_bert_family():
    mlm = transformers.BertForMaskedLM(bert_config())
    body = [f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in BERT_BODY]
    assert list(select_linear_modules(mlm)) == body  # cls.predictions.* excluded
    assert "cls.predictions.transform.dense" in dict(mlm.named_modules())

    base = transformers.BertModel(bert_config())
    assert list(select_linear_modules(base)) == (
        [f"encoder.layer.{i}.{s}" for i in range(2) for s in BERT_BODY] + ["pooler.dense"])

    clf = transformers.BertForSequenceClassification(bert_config(num_labels=3))
    sel = select_linear_modules(clf)
    assert "bert.pooler.dense" in sel and "classifier" not in sel
    assert list(select_linear_modules(clf, ["query", "value"])) == [
        f"bert.encoder.layer.{i}.attention.self.{s}" for i in range(2) for s in ("query", "value")]


def test_fisher_bert_masked_lm_with_labels():
    torch.manual_seed(6)
    mlm = transformers.BertForMaskedLM(bert_config())
    ids = torch.randint(5, 64, (2, 8), generator=torch.Generator().manual_seed(7))
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    masked = ids.clone()
    masked[:, 2] = 4
    f = estimate_fisher(mlm, [{"input_ids": masked, "labels": labels}],
                        target_modules=["query"], progress=False)
    mlm.eval()
    names = list(f)
    weights = [dict(mlm.named_modules())[n].weight for n in names]
    want = {n: torch.zeros_like(w) for n, w in zip(names, weights)}
    for r in range(2):
        loss = mlm(input_ids=masked[r:r + 1], labels=labels[r:r + 1]).loss
        for n, g in zip(names, torch.autograd.grad(loss, weights)):
            want[n] += g ** 2
    assert_fisher_equal(f, want)


def test_select_plain_modules():
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert list(select_linear_modules(seq)) == ["0", "2"]
    with pytest.raises(ValueError, match="has no nn.Linear"):
        select_linear_modules(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError):
        select_linear_modules("not a model")


def test_fisher_names_out_of_vocabulary_ids(llama):
    # An id past the embedding table would be an IndexError deep in the model (a device
    # assert on a GPU): the batch, row and position are named instead.
    vocab = llama.get_input_embeddings().num_embeddings
    good = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    bad = good.clone()
    bad[1, 4] = vocab + 3
    with pytest.raises(ValueError, match=rf"batch 1, row 1: token id {vocab + 3} at position 4 "
                                         rf"is outside the model's vocabulary \(0..{vocab - 1}\)"):
        estimate_fisher(llama, [good, bad], progress=False)
    with pytest.raises(ValueError, match="token id -1 at position 0"):
        estimate_fisher(llama, [torch.full((1, 3), -1)], progress=False)
