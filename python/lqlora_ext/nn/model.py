"""Whole-model LQ-LoRA: pick each matrix's config under a bits/param budget (ILP over
profiled decomposition costs, METHOD.md §4) and swap nn.Linear layers for LQLinear."""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..method.decomposition import decompose
from ..formats import QuantConfig
from ..integrations.hf_hook import attach_hf
from .linear import LQLinear, freeze_base


@dataclasses.dataclass
class LQLoRAConfig:
    """How :func:`quantize_model` compresses a model.

    budget_bits: average bits/param of the quantized parts (the ILP's budget). rank: LoRA
    rank r. target_modules: "all-linear" (every nn.Linear but the output head), a list of
    name suffixes, or a regex. fisher: data-aware costs (needs calibration batches).
    grid: a config grid name ("default", "paper") or a list of QuantConfig (one config =
    uniform quantization, no ILP). lora_alpha: PEFT's alpha (default r, i.e. scaling 1).
    seed: seeds every randomized SVD. The remaining fields tune the decomposition
    (max_iters, tol; profile_tol for the ILP's cost profiling, looser because the ILP only
    compares costs and a tolerance biases every config alike), the cost cache (cache_dir: resumable profiling), parallelism and
    progress bars. freeze_base: afterwards only the adapters (lora_A/lora_B) require grad,
    as in QLoRA/PEFT.
    """

    budget_bits: float
    rank: int
    target_modules: Union[str, Sequence[str]] = "all-linear"
    fisher: bool = False
    grid: Union[str, Sequence[QuantConfig]] = "default"
    lora_alpha: Optional[float] = None
    seed: int = 0
    max_iters: int = 100
    tol: float = 5e-4
    profile_tol: float = 1e-3
    cache_dir: Optional[str] = None
    workers: Optional[int] = None
    progress: bool = True
    freeze_base: bool = True

    @property
    def scaling(self) -> float:
        alpha = self.rank if self.lora_alpha is None else self.lora_alpha
        return float(alpha) / self.rank if self.rank else 1.0


@dataclasses.dataclass
class MatrixReport:
    name: str
    shape: tuple
    config: QuantConfig
    error: float       # squared (Fisher-weighted if fisher) reconstruction error
    rel_error: float   # error / ||W||^2 (weighted alike)


@dataclasses.dataclass
class AllocationReport:
    """Per-matrix choices and the model-level storage they add up to.

    bits_per_param: average bits/param of the quantized matrices (the budget's measure).
    bits_per_param_with_lowrank: the same with the low-rank factors counted at 16 bits.
    """

    entries: List[MatrixReport]
    rank: int
    budget_bits: float
    fisher: bool
    dense_bytes: int = 0
    quantized_bytes: int = 0

    @property
    def numel(self) -> int:
        return sum(e.shape[0] * e.shape[1] for e in self.entries)

    @property
    def bits_per_param(self) -> float:
        return sum(e.config.bits_per_param * e.shape[0] * e.shape[1]
                   for e in self.entries) / max(self.numel, 1)

    @property
    def lowrank_params(self) -> int:
        return sum(self.rank * (e.shape[0] + e.shape[1]) for e in self.entries)

    @property
    def bits_per_param_with_lowrank(self) -> float:
        return self.bits_per_param + 16 * self.lowrank_params / max(self.numel, 1)

    def config_counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for e in self.entries:
            out[e.config.name] = out.get(e.config.name, 0) + 1
        return dict(sorted(out.items()))

    def __str__(self) -> str:
        w = max([len(e.name) for e in self.entries] + [6])
        lines = [f"{'matrix':<{w}}  {'shape':>11}  {'config':<22} {'bits':>6}  {'rel.err':>9}"]
        for e in self.entries:
            shp = f"{e.shape[0]}x{e.shape[1]}"
            lines.append(f"{e.name:<{w}}  {shp:>11}  {e.config.name:<22} "
                         f"{e.config.bits_per_param:>6.3f}  {e.rel_error:>9.3e}")
        lines.append("")
        lines.append("configs: " + ", ".join(f"{k} x{v}" for k, v in self.config_counts().items()))
        lines.append(f"bits/param (quantized part): {self.bits_per_param:.4f} "
                     f"(budget {self.budget_bits:g})")
        lines.append(f"bits/param incl. rank-{self.rank} low-rank (16-bit): "
                     f"{self.bits_per_param_with_lowrank:.4f}")
        if self.dense_bytes:
            lines.append(f"targeted weights: {self.dense_bytes / 2**20:.1f} MiB dense -> "
                         f"{self.quantized_bytes / 2**20:.1f} MiB quantized + low-rank")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"rank": self.rank, "budget_bits": self.budget_bits, "fisher": self.fisher,
                "bits_per_param": self.bits_per_param,
                "bits_per_param_with_lowrank": self.bits_per_param_with_lowrank,
                "dense_bytes": self.dense_bytes, "quantized_bytes": self.quantized_bytes,
                "matrices": [{"name": e.name, "shape": list(e.shape),
                              "config": e.config.to_dict(), "error": e.error,
                              "rel_error": e.rel_error} for e in self.entries]}


