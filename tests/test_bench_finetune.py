"""bench/finetune_memory.py on a config-built Llama (``--model config:tiny:2``): the path that
scripts/gpu_check.sh runs with ``config:llama2-7b:2 --device cuda`` (issue 5's table), here on
the CPU with tiny shapes: quantize (--prepare), save, reload, train each variant in its own
process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "finetune_memory.py")


def test_config_model_variants_train_and_report(tmp_path):
    out = tmp_path / "ft"
    cmd = [sys.executable, BENCH, "--model", "config:tiny:2", "--prepare", "--steps", "2",
           "--batch-size", "2", "--seq-len", "16", "--rank", "4", "--dtype", "bfloat16",
           "--variants", "dense-lora,lq-ilp-2.75", "--work", str(tmp_path / "w"),
           "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "ft.json").read_text())
    assert rep["meta"]["model"] == "config:tiny:2" and rep["meta"]["dtype"] == "bfloat16"
    res = {x["variant"]: x for x in rep["results"]}
    assert set(res) == {"dense-lora", "lq-ilp-2.75"}
    for v, x in res.items():
        assert "error" not in x, (v, x)
        assert len(x["step_s"]) == 2 and x["trainable_params"] > 0
    # Same rank and targets: the same adapter size; the packed 2.75-bit base is smaller.
    assert res["lq-ilp-2.75"]["trainable_params"] == res["dense-lora"]["trainable_params"]
    assert res["lq-ilp-2.75"]["model_tensor_mib"] < 0.8 * res["dense-lora"]["model_tensor_mib"]
    md = (tmp_path / "ft.md").read_text()
    assert "config:tiny:2" in md and "bfloat16" in md and "| lq-ilp-2.75 |" in md


def test_unknown_config_model_is_refused(tmp_path):
    r = subprocess.run([sys.executable, BENCH, "--model", "config:nope", "--prepare",
                        "--variants", "lq-uniform-nf4", "--work", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "unknown config 'nope'" in r.stderr
