"""Mixed-configuration allocation (METHOD.md §4): pick one quantization config per matrix.

Given ``cost[i, k]`` (the, possibly Fisher-weighted, squared error of matrix ``i`` under
config ``k``), :func:`solve_allocation` solves the multiple-choice knapsack

    minimize    sum_ik cost[i, k] * x[i, k]
    subject to  sum_ik bits_per_param[k] * numel[i] * x[i, k] <= budget * sum_i numel[i]
                sum_k x[i, k] = 1 for every i,   x binary

exactly, as a MIP with HiGHS (the reference used Gurobi with a 60 s limit). The budget
covers the quantized matrices only. :func:`config_grid` gives the candidate configs.
"""
from __future__ import annotations

import itertools
import math
import warnings
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..formats import QuantConfig

__all__ = ["solve_allocation", "config_grid", "GRID_NAMES"]

# The budget is honoured up to this relative slack (floating-point sums of bits * numel).
_BUDGET_RTOL = 1e-9


# -- input handling ------------------------------------------------------------------------

def _as_float64(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise ValueError(f"solve_allocation: {name} must be real, got {x.dtype}")
        return x.detach().to("cpu", torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"solve_allocation: {name} is not a numeric array ({e})") from None


def _validate(costs, numels, bits_per_param, budget):
    c = _as_float64(costs, "costs")
    if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"solve_allocation: costs must be a non-empty 2-D [N matrices, K "
                         f"configs] array, got shape {tuple(c.shape)}")
    n, k = c.shape
    if np.isnan(c).any():
        i, j = np.argwhere(np.isnan(c))[0]
        raise ValueError(f"solve_allocation: costs contain NaN (first at matrix {i}, config {j})")
    if np.isneginf(c).any():
        i, j = np.argwhere(np.isneginf(c))[0]
        raise ValueError(f"solve_allocation: costs contain -inf (first at matrix {i}, config "
                         f"{j}); use +inf to forbid a config")
    no_option = np.flatnonzero(~np.isfinite(c).any(axis=1))
    if no_option.size:
        raise ValueError(f"solve_allocation: every config has infinite cost for matrix "
                         f"{int(no_option[0])} ({no_option.size} such matrices); each matrix "
                         f"needs at least one allowed config")

    ne = _as_float64(numels, "numels")
    if ne.shape != (n,):
        raise ValueError(f"solve_allocation: numels must have shape [{n}] (one per row of "
                         f"costs), got {tuple(ne.shape)}")
    if not np.isfinite(ne).all() or (ne <= 0).any() or (ne != np.round(ne)).any():
        raise ValueError("solve_allocation: numels must be positive integers")

    b = _as_float64(bits_per_param, "bits_per_param")
    if b.shape != (k,):
        raise ValueError(f"solve_allocation: bits_per_param must have shape [{k}] (one per "
                         f"column of costs), got {tuple(b.shape)}")
    if not np.isfinite(b).all() or (b <= 0).any():
        raise ValueError("solve_allocation: bits_per_param must be positive and finite")

    if isinstance(budget, torch.Tensor):
        if budget.numel() != 1:
            raise ValueError(f"solve_allocation: budget must be a scalar (bits/param), got a "
                             f"tensor of shape {tuple(budget.shape)}")
        budget = budget.item()
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"solve_allocation: budget must be a number of bits/param, got "
                         f"{budget!r}") from None
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"solve_allocation: budget must be positive and finite, got {budget}")
    return c, ne, b, budget


def _pareto_options(cost_row: np.ndarray, weight_row: np.ndarray) -> np.ndarray:
    """Config indices of one matrix that no other config dominates, by increasing weight
    (hence strictly decreasing cost). Infinite costs are dropped; among exact ties the
    lowest index is kept, so the result is deterministic."""
    idx = np.flatnonzero(np.isfinite(cost_row))
    order = idx[np.lexsort((idx, cost_row[idx], weight_row[idx]))]
    keep, best = [], math.inf
    for j in order:
        if cost_row[j] < best:
            keep.append(j)
            best = cost_row[j]
    return np.asarray(keep, dtype=np.int64)


