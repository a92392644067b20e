"""Plumbing of bench/bench_cuda.py without a GPU: it runs end to end on the CPU (--device cpu
--quick, tiny shapes) and writes the JSON / Markdown that a GPU run writes (scripts/gpu_check.sh
itself: tests/test_gpu_check.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "bench_cuda.py")

ROW_KEYS = {"shape", "N", "K", "M", "impl", "bytes", "copies", "eager_us", "us", "timing",
            "gbs", "frac_bw", "speedup_vs_bf16", "rel_err", "ok"}
TARGET_IDS = {"m1-nf4-speedup", "m1-nf3-speedup", "m1-nf2-speedup", "m1-nf4-bandwidth",
              "m16-nf4-speedup", "large-m-throughput", "lora-overhead-m1", "faster-than-bnb",
              "rsvd-speedup", "profile-grid"}


@pytest.fixture(scope="module")
def plumbing_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_cuda")
    out, md = d / "b.json", d / "b.md"
    # One OpenMP thread: on a loaded 2-core runner, spinning thread pools make tiny ops take
    # milliseconds each (the numbers are not measurements here anyway).
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # M = 1, 16 (decode path), 40 (M > 16: the dequantize + matmul path); 1024 makes the
    # large-M target apply. K = 64 and the ragged K = 100 of "odd".
    r = subprocess.run([sys.executable, BENCH, "--device", "cpu", "--quick", "--m", "1,16,1024",
                        "--out", str(out), "--md", str(md)],
                       capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text()), md.read_text(), r.stdout


def test_json_schema(plumbing_run):
    res, _, _ = plumbing_run
    assert {"info", "qmatmul", "rsvd", "profiling", "targets", "targets_summary",
            "errors"} <= set(res)
    info = res["info"]
    assert info["plumbing"] is True and "NOT a measurement" in info["note"]
    for k in ("device", "torch", "date", "command", "copy_bw_gbs", "l2_bytes", "settings"):
        assert k in info, k
    assert res["errors"] == [] and res["wrong_outputs"] == []
    rows = res["qmatmul"]
    impls = {r["impl"] for r in rows}
    assert {"cublas bf16", "cublas bf16 (repeat)", "lqlora nf4", "lqlora nf3", "lqlora nf2",
            "lqlora nf4 +lora64"} <= impls
    assert {r["M"] for r in rows} == {1, 16, 1024}
    assert {r["shape"] for r in rows} == {"k64-100x64", "odd-53x100"}
    for r in rows:
        assert ROW_KEYS <= set(r), (r["impl"], ROW_KEYS - set(r))
        assert r["ok"] and r["rel_err"] < 1e-2 and r["rows_checked"] == r["M"]
        assert r["timing"] == "eager" and "graph_us" not in r  # no CUDA graphs on the CPU
        assert r["us"] > 0 and r["copies"] >= 2 and r["bytes"] > 0
    base = [r for r in rows if r["impl"] == "cublas bf16"]
    assert all(r["speedup_vs_bf16"] == 1.0 and "repeat_spread" in r for r in base)
    nf4 = next(r for r in rows if r["impl"] == "lqlora nf4" and r["M"] == 1)
    nf2 = next(r for r in rows if r["impl"] == "lqlora nf2" and r["M"] == 1)
    assert nf2["bytes"] < nf4["bytes"]  # packed bytes are counted per width


def test_targets_and_sections(plumbing_run):
    res, _, _ = plumbing_run
    ids = {t["id"] for t in res["targets"]}
    assert TARGET_IDS <= ids, TARGET_IDS - ids
    for t in res["targets"]:
        assert t["status"] in {"pass", "fail", "missing", "skipped", "incomplete"}, t
        assert {"target", "value", "op", "threshold", "shape", "M"} <= set(t)
    # every target that has its rows is decided (nothing "missing" in a complete run)
    assert not [t for t in res["targets"] if t["status"] == "missing"]
    assert sum(res["targets_summary"].values()) == len(res["targets"])
    (rs,) = res["rsvd"]
    assert rs["niter"] == 2 and rs["lqlora_err"] < 2 * rs["optimal_err"] + 1e-3
    assert rs["torch_err"] < 2 * rs["optimal_err"] + 1e-3 and rs["speedup"] > 0
    p = res["profiling"]
    assert p["grid"] == "paper" and p["configs"] == 432 and 0 < p["done"] <= 432
    assert p["seconds"] > 0 and p["extrapolated"] == (p["done"] < 432)


def test_markdown_says_plumbing(plumbing_run):
    _, md, stdout = plumbing_run
    assert md.startswith("# CUDA qmatmul benchmark — PLUMBING RUN, NOT A MEASUREMENT")
    for section in ("## Targets", "### k64-100x64", "### odd-53x100", "## rsvd",
                    "## Cost profiling"):
        assert section in md, section
    assert "NOT a measurement" in stdout


def test_cuda_device_refused_without_gpu():
    import torch
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    r = subprocess.run([sys.executable, BENCH, "--sections", "rsvd"], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "--device cpu --quick" in r.stderr
