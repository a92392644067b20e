"""The Markdown record of one model run (bench/results/sass_cost_model.md), with an earlier
run's numbers beside it ("before" -> "after" of a kernel change).

Pure functions of the run's JSON document: ``to_markdown(doc, targets, before)``; ``before``
is an earlier document (or None). Result rows are matched across the two runs by (op, shape,
M, NF, LoRA rank, device), so a row whose path changed (M = 64 moving from dequantize +
cuBLAS to the tensor-core kernel) still shows what it was predicted at before.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

H100, H200 = "H100 SXM", "H200 SXM"
Key = Tuple[str, str, int, int, int, str]


def row_key(r: dict) -> Key:
    return (r["op"], r["shape"], r["M"], r["bits"], r.get("lora_rank", 0), r["device"])


def index_rows(doc: Optional[dict]) -> Dict[Key, dict]:
    """Every result row of a document by its key (rows of all sections)."""
    out: Dict[Key, dict] = {}
    for rows in (doc or {}).get("results", {}).values():
        for r in rows:
            if "op" in r:
                out.setdefault(row_key(r), r)
    return out


def target_index(doc: Optional[dict]) -> Dict[Tuple[str, str], dict]:
    return {(t["id"], t["device"]): t for t in (doc or {}).get("targets", [])}


def _pw(r: dict, key: str) -> str:
    v = r["per_weight"].get(key, 0.0)
    return f"{v:.2f}" if v else "0"


def _ldg_b(r: dict) -> str:
    return f"{sum(v for k, v in r['per_weight'].items() if k.startswith('ldg_bytes:')):.2f}"


def row_target(r: dict, targets: Sequence[dict]) -> str:
    """The issue-12 target of a result row: exact (shape, M, NF) match, or the target of the
    same M and NF at its reference shape in parentheses; "-" where the issue sets none."""
    lora = r.get("lora_rank", 0)
    for t in targets:
        if (t["op"], t["M"], t["bits"], t["lora"]) != (r["op"], r["M"], r["bits"], lora):
            continue
        want = {"speedup": f">= {t['value']}x", "overhead": f"<= +{100 * t['value']:.0f}%",
                "dense": "<= dense"}[t["kind"]]
        return want if r["shape"] == t["shape"] else f"({want} at {t['shape']})"
    return "-"


def _before_cell(old: Optional[dict], overhead: bool = False) -> str:
    if old is None:
        return "-"
    if overhead:
        return f"+{100 * old['lora_overhead']:.0f}%" if "lora_overhead" in old else "-"
    return f"{old['speedup_vs_bf16']:.2f}"


def md_path_table(rows: List[dict], title: str, note: str, targets: Sequence[dict],
                  before: Dict[Key, dict], lora: bool = False) -> List[str]:
    out = [f"## {title}", "", note, ""]
    hdr = ("| shape | M | NF | instr/w | LDS/w | FFMA/w | INT/w | IMAD/w | conv/w | HMMA/w | "
           "LDG B/w | DRAM B/w | H100 us | H100 x | H100 bound | H200 us | H200 x | H200 bound |")
    if lora:
        hdr += " LoRA overhead H100 / H200 | before H100 / H200 |"
    elif before:
        hdr += " before x H100 / H200 |"
    hdr += " issue target |"
    out += [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    by_key: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["shape"], r["M"], r["bits"]), {})[r["device"]] = r
    for (shape, M, bits), d in by_key.items():
        a, b = d.get(H100), d.get(H200)
        if a is None or b is None:
            continue
        line = (f"| {shape} {a['N']}x{a['K']} | {M} | {bits} | {_pw(a, 'total')} | {_pw(a, 'lds')} | "
                f"{_pw(a, 'fma')} | {_pw(a, 'int')} | {_pw(a, 'imad')} | {_pw(a, 'conv')} | "
                f"{_pw(a, 'mma')} | {_ldg_b(a)} | {a['per_weight']['dram_bytes']:.2f} | "
                f"{a['us']:.1f} | {a['speedup_vs_bf16']:.2f} | {a['binding']} | {b['us']:.1f} | "
                f"{b['speedup_vs_bf16']:.2f} | {b['binding']} |")
        ba, bb = before.get(row_key(a)), before.get(row_key(b))
        if lora:
            line += (f" +{100 * a['lora_overhead']:.0f}% / +{100 * b['lora_overhead']:.0f}% | "
                     f"{_before_cell(ba, True)} / {_before_cell(bb, True)} |")
        elif before:
            line += f" {_before_cell(ba)} / {_before_cell(bb)} |"
        line += f" {row_target(a, targets)} |"
        out.append(line)
    return out + [""]


def md_targets(doc: dict, before: Optional[dict]) -> List[str]:
    old = target_index(before)
    L = ["## Issue 12 targets", ""]
    if before:
        L += [f"Before: the record of {before.get('date', '?')} (module {before.get('module', '?')}); "
              "after: this run.", ""]
    L += ["| target | device | before | after | target | meets | binding (after) | "
          "issue's estimate | physical limit |", "|---|---|---|---|---|---|---|---|---|"]
    for t in doc["targets"]:
        o = old.get((t["id"], t["device"]))
        L.append(f"| {t['id']} ({t['shape']}, M={t['M']}, NF{t['bits']}"
                 f"{', r=' + str(t['lora']) if t['lora'] else ''}) | {t['device']} | "
                 f"{o['predicted'] if o else '-'} | {t['predicted']} | {t['target']} | "
                 f"{'yes' if t['meets'] else 'no'} | {t['binding']} | {t['issue_estimate']} | "
                 f"{str(t['physical_limit']) + 'x' if t['physical_limit'] else '-'} |")
    return L + [""]


def md_fast_vs_mma(rows: List[dict]) -> List[str]:
    """The two fused kernels at M = 1..4 and the one dispatch picks."""
    if not rows:
        return []
    L = ["## CUDA-core decode kernel vs tensor-core kernel at M = 1..4 (16-bit x)", "",
         "qmatmul_fast_kernel ((MT, R) = (1, 4) at M = 1, (4, 4) at M = 2..4) against "
         "qmatmul_mma_kernel<Bits, bf16, 1> at the same M. Dispatch sends M >= 2 of NF2-NF4 "
         "matrices with at least 8192 rows, and M >= 3 with at least 4096, to the tensor-core "
         "kernel (launch.h qmatmul_use_mma), everything else at M <= 4 to the decode kernel. instr/w: "
         "lane-instructions per weight over the launch; `faster`: the kernel predicted faster "
         "on that device; `dispatched`: the one the op runs.", "",
         "| shape | NF | M | fast instr/w | mma instr/w | H100 fast us (bound) | H100 mma us (bound) "
         "| H100 faster | H200 fast us (bound) | H200 mma us (bound) | H200 faster | dispatched |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, m = r["fast"], r["mma"]
        L.append(f"| {r['shape']} | {r['bits']} | {r['M']} | {f['instr_w']:.2f} | {m['instr_w']:.2f} | "
                 f"{f[H100]['us']:.1f} ({f[H100]['bound']}) | {m[H100]['us']:.1f} ({m[H100]['bound']}) | "
                 f"{r['faster'][H100]} | {f[H200]['us']:.1f} ({f[H200]['bound']}) | "
                 f"{m[H200]['us']:.1f} ({m[H200]['bound']}) | {r['faster'][H200]} | "
                 f"{r.get('dispatched') or '-'} |")
    return L + [""]


def md_hot_loops(rows: List[dict]) -> List[str]:
    L = ["## Hot loops (8192x8192, bf16 x)", "",
         "One iteration of each kernel's weight loop, per warp: the fast kernel decodes R x 32 "
         "groups (R x 1024 weights) per step, the tensor-core kernel NT x 8 rows x 128 k per "
         "chunk. instr/w = warp-instructions x 32 / weights of the iteration.", "",
         "| kernel | regs | warp-instr per iteration | weights per iteration | instr/w in loop | LDS | "
         "FFMA/FMUL | INT | IMAD | conv | HMMA | LDG | SHFL | branch | other | iterations per warp |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for h in rows:
        c = h["classes"]
        known = ("lds", "fma", "int", "imad", "conv", "mma", "ldg", "shfl", "branch")
        other = h["total"] - sum(c.get(k, 0) for k in known)
        L.append(f"| {h['kernel']} | {h['regs']} | {h['total']:.0f} | {h['weights']} | "
                 f"{h['per_weight']:.2f} | " + " | ".join(f"{c.get(k, 0):.0f}" for k in known)
                 + f" | {other:.0f} | {h['trips']} |")
    return L + [""]


def md_lora(rows: List[dict]) -> List[str]:
    if not rows:
        return []
    L = ["## LoRA term (rank 64, NF4): where its time goes", "",
         "Fused kernels: the producer blocks' x @ a^T path against the consumers' base product "
         "(the consumers wait for the producers' counter before their epilogue).", "",
         "| shape | M | device | base us | with LoRA us | overhead | producer blocks | producer path "
         "us | consumer path us | binding |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['shape']} | {r['M']} | {r['device']} | {r['base_us']:.1f} | {r['us']:.1f} | "
                 f"+{100 * r['overhead']:.0f}% | {r['producers']} | {r['producer_us']} | "
                 f"{r['consumer_us']} | {r['binding']} |")
    return L + [""]


def to_markdown(doc: dict, targets: Sequence[dict], before: Optional[dict] = None) -> str:
    old = index_rows(before)
    L = ["# Static SASS cost model: predicted kernel times (no GPU)", "",
         f"- device: **{doc['device']}**; predictions for {', '.join(d['name'] for d in doc['devices'])}",
         f"- date: {doc['date']}",
         f"- command: `{doc['command']}`",
         f"- nvcc {doc['versions']['nvcc']}, torch {doc['versions']['torch']}, cuobjdump "
         f"{doc['versions']['cuobjdump']}, arch {doc['arch']}, module `{doc['module']}`",
         f"- launch overhead per kernel: {doc['launch_mode']}",
         "- per-weight counts are lane-instructions per weight (warp-instructions x 32 / N*K) over "
         "every kernel of the path that has SASS; `x` = bf16 cuBLAS time / predicted time; the "
         "bound names the largest term of the slowest step; `before` columns: the same row in the "
         "earlier record.", ""]
    L += md_targets(doc, before)
    if doc.get("findings"):
        L += ["## What the model says", ""] + [f"- {x}" for x in doc["findings"]] + [""]
    R = doc["results"]
    L += md_fast_vs_mma(doc.get("fast_vs_mma", []))
    L += md_hot_loops(doc.get("hot_loops", []))
    L += md_lora(doc.get("lora_detail", []))
    L += md_path_table(R.get("decode", []), "qmatmul, M <= 4: CUDA-core decode kernel",
                       "qmatmul_fast_kernel<Bits, bf16, MT, R>: (MT, R) = (1, 4) at M = 1, (4, 4) at "
                       "M <= 4; not M >= 2 of NF2-NF4 matrices with >= 8192 rows, nor M >= 3 "
                       "with >= 4096 (the next table).", targets, old)
    L += md_path_table(R.get("tensor_core", []), "qmatmul, 4 < M <= 64: tensor-core kernel",
                       "qmatmul_mma_kernel<Bits, bf16, MT16>: MT16 = 1, 2, 4 M tiles of 16 for "
                       "M <= 16, 32, 64, and M = 2..4 of NF2-NF4 matrices with >= 8192 rows "
                       "(M = 3, 4: >= 4096). "
                       "Target at M = 16, 8192^2: >= 2.5x.", targets, old)
    L += md_path_table(R.get("large_m", []), "qmatmul, M > 64: dequantize + cuBLAS",
                       "dequantize_kernel (chunks of 2^26 / K rows) then cuBLAS, each chunk's "
                       "product written into its columns of out. Target at M = 1024, 8192^2: >= 0.9x.", targets, old)
    L += md_path_table(R.get("lora", []), "qmatmul + rank-64 LoRA, NF4",
                       "M <= 64 (16-bit x): the LoRA term fused into the same launch (producer "
                       "blocks + epilogue); M > 64: two extra cuBLAS calls. Overhead = time with "
                       "LoRA / time without - 1. Target at M = 1: <= +15%.", targets, old, lora=True)
    L += md_path_table(R.get("qmatmul_t", []), "qmatmul_t (backward)",
                       "M <= 16: unpack_scales_kernel + qmatmul_t_kernel (splits from "
                       "qmatmul_t_splits) + qmatmul_t_reduce_kernel (ordered sum and cast); M > 16: "
                       "dequantize + cuBLAS. Baseline: dense bf16 g @ W. Target at M = 1, 8192^2: "
                       "<= dense.", targets, old)
    L += [f"## Registers and spills ({doc['arch']})", "",
          "| kernel | regs | shared B | stack B | spill stores B | spill loads B |",
          "|---|---|---|---|---|---|"]
    for r in doc["kernels"]:
        L.append(f"| {r['kernel']} | {r['regs']} | {r['shared']} | {r['stack']} | "
                 f"{r['spill_store_bytes']} | {r['spill_load_bytes']} |")
    if doc.get("sensitivity"):
        ids = [t["id"] for t in targets]
        L += ["", "## Sensitivity of the H100 target predictions", "",
              "| assumption | " + " | ".join(ids) + " |", "|---|" + "---|" * len(ids)]
        for r in doc["sensitivity"]:
            cells = []
            for t in targets:
                v = r["values"].get(t["id"])
                cells.append("-" if v is None else (f"+{100 * v:.0f}%" if t["kind"] == "overhead"
                                                    else f"{v:.2f}x"))
            L.append(f"| {r['assumption']} | " + " | ".join(cells) + " |")
    if doc.get("sanity"):
        L += ["", "## Sanity checks", ""] + [f"- {x}" for x in doc["sanity"]]
    L += ["", "## Constants", ""]
    for k, v in doc["constants"].items():
        L.append(f"- {k}: {v}")
    L += ["", "## Where the model is uncertain", ""] + [f"- {u}" for u in doc["uncertainty"]]
    return "\n".join(L) + "\n"