def _greedy(options, w, c, slack):
    """Feasible solution from the LP-relaxation greedy: per matrix, walk the lower convex
    hull of its (weight, cost) options; take the upgrades with the best cost decrease per
    bit first, while they fit in ``slack`` (weights and costs here are relative to each
    matrix's lightest option). Returns positions into each ``options`` list."""
    steps = []  # (-efficiency, matrix, target position, extra weight)
    for i, opt in enumerate(options):
        hull = [0]
        for p in range(1, len(opt)):
            # keep the hull convex: the slope (cost per extra weight) must increase
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                s_ab = (c[i][b] - c[i][a]) / (w[i][b] - w[i][a])
                s_bp = (c[i][p] - c[i][b]) / (w[i][p] - w[i][b])
                if s_bp <= s_ab:
                    hull.pop()
                else:
                    break
            hull.append(p)
        for a, b in zip(hull, hull[1:]):
            eff = (c[i][a] - c[i][b]) / (w[i][b] - w[i][a])
            steps.append((-eff, i, b, w[i][b] - w[i][a]))
    steps.sort(key=lambda s: (s[0], s[1], s[2]))
    choice = [0] * len(options)
    used = 0.0
    for _, i, b, dw in steps:
        if used + dw > slack:
            break  # the LP would take this step fractionally; stop to stay integral
        choice[i] = b
        used += dw
    return choice


def _highs():
    """A silent HiGHS instance. ``highspy.Highs()`` prints a banner as it is constructed
    (before any option can be set); the bare binding class does not."""
    try:
        from highspy._core import _Highs as HighsClass
    except ImportError:  # older highspy layouts
        from highspy import Highs as HighsClass
    h = HighsClass()
    h.setOptionValue("output_flag", False)
    return h


def _solve_mip(options, w, c, slack, time_limit):
    """Exact MIP over the remaining options; returns positions into each options list."""
    import highspy

    starts = np.cumsum([0] + [len(o) for o in options])
    nvar = int(starts[-1])
    n = len(options)
    cost = np.concatenate([np.asarray(ci, dtype=np.float64) for ci in c])
    weight = np.concatenate([np.asarray(wi, dtype=np.float64) for wi in w])
    row_of = np.repeat(np.arange(n), [len(o) for o in options])

    lp = highspy.HighsLp()
    lp.num_col_ = nvar
    lp.num_row_ = n + 1
    lp.col_cost_ = cost
    lp.col_lower_ = np.zeros(nvar)
    lp.col_upper_ = np.ones(nvar)
    lp.row_lower_ = np.concatenate([np.ones(n), [-highspy.kHighsInf]])
    rhs = slack
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    # column j: 1 in its matrix's row, weight[j] in the budget row (skipped when zero)
    nz = weight != 0
    start = np.concatenate([[0], np.cumsum(1 + nz)]).astype(np.int32)
    index = np.empty(int(start[-1]), dtype=np.int32)
    value = np.empty(int(start[-1]), dtype=np.float64)
    pos = start[:-1]
    index[pos] = row_of
    value[pos] = 1.0
    index[pos[nz] + 1] = n
    value[pos[nz] + 1] = weight[nz]
    lp.a_matrix_.start_ = start
    lp.a_matrix_.index_ = index
    lp.a_matrix_.value_ = value
    lp.integrality_ = [highspy.HighsVarType.kInteger] * nvar

    for attempt in range(4):
        lp.row_upper_ = np.concatenate([np.ones(n), [rhs]])
        h = _highs()
        for opt, val in (("mip_rel_gap", 0.0), ("mip_abs_gap", 0.0), ("random_seed", 0),
                         ("mip_feasibility_tolerance", 1e-9),
                         ("primal_feasibility_tolerance", 1e-9)):
            h.setOptionValue(opt, val)
        if time_limit is not None:
            h.setOptionValue("time_limit", float(time_limit))
        h.passModel(lp)
        h.run()
        status = h.getModelStatus()
        name = h.modelStatusToString(status)
        x = np.asarray(h.getSolution().col_value, dtype=np.float64)
        if status != highspy.HighsModelStatus.kOptimal:
            if status == highspy.HighsModelStatus.kTimeLimit and x.size == nvar and \
                    h.getInfo().primal_solution_status == highspy.kSolutionStatusFeasible:
                warnings.warn(f"solve_allocation: HiGHS hit the {time_limit} s time limit; "
                              f"returning its best allocation (MIP gap "
                              f"{h.getInfo().mip_gap:.3g}), which may not be optimal")
            else:
                raise RuntimeError(f"solve_allocation: HiGHS did not solve the allocation MIP "
                                   f"(model status: {name})")
        choice = [int(np.argmax(x[starts[i]:starts[i + 1]])) for i in range(n)]
        used = float(sum(w[i][p] for i, p in enumerate(choice)))
        if used <= slack:
            return choice
        # the solver's feasibility tolerance let the budget row slip; tighten and re-solve
        rhs -= (used - slack) * 2
    raise RuntimeError("solve_allocation: HiGHS returned allocations over budget after "
                       "tightening; the problem is numerically ill-conditioned")


