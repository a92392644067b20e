"""profile_costs: costs equal decompose errors, the resumable on-disk cache (only missing work
is recomputed; changed inputs get new keys; torn/foreign files are recomputed), and process
parallelism giving the same numbers."""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch

from lqlora_ext import QuantConfig, decompose
from lqlora_ext.method import profiling
from lqlora_ext.method.profiling import profile_costs

import grid

CONFIGS = [QuantConfig(2, 64, 8, 256), QuantConfig(3, 32, 4, 64, torch.bfloat16),
           QuantConfig(4, 64, 8, 256)]
RANK = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def weights():
    return {"a": grid.make_weight(48, 64, seed=1), "b": grid.make_weight(64, 32, seed=2),
            "c": grid.make_weight(40, 40, seed=3), "d": grid.make_weight(33, 50, seed=4)}


def fishers(ws):
    g = torch.Generator().manual_seed(9)
    return {n: torch.rand(w.shape, generator=g) for n, w in ws.items()}


@pytest.fixture
def counting(monkeypatch):
    """Record which matrices (by content) and configs _profile_one is asked for."""
    calls = []
    real = profiling._profile_one

    def wrapper(w, fisher, configs, rank, settings):
        calls.append((w.clone(), [c.copy() for c in configs]))
        return real(w, fisher, configs, rank, settings)

    monkeypatch.setattr(profiling, "_profile_one", wrapper)
    return calls


def which(calls, ws):
    """Names of the matrices in calls (each once)."""
    out = set()
    for w, _ in calls:
        out |= {n for n, v in ws.items() if v.shape == w.shape and torch.equal(v, w)}
    return sorted(out)


def asked(calls):
    """How many (matrix, config) costs calls computed."""
    return sum(len(cfgs) for _, cfgs in calls)


def key_of(w, fisher=None, **kw):
    s = dict(rank=RANK, seed=0, max_iters=100, tol=1e-3, threads=1)
    s.update(kw)
    return profiling._key(w, fisher, profiling.cache_settings(w.device.type, **s))


def run(ws, cache_dir=None, workers=1, **kw):
    return profile_costs(ws, CONFIGS, RANK, cache_dir=cache_dir, workers=workers,
                         progress=False, **kw)


def test_costs_match_decompose():
    ws = weights()
    costs = run(ws)
    assert costs.shape == (4, 3) and costs.dtype == torch.float64
    assert torch.isfinite(costs).all() and (costs > 0).all()
    for i, w in enumerate(ws.values()):
        for j, c in enumerate(CONFIGS):
            d = decompose(w, c, RANK, seed=0, max_iters=100, tol=1e-3)
            assert costs[i, j] == d.error
    # more bits, less error (same block/scale layout for nf2 vs nf4)
    assert (costs[:, 2] < costs[:, 0]).all()


def test_costs_with_fisher():
    ws = weights()
    fs = fishers(ws)
    costs = run(ws, fishers=fs, seed=3, max_iters=20, tol=0.0)
    for i, (n, w) in enumerate(ws.items()):
        for j, c in enumerate(CONFIGS):
            d = decompose(w, c, RANK, fisher=fs[n], seed=3, max_iters=20, tol=0.0)
            assert costs[i, j] == d.error
    with pytest.raises(ValueError, match="no Fisher estimate for 'c'"):
        run(ws, fishers={k: v for k, v in fs.items() if k != "c"})


def test_no_configs():
    with pytest.raises(ValueError, match="no configs"):
        profile_costs(weights(), [], RANK, progress=False)


