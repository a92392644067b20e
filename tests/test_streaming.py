"""Streaming quantization of checkpoint directories (``lqlora quantize --stream``): the same
tensors as the in-memory ``quantize_model`` path, loadable by from_pretrained and
load_quantized, resumable after ``kill -9``, data-aware from a ``lqlora fisher`` directory,
and clear refusals of bad input with no partial output."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tiny  # noqa: E402
from lqlora_ext import load_quantized, quantize_model  # noqa: E402
from lqlora_ext.cli import commands as cli  # noqa: E402
from lqlora_ext.io.streaming import CheckpointDir, CheckpointError  # noqa: E402

# module_docs("typing") reads typing.io / typing.re, which warn on access (Python 3.11)
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings(
    r"ignore:typing\.(io|re) is deprecated:DeprecationWarning")]

# The GRID of tests/tiny.py as `--grid` cannot name it: quantize_checkpoint takes a config.
BUDGET, RANK = 3.0, 4


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = ["\n"] + [chr(i) for i in range(32, 127)]
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


def save_dense(path, seed=0, shard=None, **kw):
    m = tiny.llama(seed, **kw)
    m.save_pretrained(str(path), **({"max_shard_size": shard} if shard else {}))
    char_tokenizer().save_pretrained(str(path))
    return m


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense")
    save_dense(d)
    return str(d)


def stream(src, out, cache=None, fisher_dir=None, grid=tiny.GRID, **kw):
    from lqlora_ext.io.stream_quantize import quantize_checkpoint
    cfg = tiny.lq_config(budget_bits=BUDGET, rank=RANK, grid=grid, cache_dir=cache,
                         fisher=fisher_dir is not None, **kw)
    return quantize_checkpoint(src, str(out), cfg, fisher_dir=fisher_dir, log=lambda s: None,
                               max_shard_bytes=20_000)


def state_of(model):
    return {k: v for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def file_digests(d):
    """sha256 of every output file except report.json (it holds timings)."""
    return {os.path.basename(f): hashlib.sha256(open(f, "rb").read()).hexdigest()
            for f in sorted(glob.glob(os.path.join(d, "*"))) if not f.endswith("report.json")}


# ----------------------------------------------------------------------- equivalence
def test_matches_in_memory_and_loads_both_ways(dense, tmp_path):
    out = tmp_path / "out"
    rep = stream(dense, out, cache=str(tmp_path / "cache"))
    assert len(glob.glob(str(out / "model-*-of-*.safetensors"))) > 1  # sharded output
    ref = tiny.llama(0)
    ref_report = quantize_model(ref, tiny.lq_config(budget_bits=BUDGET, rank=RANK))
    got = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert_same_state(state_of(ref), state_of(got))
    ids = tiny.tokens()
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, got(ids).logits)
    # the report's choices and errors are the in-memory ones
    assert [m["config"] for m in rep["allocation"]["matrices"]] == \
        [e.config.to_dict() for e in ref_report.entries]
    assert [m["error"] for m in rep["allocation"]["matrices"]] == \
        [e.error for e in ref_report.entries]
    # load_quantized reads the same directory into a fresh dense model
    fresh = load_quantized(str(out), tiny.llama(7))
    assert_same_state(state_of(ref), state_of(fresh))


def test_uniform_grid_sharded_source_no_profiling(tmp_path):
    src = tmp_path / "src"
    save_dense(src, seed=1, shard="30KB")
    assert os.path.isfile(src / "model.safetensors.index.json")
    from lqlora_ext.method.allocation import config_grid
    rc = cli.main(["quantize", "--model", str(src), "--out", str(tmp_path / "out"),
                   "--grid", "nf3", "--rank", str(RANK), "--no-fisher", "--no-eval",
                   "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    assert not os.path.exists(tmp_path / "cache") or not os.listdir(tmp_path / "cache")
    ref = tiny.llama(1)
    quantize_model(ref, tiny.lq_config(budget_bits=3.2, rank=RANK, grid=config_grid("nf3"),
                                       lora_alpha=None))
    got = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert_same_state(state_of(ref), state_of(got))
    assert not glob.glob(str(tmp_path / ".out.*"))  # no work directory left behind


def test_fisher_directory_matches_in_memory_fisher(dense, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    fdir = tmp_path / "fisher"
    rc = cli.main(["fisher", "--model", dense, "--calibration", str(calib), "--out", str(fdir),
                   "--dtype", "float32", "--seq-len", "32", "--calib-seqs", "4"])
    assert rc == 0
    out = tmp_path / "out"
    stream(dense, out, cache=str(tmp_path / "cache"), fisher_dir=str(fdir))
    from lqlora_ext.cli.data import token_batches
    ref = tiny.llama(0)
    batches = token_batches(char_tokenizer(), calib.read_text(), 32, 4)
    quantize_model(ref, tiny.lq_config(budget_bits=BUDGET, rank=RANK, fisher=True),
                   calibration=batches)
    got = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert_same_state(state_of(ref), state_of(got))
    # bf16 (the default) runs too and keeps fp32 accumulators
    rc = cli.main(["fisher", "--model", dense, "--calibration", str(calib), "--out",
                   str(tmp_path / "f16"), "--seq-len", "32", "--calib-seqs", "2"])
    assert rc == 0
    man = json.load(open(tmp_path / "f16" / "fisher.json"))
    assert man["model_dtype"] == "bfloat16" and len(man["tensors"]) == 14
    from lqlora_ext.io.fisher_store import FisherDir
    t = FisherDir(str(tmp_path / "f16")).load("model.layers.0.mlp.up_proj.weight")
    assert t.dtype == torch.float32 and t.shape == (128, 64) and (t > 0).any()


# ---------------------------------------------------------------------------- resume
def _cli_cmd(src, out, cache, *extra):
    return [sys.executable, "-m", "lqlora_ext.cli", "quantize", "--model", src, "--out", out,
            "--rank", str(RANK), "--no-fisher", "--no-eval", "--cache-dir", cache,
            "--max-shard-size", "20kB", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _kill_when(proc, pattern, timeout=120):
    """SIGKILL ``proc`` as soon as a file matching ``pattern`` exists; False if the process
    ended first."""
    t = time.time()
    while time.time() - t < timeout:
        if glob.glob(pattern):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"nothing matched {pattern} in {timeout} s")


def test_resume_after_kill_9(tmp_path, capsys):
    """Killed once while profiling and once while decomposing, the third run finishes and
    writes exactly the bytes of an uninterrupted run."""
    src = str(tmp_path / "src")
    save_dense(src, seed=2, layers=3)
    clean = str(tmp_path / "clean")
    assert cli.main(_cli_cmd(src, clean, str(tmp_path / "c0"))[3:]) == 0
    out, cache = str(tmp_path / "out"), str(tmp_path / "c1")
    stages = {"profile": os.path.join(cache, "*.json"),
              "decompose": os.path.join(tmp_path, ".out.partial", "results", "*.json")}
    logs = {}
    for stage, pattern in stages.items():
        proc = subprocess.Popen(_cli_cmd(src, out, cache), env=_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert _kill_when(proc, pattern), f"the run finished before the {stage} kill"
        logs[stage] = proc.stdout.read()
        assert not os.path.exists(out)  # the output appears only when complete
    cached = int(logs["decompose"].split("cost profile: ")[1].split(" of")[0])
    assert cached > 0, logs["decompose"]  # the first kill's costs were reused
    capsys.readouterr()
    assert cli.main(_cli_cmd(src, out, cache)[3:]) == 0
    log = capsys.readouterr().out
    assert "resuming the job" in log and "already decomposed" in log and \
        "allocation: read from the interrupted run" in log, log
    assert file_digests(out) == file_digests(clean)
    assert not os.path.exists(os.path.join(tmp_path, ".out.partial"))
    assert cli.main(_cli_cmd(src, out, cache)[3:]) == 0
    assert "nothing to do" in capsys.readouterr().out


# ------------------------------------------------------------------------- bad input
def _refused(tmp_path, argv, *needles):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", *argv, "--out", str(out), "--rank", str(RANK), "--no-eval",
                  "--cache-dir", str(tmp_path / "cache")])
    msg = str(e.value)
    for n in needles:
        assert n in msg, msg
    assert not os.path.exists(out) and not glob.glob(str(tmp_path / ".out.*"))
    return msg


def test_not_a_model_directory(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    _refused(tmp_path, ["--model", str(tmp_path / "junk"), "--no-fisher"],
             "not a Hugging Face model directory", "config.json")
    (tmp_path / "junk" / "config.json").write_text("{}")
    _refused(tmp_path, ["--model", str(tmp_path / "junk"), "--no-fisher"],
             "model.safetensors")


def test_missing_and_corrupt_shards(tmp_path):
    src = tmp_path / "src"
    save_dense(src, seed=3, shard="30KB")
    shards = sorted(glob.glob(str(src / "model-*.safetensors")))
    os.rename(shards[1], shards[1] + ".away")
    _refused(tmp_path, ["--model", str(src), "--no-fisher"], "missing shard",
             os.path.basename(shards[1]))
    os.rename(shards[1] + ".away", shards[1])
    with open(shards[0], "r+b") as f:
        f.truncate(os.path.getsize(shards[0]) - 100)
    _refused(tmp_path, ["--model", str(src), "--no-fisher"], "truncated",
             os.path.basename(shards[0]))
    with open(shards[0], "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    _refused(tmp_path, ["--model", str(src), "--no-fisher"], "corrupt safetensors header",
             os.path.basename(shards[0]))


def test_index_names_a_tensor_the_shard_lacks(tmp_path):
    src = tmp_path / "src"
    save_dense(src, seed=3, shard="30KB")
    idx = json.load(open(src / "model.safetensors.index.json"))
    idx["weight_map"]["model.layers.9.mlp.up_proj.weight"] = sorted(
        set(idx["weight_map"].values()))[0]
    json.dump(idx, open(src / "model.safetensors.index.json", "w"))
    _refused(tmp_path, ["--model", str(src), "--no-fisher"], "model.layers.9.mlp.up_proj.weight")


def test_mismatched_fisher_directory(dense, tmp_path):
    other = tmp_path / "other"
    save_dense(other, seed=5)
    fdir = tmp_path / "fisher"
    assert cli.main(["fisher", "--model", str(other), "--out", str(fdir), "--seq-len", "32",
                     "--calib-seqs", "2"]) == 0
    _refused(tmp_path, ["--model", dense, "--fisher-dir", str(fdir)], "does not match",
             "model.layers.0.self_attn.q_proj.weight")
    _refused(tmp_path, ["--model", dense, "--fisher-dir", str(tmp_path)],
             "not a Fisher directory")
    _refused(tmp_path, ["--model", dense, "--stream", "--fisher"], "--fisher-dir")


def test_unreachable_rendezvous(dense, tmp_path, monkeypatch):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    t = time.time()
    _refused(tmp_path, ["--model", dense, "--no-fisher", "--dist-timeout", "2"],
             "cannot reach the rendezvous", f"127.0.0.1:{port}")
    assert time.time() - t < 60


def test_checkpoint_dir_reads_one_tensor_at_a_time(dense):
    src = CheckpointDir(dense)
    key = "model.layers.0.mlp.up_proj.weight"
    ref = tiny.llama(0).state_dict()[key]
    assert torch.equal(src.load(key), ref)
    assert src.fingerprint(key) == CheckpointDir(dense).fingerprint(key)
    with pytest.raises(CheckpointError, match="no tensor 'nope'"):
        src.load("nope")


def test_streaming_mode_selection(monkeypatch):
    from lqlora_ext.cli.stream import parse_size, wants_streaming
    p = cli.build_parser()
    want = lambda *a: wants_streaming(p.parse_args(["quantize", "--model", "m", *a]))  # noqa
    assert not want() and want("--stream") and want("--no-eval") and want("--fisher-dir", "f")
    assert not want("--no-stream", "--no-eval")
    with pytest.raises(SystemExit, match="--fisher-dir is read by the streaming path"):
        want("--no-stream", "--fisher-dir", "f")
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    assert want()
    with pytest.raises(SystemExit, match="under torchrun"):
        want("--no-stream")
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20
    with pytest.raises(SystemExit, match="cannot read size"):
        parse_size("lots")
    with pytest.raises(SystemExit):
        p.parse_args(["quantize", "--max-iters", "0"])


def test_bench_checkpoint_writer_makes_a_loadable_model(tmp_path):
    """bench/stream_memory.py's 7B-shaped checkpoints, at a tiny shape: sharded, bf16,
    seeded (the same bytes twice), and an ordinary from_pretrained directory."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    from stream_memory import write_checkpoint
    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=128, max_position_embeddings=64,
                 tie_word_embeddings=False)
    for d in ("a", "b"):
        write_checkpoint(str(tmp_path / d), 2, shard_bytes=40_000, shape=shape)
    assert file_digests(str(tmp_path / "a")) == file_digests(str(tmp_path / "b"))
    src = CheckpointDir(str(tmp_path / "a"))
    assert len(src.files) > 1 and all(t.dtype == "BF16" for t in src.tensors.values())
    m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "a"))
    w = m.model.layers[1].mlp.up_proj.weight
    assert w.dtype == torch.bfloat16 and 0.015 < float(w.detach().float().std()) < 0.025