# -- public API ----------------------------------------------------------------------------

def solve_allocation(costs, numels, bits_per_param, budget, *,
                     time_limit: Optional[float] = None) -> torch.Tensor:
    """Choose one config per matrix to minimize total cost under a bits/param budget.

    Args:
        costs: ``[N, K]`` float (tensor, array or nested lists); ``costs[i, k]`` is the error
            of matrix ``i`` under config ``k``. ``+inf`` forbids a config for a matrix;
            NaN and ``-inf`` are rejected.
        numels: ``[N]`` positive integers, elements per matrix.
        bits_per_param: ``[K]`` positive storage cost of each config (bits per element),
            e.g. ``[c.bits_per_param for c in grid]``.
        budget: average bits/param allowed over all N matrices (quantized part only).
        time_limit: optional seconds for HiGHS; when hit, the best allocation found so far
            is returned with a warning. Default: no limit (exact).

    Returns:
        ``torch.LongTensor [N]``: the chosen config index per matrix, an exact optimum of the
        multiple-choice knapsack (up to a relative 1e-9 of the objective, HiGHS's
        tolerances). Deterministic for the same inputs. The budget holds up to a relative
        ``1e-9``.

    Raises:
        ValueError: bad shapes or values, or an infeasible budget (the message names the
            smallest feasible budget in bits/param).
    """
    c, ne, b, budget = _validate(costs, numels, bits_per_param, budget)
    n, _ = c.shape
    total = float(ne.sum())
    weights = b[None, :] * ne[:, None]  # [N, K] bits
    capacity = budget * total

    options = [_pareto_options(c[i], weights[i]) for i in range(n)]
    wmin = np.array([weights[i, o[0]] for i, o in enumerate(options)])
    min_total = float(wmin.sum())
    if min_total > capacity * (1 + _BUDGET_RTOL):
        need = min_total / total
        shown = math.ceil(need * 1e6) / 1e6
        raise ValueError(f"solve_allocation: budget {budget:g} bits/param is infeasible; the "
                         f"smallest feasible budget is {shown:.6f} bits/param (every matrix "
                         f"at its smallest allowed config)")
    slack = max(capacity * (1 + _BUDGET_RTOL) - min_total, 0.0)

    # Work relative to each matrix's lightest option: w >= 0, and c <= 0 (options get
    # cheaper as they get heavier), shifted below so that c >= 0 with the cheapest at 0.
    rel_w, rel_c = [], []
    for i, o in enumerate(options):
        o = o[weights[i, o] - wmin[i] <= slack]  # drop those that cannot fit even alone
        options[i] = o
        rel_w.append(weights[i, o] - wmin[i])
        rel_c.append(c[i, o] - c[i, o].min())
    result = np.array([o[-1] for o in options], dtype=np.int64)  # cheapest of each matrix
    if sum(wi[-1] for wi in rel_w) <= slack:
        return torch.from_numpy(result)

    # Upper bound from a greedy feasible solution; options dearer than it on their own can
    # never be optimal (all relative costs are >= 0). Then normalize costs by that bound.
    choice = _greedy(options, rel_w, rel_c, slack)
    ub = float(sum(rel_c[i][p] for i, p in enumerate(choice)))
    if ub <= 0:
        return torch.from_numpy(np.array([o[p] for o, p in zip(options, choice)]))
    for i in range(n):
        keep = rel_c[i] <= ub
        options[i], rel_w[i], rel_c[i] = options[i][keep], rel_w[i][keep], rel_c[i][keep] / ub
    # weights in bits/param of the whole model keep the budget row's scale near 1
    rel_w = [wi / total for wi in rel_w]
    pos = _solve_mip(options, rel_w, rel_c, slack / total, time_limit)
    return torch.from_numpy(np.array([o[p] for o, p in zip(options, pos)], dtype=np.int64))