def test_cache_resumes_only_missing_matrix(tmp_path, counting):
    ws = weights()
    cache = str(tmp_path / "cache")
    first = run(ws, cache)
    assert which(counting, ws) == ["a", "b", "c", "d"]
    files = sorted(glob.glob(os.path.join(cache, "*.json")))
    assert len(files) == 4
    for f in files:
        with open(f) as fh:
            data = json.load(fh)
        assert set(data["costs"]) == {c.name for c in CONFIGS}

    # everything cached: no work at all, identical costs
    counting.clear()
    assert torch.equal(run(ws, cache), first)
    assert counting == []

    # delete one matrix's file: only that matrix is recomputed
    key_b = key_of(ws["b"])
    path_b = os.path.join(cache, key_b + ".json")
    assert path_b in files
    mtimes = {f: os.stat(f).st_mtime_ns for f in files if f != path_b}
    os.unlink(path_b)
    counting.clear()
    assert torch.equal(run(ws, cache), first)
    assert which(counting, ws) == ["b"]
    # one task: the matrix's configs together (workers=1), its first low-rank step shared
    assert len(counting) == 1 and len(counting[0][1]) == len(CONFIGS)
    assert os.path.exists(path_b)
    assert {f: os.stat(f).st_mtime_ns for f in mtimes} == mtimes  # others untouched


def test_cache_adds_only_missing_configs(tmp_path, counting):
    ws = weights()
    cache = str(tmp_path)
    profile_costs(ws, CONFIGS[:2], RANK, cache_dir=cache, workers=1, progress=False)
    counting.clear()
    full = run(ws, cache)
    # each matrix is asked for the one new config only
    assert which(counting, ws) == ["a", "b", "c", "d"]
    assert all([c["bits"] for c in cfgs] == [4] for _, cfgs in counting)
    assert torch.equal(full, run(ws))
    # and the cache now holds all three, so a rerun does nothing
    counting.clear()
    run(ws, cache)
    assert counting == []


def test_changed_inputs_change_the_key(tmp_path, counting):
    ws = weights()
    settings = profiling.cache_settings("cpu", RANK, 0, 100, 1e-3, 1)
    k = profiling._key(ws["a"], None, settings)
    w2 = ws["a"].clone()
    w2[5, 7] += 1e-3
    assert profiling._key(w2, None, settings) != k
    assert profiling._key(ws["a"].clone(), None, settings) == k
    assert profiling._key(ws["a"].double(), None, settings) == k  # value, not dtype
    assert profiling._key(ws["a"].reshape(64, 48), None, settings) != k
    assert profiling._key(ws["a"], torch.ones_like(ws["a"]), settings) != k
    for field, value in (("rank", 8), ("seed", 1), ("max_iters", 50), ("tol", 0.0),
                         ("v", settings["v"] + 1), ("threads", 2), ("device", "cuda")):
        assert profiling._key(ws["a"], None, {**settings, field: value}) != k

    cache = str(tmp_path)
    first = run(ws, cache)
    counting.clear()
    ws2 = dict(ws, a=w2)
    second = run(ws2, cache)
    assert which(counting, ws2) == ["a"]
    assert len(glob.glob(os.path.join(cache, "*.json"))) == 5
    assert torch.equal(second[1:], first[1:])
    assert not torch.equal(second[0], first[0])
    # other settings (seed, fisher) never reuse these costs either
    counting.clear()
    run(ws, cache, seed=1)
    assert which(counting, ws) == ["a", "b", "c", "d"]
    counting.clear()
    run(ws, cache, fishers=fishers(ws))
    assert which(counting, ws) == ["a", "b", "c", "d"]


