"""FSDP2 (fully_shard) over LQ-LoRA models, 2 gloo ranks on CPU against one process.

One spawned pair of ranks runs every healthy scenario in turn (process start-up dominates
on a 2-core runner) and writes its results; the tests below check them:
- the packed tensors are sharded (~1/2 per rank) and all-gather bit-identically;
- training losses equal single-process training (fp32), also with activation
  checkpointing, and with a bf16 MixedPrecisionPolicy equal a 1-rank FSDP2 run within bf16
  rounding, while the packed tensors stay bit-exact in their own dtypes inside forward;
- torch.distributed.checkpoint save / load / resume; a full save_pretrained that
  from_pretrained loads in one process; a sharded checkpoint read by one process;
- estimate_fisher on a sharded dense model equals the single-process Fisher.
A second pair holds different quantizations on its two ranks (bad input).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import traceback

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lqlora_ext import LQLinear  # noqa: E402

import tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PACKED = ("qcodes", "qscales", "scale2", "offset")
STEPS = 3


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bits(t):
    t = t.detach()
    return t.view(torch.uint8) if t.dtype.is_floating_point else t


def _plain(t) -> bool:
    """Not a DTensor shard: the whole tensor, gathered."""
    return type(t).__name__ != "DTensor"


def _packed(model):
    return {f"{n}.{k}": getattr(m, k).detach().clone() for n, m in model.named_modules()
            if isinstance(m, LQLinear) for k in PACKED}


def _train(model, steps, rank=0, world=1, first=0, opt=None):
    """AdamW steps on batches of 4 sequences, rank r taking rows r::world; returns the
    full-batch mean losses (equal token counts per rank) and the optimizer."""
    import torch.distributed as dist

    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for s in range(first, first + steps):
        x = tiny.tokens(4, 16, seed=100 + s)[rank::world]
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        val = loss.detach().float().clone()
        if world > 1:
            dist.all_reduce(val)
            val /= world
        losses.append(val.item())
    return losses, opt


def _checkpointing(model):
    enable = getattr(model, "activation_checkpointing_enable", None) or \
        model.gradient_checkpointing_enable  # renamed in transformers 5
    enable()


def _load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).train()


def _init(rank, world, port):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)


def _unshard_all(model, on: bool):
    from torch.distributed.fsdp import FSDPModule

    for mod in model.modules():
        if isinstance(mod, FSDPModule):
            mod.unshard() if on else mod.reshard()


# --------------------------------------------------------------------------- healthy pair
def _worker(rank, world, port, d):
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from lqlora_ext import estimate_fisher, quantize_model
    from lqlora_ext.distributed import fsdp as lqf

    _init(rank, world, port)
    res = {}
    q = os.path.join(d, "q")
    try:
        # 1. sharding and bit-exact all-gather
        m = _load(q)
        ref = _packed(m)
        lqf.shard_model(m)
        res["bytes"] = lqf.local_bytes(m)
        res["sharded"] = all(type(getattr(lay, k)).__name__ == "DTensor"
                             for lay in m.modules() if isinstance(lay, LQLinear) for k in PACKED)
        _unshard_all(m, True)
        got = _packed(m)
        res["bitexact"] = {k: got[k].dtype == ref[k].dtype and _plain(got[k])
                           and torch.equal(_bits(got[k]), _bits(ref[k])) for k in ref}
        _unshard_all(m, False)

        # 1b. code words whose bits read as NaN if viewed as floats (signalling, quiet,
        # negative, payloads), in every layer: FSDP must move them as integers
        m0 = _load(q)
        nan_bits = torch.tensor([0x7FA00001, 0x7FC00000, -0x3FFFFF, 0x7F800001, 0x7FFFFFFF],
                                dtype=torch.int32)
        for lay in m0.modules():
            if isinstance(lay, LQLinear):
                with torch.no_grad():
                    lay.qcodes[:5] = nan_bits
                    lay.qcodes[-5:] = nan_bits
        ref0 = _packed(m0)
        lqf.shard_model(m0)
        _unshard_all(m0, True)
        got0 = _packed(m0)
        res["nan_bits_exact"] = all(torch.equal(got0[k], ref0[k]) for k in ref0)
        del m0

        # 2. fp32 training
        res["fp32"], _ = _train(m, STEPS, rank, world)

        # 3. activation checkpointing
        m = _load(q)
        _checkpointing(m)
        lqf.shard_model(m)
        res["ckpt"], _ = _train(m, STEPS, rank, world)

        # 4. bf16 mixed precision; reference: the same policy on a 1-rank mesh
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        seen = {}

        def capture(mod, args, name):
            seen.setdefault(name, {k: getattr(mod, k).detach().clone() for k in PACKED})
            seen[name + ".lora_dtype"] = str(mod.lora_A.dtype)

        m = _load(q)
        for n, lay in m.named_modules():
            if isinstance(lay, LQLinear):
                lay.register_forward_pre_hook(lambda mod, a, n=n: capture(mod, a, n))
        lqf.shard_model(m, mp_policy=mp)
        res["bf16"], _ = _train(m, STEPS, rank, world)
        res["bf16_packed_exact"] = {
            f"{n}.{k}": _plain(t) and t.dtype == ref[f"{n}.{k}"].dtype
            and torch.equal(_bits(t), _bits(ref[f"{n}.{k}"]))
            for n, v in seen.items() if isinstance(v, dict) for k, t in v.items()}
        res["bf16_lora_dtypes"] = sorted({v for k, v in seen.items() if k.endswith("lora_dtype")})
        singles = [dist.new_group([r]) for r in range(world)]
        m = _load(q)
        lqf.shard_model(m, mp_policy=mp, mesh=DeviceMesh.from_group(singles[rank], "cpu"))
        res["bf16_1rank"], _ = _train(m, STEPS)

        # 5. sharded checkpoint (DCP), resume
        m = _load(q)
        lqf.shard_model(m)
        _, opt = _train(m, 2, rank, world)
        lqf.save_sharded(os.path.join(d, "ckpt"), m, opt, extra={"step": 2})
        sd = lqf.full_state_dict(m)
        if rank == 0:
            torch.save(sd, os.path.join(d, "ckpt_full.pt"))
        res["dcp_continued"], _ = _train(m, 2, rank, world, first=2, opt=opt)
        m2 = _load(q)
        lqf.shard_model(m2)
        opt2 = torch.optim.AdamW([p for p in m2.parameters() if p.requires_grad], lr=1e-2)
        res["dcp_extra"] = lqf.load_sharded(os.path.join(d, "ckpt"), m2, opt2)
        res["dcp_resumed"], _ = _train(m2, 2, rank, world, first=2, opt=opt2)

        # 6. full save_pretrained from rank 0 (the model's own would write rank shards)
        try:
            m2.save_pretrained(os.path.join(d, f"plain{rank}"))
            res["plain_save_sharded"] = "no error"
        except ValueError as e:
            res["plain_save_sharded"] = str(e)
        res["plain_save_left_nothing"] = not os.path.exists(os.path.join(d, f"plain{rank}")) \
            or os.listdir(os.path.join(d, f"plain{rank}")) == []
        lqf.save_pretrained(m2, os.path.join(d, "full"))
        sd = lqf.full_state_dict(m2)
        if rank == 0:
            torch.save(sd, os.path.join(d, "full_sd.pt"))
        res["full_sd_empty_off_rank0"] = rank == 0 or sd == {}

        # 7. Fisher of a sharded dense model (5 sequences: the last group is ragged)
        dense = tiny.llama(tie_word_embeddings=True)  # tied: embedding + head in one unit
        lqf.shard_model(dense)
        fisher = estimate_fisher(dense, tiny.tokens(5, 16, seed=7), progress=False)
        res["fisher_local_fraction"] = sum(f.to_local().numel() for f in fisher.values()) / \
            sum(f.numel() for f in fisher.values())
        full = {k: f.full_tensor() for k, f in fisher.items()}
        if rank == 0:
            torch.save(full, os.path.join(d, "fisher.pt"))

        # 8. quantize_model after fully_shard
        try:
            quantize_model(dense, tiny.lq_config())
            res["quantize_after_shard"] = "no error"
        except ValueError as e:
            res["quantize_after_shard"] = str(e)

        # 9. the ranks hold different quantizations (last: it leaves FSDP state half-run)
        res.update(_different_quantizations(rank, d))
    except BaseException:
        res["error"] = traceback.format_exc()
        raise
    finally:
        with open(os.path.join(d, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    tiny.mixed_llama(tiny.GRID).save_pretrained(d / "q")
    # Another quantization of the same model: other configs per layer.
    tiny.mixed_llama(tiny.GRID[::-1]).save_pretrained(d / "q_other")
    return d


@pytest.fixture(scope="module")
def run(ckpts):
    import torch.multiprocessing as mp

    d = ckpts
    mp.start_processes(_worker, args=(2, _port(), str(d)), nprocs=2, start_method="spawn",
                       join=True)
    res = [json.loads((d / f"rank{r}.json").read_text()) for r in (0, 1)]
    return d, res


def test_packed_tensors_are_sharded_and_all_gather_bit_identical(run):
    _, res = run
    for r in res:
        assert r["sharded"]
        assert r["bitexact"] and all(r["bitexact"].values()), r["bitexact"]
        assert r["nan_bits_exact"]  # no NaN canonicalization of packed bits
        b = r["bytes"]
        # Each rank holds half of every packed tensor: ceil(n/2) or floor(n/2) elements of
        # each of the 14 layers' 4 tensors (at most 4 bytes each).
        assert abs(b["packed"] - b["packed_full"] / 2) <= 14 * 4 * 4
        assert b["trainable"] * 2 == b["trainable_full"]
    assert res[0]["bytes"]["packed"] + res[1]["bytes"]["packed"] == res[0]["bytes"]["packed_full"]


@pytest.fixture(scope="module")
def single(run):
    """Single-process references, from the same checkpoint."""
    d, _ = run
    out = {"fp32": _train(_load(d / "q"), STEPS)[0]}
    m = _load(d / "q")
    _checkpointing(m)
    out["ckpt"] = _train(m, STEPS)[0]
    out["four"] = _train(_load(d / "q"), 4)[0]
    return out


@pytest.mark.parametrize("variant", ["fp32", "ckpt"])
def test_training_losses_equal_single_process(run, single, variant):
    _, res = run
    for r in res:
        torch.testing.assert_close(torch.tensor(r[variant]), torch.tensor(single[variant]))
    assert single[variant][-1] < single[variant][0]  # it trains


def test_bf16_mixed_precision_matches_one_rank_and_never_casts_packed(run, single):
    _, res = run
    for r in res:
        assert r["bf16_packed_exact"] and all(r["bf16_packed_exact"].values()), \
            [k for k, v in r["bf16_packed_exact"].items() if not v]
        assert r["bf16_lora_dtypes"] == ["torch.bfloat16"]  # the policy did apply
        # Tolerance from the baseline: 2 ranks differ from 1 rank (same policy) by at most
        # twice what bf16 itself does to the losses (1 rank bf16 vs fp32).
        two, one, fp32 = (torch.tensor(v) for v in (r["bf16"], r["bf16_1rank"], single["fp32"]))
        base = (one - fp32).abs().max()
        assert 0 < base < 1e-2 * fp32.abs().max()
        assert (two - one).abs().max() <= 2 * base, (two, one, fp32)


def test_sharded_checkpoint_resumes_training_exactly(run, single):
    _, res = run
    for r in res:
        assert r["dcp_extra"] == {"step": 2}
        torch.testing.assert_close(torch.tensor(r["dcp_resumed"]),
                                   torch.tensor(r["dcp_continued"]), rtol=0, atol=0)
        torch.testing.assert_close(torch.tensor(r["dcp_resumed"]), torch.tensor(single["four"][2:]))


def test_sharded_checkpoint_loads_in_one_process_and_refuses_another_quantization(run, tmp_path):
    from lqlora_ext.distributed.fsdp import load_sharded

    d, _ = run
    m = _load(d / "q")  # another world size (1, no process group): DCP reshards
    assert load_sharded(str(d / "ckpt"), m) == {"step": 2}
    want = torch.load(d / "ckpt_full.pt")
    got = m.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(_bits(got[k]), _bits(want[k])), k
    other = _load(d / "q_other")
    with pytest.raises(ValueError, match=r"another quantization than the model \(module "
                                         r"'model.layers.0.self_attn.q_proj'"):
        load_sharded(str(d / "ckpt"), other)
    with pytest.raises(ValueError, match="is not an lqlora sharded checkpoint"):
        load_sharded(str(d / "q"), m)
    shutil.copytree(d / "ckpt", tmp_path / "c")
    man = json.loads((tmp_path / "c" / "lqlora_fsdp.json").read_text())
    man["has_optimizer"] = False
    (tmp_path / "c" / "lqlora_fsdp.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="holds no optimizer state"):
        load_sharded(str(tmp_path / "c"), m, torch.optim.AdamW(
            [p for p in m.parameters() if p.requires_grad]))
    (tmp_path / "c" / "lqlora_fsdp.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt manifest"):
        load_sharded(str(tmp_path / "c"), m)


def test_full_save_pretrained_loads_in_one_process(run):
    d, res = run
    assert all(r["full_sd_empty_off_rank0"] for r in res)
    m = transformers.AutoModelForCausalLM.from_pretrained(d / "full")
    want = torch.load(d / "full_sd.pt")
    got = m.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(_bits(got[k]), _bits(want[k])), k
    x = tiny.tokens(2, 16)
    assert torch.isfinite(m(x, labels=x).loss)


def test_fisher_of_sharded_model_equals_single_process(run):
    from lqlora_ext import estimate_fisher

    d, res = run
    ref = estimate_fisher(tiny.llama(tie_word_embeddings=True), tiny.tokens(5, 16, seed=7),
                          progress=False)
    got = torch.load(d / "fisher.pt")
    assert got.keys() == ref.keys() and len(ref) == 14
    for k in ref:
        assert ref[k].abs().sum() > 0
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6 * float(ref[k].max()))
    for r in res:
        assert 0.5 <= r["fisher_local_fraction"] <= 0.52  # each rank accumulates its shard


def test_plain_save_pretrained_of_a_sharded_model_is_refused(run):
    # Each rank would write only its shards under the full names: a checkpoint that loads
    # wrong. The refusal names the way that gathers first.
    _, res = run
    for r in res:
        assert "is a DTensor" in r["plain_save_sharded"], r["plain_save_sharded"]
        assert "lqlora_ext.distributed.fsdp.save_pretrained" in r["plain_save_sharded"]
        assert r["plain_save_left_nothing"]


def test_quantize_model_after_fully_shard_is_refused(run):
    _, res = run
    for r in res:
        assert "already sharded" in r["quantize_after_shard"]
        assert "model.layers.0.self_attn.q_proj.weight is a DTensor" in r["quantize_after_shard"]


def _different_quantizations(rank, d):
    from torch.distributed.fsdp import fully_shard

    from lqlora_ext.distributed import fsdp as lqf

    res = {}
    m = _load(os.path.join(d, "q" if rank == 0 else "q_other"))
    try:
        lqf.shard_model(m)
        res["bad_shard_model"] = "no error"
    except ValueError as e:
        res["bad_shard_model"] = str(e)
    # By hand (as accelerate does): the first all-gather of each layer checks it.
    for layer in m.model.layers:
        fully_shard(layer)
    fully_shard(m)
    x = tiny.tokens(2, 16)
    try:
        m(x, labels=x)
        res["bad_fully_shard"] = "no error"
    except ValueError as e:
        res["bad_fully_shard"] = str(e)
    return res


def test_ranks_holding_different_quantizations_get_a_clear_error(run):
    _, res = run
    for r in res:
        assert "check_layout: rank 1 holds a different quantization than rank 0 (module " \
               "'model.layers.0.self_attn.q_proj'" in r["bad_shard_model"], r["bad_shard_model"]
        assert "hold different quantizations of this layer" in r["bad_fully_shard"], \
            r["bad_fully_shard"]
