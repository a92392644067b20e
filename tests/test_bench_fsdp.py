"""bench/fsdp_memory.py on a config-built tiny Llama: quantize once into a DCP checkpoint,
then 1 and 2 torchrun ranks build the model on the meta device, shard it, load only their
shards and train. Marked slow (three process launches): ``--runslow`` runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "fsdp_memory.py")


@pytest.mark.slow
def test_one_and_two_ranks_report_per_rank_memory(tmp_path):
    out = tmp_path / "fsdp"
    cmd = [sys.executable, BENCH, "--prepare", "--model", "config:tiny:2", "--ranks", "1,2",
           "--rank", "4", "--seq-len", "16", "--steps", "2", "--work", str(tmp_path / "w"),
           "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rep = json.loads((tmp_path / "fsdp.json").read_text())
    assert rep["meta"]["model"] == "config:tiny:2" and rep["meta"]["torch"]
    one, two = rep["runs"]["1"], rep["runs"]["2"]
    assert len(one) == 1 and len(two) == 2
    full = one[0]["bytes"]["packed"]
    assert full == one[0]["bytes"]["packed_full"] > 0
    # two ranks: each holds about half of the packed tensors, together all of them
    assert sum(x["bytes"]["packed"] for x in two) == full
    assert all(abs(x["bytes"]["packed"] - full / 2) <= 14 * 4 * 4 for x in two)
    md = (tmp_path / "fsdp.md").read_text()
    assert "| 2 | 1 |" in md and "config:tiny:2" in md