def _resolve_grid(grid) -> List[QuantConfig]:
    if isinstance(grid, str):
        from ..method.allocation import config_grid
        return list(config_grid(grid))
    grid = list(grid)
    if not grid or not all(isinstance(c, QuantConfig) for c in grid):
        raise ValueError("LQLoRAConfig.grid must be a grid name or a non-empty list of "
                         "QuantConfig")
    return grid


def _decompose_task(name, w, cfg, rank, fisher, seed, max_iters, tol):
    try:
        return decompose(w, cfg, rank, fisher=fisher, seed=seed, max_iters=max_iters, tol=tol)
    except ValueError as e:  # name the module: "decompose: fisher is all zeros" alone is not
        raise ValueError(f"quantize_model: {name} ({cfg.name}): {e}") from None


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _refuse_sharded(targets: Dict[str, nn.Linear]) -> None:
    """FSDP2 cannot swap a module inside a unit it already manages; the order that works is
    quantize first, then shard (LQLinear's packed tensors are FSDP2-shardable parameters)."""
    from .packed import is_sharded

    for name, lin in targets.items():
        if is_sharded(lin.weight):
            raise ValueError(f"quantize_model: the model is already sharded (fully_shard / "
                             f"FSDP2: {name}.weight is a DTensor shard); quantize the "
                             f"unsharded model first, then shard it (lqlora_ext.distributed."
                             f"fsdp.shard_model): LQLinear's packed tensors shard like any "
                             f"parameter")


