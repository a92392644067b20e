"""Checks of the ``lqlora`` command's arguments, run before any model is loaded: each
failure is a :class:`CLIError` whose message is one line naming the option and the value.

Argument types and ranges are checked by argparse (the ``type=`` functions below); what
needs the file system or the model's config (paths, ``--rank`` against the model's
matrices, ``--seq-len`` against its context, token ids against its vocabulary) is checked
by the functions that follow, in the order the commands call them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Optional, Sequence

from ..io.atomic import OutputDirError, check_output_dir


class CLIError(Exception):
    """A usage error: printed as ``lqlora <command>: error: <message>``, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``lqlora quantize: error: ...``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------- argparse types
def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}")
    return v


def nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {s!r}")
    return v


def seq_len(s: str) -> int:
    v = positive_int(s)
    if v < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (a next-token loss needs two "
                                         f"tokens), got {s!r}")
    return v


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {s!r}")
    return v


# ------------------------------------------------------------------ files and paths
def text_file(path: Optional[str], option: str) -> Optional[str]:
    """The UTF-8 text of ``path`` (None stays None); refuses missing, unreadable, empty and
    binary files, naming the first offending byte."""
    if path is None:
        return None
    if not os.path.exists(path):
        raise CLIError(f"{option} {path}: no such file")
    if not os.path.isfile(path):
        raise CLIError(f"{option} {path}: not a regular file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CLIError(f"{option} {path}: cannot read it ({e.strerror})") from None
    nul = data.find(b"\x00")
    if nul >= 0:
        raise CLIError(f"{option} {path} is a binary file (NUL byte at offset {nul}), not "
                       f"UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(f"{option} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at "
                       f"offset {e.start})") from None
    if not text.strip():
        raise CLIError(f"{option} {path} is empty")
    return text


def model_path(path: str, option: str = "--model") -> str:
    """A local Hugging Face model directory (with config.json) or .gguf file, or a hub id
    already in the local cache (nothing is downloaded)."""
    if os.path.exists(path):
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise CLIError(f"{option} {path}: directory has no config.json (not a Hugging "
                               f"Face model directory)")
            return path
        if not path.endswith(".gguf"):
            raise CLIError(f"{option} {path}: a file, but not a .gguf model (give a Hugging "
                           f"Face model directory or a .gguf file)")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise CLIError(f"{option} {path}: not a GGUF file (bad magic bytes)")
        return path
    parts = path.split("/")
    if len(parts) == 2 and all(parts) and not path.startswith((".", "~")):
        try:
            from huggingface_hub import snapshot_download
            local = snapshot_download(path, local_files_only=True)
            if os.path.isfile(os.path.join(local, "config.json")):
                return local
        except Exception:  # not cached (or no hub library): fall through to the message
            pass
    raise CLIError(f"{option} {path}: no such file or directory (give a Hugging Face model "
                   f"directory or a .gguf file; hub ids work only if already in the local "
                   f"cache, nothing is downloaded)")


def out_dir(path: str, overwrite: bool, protect: Sequence[str]) -> str:
    try:
        check_output_dir(path, overwrite=overwrite, protect=protect, who="--out")
    except OutputDirError as e:
        raise CLIError(str(e)) from None
    return path


def cache_dir(path: str) -> str:
    p = os.path.abspath(os.path.expanduser(path))
    base = p
    while not os.path.exists(base):
        base = os.path.dirname(base)
    if not os.path.isdir(base) or not os.access(base, os.W_OK | os.X_OK):
        raise CLIError(f"--cache-dir {path}: not writable ({base} is "
                       f"{'not a directory' if not os.path.isdir(base) else 'read-only'})")
    return path


def is_lq_config(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json")) as f:
            qc = json.load(f).get("quantization_config")
        return isinstance(qc, dict) and qc.get("quant_method") == "lqlora"
    except (OSError, ValueError, AttributeError):
        return False


# ------------------------------------------------------------------ against the model
def model_limits(config) -> dict:
    """``vocab_size`` and ``max_positions`` (None when the config does not say)."""
    text = getattr(config, "get_text_config", lambda: config)()
    mp = getattr(text, "max_position_embeddings", None)
    return {"vocab_size": getattr(text, "vocab_size", None),
            "max_positions": mp if isinstance(mp, int) and mp > 0 else None}


def seq_len_fits(n: int, limits: dict, option: str = "--seq-len") -> None:
    mp = limits["max_positions"]
    if mp is not None and n > mp:
        raise CLIError(f"{option} {n} exceeds the model's context of {mp} positions")


def rank_fits(rank: int, config, target_modules="all-linear") -> None:
    """``--rank`` against every targeted matrix, from a weightless (meta-device) copy of
    the model built from its config."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..method.targets import select_linear_modules

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # an architecture from_config cannot build: checked after loading
        return
    targets = select_linear_modules(skeleton, target_modules)
    if not targets:
        raise CLIError("the model has no nn.Linear layers to quantize")
    name, lin = min(targets.items(), key=lambda kv: min(kv[1].weight.shape))
    if rank >= min(lin.weight.shape):
        raise CLIError(f"--rank {rank} must be smaller than every targeted matrix's smaller "
                       f"side; {name} is {lin.out_features}x{lin.in_features}")


def budget_fits(budget: float, grid_name: str):
    """The grid's configs; ``--budget`` must reach its smallest bits/param."""
    from ..method.allocation import config_grid

    try:
        grid = config_grid(grid_name)
    except ValueError as e:
        raise CLIError(f"--grid {grid_name!r}: {str(e).split(': ', 1)[1]}") from None
    smallest = min(c.bits_per_param for c in grid)
    if len(grid) > 1 and budget < smallest - 1e-9:
        raise CLIError(f"--budget {budget:g} is below the smallest config of grid "
                       f"{grid_name!r} ({smallest:.4f} bits/param)")
    return grid


def ids_in_vocab(batches, vocab_size: Optional[int], option: str, source: str) -> None:
    """Token ids the model's embedding cannot look up, named by sequence and position."""
    if vocab_size is None:
        return
    for i, b in enumerate(batches):
        bad = (b < 0) | (b >= vocab_size)
        if bool(bad.any()):
            row, pos = (int(x) for x in bad.nonzero()[0])
            raise CLIError(f"{option} {source}: token id {int(b[row, pos])} (sequence "
                           f"{i * b.shape[0] + row}, position {pos}) is outside the model's "
                           f"vocabulary of {vocab_size} (tokenizer and model do not match)")
