"""``torchrun -m lqlora_ext.cli quantize``: two gloo processes on a tiny model write the
same bytes as one process, and a rank killed mid-profile costs only its unfinished work
(torchrun restarts the group, which resumes from the shared cost cache)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")

from lqlora_ext.cli import commands as cli  # noqa: E402
from lqlora_ext.distributed.env import assign, contiguous_chunks  # noqa: E402
from test_streaming import _env, file_digests, save_dense  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(src, out, cache):
    return ["quantize", "--model", src, "--out", out, "--rank", "4", "--no-fisher",
            "--no-eval", "--cache-dir", cache, "--max-shard-size", "20kB"]


def _torchrun(*args, restarts=0):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", "2", "--max-restarts", str(restarts), "-m", "lqlora_ext.cli",
            *args]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A tiny checkpoint and its single-process (1 thread) streaming result."""
    d = tmp_path_factory.mktemp("dist")
    src = str(d / "src")
    save_dense(src, seed=4, layers=3)
    assert cli.main(_args(src, str(d / "single"), str(d / "c0"))) == 0
    return src, str(d / "single")


def test_two_gloo_ranks_match_one_process(clean, tmp_path):
    src, single = clean
    out = str(tmp_path / "out")
    res = subprocess.run(_torchrun(*_args(src, out, str(tmp_path / "cache"))), env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "torchrun: 2 processes (gloo)" in res.stdout
    assert file_digests(out) == file_digests(single)


def _rank_pid(parent: int, rank: int):
    """PID of the torchrun worker with RANK=rank among the descendants of ``parent``."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b" ".join(env) and \
                _descends(ppid, parent):
            return int(pid)
    return None


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


def test_rank_killed_mid_profile_resumes_from_cache(clean, tmp_path):
    src, single = clean
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    proc = subprocess.Popen(_torchrun(*_args(src, out, cache), restarts=1), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed, t = None, time.time()
    while time.time() - t < 300 and killed is None:
        frags = [f for f in os.listdir(cache)] if os.path.isdir(cache) else []
        if any(f.endswith(".r1.json") for f in frags):  # rank 1 is mid-profile
            pid = _rank_pid(proc.pid, 1)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed = pid
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    log, _ = proc.communicate(timeout=600)
    assert killed is not None, "rank 1 finished profiling before it could be killed\n" + log
    assert proc.returncode == 0, log[-4000:]  # torchrun restarted the group, which finished
    # the restarted group found the dead rank's finished costs in the cache
    parts = log.split("cost profile: ")
    assert len(parts) == 3, log[-4000:]
    assert int(parts[2].split(" of")[0]) > int(parts[1].split(" of")[0])
    assert file_digests(out) == file_digests(single)


def test_assignment_helpers_balance_and_are_deterministic():
    w = [5, 1, 1, 1, 4, 4]
    owner = assign(w, 2)
    loads = [sum(x for x, o in zip(w, owner) if o == r) for r in range(2)]
    assert sorted(loads) == [8, 8] and owner == assign(w, 2)
    assert assign(w, 1) == [0] * 6
    c = contiguous_chunks([1] * 10, 3)
    assert c == sorted(c) and set(c) == {0, 1, 2}
    assert contiguous_chunks([], 4) == []