# -- candidate grids -----------------------------------------------------------------------

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# config_grid("default"): 18 of the 432 reference configs, measured by
# bench/grid_pruning.py (numbers in bench/results/grid_pruning.json) on Gaussian, Student-t
# and outlier-column matrices plus 15 SmolLM2-135M matrices:
# * the second-level dtype changes the error by about 1% either way, as noise (p1/p99 of the
#   fp16/bf16 and fp32/bf16 error ratios), so only bf16 is kept (fp32 costs bits for
#   nothing, fp16 has less range);
# * greedy forward selection on each matrix's error-vs-bits lower convex hull (what a mixed
#   allocation reaches) over 2.04-8.2 bits/param: these 18 leave a mean excess of 0.23% over
#   the full grid (0.15% on held-out matrices); the ILP on the 18 matrices as one model stays
#   within 0.9% of the 432-config optimum at budgets 2.25-8.
# (bits, block_size, scale_bits, scale_block_size, scale dtype), by bits/param:
_DEFAULT_GRID: Tuple[Tuple[int, int, int, int, str], ...] = (
    (2, 64, 2, 64, "bf16"),    # 2.0352
    (2, 32, 3, 64, "bf16"),    # 2.1016
    (2, 16, 2, 64, "bf16"),    # 2.1406
    (2, 16, 3, 64, "bf16"),    # 2.2031
    (3, 64, 3, 64, "bf16"),    # 3.0508
    (3, 32, 3, 64, "bf16"),    # 3.1016
    (3, 16, 3, 64, "bf16"),    # 3.2031
    (3, 16, 4, 64, "bf16"),    # 3.2656
    (3, 16, 4, 16, "bf16"),    # 3.3125
    (3, 16, 8, 256, "bf16"),   # 3.5039
    (4, 64, 4, 64, "bf16"),    # 4.0664
    (4, 32, 4, 64, "bf16"),    # 4.1328
    (4, 16, 4, 64, "bf16"),    # 4.2656
    (4, 16, 4, 16, "bf16"),    # 4.3125
    (4, 16, 8, 256, "bf16"),   # 4.5039
    (8, 64, 4, 16, "bf16"),    # 8.0781
    (8, 64, 8, 256, "bf16"),   # 8.1260
    (8, 32, 8, 64, "bf16"),    # 8.2578
)

_SINGLE = {f"nf{b}": (b, 64, 8, 256, "fp32") for b in (2, 3, 4, 8)}  # QLoRA-style uniform

GRID_NAMES = ("default", "paper") + tuple(_SINGLE)


def _sorted(configs) -> List[QuantConfig]:
    return sorted(configs, key=lambda q: (q.bits_per_param, q.bits, q.block_size, q.scale_bits,
                                          q.scale_block_size, str(q.scale_dtype)))


def config_grid(name: str = "default") -> List[QuantConfig]:
    """Candidate quantization configs for :func:`solve_allocation`, sorted by bits/param.

    ``"paper"``: the reference's 432 configs, bits {2,3,4,8} x block_size {16,32,64} x
    scale_bits {2,3,4,8} x scale_block_size {16,64,256} x scale_dtype {bf16,fp16,fp32}.
    ``"default"``: the measured Pareto-efficient subset (see bench/grid_pruning.py), about
    an order of magnitude cheaper to evaluate with nearly the same choices.
    ``"nf2"``, ``"nf3"``, ``"nf4"``, ``"nf8"``: one QLoRA-style config (block 64, 8-bit
    scales in blocks of 256, fp32 second level), for uniform-precision baselines.
    """
    if name == "paper":
        return _sorted(QuantConfig(b, bs, sb, sbs, dt) for b, bs, sb, sbs, dt in itertools.product(
            (2, 3, 4, 8), (16, 32, 64), (2, 3, 4, 8), (16, 64, 256), _DTYPES.values()))
    if name == "default":
        return _sorted(QuantConfig(b, bs, sb, sbs, _DTYPES[dt])
                       for b, bs, sb, sbs, dt in _DEFAULT_GRID)
    if name in _SINGLE:
        b, bs, sb, sbs, dt = _SINGLE[name]
        return [QuantConfig(b, bs, sb, sbs, _DTYPES[dt])]
    raise ValueError(f"config_grid: unknown grid {name!r}; valid names: {', '.join(GRID_NAMES)}")
