"""scripts/gpu_check.sh without a GPU: it parses, documents its stages and options, plans the
default (the whole validation) and explicit stage lists with their time limits, refuses bad
arguments naming them, and stops before writing anything where torch sees no GPU; its
summary (scripts/gpu_check_summary.py) reads every stage's results."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
SUMMARY = os.path.join(ROOT, "scripts", "gpu_check_summary.py")
STAGES = ["build", "tests", "tests-full", "bench", "bench-full", "finetune", "wheel"]
DEFAULT = ["build", "tests", "bench", "finetune", "wheel"]

needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def run(*args, cwd=ROOT):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def plan(stdout):
    """{stage: its dry-run line} in the order the script would run them."""
    rows = [ln for ln in stdout.splitlines() if ln and not ln.startswith("#")]
    return {ln.split()[0]: ln for ln in rows}


@needs_bash
def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True, timeout=30)


@needs_bash
def test_help_lists_stages_and_options():
    r = run("--help")
    assert r.returncode == 0, r.stderr
    for word in STAGES + ["all", "--out", "--wheels", "--work", "--python", "--limit",
                          "--dry-run", "TORCH_CUDA_ARCH_LIST"]:
        assert word in r.stdout, word


@needs_bash
def test_default_plan_is_the_whole_validation(tmp_path):
    r = run("--dry-run", "--out", "res", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    p = plan(r.stdout)
    assert list(p) == DEFAULT
    assert f"results in {tmp_path}/res," in r.stdout  # relative to where it was called from
    assert "tests/test_cuda.py tests/test_cuda_hw.py tests/test_build.py" in p["tests"]
    assert "-k" not in p["tests"].split() and "::" not in p["tests"]
    assert "bench/bench_cuda.py --quick" in p["bench"]
    assert "limit   360 s" in p["bench"]
    assert not (tmp_path / "res").exists()  # a dry run writes nothing


@needs_bash
def test_all_stages_in_order_with_a_limit(tmp_path):
    r = run("--dry-run", "--limit", "bench-full=42", "--wheels", str(tmp_path), "all")
    assert r.returncode == 0, r.stderr
    p = plan(r.stdout)
    assert list(p) == STAGES
    assert "limit    42 s" in p["bench-full"] and "--quick" not in p["bench-full"]
    assert f"# extra wheels from {tmp_path}" in r.stdout


@needs_bash
@pytest.mark.parametrize("args, message", [
    (["bogus"], "unknown stage 'bogus'"),
    (["--frob"], "unknown option '--frob'"),
    (["--out"], "--out needs a value"),
    (["--limit", "bench=soon"], "--limit bench=soon: expected STAGE=SECONDS"),
    (["--limit", "nap=10"], "unknown stage 'nap'"),
    (["--limit", "bench=0"], "the limit must be positive"),
    (["--wheels", "/nonexistent/wheels"], "--wheels /nonexistent/wheels: no such directory"),
    (["--python", "no-such-python-3"], "no interpreter 'no-such-python-3'"),
], ids=["stage", "option", "no-value", "limit-format", "limit-stage", "limit-zero", "wheels",
        "python"])
def test_bad_arguments_are_named(args, message):
    r = run("--dry-run", *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr


@needs_bash
def test_refuses_without_a_gpu_and_writes_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    r = run("--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"), "--python",
            sys.executable)
    assert r.returncode == 2 and "sees no CUDA GPU" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


# ------------------------------------------------------------ scripts/gpu_check_summary.py
def _results(d):
    (d / "stages.tsv").write_text("build\tok\t0\t95\t600\n"
                                  "tests\tFAILED\t1\t120\t480\n"
                                  "bench\tok\t0\t130\t360\n"
                                  "finetune\tok\t0\t200\t600\n"
                                  "wheel\tTIMEOUT\t124\t600\t600\n")
    (d / "tests.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="12" failures="1" errors="0" '
        'skipped="2"></testsuite></testsuites>')
    targets = [{"id": "m1-nf4-speedup", "status": "pass", "target": "M=1 NF4 faster",
                "shape": "llama2-70b-attn", "M": 1, "value": 2.5},
               {"id": "rsvd-speedup", "status": "fail", "target": "rsvd faster than torch",
                "shape": None, "M": None, "value": 0.8}]
    (d / "bench_cuda_quick.json").write_text(json.dumps({
        "info": {"device": "NVIDIA H200"}, "targets": targets,
        "targets_summary": {"pass": 1, "fail": 1}, "errors": [], "wrong_outputs": []}))
    (d / "finetune_memory_cuda.json").write_text(json.dumps({
        "meta": {"gpu": "NVIDIA H200"},
        "results": [{"variant": "lq-ilp-2.75", "cuda_peak_mib": 2389.4, "median_step_s": 0.05},
                    {"variant": "qlora-bnb-nf4", "error": "ModuleNotFoundError: bitsandbytes"}]}))
    (d / "wheel_smoke.json").write_text("{not json")


def test_summary_reads_every_stage(tmp_path):
    _results(tmp_path)
    r = subprocess.run([sys.executable, SUMMARY, str(tmp_path), "--command", "gpu_check.sh"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "summary.json").read_text())
    assert [(x["stage"], x["status"], x["rc"]) for x in s["stages"]] == [
        ("build", "ok", 0), ("tests", "failed", 1), ("bench", "ok", 0),
        ("finetune", "ok", 0), ("wheel", "timeout", 124)]
    assert s["details"]["tests"] == {"tests": 12, "failures": 1, "errors": 0, "skipped": 2}
    b = s["details"]["bench"]
    assert b["device"] == "NVIDIA H200" and [t["id"] for t in b["not_passed"]] == ["rsvd-speedup"]
    assert s["details"]["finetune"] == {"gpu": "NVIDIA H200", "variants": {
        "lq-ilp-2.75": {"cuda_peak_mib": 2389, "median_step_s": 0.05},
        "qlora-bnb-nf4": {"error": "ModuleNotFoundError: bitsandbytes"}}}
    assert "build" not in s["details"]  # no result file: nothing invented
    assert "wheel_smoke.json unreadable" in s["details"]["wheel"]["error"]
    env = s["env"]
    assert env["command"] == "gpu_check.sh" and env["torch"] == torch.__version__
    assert env["date"] and env["python"]
    assert "tests: 12 tests, 1 failed, 0 errors, 2 skipped" in r.stdout
    assert "rsvd faster than torch" in r.stdout and "wheel: wheel_smoke.json unreadable" in r.stdout


def test_summary_names_a_malformed_stage_line(tmp_path):
    (tmp_path / "stages.tsv").write_text("build ok 0\n")
    r = subprocess.run([sys.executable, SUMMARY, str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "stages.tsv line 1" in r.stderr
