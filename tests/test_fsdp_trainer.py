"""The Hugging Face Trainer, unmodified, with accelerate's FSDP2 configuration on 2 CPU
processes launched by torchrun (tests/fsdp_trainer_run.py): the LQ-LoRA model is sharded per
decoder layer, trains with the same losses as DDP, resumes from a Trainer checkpoint, trains
under bf16 mixed precision after accelerate's meta-device loading, and its export loads with
from_pretrained in one process with Q bit-identical to the source checkpoint."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from lqlora_ext import LQLinear  # noqa: E402

import tiny  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PACKED = ("qcodes", "qscales", "scale2", "offset")


def _launch(model_dir, out):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port),
           os.path.join(HERE, "fsdp_trainer_run.py"), str(model_dir), str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("trainer")
    tiny.mixed_llama().save_pretrained(d / "q")
    return d, _launch(d / "q", d / "out")


def test_trainer_fsdp2_shards_the_model_and_matches_ddp(runs):
    _, res = runs
    fsdp2, ddp = res["fsdp2"], res["ddp"]
    assert fsdp2["model_class"].startswith("FSDP") and not ddp["model_class"].startswith("FSDP")
    b = fsdp2["bytes"]
    assert abs(b["packed"] - b["packed_full"] / 2) <= 14 * 4 * 4  # half of Q on each rank
    assert ddp["bytes"]["packed"] == ddp["bytes"]["packed_full"]  # DDP replicates Q
    assert len(fsdp2["losses"]) == 3
    torch.testing.assert_close(torch.tensor(fsdp2["losses"]), torch.tensor(ddp["losses"]))


def test_trainer_fsdp2_resumes_from_its_sharded_checkpoint(runs):
    d, res = runs
    assert os.path.isdir(d / "out" / "fsdp2" / "checkpoint-2" / "pytorch_model_fsdp_0")
    assert res["resumed"]["model_class"].startswith("FSDP")
    # step 3 after resuming from the step-2 checkpoint = step 3 of the uninterrupted run
    assert len(res["resumed"]["losses"]) == 3
    assert res["resumed"]["losses"][-1] == res["fsdp2"]["losses"][-1]


def test_trainer_fsdp2_bf16_mixed_precision_after_meta_device_loading(runs):
    _, res = runs
    bf16, fp32 = res["fsdp2_bf16"], res["ddp"]["losses"]
    assert bf16["model_class"].startswith("FSDP") and len(bf16["losses"]) == 3
    for got, want in zip(bf16["losses"], fp32):
        ulp = 2.0 ** (math.floor(math.log2(abs(want))) - 7)  # bf16 spacing at the loss
        assert abs(got - want) <= 2 * ulp, (bf16["losses"], fp32)


def test_trainer_fsdp2_export_loads_in_one_process(runs):
    d, _ = runs
    before = transformers.AutoModelForCausalLM.from_pretrained(d / "q")
    after = transformers.AutoModelForCausalLM.from_pretrained(d / "out" / "final")
    lq = [n for n, m in after.named_modules() if isinstance(m, LQLinear)]
    assert len(lq) == 14
    a, b = after.state_dict(), before.state_dict()
    for n in lq:
        for k in PACKED:
            assert torch.equal(a[f"{n}.{k}"], b[f"{n}.{k}"]), (n, k)  # Q is frozen
    assert any(not torch.equal(a[f"{n}.lora_A"], b[f"{n}.lora_A"]) for n in lq)  # trained
    x = tiny.tokens(2, 16)
    assert torch.isfinite(after(x, labels=x).loss)
