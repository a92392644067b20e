"""The one shapes module for tests and benchmarks (STYLE.md, "Tests and benchmarks").

Weight shapes use the ``nn.Linear`` layout ``[out_features, in_features]`` = ``[N, K]``;
``M`` is the number of activation rows (tokens). Every shape has a readable id
(``smollm2-q-576x576``) used as the pytest id and as the benchmark's ``--shapes`` name.

No pytest import at module level: ``bench/`` imports this file too.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, List, Sequence


@dataclasses.dataclass(frozen=True)
class Shape:
    """A 2-D weight ``[rows, cols]`` (= ``[N, K]``) with a readable name."""

    name: str
    rows: int
    cols: int
    slow: bool = False  # too big for the default CPU suite (reference oracle takes seconds)

    @property
    def id(self) -> str:
        return f"{self.name}-{self.rows}x{self.cols}"

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def __iter__(self):  # rows, cols = shape
        return iter((self.rows, self.cols))


# --- real model shapes -----------------------------------------------------------------------
# SmolLM2-135M: hidden 576, 9 heads x 64 (q/o 576x576), 3 KV heads (k/v 192x576), MLP 1536.
SMOLLM2 = (
    Shape("smollm2-q", 576, 576),
    Shape("smollm2-kv", 192, 576),
    Shape("smollm2-up", 1536, 576),
    Shape("smollm2-down", 576, 1536),
)
# BERT-base: hidden 768, FFN 3072.
BERT = (
    Shape("bert-attn", 768, 768),
    Shape("bert-ffn-up", 3072, 768),
)
# LLaMA-2-7B: hidden 4096, MLP 11008. The 4096x4096 one is the benchmark's main shape and
# stays in the default suite for quantize/dequantize only; 11008x4096 is marked slow.
LLAMA2_7B = (
    Shape("llama2-7b-attn", 4096, 4096),
    Shape("llama2-7b-up", 11008, 4096, slow=True),
)
REAL = SMOLLM2 + BERT + LLAMA2_7B
REAL_FAST = tuple(s for s in REAL if s.numel <= 3072 * 768)  # cheap enough for any test

# --- awkward shapes: ragged first-level blocks and scale groups, K not a multiple of B0 ----
AWKWARD = (
    Shape("odd", 53, 100),       # n = 5300: ragged last block for every B0, ragged groups
    Shape("row", 1, 17),         # a single row, fewer elements than one packed group
    Shape("tiny", 3, 5),         # 15 elements: smaller than every block size
    Shape("smollm2-q+1", 576, 577),  # K = 577: blocks straddle rows at odd offsets
    Shape("k64", 100, 64),       # K = 64: rows align with B0 = 64 blocks
)

ALL = REAL + AWKWARD
ALL_FAST = REAL_FAST + AWKWARD

# --- benchmark-only shapes (bench/bench_cuda.py) -------------------------------------------
# Reachable by name through lookup() / BY_NAME but in none of the test tuples above: far too
# big for any test. LLaMA-2-7B MLP down-projection; LLaMA-2-70B: hidden 8192 (q/o 8192x8192),
# MLP 28672 (k/v are 1024x8192 under GQA, not benchmarked).
BENCH_ONLY = (
    Shape("llama2-7b-down", 4096, 11008, slow=True),
    Shape("llama2-70b-attn", 8192, 8192, slow=True),
    Shape("llama2-70b-up", 28672, 8192, slow=True),
    Shape("llama2-70b-down", 8192, 28672, slow=True),
)

# --- activation rows M -------------------------------------------------------------------------
# 1 (decode), 2, 7 (odd), 16 (the fused small-M path's limit), 17 (first GEMM-path M), 53, 128.
M_VALUES = (1, 2, 7, 16, 17, 53, 128)

BY_ID = {s.id: s for s in ALL + BENCH_ONLY}
BY_NAME = {s.name: s for s in ALL + BENCH_ONLY}


def lookup(names: Iterable[str]) -> List[Shape]:
    """Shapes by name (``smollm2-q``), id (``smollm2-q-576x576``) or ``ROWSxCOLS``."""
    out = []
    for nm in names:
        if nm in BY_NAME:
            out.append(BY_NAME[nm])
        elif nm in BY_ID:
            out.append(BY_ID[nm])
        elif "x" in nm and nm.replace("x", "", 1).isdigit():
            r, c = nm.split("x")
            out.append(Shape("custom", int(r), int(c)))
        else:
            raise ValueError(f"unknown shape {nm!r}; known: {sorted(BY_NAME)} or ROWSxCOLS")
    return out


def params(shapes: Sequence[Shape]):
    """``pytest.param`` per shape with its readable id; slow shapes get ``pytest.mark.slow``."""
    import pytest

    return [pytest.param(s, id=s.id, marks=[pytest.mark.slow] if s.slow else [])
            for s in shapes]
