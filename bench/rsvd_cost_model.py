"""Cost model of lqlora::rsvd on CUDA and of the cost profile built on it: predicted H100 /
H200 times for issue 16's three targets, without a GPU.

- The Jacobi eigensolver (csrc/cuda/rsvd.cu) from its sm_90a SASS through bench/sass_model
  (kernels.jacobi_launch), with the sweep statistics measured by bench/rsvd_inputs.py; the
  Gaussian sketch kernel (csrc/cuda/sketch.cu) from its SASS too (kernels.sketch_launch);
- every other step of ops_rsvd.cpp and of decompose_many's lockstep iteration as the ATen
  ops they are: GEMMs at the fp32 / fp64 roofline, memory-bound kernels at their bytes,
  cuSOLVER calls and host syncs at fixed costs (bench/sass_model/rsvd.py documents each
  constant; the sensitivity table varies the assumed ones).

Targets:
1. rank 64 (+10) of 4096 x 4096 at least 3x faster than torch.svd_lowrank (q = 74, niter
   2). torch.svd_lowrank runs the same GEMMs plus 5 cuSOLVER QRs and one SVD, which this
   model has no cost for: it prints the GEMM floor the two share and how long the QRs and
   the SVD would have to take for the 3x to hold.
2. all 432 paper-grid configs of one 4096 x 4096 matrix profiled in under a minute;
3. the LLaMA-2-7B paper-grid profile (32 layers x 4 attention matrices 4096 x 4096 and 3 MLP
   matrices 11008 x 4096) in at most an hour.

Usage:
    python bench/rsvd_cost_model.py [--so MODULE] [--before-so OLD_MODULE_OR_CUBIN]
Writes bench/results/rsvd_cost_model.json and .md. Needs cuobjdump (see
bench/sass_cost_model.py) and bench/results/rsvd_inputs.json; no GPU, no torch.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from sass_cost_model import atomic_write, load_module  # noqa: E402
from sass_model import hw, module, rsvd  # noqa: E402

RANK, OVERSAMPLE = 64, 10
PAPER_CONFIGS = 432
LLAMA7B = [("attention q/k/v/o", 4096, 4096, 4 * 32), ("mlp gate/up", 11008, 4096, 2 * 32),
           ("mlp down", 4096, 11008, 32)]


def load_index(so: str):
    """The module's (or cubin's) sm_90a kernels by (family, template arguments)."""
    kernels, _ = load_module(argparse.Namespace(sass=None, res=None, so=so, arch="sm_90a"))
    return module.index(kernels)


def jacobi_rows(ix, st: Dict[str, rsvd.JacobiStats], label: str) -> List[dict]:
    out = []
    for dev in (hw.H100, hw.H200):
        for kind, s in st.items():
            for B in (1, 16):
                step = rsvd.jacobi_step(ix, dev, B, RANK + OVERSAMPLE, s)
                out.append({"kernel": label, "device": dev.name, "step": kind, "batch": B,
                            "us": step.time.total_us, "binding": step.time.binding,
                            "bounds": {k: round(v, 2) for k, v in step.time.bounds.items()}})
    return out


def targets(ix, dev, st_first, st_warm, iters) -> Dict[str, dict]:
    k = RANK + OVERSAMPLE
    one = rsvd.rsvd_steps(ix, dev, 1, 4096, 4096, RANK, OVERSAMPLE, 2, False, st_first)
    ours = rsvd.total_us(one)
    floor = rsvd.svd_lowrank_gemm_floor(dev, 4096, 4096, k, 2)
    sk = next(x for x in one if x.name.startswith("gaussian_sketch_kernel"))
    t1 = {"ours_us": ours, "by_kind": rsvd.by_kind(one), "svd_lowrank_gemm_floor_us": floor,
          "sketch_us": sk.time.total_us, "sketch_binding": sk.time.binding,
          "needed_qr_svd_us": 3 * ours - floor,
          "needed_per_cusolver_call_us": (3 * ours - floor) / 6}
    m4 = rsvd.profile_matrix_us(ix, dev, 4096, 4096, RANK, iters, PAPER_CONFIGS, st_first, st_warm)
    t2 = {"seconds": m4["total"] / 1e6, "parts_s": {k2: v / 1e6 for k2, v in m4.items()}}
    total, parts = 0.0, {}
    for name, m, n, count in LLAMA7B:
        r = m4 if (m, n) == (4096, 4096) else rsvd.profile_matrix_us(
            ix, dev, m, n, RANK, iters, PAPER_CONFIGS, st_first, st_warm)
        parts[name] = count * r["total"] / 1e6
        total += parts[name]
    t3 = {"seconds": total, "hours": total / 3600, "parts_s": parts}
    it = rsvd.iteration_steps(ix, dev, 16, 4096, 4096, RANK, 3, st_warm)
    t2["iteration16_us"] = rsvd.total_us(it)
    t2["iteration16_by_kind"] = rsvd.by_kind(it)
    return {"rsvd_4096": t1, "profile_4096": t2, "profile_llama2_7b": t3}


def sensitivity(ix, dev, st_first, st_warm, iters) -> List[dict]:
    rows = []
    for name, values in rsvd.SENSITIVITY.items():
        base = getattr(rsvd, name)
        for v in values:
            setattr(rsvd, name, v)
            try:
                t = targets(ix, dev, st_first, st_warm, iters)
            finally:
                setattr(rsvd, name, base)
            rows.append({"device": dev.name, "constant": name, "value": v,
                         "rsvd_4096_us": t["rsvd_4096"]["ours_us"],
                         "profile_4096_s": t["profile_4096"]["seconds"],
                         "profile_7b_h": t["profile_llama2_7b"]["hours"]})
    return rows


def render(doc: dict) -> str:
    L = ["# Cost model of lqlora::rsvd on CUDA and the batched cost profile (issue 16)", "",
         f"- date: {doc['date']}; command: `{doc['command']}`",
         f"- module: {doc['module']}; before: {doc.get('before') or '-'}",
         f"- inputs: bench/results/rsvd_inputs.json ({doc['inputs']['command']}, "
         f"{doc['inputs']['date']}): mean iterations per decomposition "
         f"{doc['mean_iterations']:.1f} over {doc['decompositions']} decompositions; Jacobi "
         f"statistics of {doc['grams']['first']} first-step and {doc['grams']['warm']} "
         "warm-step Gram matrices (k = 74)",
         "- predictions, not measurements: no GPU was used. Constants and their sources: "
         "bench/sass_model/hw.py and bench/sass_model/rsvd.py.", "",
         "## Jacobi eigensolver (k = 74), one launch", "",
         "| kernel | device | Gram matrices | batch | predicted | binding |", "|---|---|---|---|---|---|"]
    for r in doc["jacobi"]:
        L.append(f"| {r['kernel']} | {r['device']} | {r['step']} | {r['batch']} | "
                 f"{r['us']:.0f} us | {r['binding']} |")
    L += ["", "## Targets", "",
          "| target | device | predicted | target | meets |", "|---|---|---|---|---|"]
    for dev, t in doc["targets"].items():
        t1, t2, t3 = t["rsvd_4096"], t["profile_4096"], t["profile_llama2_7b"]
        L.append(f"| rank 64 (+10) of 4096^2, niter 2 | {dev} | {t1['ours_us']:.0f} us; "
                 f"svd_lowrank's GEMMs alone {t1['svd_lowrank_gemm_floor_us']:.0f} us | "
                 f">= 3x svd_lowrank | if its 5 QRs + 1 SVD take >= "
                 f"{t1['needed_qr_svd_us']:.0f} us ({t1['needed_per_cusolver_call_us']:.0f} us "
                 "each) |")
        L.append(f"| 432 configs of one 4096^2 | {dev} | {t2['seconds']:.1f} s | < 60 s | "
                 f"{'yes' if t2['seconds'] < 60 else 'no'} |")
        L.append(f"| LLaMA-2-7B paper grid | {dev} | {t3['hours']:.2f} h | <= 1 h | "
                 f"{'yes' if t3['hours'] <= 1 else 'no'} |")
    L += ["", "## Where the time goes", ""]
    for dev, t in doc["targets"].items():
        t1, t2 = t["rsvd_4096"], t["profile_4096"]
        L.append(f"- {dev}, one rsvd of 4096^2: " + ", ".join(
            f"{k} {v:.0f} us" for k, v in sorted(t1["by_kind"].items(), key=lambda x: -x[1])))
        L.append(f"- {dev}, of which the Gaussian sketch [4096, {RANK + OVERSAMPLE}] on the device: "
                 f"{t1['sketch_us']:.1f} us ({t1['sketch_binding']}-bound)")
        L.append(f"- {dev}, one lockstep iteration of 16 configs of 4096^2 "
                 f"({t2['iteration16_us'] / 1e3:.2f} ms): " + ", ".join(
                     f"{k} {v / 1e3:.2f} ms" for k, v in
                     sorted(t2["iteration16_by_kind"].items(), key=lambda x: -x[1])))
        L.append(f"- {dev}, 432 configs of 4096^2: " + ", ".join(
            f"{k} {v:.2f} s" for k, v in t2["parts_s"].items() if k != "total"))
    L += ["", "## Sensitivity to the assumed constants", "",
          "| device | constant | value | rsvd 4096^2 | profile 4096^2 | profile 7B |",
          "|---|---|---|---|---|---|"]
    for r in doc["sensitivity"]:
        L.append(f"| {r['device']} | {r['constant']} | {r['value']} | {r['rsvd_4096_us']:.0f} us | "
                 f"{r['profile_4096_s']:.1f} s | {r['profile_7b_h']:.2f} h |")
    return "\n".join(L) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--so", help="built module (default: the installed lqlora_ext/_C*.so)")
    ap.add_argument("--before-so", help="an earlier module or cubin, for the Jacobi rows")
    ap.add_argument("--inputs", default=os.path.join(HERE, "results", "rsvd_inputs.json"))
    ap.add_argument("--out-json", default=os.path.join(HERE, "results", "rsvd_cost_model.json"))
    ap.add_argument("--out-md", default=os.path.join(HERE, "results", "rsvd_cost_model.md"))
    args = ap.parse_args(argv)
    try:
        so = args.so or module.default_module()
        ix = load_index(so)
        with open(args.inputs) as f:
            inputs = json.load(f)
    except (module.ToolError, OSError) as e:
        print(f"rsvd_cost_model: {e}", file=sys.stderr)
        return 2
    grams = inputs["grams"]
    st_first = rsvd.stats_from([g for g in grams if g["step"] == "first"])
    st_warm = rsvd.stats_from([g for g in grams if g["step"] == "warm"]) or st_first
    iters = [i for v in inputs["iterations"].values() for i in v]
    st = {"first step": st_first, "warm steps": st_warm}
    jac = jacobi_rows(ix, st, "this build")
    if args.before_so:
        jac = jacobi_rows(load_index(args.before_so), st, "before") + jac
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python bench/rsvd_cost_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "module": os.path.basename(so), "before": args.before_so and os.path.basename(args.before_so),
           "inputs": {"command": inputs["command"], "date": inputs["date"]},
           "mean_iterations": sum(iters) / len(iters), "decompositions": len(iters),
           "grams": {"first": sum(g["step"] == "first" for g in grams),
                     "warm": sum(g["step"] == "warm" for g in grams)},
           "jacobi_stats": {k: vars(v) for k, v in st.items()},
           "constants": {"FP32_FLOPS": rsvd.FP32_FLOPS, "FP64_TENSOR_FLOPS": rsvd.FP64_TENSOR_FLOPS,
                         "GEMM_EFFICIENCY": rsvd.GEMM_EFFICIENCY, "SOLVER_US": rsvd.SOLVER_US,
                         "SYNC_US": rsvd.SYNC_US, "SINGLE_PASS": rsvd.SINGLE_PASS},
           "jacobi": jac,
           "targets": {dev.name: targets(ix, dev, st_first, st_warm, iters) for dev in (hw.H100, hw.H200)},
           "sensitivity": [r for dev in (hw.H100, hw.H200)
                           for r in sensitivity(ix, dev, st_first, st_warm, iters)]}
    atomic_write(args.out_json, json.dumps(doc, indent=1) + "\n")
    atomic_write(args.out_md, render(doc))
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
