"""Saving never loses a user's files (lqlora_ext.io.atomic): refusal of foreign non-empty
directories and of the input model, only our own files replaced or removed, no leftover
temporary directories after a killed save, no moment without a complete target, fsync
before commit, normal directory modes."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from lqlora_ext.io import atomic
from lqlora_ext.io.atomic import OUTPUT_MARKER, OutputDirError, atomic_dir, check_output_dir

ATOMIC_FILE = atomic.__file__


def write(d, files):
    for name, text in files.items():
        p = os.path.join(d, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(text)


def save(target, files, **kw):
    with atomic_dir(str(target), **kw) as tmp:
        write(tmp, files)


def contents(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = open(p).read()
    return out


def marker(d):
    with open(os.path.join(d, OUTPUT_MARKER)) as f:
        return json.load(f)["files"]


# ------------------------------------------------------------------- refusals (data loss)
def test_refuses_non_empty_foreign_directory(tmp_path):
    write(tmp_path / "mine", {"thesis.tex": "years of work", "data/raw.csv": "1,2"})
    before = contents(tmp_path / "mine")
    with pytest.raises(OutputDirError, match=r"mine is not empty \(data, thesis.tex\).*"
                                             r"not an lqlora output.*--overwrite"):
        save(tmp_path / "mine", {"model.safetensors": "new"})
    assert contents(tmp_path / "mine") == before
    assert sorted(os.listdir(tmp_path)) == ["mine"]  # no temporary directory left


def test_overwrite_replaces_only_same_names(tmp_path):
    d = tmp_path / "mine"
    write(d, {"thesis.tex": "years of work", "config.json": "theirs", "sub/x.txt": "x"})
    save(d, {"config.json": "ours", "model.safetensors": "w"}, overwrite=True)
    assert contents(d) == {"thesis.tex": "years of work", "sub/x.txt": "x",
                           "config.json": "ours", "model.safetensors": "w",
                           OUTPUT_MARKER: open(d / OUTPUT_MARKER).read()}
    assert marker(d) == ["config.json", "model.safetensors"]
    # a later save may remove its own earlier files, never the user's
    save(d, {"config.json": "ours 2"})
    assert sorted(contents(d)) == sorted([OUTPUT_MARKER, "config.json", "sub/x.txt",
                                          "thesis.tex"])
    assert open(d / "config.json").read() == "ours 2" and marker(d) == ["config.json"]


def test_user_files_added_to_an_output_survive_a_resave(tmp_path):
    d = tmp_path / "out"
    save(d, {"model.safetensors": "1", "shard-2.safetensors": "1b", "config.json": "1"})
    write(d, {"NOTES.md": "my notes"})
    save(d, {"model.safetensors": "2", "config.json": "2"})
    assert contents(d) == {"model.safetensors": "2", "config.json": "2",
                           "NOTES.md": "my notes", OUTPUT_MARKER: open(d / OUTPUT_MARKER).read()}


@pytest.mark.parametrize("where", ["same", "parent", "grandparent"])
def test_refuses_the_input_model_or_a_parent_of_it(tmp_path, where):
    model = tmp_path / "a" / "b" / "model"
    write(model, {"config.json": "{}", "model.safetensors": "weights"})
    out = {"same": model, "parent": model.parent, "grandparent": model.parent.parent}[where]
    with pytest.raises(OutputDirError, match="the input model"):
        check_output_dir(str(out), overwrite=True, protect=[str(model)])
    with pytest.raises(OutputDirError, match="input model"):
        save(out, {"x": "y"}, overwrite=True, protect=[str(model)])
    assert contents(model) == {"config.json": "{}", "model.safetensors": "weights"}
    check_output_dir(str(model / "sub"), protect=[str(model / "other")])  # siblings are fine


def test_refuses_files_and_unwritable_places(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputDirError, match="exists and is not a directory"):
        check_output_dir(str(tmp_path / "f"))
    with pytest.raises(OutputDirError, match="f is not a directory"):
        check_output_dir(str(tmp_path / "f" / "out"))
    with pytest.raises(OutputDirError, match="non-empty path"):
        check_output_dir("")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(OutputDirError, match="not writable"):
                check_output_dir(str(ro / "out"))
        finally:
            ro.chmod(0o755)


def test_earlier_lqlora_outputs_are_recognized(tmp_path):
    """Directories written before the file list existed count as lqlora outputs, but
    nothing of theirs is removed (we cannot tell which files were ours)."""
    d = tmp_path / "old"
    write(d, {"config.json": json.dumps({"quantization_config": {"quant_method": "lqlora"}}),
              "tokenizer.json": "t", "model.safetensors": "old"})
    save(d, {"config.json": "{}", "model.safetensors": "new"})
    assert contents(d)["tokenizer.json"] == "t"
    assert contents(d)["model.safetensors"] == "new"


# --------------------------------------------------------------------- commit mechanics
def test_exchange_swaps_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write(a, {"x": "a"})
    write(b, {"x": "b"})
    if not atomic._exchange(str(a), str(b)):
        pytest.skip("renameat2(RENAME_EXCHANGE) unsupported on this filesystem")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_target_never_absent_during_resaves(tmp_path):
    """A reader polling the checkpoint while it is saved over and over always finds its
    files complete (old or new), never a missing directory or a missing file."""
    d = tmp_path / "ck"
    save(d, {"model.safetensors": "0" * 1000, "lqlora.json": "0"})
    seen, stop = [], threading.Event()

    def poll():
        # Each file, opened by path, is always there and complete (a reader opening two
        # files may still see one from each save; the loaders' digests catch that).
        while not stop.is_set():
            try:
                w = open(d / "model.safetensors").read()
                m = open(d / "lqlora.json").read()
                seen.append(len(w) == 1000 and len(set(w)) == 1 and len(m) == 1)
            except FileNotFoundError:
                seen.append(False)

    t = threading.Thread(target=poll)
    t.start()
    try:
        for i in range(1, 40):
            save(d, {"model.safetensors": str(i % 10) * 1000, "lqlora.json": str(i % 10)})
    finally:
        stop.set()
        t.join()
    assert seen and all(seen), f"{seen.count(False)} of {len(seen)} reads saw no/partial target"


def test_fsync_before_commit(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename, real_exchange = atomic._fsync_path, os.rename, atomic._exchange
    monkeypatch.setattr(atomic, "_fsync_path",
                        lambda p: (events.append(("fsync", os.path.basename(p))), real_fsync(p)))
    monkeypatch.setattr(atomic.os, "rename",
                        lambda a, b: (events.append(("commit", b)), real_rename(a, b)))
    monkeypatch.setattr(atomic, "_exchange",
                        lambda a, b: (events.append(("commit", b)), real_exchange(a, b))[1])
    d = tmp_path / "ck"
    for i in range(2):  # a new target, then a swap over the previous save
        events.clear()
        save(d, {"model.safetensors": f"w{i}", "config.json": f"c{i}"})
        first = next(j for j, e in enumerate(events) if e[0] == "commit")
        synced = {e[1] for e in events[:first] if e[0] == "fsync"}
        assert {"model.safetensors", "config.json"} <= synced, events


def test_directory_modes_follow_umask_or_the_existing_target(tmp_path):
    old = os.umask(0o022)
    try:
        save(tmp_path / "new", {"f": "x"})
        assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o755
        assert stat.S_IMODE(os.stat(tmp_path / "new" / "f").st_mode) == 0o644
        os.chmod(tmp_path / "new", 0o750)
        save(tmp_path / "new", {"f": "y"})
        assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o750
    finally:
        os.umask(old)


def test_failed_save_leaves_previous_and_nothing_else(tmp_path):
    d = tmp_path / "ck"
    save(d, {"a": "1"})
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(str(d)) as tmp:
            write(tmp, {"a": "2"})
            raise RuntimeError("boom")
    assert contents(d) == {"a": "1", OUTPUT_MARKER: open(d / OUTPUT_MARKER).read()}
    assert sorted(os.listdir(tmp_path)) == ["ck"]


# ------------------------------------------------------------------- killed saves (kill -9)
_CHILD = r"""
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("atomic", sys.argv[1])
atomic = importlib.util.module_from_spec(spec); spec.loader.exec_module(atomic)
target, mode = sys.argv[2], sys.argv[3]
i = 0
while True:
    i += 1
    with atomic.atomic_dir(target) as tmp:
        for name in ("model.safetensors", "lqlora.json"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(str(i % 10) * (200000 if name == "model.safetensors" else 1))
        if mode == "hang":
            print("ready", flush=True)
            time.sleep(60)
"""


def _child(tmp_path, target, mode):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    return subprocess.Popen([sys.executable, str(script), ATOMIC_FILE, str(target), mode],
                            stdout=subprocess.PIPE, text=True)


def _consistent(d):
    w, m = open(d / "model.safetensors").read(), open(d / "lqlora.json").read()
    return len(w) == 200000 and set(w) == {m}


def test_kill_9_leaves_a_complete_checkpoint_and_stale_tmp_is_cleaned(tmp_path):
    d = tmp_path / "ck"
    for delay in (0.3, 0.55, 0.8):
        p = _child(tmp_path, d, "loop")
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert _consistent(d)
    # a killed process's temporary directory is removed by the next save of that target
    p = _child(tmp_path, d, "hang")
    assert p.stdout.readline().strip() == "ready"
    stale = [n for n in os.listdir(tmp_path) if n.startswith(".ck.lqlora-tmp-")]
    assert stale
    save(d, {"model.safetensors": "5" * 200000, "lqlora.json": "5"})  # its lock is held
    assert set(stale) <= set(os.listdir(tmp_path)), "a live save's directory was removed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    save(d, {"model.safetensors": "6" * 200000, "lqlora.json": "6"})
    assert sorted(n for n in os.listdir(tmp_path) if n != "child.py") == ["ck"]
    assert _consistent(d)


def test_cleanup_keeps_directories_it_cannot_prove_ours(tmp_path):
    d = tmp_path / "ck"
    foreign = tmp_path / ".ck.lqlora-tmp-deadbeef"
    write(foreign, {"someone.txt": "x"})  # our name pattern, but no lock file of ours
    empty = tmp_path / ".ck.lqlora-tmp-00000000"
    empty.mkdir()
    save(d, {"a": "1"})
    assert foreign.is_dir() and empty.is_dir()


def test_atomic_module_has_no_package_imports():
    """The kill test runs the module standalone; keep it importable on its own."""
    spec = importlib.util.spec_from_file_location("atomic_alone", ATOMIC_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.OUTPUT_MARKER == OUTPUT_MARKER