@pytest.mark.parametrize("content", [
    "torn",                      # the first half of a valid file
    "",                          # empty
    "[]",                        # valid JSON, foreign shape
    "null",
    '{"costs": null}',
    '{"name": "x"}',
    '{"costs": {"nf2-b64-s8x256-fp32": "oops"}}',
])
def test_torn_or_foreign_cache_file_is_recomputed(tmp_path, counting, content):
    ws = weights()
    cache = str(tmp_path)
    first = run(ws, cache)
    files = sorted(glob.glob(os.path.join(cache, "*.json")))
    victim = files[2]
    if content == "torn":
        data = open(victim).read()
        content = data[: len(data) // 2]
    with open(victim, "w") as f:
        f.write(content)
    counting.clear()
    with pytest.warns(RuntimeWarning, match="cost cache file .*" + os.path.basename(victim)):
        again = run(ws, cache)
    assert len(which(counting, ws)) == 1 and asked(counting) == len(CONFIGS)
    assert torch.equal(again, first)
    with open(victim) as f:  # rewritten whole
        assert set(json.load(f)["costs"]) == {c.name for c in CONFIGS}
    assert not glob.glob(os.path.join(cache, "*.tmp"))


def test_workers_match_single_process(tmp_path):
    ws = weights()
    one = run(ws, workers=1)
    two = run(ws, workers=2)
    assert torch.equal(one, two)
    # and through the cache: the rows land in the right places whatever the finish order
    cache = str(tmp_path)
    assert torch.equal(run(ws, cache, workers=2), one)
    assert len(glob.glob(os.path.join(cache, "*.json"))) == 4
    assert torch.equal(run(ws, cache, workers=1), one)


def test_map_matrices_order_and_inline():
    tasks = [(i,) for i in range(5)]
    got = dict(profiling.map_matrices(lambda x: x * x, tasks, workers=1))
    assert got == {i: i * i for i in range(5)}
    got = dict(profiling.map_matrices(_square, tasks, workers=2))
    assert got == {i: i * i for i in range(5)}


def _square(x):
    return x * x


# ------------------------------------------------------------ corrupt entries, regimes
@pytest.mark.parametrize("bad", [float("nan"), -1.0, [1.0, 2.0], {"x": 1}, True, 1e400],
                         ids=["nan", "negative", "list", "object", "bool", "inf"])
def test_invalid_cache_entries_named_and_recomputed(tmp_path, counting, bad):
    ws = {"a": weights()["a"]}
    first = run(ws, str(tmp_path))
    (path,) = glob.glob(os.path.join(str(tmp_path), "*.json"))
    with open(path) as f:
        data = json.load(f)
    data["costs"][CONFIGS[1].name] = bad
    with open(path, "w") as f:
        f.write(json.dumps(data))  # NaN/Infinity are written as JSON extensions
    counting.clear()
    with pytest.warns(RuntimeWarning, match=rf"{os.path.basename(path)} has 1 invalid entry "
                                            rf"\({CONFIGS[1].name}="):
        again = run(ws, str(tmp_path))
    assert torch.equal(again, first)
    assert [c[0]["bits"] for _, c in counting] == [CONFIGS[1].bits]  # only that one
    with open(path) as f:
        assert json.load(f)["costs"][CONFIGS[1].name] == first[0, 1].item()


def test_costs_independent_of_thread_and_worker_count(tmp_path):
    """The decompositions run with one intra-op thread whatever torch is set to, so the
    costs are the same bits in-process at 1 or 2 threads and over 2 workers."""
    ws = weights()
    fs = fishers(ws)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = run(ws, fishers=fs)
        assert torch.get_num_threads() == 2  # restored after each decomposition
    finally:
        torch.set_num_threads(before)
    torch.set_num_threads(1)
    one = run(ws, fishers=fs)
    assert torch.equal(one, two)
    assert torch.equal(run(ws, fishers=fs, workers=2), one)


def test_unpinned_threads_get_their_own_cache_entries(tmp_path, counting):
    ws = {"a": weights()["a"]}
    run(ws, str(tmp_path))
    counting.clear()
    run(ws, str(tmp_path), threads=None)  # torch's setting, 1 here: the same numerics
    assert counting == []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run(ws, str(tmp_path), threads=None, workers=2)  # 2 threads: another regime
    finally:
        torch.set_num_threads(before)
    assert asked(counting) == len(CONFIGS)  # and in this process, whatever workers says
    assert len(glob.glob(os.path.join(str(tmp_path), "*.json"))) == 2


# -------------------------------------------------------------------------- Ctrl-C
_INTERRUPTED = r"""
import signal, sys, torch
# A job started in the background by a non-interactive shell inherits SIGINT ignored, and
# Python then never raises KeyboardInterrupt: restore what a terminal's foreground job has.
signal.signal(signal.SIGINT, signal.default_int_handler)
import lqlora_ext as L
from lqlora_ext.method.profiling import profile_costs
g = torch.Generator().manual_seed(0)
# 48 matrices: a task is one matrix's 6 configs, so the first cached file comes after 2 of
# 48 tasks and most of the work is still pending when Ctrl-C arrives.
ws = {f"m{i}": torch.randn(160, 224, generator=g) for i in range(48)}
grid = [L.QuantConfig(b, bs) for b in (2, 3, 4) for bs in (32, 64)]
profile_costs(ws, grid, 8, cache_dir=sys.argv[1], workers=2, progress=False, tol=0.0)
print("finished")
"""


def _alive_with(marker):
    out = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    out.append(pid)
        except OSError:
            pass
    return out


def test_ctrl_c_stops_promptly_and_keeps_finished_results(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    cache = str(tmp_path / "cache")
    marker = f"lqlora-ctrl-c-{os.getpid()}"
    p = subprocess.Popen([sys.executable, "-c", _INTERRUPTED, cache, marker],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)  # its own group: Ctrl-C reaches all of it
    try:
        deadline = time.time() + 240
        while not glob.glob(os.path.join(cache, "*.json")):
            assert p.poll() is None, p.communicate()
            assert time.time() < deadline, "no result was cached in time"
            time.sleep(0.05)
        t0 = time.time()
        os.killpg(p.pid, signal.SIGINT)  # what the terminal sends on Ctrl-C
        out, err = p.communicate(timeout=30)
        stopped = time.time() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert "finished" not in out and "KeyboardInterrupt" in err
    assert stopped < 5.0, f"took {stopped:.1f} s to stop"
    time.sleep(0.2)
    assert _alive_with(marker) == [], "worker processes outlived Ctrl-C"
    files = glob.glob(os.path.join(cache, "*"))
    assert files and all(f.endswith(".json") for f in files)  # nothing half-written
    kept = 0
    for f in files:
        with open(f) as fh:
            costs = json.load(fh)["costs"]
        assert costs and all(isinstance(v, float) and v > 0 for v in costs.values())
        kept += len(costs)
    assert kept < 48 * 6  # it really stopped early


# ------------------------------------------------------------------- config groups
def test_task_groups_cpu_keep_workers_busy_and_cap_the_group():
    tg = profiling.task_groups
    miss = [list(range(18)), [], [3, 4]]
    shapes = [(64, 64)] * 3
    one = tg(miss, 18, shapes, "cpu", workers=1)
    # one worker: whole groups of at most CPU_GROUP configs, in order, nothing twice
    assert [(i, len(js)) for i, js in one] == [(0, 6), (0, 6), (0, 6), (2, 2)]
    assert sorted(j for i, js in one if i == 0 for j in js) == list(range(18))
    many = tg(miss, 18, shapes, "cpu", workers=8)  # 32 tasks wanted over 2 matrices
    assert len([t for t in many if t[0] == 0]) == 16 and len([t for t in many if t[0] == 2]) == 2
    assert sorted(j for i, js in many if i == 0 for j in js) == list(range(18))


def test_task_groups_cuda_are_fixed_chunks_recomputed_whole():
    tg = profiling.task_groups
    # 4096 x 4096: 16 configs per chunk; matrix 0 misses one cost in the second chunk
    got = tg([[17], list(range(18))], 18, [(4096, 4096), (4096, 4096)], "cuda")
    assert got == [(0, list(range(16, 18))), (1, list(range(16))), (1, [16, 17])]


def test_cpu_groups_do_not_change_a_cost(tmp_path):
    """Grouped (workers=1: one task per matrix) and one config per task (many workers) give
    the same bits: the shared first step is the same computation."""
    ws = weights()
    grouped = run(ws, workers=1)
    for i, w in enumerate(ws.values()):
        for j, c in enumerate(CONFIGS):
            assert grouped[i, j] == decompose(w, c, RANK, seed=0, max_iters=100, tol=1e-3).error


def test_cuda_costs_have_their_own_cache_key():
    s_cpu = profiling.cache_settings("cpu", RANK, 0, 100, 1e-3, 1)
    s_cuda = profiling.cache_settings("cuda", RANK, 0, 100, 1e-3, 1)
    assert "batched" not in s_cpu and s_cuda["batched"] == 1
