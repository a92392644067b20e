"""The Hugging Face Trainer, unmodified, with accelerate's FSDP2 configuration on 2 CPU
processes launched by torchrun (tests/fsdp_trainer_run.py): the LQ-LoRA model is sharded per
decoder layer, trains with the same losses as DDP, resumes from a Trainer checkpoint, and
its export loads with from_pretrained in one process with Q unchanged."""
from __future__ import annotations

import json
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


def _launch(model_dir, out, mode):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port),
           os.path.join(HERE, "fsdp_trainer_run.py"), str(model_dir), str(out), mode]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("trainer")
    tiny.mixed_llama().save_pretrained(d / "q")
    return d, _launch(d / "q", d / "fsdp2", "fsdp2"), _launch(d / "q", d / "ddp", "ddp")


def test_trainer_fsdp2_shards_the_model_and_matches_ddp(runs):
    _, fsdp2, ddp = runs
    assert fsdp2["model_class"].startswith("FSDP") and not ddp["model_class"].startswith("FSDP")
    b = fsdp2["bytes"]
    assert abs(b["packed"] - b["packed_full"] / 2) <= 14 * 4 * 4  # half of Q on each rank
    assert ddp["bytes"]["packed"] == ddp["bytes"]["packed_full"]  # DDP replicates Q
    assert len(fsdp2["losses"]) == 3
    torch.testing.assert_close(torch.tensor(fsdp2["losses"]), torch.tensor(ddp["losses"]))


def test_trainer_fsdp2_resumes_from_its_sharded_checkpoint(runs):
    d, fsdp2, _ = runs
    assert os.path.isdir(d / "fsdp2" / "checkpoint-2" / "pytorch_model_fsdp_0")
    # step 3 after resuming from the step-2 checkpoint = step 3 of the uninterrupted run
    torch.testing.assert_close(fsdp2["resumed_losses"][-1], fsdp2["losses"][-1], rtol=0, atol=0)


def test_trainer_fsdp2_export_loads_in_one_process(runs):
    d, _, _ = runs
    before = transformers.AutoModelForCausalLM.from_pretrained(d / "q")
    after = transformers.AutoModelForCausalLM.from_pretrained(d / "fsdp2" / "final")
    lq = [n for n, m in after.named_modules() if isinstance(m, LQLinear)]
    assert len(lq) == 14
    a, b = after.state_dict(), before.state_dict()
    for n in lq:
        for k in PACKED:
            assert torch.equal(a[f"{n}.{k}"], b[f"{n}.{k}"]), (n, k)  # Q is frozen
    assert any(not torch.equal(a[f"{n}.lora_A"], b[f"{n}.lora_A"]) for n in lq)  # trained
    x = tiny.tokens(2, 16)
    assert torch.isfinite(after(x, labels=x).loss)
