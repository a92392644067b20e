"""Streaming, resumable LQ-LoRA quantization of a Hugging Face checkpoint directory, on
one process or sharded over a torch.distributed world.

The dense model is never materialized: the module tree is built on the meta device (to
know which tensors are targeted ``nn.Linear`` weights), and each weight is read from its
shard when its turn comes, decomposed, and dropped. Peak memory is that of the largest
matrix's decomposition (plus, with Fisher, its Fisher tensor), whatever the model's depth.

Work directory ``.<out>.partial`` (a sibling of ``out``; on a filesystem every rank sees):

- ``job.json``: the job's identity (model fingerprints, settings); a different job finds
  a different identity and starts afresh;
- ``allocation.json``: the ILP's choice once made (profiling is not repeated);
- ``parts/<i>.safetensors`` and ``results/<i>.json``: matrix ``i``'s Q/L1/L2 and errors;
- ``final/``: the output shards, each written whole once its matrices are done; with the
  index, config and report it becomes ``out``'s content the way every lqlora save does
  (:mod:`lqlora_ext.io.atomic`: by one rename or exchange, never removing a user's files;
  ``out`` is checked before any work). Like ``save_pretrained`` of a quantized model, the
  output holds each LQLinear's placeholder ``weight``, the hint tensor, and the tensor and
  config digests (:mod:`lqlora_ext.io.layout`).

Every file appears by an atomic rename, so a run killed at any point (``kill -9``) and
started again continues where it stopped and writes the same bytes. Output shard layout
depends only on the model and ``max_shard_bytes``, not on the number of ranks.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from typing import Callable, Dict, List, Optional

import torch

from ..distributed.env import World, assign
from ..formats import FORMAT_VERSION, QuantConfig, packed_sizes
from ..method.decomposition import decompose
from ..nn.model import AllocationReport, LQLoRAConfig, MatrixReport, _resolve_grid
from .atomic import check_output_dir, commit_prepared
from .fisher_store import FisherDir
from .layout import (HINT_KEY, PLACEHOLDER, PLACEHOLDER_DTYPE, PLACEHOLDER_SHAPE, file_digests,
                     hf_quantization_config, placeholder_tensor)
from .streaming import (SAFE_INDEX, CheckpointDir, CheckpointError, Entry, atomic_write_json,
                        is_complete, pack_shards, read_header, shard_names,
                        write_safetensors)

JOB_VERSION = 2  # 2: placeholders, hint tensor and digests in the output
REPORT = "report.json"
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf")


def build_skeleton(src: CheckpointDir):
    """The checkpoint's transformers model on the meta device (no weights, no memory)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    try:
        cfg = transformers.AutoConfig.from_pretrained(src.path)
    except Exception as e:  # unknown model_type, bad fields: transformers' own errors
        raise CheckpointError(f"{src.path}/config.json: not a usable transformers config "
                              f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    archs = [a for a in (getattr(cfg, "architectures", None) or []) if hasattr(transformers, a)]
    with torch.device("meta"):
        if archs:
            return getattr(transformers, archs[0])(cfg).eval()
        return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def checkpoint_key(src: CheckpointDir, model_key: str, prefix: str) -> Optional[str]:
    """The checkpoint's name for the model's state key: the same, or with the base-model
    prefix (``model.``) dropped or added, as transformers' loader accepts."""
    cands = [model_key]
    if prefix:
        if model_key.startswith(prefix + "."):
            cands.append(model_key[len(prefix) + 1:])
        else:
            cands.append(f"{prefix}.{model_key}")
    return next((k for k in cands if k in src.tensors), None)


def _check_complete(src: CheckpointDir, model, prefix: str) -> None:
    """Every tensor the model's state dict needs is in the checkpoint (tied tensors: one
    name of the group is enough), else the output would load with random weights."""
    groups: Dict[int, List[str]] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(k)
    for names in groups.values():
        if not any(checkpoint_key(src, k, prefix) for k in names):
            raise CheckpointError(f"{src.path}: the checkpoint lacks tensor {names[0]!r} "
                                  f"that the model ({type(model).__name__}) needs (missing "
                                  f"shard or another architecture?)")


def _phase(world: World, fn: Callable[[], object]):
    """Run ``fn`` on every rank; if any rank fails, every rank raises (none is left
    waiting at the next collective)."""
    err = None
    try:
        out = fn()
    except Exception as e:  # re-raised below, on this rank as itself
        err, out = e, None
    msgs = world.all_gather(None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if bad:
        raise RuntimeError(f"lqlora: rank {bad[0][0]} failed: {bad[0][1]}")
    return out


def quantize_checkpoint(model_dir: str, out: str, config: LQLoRAConfig, *,
                        fisher_dir: Optional[str] = None, device: str = "cpu",
                        world: Optional[World] = None, max_shard_bytes: int = 2 << 30,
                        log: Callable[[str], None] = print, overwrite: bool = False) -> dict:
    """Quantize the checkpoint directory ``model_dir`` into the Hugging Face directory
    ``out`` (read by ``from_pretrained`` with quant_method "lqlora" and by
    :func:`~lqlora_ext.load_quantized`), tensor by tensor, resumably. See the module
    docstring.

    config: as for :func:`~lqlora_ext.quantize_model` (``fisher=True`` needs
    ``fisher_dir``, written by ``lqlora fisher``; ``workers`` is unused: parallelism is the
    world's ranks). device: where weights are decomposed (``cpu``, ``cuda``). world: the
    process group (:func:`lqlora_ext.distributed.env.init`; default one process).
    overwrite: allow an ``out`` that is a non-empty directory other than an lqlora output
    (only files of the same names are replaced). Returns the report dict (also
    ``out/report.json``) on every rank.
    """
    world = world or World()
    say = log if world.is_main else (lambda *_: None)
    t0 = time.time()
    if not isinstance(config.rank, int) or config.rank < 0:
        raise ValueError(f"quantize: rank must be a non-negative integer, got {config.rank!r}")
    if not (isinstance(config.budget_bits, (int, float)) and math.isfinite(config.budget_bits)
            and config.budget_bits > 0):
        raise ValueError(f"quantize: budget_bits must be a positive number, got "
                         f"{config.budget_bits!r}")
    if config.fisher and fisher_dir is None:
        raise ValueError("quantize: data-aware streaming quantization needs a Fisher "
                         "directory (make one with `lqlora fisher --model DIR --out FISHER`, "
                         "pass --fisher-dir FISHER) or --no-fisher")
    grid = _resolve_grid(config.grid)
    # Before any work: never the input model, never a user's non-empty directory.
    check_output_dir(out, overwrite=overwrite, protect=[model_dir], who="quantize: --out")
    src = CheckpointDir(model_dir)
    from ..method.targets import select_linear_modules

    model = build_skeleton(src)
    prefix = getattr(model, "base_model_prefix", "") or ""
    _check_complete(src, model, prefix)
    targets = select_linear_modules(model, config.target_modules)
    names, keys, shapes = list(targets), [], []
    for name, lin in targets.items():
        key = checkpoint_key(src, name + ".weight", prefix)
        if key is None:
            raise CheckpointError(f"{src.path}: the checkpoint has no weight for {name!r}")
        info = src.info(key)
        if info.shape != tuple(lin.weight.shape) or not info.torch_dtype.is_floating_point:
            raise CheckpointError(f"{info.file}: tensor {key!r} is {info.dtype} "
                                  f"{list(info.shape)}, the model's {name} needs a float "
                                  f"{list(lin.weight.shape)}")
        if config.rank >= min(info.shape):
            raise ValueError(f"quantize: rank {config.rank} must be < min(out, in) = "
                             f"{min(info.shape)} for {name} {list(info.shape)}")
        keys.append(key)
        shapes.append(info.shape)
    biases = {n: lin.bias is not None for n, lin in targets.items()}
    del model, targets
    fisher = FisherDir(fisher_dir) if config.fisher else None
    if fisher is not None:
        fisher.check(src, keys)
    numels = [s[0] * s[1] for s in shapes]

    job = {"v": JOB_VERSION, "format_version": FORMAT_VERSION,
           "model": {k: src.fingerprint(k) for k in src.tensors},
           "configs": [c.to_dict() for c in grid], "budget_bits": float(config.budget_bits),
           "rank": config.rank, "scaling": config.scaling, "seed": config.seed,
           "max_iters": config.max_iters, "tol": config.tol, "profile_tol": config.profile_tol,
           "targets": names, "fisher": fisher.fingerprint() if fisher else None,
           "device": torch.device(device).type, "max_shard_bytes": int(max_shard_bytes)}
    job_id = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:32]
    out = os.path.abspath(out)
    work = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial")

    def prepare():
        if not world.is_main:
            return None
        done = _finished_report(out, job_id)
        if done is not None:
            shutil.rmtree(work, ignore_errors=True)
            return done
        old = _read_json(os.path.join(work, "job.json"))
        if old is not None and old.get("id") != job_id:
            say(f"{work}: left by a different job (other model or settings): starting afresh")
            shutil.rmtree(work)
        elif old is not None:
            say(f"resuming the job in {work}")
        for d in ("parts", "results", "final"):
            os.makedirs(os.path.join(work, d), exist_ok=True)
        if old is None or old.get("id") != job_id:
            atomic_write_json(os.path.join(work, "job.json"), {"id": job_id, "job": job})
        return None

    finished = world.broadcast(_phase(world, prepare))
    if finished is not None:
        say(f"{out} already holds this job's result: nothing to do")
        return finished

    # -- allocation -----------------------------------------------------------------------
    load_w = lambda i: src.load(keys[i])  # noqa: E731
    load_f = (lambda i: fisher.load(keys[i])) if fisher is not None else None
    apath = os.path.join(work, "allocation.json")
    saved = world.broadcast(_read_json(apath) if world.is_main else None)
    if saved is not None:
        choice = saved["choice"]
        say("allocation: read from the interrupted run")
    elif len(grid) == 1:
        choice = [0] * len(names)  # uniform quantization: nothing to profile or allocate
    else:
        bpp = torch.tensor([c.bits_per_param for c in grid], dtype=torch.float64)
        if float(bpp.min()) > config.budget_bits + 1e-9:
            raise ValueError(f"quantize: budget {config.budget_bits:g} bits/param is below "
                             f"the smallest config in the grid; the smallest feasible budget "
                             f"is {float(bpp.min()):.4f}")
        from ..distributed.profile import profile_costs_sharded
        costs = _phase(world, lambda: profile_costs_sharded(
            world, names, numels, load_w, load_f, grid, config.rank,
            cache_dir=config.cache_dir, seed=config.seed, max_iters=config.max_iters,
            tol=config.profile_tol, device=device, progress=config.progress, log=say))

        def solve():
            if not world.is_main:
                return None
            from ..method.allocation import solve_allocation
            ch = solve_allocation(costs, torch.tensor(numels, dtype=torch.float64), bpp,
                                  config.budget_bits).tolist()
            atomic_write_json(apath, {"choice": ch, "costs": costs.tolist()})
            return ch
        choice = world.broadcast(_phase(world, solve))  # solved once, on rank 0
    configs = [grid[k] for k in choice]

    # -- plan: output tensors in source order, cut into shards ------------------------------
    lq_of = {k: i for i, k in enumerate(keys)}
    units = []  # (entries without sources, matrix index or None)
    for key, info in src.tensors.items():
        if key in lq_of:
            i = lq_of[key]
            units.append((_lq_entries(key[:-len(".weight")], shapes[i], configs[i],
                                      config.rank), i))
        else:
            units.append(([Entry(key, info.torch_dtype, info.shape, None)], None))
    units.append(([Entry(HINT_KEY, PLACEHOLDER_DTYPE, PLACEHOLDER_SHAPE, placeholder_tensor())],
                  None))
    shard_of = pack_shards([sum(e.nbytes for e in es) for es, _ in units], max_shard_bytes)
    files = shard_names(max(shard_of) + 1)
    paths = [os.path.join(work, "final", f) for f in files]

    # -- decompositions, sharded by matrix ----------------------------------------------------
    part = lambda i: os.path.join(work, "parts", f"{i:05d}.safetensors")  # noqa: E731
    result = lambda i: os.path.join(work, "results", f"{i:05d}.json")  # noqa: E731
    in_done_shard = {i for (es, i), s in zip(units, shard_of)
                     if i is not None and is_complete(paths[s])}
    owner = assign(numels, world.world_size)

    def decompose_mine():
        from tqdm.auto import tqdm
        mine = [i for i in range(len(names)) if owner[i] == world.rank]
        todo = [i for i in mine if not os.path.exists(result(i)) or
                (i not in in_done_shard and not is_complete(part(i)))]
        if len(todo) < len(mine):
            say(f"resuming: {len(mine) - len(todo)} of {len(mine)} matrices of rank "
                f"{world.rank} already decomposed")
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="matrix",
                   desc=f"decomposing (rank {world.rank})" if world.distributed
                   else "decomposing", disable=not config.progress)
        with bar:
            for i in todo:
                _decompose_one(i, names[i], keys[i], configs[i], config, load_w, load_f,
                               device, part(i), result(i))
                bar.update(1)
    _phase(world, decompose_mine)

    # -- output shards, each by one rank ------------------------------------------------------
    shard_bytes = [0] * len(files)
    for (es, _), s in zip(units, shard_of):
        shard_bytes[s] += sum(e.nbytes for e in es)
    shard_owner = assign(shard_bytes, world.world_size)

    def write_mine():
        for s, path in enumerate(paths):
            if shard_owner[s] != world.rank or is_complete(path):
                continue
            entries = []
            for (es, i), us in zip(units, shard_of):
                if us == s:
                    entries += [Entry(e.key, e.dtype, e.shape,
                                      e.source if e.source is not None else
                                      _raw_source(src, e.key) if i is None else
                                      _part_source(part(i), e.key)) for e in es]
            write_safetensors(path, entries, metadata={"format": "pt"})
        for (es, i), s in zip(units, shard_of):
            if i is not None and shard_owner[s] == world.rank and os.path.exists(part(i)):
                os.unlink(part(i))  # its shard is complete: the part is no longer needed
    _phase(world, write_mine)

    # -- index, config, report; the output appears by one rename ----------------------------
    def finish():
        if not world.is_main:
            return None
        final = os.path.join(work, "final")
        weight_map = {e.key: files[s] for (es, _), s in zip(units, shard_of) for e in es}
        total = sum(shard_bytes)
        if len(files) > 1:
            with open(os.path.join(final, SAFE_INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                          indent=2, sort_keys=True)
        cfg = dict(src.config)
        digests = {}
        for p in paths:
            digests.update(file_digests(p))
        cfg["quantization_config"] = hf_quantization_config(
            {n: {"shape": list(shapes[i]), "rank": config.rank, "scaling": config.scaling,
                 "bias": biases[n], "quant": configs[i].to_dict()}
             for i, n in enumerate(names)}, digests, FORMAT_VERSION)
        with open(os.path.join(final, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        for fn in sorted(os.listdir(src.path)):  # tokenizer, generation config, ...
            p = os.path.join(src.path, fn)
            if os.path.isfile(p) and fn not in ("config.json", SAFE_INDEX, REPORT) and \
                    not fn.endswith(_WEIGHT_FILES) and not fn.startswith("."):
                shutil.copyfile(p, os.path.join(final, fn))
        report = _report(names, shapes, configs, config, [
            _read_json(result(i)) for i in range(len(names))], src, keys)
        secs = [r["seconds"] for r in (_read_json(result(i)) for i in range(len(names)))]
        summary = {"model": src.path, "streaming": True, "processes": world.world_size,
                   "device": str(device), "budget_bits": config.budget_bits,
                   "rank": config.rank, "fisher": config.fisher,
                   "bits_per_param": report.bits_per_param,
                   "bits_per_param_with_lowrank": report.bits_per_param_with_lowrank,
                   "weights_mib_before": src.total_bytes / 2**20,
                   "weights_mib_after": total / 2**20, "matrices": len(names),
                   "decompose_seconds_median": sorted(secs)[len(secs) // 2] if secs else 0.0,
                   "decompose_seconds_total": sum(secs), "decompose_seconds": secs,
                   "seconds": time.time() - t0,
                   "job": job_id, "allocation": report.to_dict()}
        with open(os.path.join(final, REPORT), "w") as f:
            json.dump(summary, f, indent=1)
        commit_prepared(final, out, overwrite=overwrite, protect=[model_dir],
                        who="quantize: --out")
        shutil.rmtree(work, ignore_errors=True)
        say(str(report))
        return summary
    return world.broadcast(_phase(world, finish))


def _lq_entries(base: str, shape, cfg: QuantConfig, rank: int) -> List[Entry]:
    nc, ns, ng = packed_sizes(shape[0] * shape[1], cfg)
    es = [Entry(f"{base}.qcodes", torch.int32, (nc,), None),
          Entry(f"{base}.qscales", torch.int32, (ns,), None),
          Entry(f"{base}.scale2", cfg.scale_dtype, (ng,), None),
          Entry(f"{base}.offset", torch.float32, (1,), None),
          # what makes a transformers without lqlora_ext refuse the checkpoint
          Entry(f"{base}.{PLACEHOLDER}", PLACEHOLDER_DTYPE, PLACEHOLDER_SHAPE,
                placeholder_tensor())]
    if rank:
        es += [Entry(f"{base}.lora_A", torch.float32, (rank, shape[1]), None),
               Entry(f"{base}.lora_B", torch.float32, (shape[0], rank), None)]
    return es


def _decompose_one(i, name, key, cfg, config, load_w, load_f, device, part_path, result_path):
    """Matrix ``i``: the same decomposition :func:`~lqlora_ext.quantize_model` makes, its
    tensors to ``part_path`` and its errors to ``result_path`` (both atomic)."""
    t = time.time()
    W = load_w(i).to(device, torch.float32)
    F = None if load_f is None else load_f(i).to(device, torch.float32)
    d = decompose(W, cfg, config.rank, fisher=F, seed=config.seed, max_iters=config.max_iters,
                  tol=config.tol)
    # as quantize_model computes it, so the reports agree to the last bit
    ref = float((W.float().square() * F).sum() if F is not None else W.float().square().sum())
    root = math.sqrt(config.scaling)
    base = key[:-len(".weight")]
    tensors = {"qcodes": d.q.qcodes, "qscales": d.q.qscales, "scale2": d.q.scale2,
               "offset": d.q.offset}
    if config.rank:
        tensors.update(lora_A=d.l2 / root, lora_B=d.l1 / root)
    entries = [Entry(f"{base}.{k}", v.dtype, tuple(v.shape), v.detach().cpu().contiguous())
               for k, v in tensors.items()]
    write_safetensors(part_path, entries)
    atomic_write_json(result_path, {"name": name, "error": d.error, "ref": ref,
                                    "iters": d.iters, "seconds": time.time() - t})


def _raw_source(src: CheckpointDir, key: str):
    return lambda f: src.copy_raw(key, f)


def _part_source(path: str, key: str):
    def write(f):
        from safetensors import safe_open

        from .streaming import tensor_bytes
        with safe_open(path, framework="pt", device="cpu") as sf:
            f.write(tensor_bytes(sf.get_tensor(key)))
    return write


def _report(names, shapes, configs, config, results, src, keys) -> AllocationReport:
    entries, dense = [], 0
    quant = 0
    for n, s, c, r, k in zip(names, shapes, configs, results, keys):
        entries.append(MatrixReport(n, tuple(s), c, r["error"],
                                    r["error"] / r["ref"] if r["ref"] > 0 else 0.0))
        dense += src.info(k).nbytes
        nc, ns, ng = packed_sizes(s[0] * s[1], c)
        quant += 4 * (nc + ns + 1) + ng * torch.tensor([], dtype=c.scale_dtype).element_size()
        quant += 2 * config.rank * (s[0] + s[1])  # low-rank counted at 16 bits
    return AllocationReport(entries, config.rank, float(config.budget_bits), config.fisher,
                            dense, quant)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _finished_report(out: str, job_id: str):
    rep = _read_json(os.path.join(out, REPORT))
    if not isinstance(rep, dict) or rep.get("job") != job_id:
        return None
    idx = _read_json(os.path.join(out, SAFE_INDEX))
    files = sorted(set(idx["weight_map"].values())) if isinstance(idx, dict) else \
        ["model.safetensors"]
    if not all(is_complete(os.path.join(out, f)) for f in files):
        return None
    return rep