def quantize_model(model: nn.Module, config: LQLoRAConfig,
                   calibration: Optional[Iterable[Tensor]] = None) -> AllocationReport:
    """Replace every targeted ``nn.Linear`` of ``model`` (in place) by an :class:`LQLinear`
    computing exactly ``Q + L1 L2`` (+ bias), with each matrix's quantization config chosen
    by an exact ILP under ``config.budget_bits``.

    calibration: iterable of LongTensor ``input_ids [B, T]``; required when
    ``config.fisher`` (data-aware costs and weighting). Returns the AllocationReport.
    """
    from tqdm.auto import tqdm

    from ..method.targets import select_linear_modules

    if not isinstance(config, LQLoRAConfig):
        raise TypeError(f"quantize_model: config must be an LQLoRAConfig, got "
                        f"{type(config).__name__}")
    if not isinstance(config.rank, int) or config.rank < 0:
        raise ValueError(f"quantize_model: rank must be a non-negative integer, got "
                         f"{config.rank!r}")
    if config.fisher and calibration is None:
        raise ValueError("quantize_model: fisher=True needs calibration data "
                         "(an iterable of input_ids LongTensors [B, T])")
    if not (isinstance(config.budget_bits, (int, float)) and math.isfinite(config.budget_bits)
            and config.budget_bits > 0):
        raise ValueError(f"quantize_model: budget_bits must be a positive number, got "
                         f"{config.budget_bits!r}")
    grid = _resolve_grid(config.grid)
    targets = select_linear_modules(model, config.target_modules)
    _refuse_sharded(targets)
    from ..method.decomposition import first_non_finite
    for name, lin in targets.items():
        bad = None if lin.weight.device.type == "meta" else first_non_finite(lin.weight.detach())
        if bad is not None:  # before hours of Fisher and profiling, not a bare SVD error
            raise ValueError(f"quantize_model: {name}.weight {tuple(lin.weight.shape)} has a "
                             f"non-finite value ({bad[1]}) at {bad[0]}")
        if config.rank >= min(lin.weight.shape):
            raise ValueError(f"quantize_model: rank {config.rank} must be < min(out, in) = "
                             f"{min(lin.weight.shape)} for {name} {tuple(lin.weight.shape)}")

    fishers = None
    if config.fisher:
        from ..method.fisher import estimate_fisher
        fishers = estimate_fisher(model, calibration, target_modules=list(targets),
                                  progress=config.progress)

    names = list(targets)
    numels = torch.tensor([targets[n].weight.numel() for n in names], dtype=torch.float64)
    bpp = torch.tensor([c.bits_per_param for c in grid], dtype=torch.float64)
    if len(grid) == 1:  # uniform quantization: nothing to allocate, the budget is moot
        choice = [0] * len(names)
    else:
        from ..method.allocation import solve_allocation
        from ..method.profiling import profile_costs
        # Feasibility first, before hours of profiling.
        min_bits = float(bpp.min())
        if min_bits > config.budget_bits + 1e-9:
            raise ValueError(f"quantize_model: budget {config.budget_bits:g} bits/param is "
                             f"below the smallest config in the grid; the smallest feasible "
                             f"budget is {min_bits:.4f}")
        costs = profile_costs({n: targets[n].weight for n in names}, grid, config.rank,
                              fishers=fishers, cache_dir=config.cache_dir, seed=config.seed,
                              max_iters=config.max_iters, tol=config.profile_tol,
                              workers=config.workers, progress=config.progress)
        choice = solve_allocation(costs, numels, bpp, config.budget_bits).tolist()

    from ..method.profiling import map_matrices

    tasks = [(n, targets[n].weight.detach(), grid[k], config.rank,
              None if fishers is None else fishers[n].to(targets[n].weight.device),
              config.seed, config.max_iters, config.tol) for n, k in zip(names, choice)]
    results = [None] * len(names)
    with tqdm(total=len(names), desc="decomposing", unit="matrix",
              disable=not config.progress) as bar:
        for i, d in map_matrices(_decompose_task, tasks, config.workers):
            results[i] = d
            bar.update(1)

    entries: List[MatrixReport] = []
    dense_bytes = quant_bytes = 0
    s, root = config.scaling, math.sqrt(config.scaling)
    for name, k, d, task in zip(names, choice, results, tasks):
        lin, W, F = targets[name], task[1], task[4]
        ref = float((W.float().square() * F).sum() if F is not None else W.float().square().sum())
        entries.append(MatrixReport(name, tuple(W.shape), grid[k], d.error,
                                    d.error / ref if ref > 0 else 0.0))
        layer = LQLinear(d.q, d.l2 / root, d.l1 / root, s,
                         None if lin.bias is None else lin.bias.detach())
        dense_bytes += W.numel() * W.element_size()
        quant_bytes += d.q.nbytes + 2 * config.rank * sum(W.shape)  # low-rank at 16 bits
        _set_module(model, name, layer.to(W.device))
    if config.freeze_base:
        freeze_base(model)
    attach_hf(model, config.freeze_base)  # save_pretrained/from_pretrained, Trainer
    return AllocationReport(entries, config.rank, float(config.budget_bits), config.fisher,
                            dense_bytes, quant_bytes)
