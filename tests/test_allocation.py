"""solve_allocation against exhaustive search and an exact DP; config_grid contents."""
import itertools
import math
import re

import numpy as np
import pytest
import torch

from lqlora_ext.method.allocation import GRID_NAMES, config_grid, solve_allocation
from lqlora_ext.formats import QuantConfig

RTOL = 1e-9  # the budget slack and objective tolerance solve_allocation documents


def brute_force(costs, numels, bits, budget):
    """Optimal objective by enumerating all K**N assignments, or None when infeasible."""
    n, k = costs.shape
    combos = np.array(list(itertools.product(range(k), repeat=n)))  # [K**N, N]
    with np.errstate(invalid="ignore"):
        value = costs[np.arange(n), combos].sum(1)
    used = (bits[combos] * numels).sum(1)
    ok = np.isfinite(value) & (used <= budget * numels.sum() * (1 + RTOL))
    return float(value[ok].min()) if ok.any() else None


def check_solution(costs, numels, bits, budget, choice):
    choice = choice.numpy()
    assert choice.shape == (costs.shape[0],)
    used = float((bits[choice] * numels).sum())
    assert used <= budget * numels.sum() * (1 + RTOL)
    value = float(costs[np.arange(costs.shape[0]), choice].sum())
    assert math.isfinite(value)
    return value


def random_instance(rng, n_max=6, k_max=4, ties=False, inf_rate=0.0):
    n, k = int(rng.integers(1, n_max + 1)), int(rng.integers(1, k_max + 1))
    bits = rng.choice([2.0, 2.25, 3.126953125, 4.126953125, 8.0], k)  # repeats allowed
    costs = rng.random((n, k))
    if rng.random() < 0.7:  # realistic: more bits, less error, so the budget binds
        costs = costs * 0.3 + np.exp(-bits)[None, :] * rng.lognormal(0, 1, (n, 1))
    if ties:
        costs = np.round(costs * 3)  # many equal costs
    costs[rng.random((n, k)) < inf_rate] = np.inf
    for i in range(n):  # every matrix keeps at least one allowed config
        if not np.isfinite(costs[i]).any():
            costs[i, rng.integers(k)] = float(rng.integers(0, 3))
    numels = rng.integers(1, 100, n).astype(np.int64)
    budget = float(rng.uniform(bits.min() - 0.1, bits.max()))  # mostly binding
    return costs, numels, np.asarray(bits, dtype=np.float64), budget


@pytest.mark.parametrize("ties,inf_rate", [(False, 0.0), (True, 0.0), (False, 0.2), (True, 0.3)],
                         ids=["plain", "ties", "inf", "ties+inf"])
def test_matches_brute_force(ties, inf_rate):
    rng = np.random.default_rng(1234 + int(ties) * 10 + int(inf_rate * 10))
    for _ in range(200):
        costs, numels, bits, budget = random_instance(rng, ties=ties, inf_rate=inf_rate)
        best = brute_force(costs, numels, bits, budget)
        if best is None:
            with pytest.raises(ValueError, match="infeasible"):
                solve_allocation(costs, numels, bits, budget)
            continue
        value = check_solution(costs, numels, bits, budget,
                               solve_allocation(costs, numels, bits, budget))
        assert value == pytest.approx(best, rel=RTOL, abs=1e-12)


def dp_optimum(costs, weights, cap):
    """Exact multiple-choice knapsack by DP over integer weights."""
    inf = np.inf
    f = np.zeros(cap + 1)
    for i in range(costs.shape[0]):
        g = np.full(cap + 1, inf)
        for j in range(costs.shape[1]):
            w = int(weights[i, j])
            if w <= cap and math.isfinite(costs[i, j]):
                g[w:] = np.minimum(g[w:], f[: cap + 1 - w] + costs[i, j])
        f = g
    return f[cap]


def test_matches_dp_on_larger_instances():
    # bits in multiples of 1/8 and small numels make weights integral (in 1/8 bits), so a DP
    # is exact; 40 matrices x 12 configs force real branching in the MIP
    rng = np.random.default_rng(7)
    for trial in range(6):
        n, k = 40, 12
        bits = np.sort(rng.choice(np.arange(16, 70) / 8, k, replace=False))
        numels = rng.integers(1, 20, n)
        sens = rng.lognormal(0, 1.5, n)
        costs = sens[:, None] * np.exp(-bits[None, :]) * (1 + 0.5 * rng.random((n, k)))
        costs[rng.random((n, k)) < 0.1] = np.inf
        costs[:, 0] = sens  # the lightest config always allowed
        budget = float(rng.uniform(bits[0] + 0.1, bits[-1] - 0.5))
        weights = (bits[None, :] * 8 * numels[:, None]).round().astype(np.int64)
        cap = int(math.floor(budget * 8 * numels.sum() + 1e-9))
        value = check_solution(costs, numels, bits, budget,
                               solve_allocation(costs, numels, bits, budget))
        assert value == pytest.approx(dp_optimum(costs, weights, cap), rel=1e-9)


def test_budget_exactly_at_a_feasible_point():
    # best pair is (nf4, nf2) whose average is exactly the budget of 3 bits/param
    costs = np.array([[10.0, 6.0, 0.0], [10.0, 5.0, 1.0]])
    numels = np.array([64, 64])
    bits = np.array([2.0, 3.0, 4.0])
    assert solve_allocation(costs, numels, bits, 3.0).tolist() == [2, 0]
    # with real config sizes: half at NF4, half at NF3 exactly fills the budget
    b4, b3 = QuantConfig(4).bits_per_param, QuantConfig(3).bits_per_param
    n = 4096 * 4096
    costs = np.array([[5.0, 1.0], [4.0, 1.0], [3.0, 2.9]])
    numels = np.array([n, n, 2 * n])
    r = solve_allocation(costs, numels, [b3, b4], (b3 + b4) / 2)
    assert r.tolist() == [1, 1, 0]
    # budget exactly at the smallest feasible point: everything at its lightest config
    costs = np.array([[1.0, 0.5], [2.0, 0.1]])
    assert solve_allocation(costs, [10, 30], [2.5, 4.0], 2.5).tolist() == [0, 0]


