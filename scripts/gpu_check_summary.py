#!/usr/bin/env python3
"""The closing summary of scripts/gpu_check.sh: read what its stages left in the results
folder, print one short block per stage and write DIR/summary.json.

    python scripts/gpu_check_summary.py DIR [--command "scripts/gpu_check.sh ..."]

Inputs, all in DIR: ``stages.tsv`` (one line per stage run: name, status, exit code,
seconds, limit; written by the script's stage runner) and, where that stage ran, its
results: ``tests.xml`` / ``tests-full.xml`` (pytest JUnit XML), ``bench_cuda_quick.json`` /
``bench_cuda.json`` (bench/bench_cuda.py), ``finetune_memory_cuda.json``
(bench/finetune_memory.py) and ``wheel_smoke.json`` (scripts/smoke_test.py --json).

summary.json: ``{"env": {date, command, gpu, torch, torch_cuda, python, commit},
"stages": [{stage, status, rc, seconds, limit_s, log}], "details": {stage: ...}}``, status
one of ok, failed, timeout, skipped. A result file that cannot be read is reported in its
stage's details, never fatal: the summary is what a failed run most needs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET

BENCH_JSON = {"bench": "bench_cuda_quick.json", "bench-full": "bench_cuda.json"}


def read_stages(out: str) -> list:
    stages = []
    with open(os.path.join(out, "stages.tsv")) as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 5:
                raise SystemExit(f"{out}/stages.tsv line {n}: expected 5 tab-separated fields, "
                                 f"got {line!r}")
            name, status, rc, sec, limit = parts
            stages.append({"stage": name, "status": status.lower(), "rc": int(rc),
                           "seconds": int(sec), "limit_s": int(limit), "log": f"{name}.log"})
    return stages


def junit_counts(path: str) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    return {k: sum(int(s.get(k, 0)) for s in suites)
            for k in ("tests", "failures", "errors", "skipped")}


def tests_lines(name: str, c: dict) -> list:
    return [f"{name}: {c['tests']} tests, {c['failures']} failed, {c['errors']} errors, "
            f"{c['skipped']} skipped"]


def bench_details(path: str) -> dict:
    r = json.load(open(path))
    info = r.get("info", {})
    return {"device": info.get("device"), "targets": r["targets_summary"],
            "errors": len(r["errors"]), "wrong_outputs": len(r.get("wrong_outputs", [])),
            "not_passed": [{k: t[k] for k in ("id", "status", "target", "shape", "M", "value")}
                           for t in r["targets"] if t["status"] != "pass"]}


def bench_lines(name: str, d: dict) -> list:
    lines = [f"{name}: targets {d['targets']}, errors {d['errors']}, wrong outputs "
             f"{d['wrong_outputs']} ({d['device']})"]
    for t in d["not_passed"]:
        v = "-" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"  {t['status']:<10} {t['target'][:68]:<68} {t['shape'] or ''} "
                     f"M={t['M']}: {v}")
    return lines


def finetune_details(path: str) -> dict:
    rep = json.load(open(path))
    d = {"gpu": rep["meta"].get("gpu"), "variants": {}}
    for x in rep["results"]:
        d["variants"][x["variant"]] = {"error": x["error"]} if "error" in x else {
            "cuda_peak_mib": round(x["cuda_peak_mib"]) if "cuda_peak_mib" in x else None,
            "median_step_s": round(x["median_step_s"], 4)}
    return d


def finetune_lines(d: dict) -> list:
    return [f"finetune ({d['gpu']}): CUDA peak MiB / median step s"] + [
        f"  {v:<16} failed: {x['error'][:80]}" if "error" in x else
        f"  {v:<16} {x['cuda_peak_mib']} MiB  {x['median_step_s']} s"
        for v, x in d["variants"].items()]


def wheel_details(path: str) -> list:
    return [{"wheel": x["wheel"], "ok": x["ok"], "gpu": x.get("gpu"),
             "checks": len(x.get("checks", []))} for x in json.load(open(path))]


def wheel_lines(d: list) -> list:
    return [f"wheel: {'PASS' if x['ok'] else 'FAIL'} {x['wheel']} ({x['checks']} checks, "
            f"GPU {x['gpu']})" for x in d]


def stage_details(out: str, name: str):
    """(details, lines) for one stage from its result file; (None, []) if it left none."""
    if name in ("tests", "tests-full"):
        path = os.path.join(out, f"{name}.xml")
        parse, show = junit_counts, lambda d: tests_lines(name, d)
    elif name in BENCH_JSON:
        path = os.path.join(out, BENCH_JSON[name])
        parse, show = bench_details, lambda d: bench_lines(name, d)
    elif name == "finetune":
        path = os.path.join(out, "finetune_memory_cuda.json")
        parse, show = finetune_details, finetune_lines
    elif name == "wheel":
        path = os.path.join(out, "wheel_smoke.json")
        parse, show = wheel_details, wheel_lines
    else:
        return None, []
    if not os.path.exists(path):
        return None, []
    try:
        d = parse(path)
    except (OSError, ValueError, KeyError, TypeError, ET.ParseError) as e:
        msg = f"{os.path.basename(path)} unreadable: {type(e).__name__}: {e}"
        return {"error": msg}, [f"{name}: {msg}"]
    return d, show(d)


def environment(command: str) -> dict:
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
           "python": platform.python_version()}
    try:
        import torch
        env.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                   gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except Exception as e:  # noqa: BLE001  (the summary must still be written)
        env["torch_error"] = f"{type(e).__name__}: {e}"
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the results folder of scripts/gpu_check.sh")
    ap.add_argument("--command", default="", help="the command line that produced it")
    a = ap.parse_args(argv)
    stages = read_stages(a.out)
    details, lines = {}, []
    for st in stages:
        d, ls = stage_details(a.out, st["stage"])
        if d is not None:
            details[st["stage"]] = d
        lines += ls
    summary = {"env": environment(a.command), "stages": stages, "details": details}
    tmp = os.path.join(a.out, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(a.out, "summary.json"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