def test_infeasible_budget_names_smallest_feasible_budget():
    costs = np.array([[np.inf, 1.0, 0.5], [3.0, 2.0, 1.0]])
    numels = np.array([100, 300])
    bits = np.array([2.5, 3.0, 4.0])
    # matrix 0 cannot use 2.5 bits: smallest = (3*100 + 2.5*300) / 400 = 2.625
    with pytest.raises(ValueError, match=r"smallest feasible budget is 2\.625000 bits/param"):
        solve_allocation(costs, numels, bits, 2.6)
    assert solve_allocation(costs, numels, bits, 2.625).tolist() == [1, 0]
    # a non-round minimum is rounded up, so the named budget itself is feasible
    bits = np.array([2.1, 3.0, 4.0])
    numels = np.array([7, 3])
    with pytest.raises(ValueError) as e:
        solve_allocation(costs, numels, bits, 2.0)
    named = float(re.search(r"smallest feasible budget is ([0-9.]+)", str(e.value)).group(1))
    assert named >= (3.0 * 7 + 2.1 * 3) / 10
    solve_allocation(costs, numels, bits, named)


def test_inputs_tensor_or_array_and_deterministic():
    rng = np.random.default_rng(3)
    costs = rng.random((30, 8))
    numels = rng.integers(100, 10_000, 30)
    bits = np.linspace(2.1, 8.2, 8)
    a = solve_allocation(costs, numels, bits, 3.3)
    b = solve_allocation(torch.tensor(costs, dtype=torch.float32).double(), torch.tensor(numels),
                         torch.tensor(bits), torch.tensor(3.3))
    c = solve_allocation(costs.tolist(), numels.tolist(), bits.tolist(), 3.3)
    assert a.dtype == torch.int64 and a.shape == (30,)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(a, solve_allocation(costs, numels, bits, 3.3))


@pytest.mark.parametrize("kwargs,match", [
    (dict(costs=[[1.0, float("nan")]]), "NaN"),
    (dict(costs=[[1.0, -float("inf")]]), "-inf"),
    (dict(costs=[[float("inf"), float("inf")]]), "infinite cost for matrix 0"),
    (dict(costs=[1.0, 2.0]), "2-D"),
    (dict(numels=[10, 10]), "numels must have shape"),
    (dict(numels=[0]), "positive integers"),
    (dict(numels=[2.5]), "positive integers"),
    (dict(bits=[2.0]), "bits_per_param must have shape"),
    (dict(bits=[2.0, -1.0]), "positive"),
    (dict(budget=0.0), "budget must be positive"),
    (dict(budget=float("nan")), "budget must be positive"),
], ids=["nan", "neg-inf", "all-inf-row", "1d-costs", "numels-shape", "numels-zero",
        "numels-frac", "bits-shape", "bits-neg", "budget-zero", "budget-nan"])
def test_validation_errors(kwargs, match):
    args = dict(costs=[[1.0, 0.5]], numels=[10], bits=[2.0, 4.0], budget=4.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        solve_allocation(args["costs"], args["numels"], args["bits"], args["budget"])


def test_paper_grid():
    grid = config_grid("paper")
    assert len(grid) == 432 and len(set(grid)) == 432
    assert {c.bits for c in grid} == {2, 3, 4, 8}
    assert {c.block_size for c in grid} == {16, 32, 64}
    assert {c.scale_bits for c in grid} == {2, 3, 4, 8}
    assert {c.scale_block_size for c in grid} == {16, 64, 256}
    assert {c.scale_dtype for c in grid} == {torch.bfloat16, torch.float16, torch.float32}
    bpp = [c.bits_per_param for c in grid]
    assert bpp == sorted(bpp)


def test_default_grid():
    grid = config_grid("default")
    paper = set(config_grid("paper"))
    bpp = [c.bits_per_param for c in grid]
    assert 10 <= len(grid) <= 20 and len(set(grid)) == len(grid)
    assert set(grid) <= paper
    assert bpp == sorted(bpp)
    assert 2.0 <= bpp[0] <= 2.3 and 8.0 <= bpp[-1] <= 8.7
    assert {c.bits for c in grid} == {2, 3, 4, 8}
    # usable as-is by the solver over its whole range
    costs = np.exp(-np.array(bpp))[None, :].repeat(3, 0)
    r = solve_allocation(costs, [100, 200, 300], bpp, 3.0)
    assert max(bpp[j] for j in r.tolist()) > 3.0 > min(bpp[j] for j in r.tolist())


def test_named_single_config_grids_and_unknown_name():
    assert config_grid("nf4") == [QuantConfig(4)]
    assert config_grid("nf4")[0].bits_per_param == 4.126953125
    assert config_grid("nf3")[0].bits_per_param == 3.126953125
    assert set(GRID_NAMES) >= {"default", "paper", "nf2", "nf3", "nf4", "nf8"}
    with pytest.raises(ValueError, match="valid names: default, paper"):
        config_grid("bogus")


def test_solver_prints_nothing(capfd):
    rng = np.random.default_rng(11)
    bits = np.linspace(2.1, 8.2, 10)
    costs = rng.lognormal(0, 1, (50, 1)) * np.exp(-bits)[None, :] * (1 + rng.random((50, 10)))
    solve_allocation(costs, rng.integers(100, 1000, 50), bits, 3.1)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
