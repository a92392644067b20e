"""End to end: the same model and seed give the same quantized model, bit for bit, whatever
the torch thread count and the number of worker processes (the README's promise; a
sharded profile across ranks relies on it). Weight-only here: the Fisher estimate is a
model forward/backward at torch's thread setting, an input to this promise (given the
same Fisher, the profiling tests show the same costs)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from lqlora_ext import quantize_model  # noqa: E402

import tiny  # noqa: E402


def _quantize(threads: int, workers: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        m = tiny.llama(seed=0)
        report = quantize_model(m, tiny.lq_config(workers=workers))
    finally:
        torch.set_num_threads(before)
    return report, m.state_dict()


def test_same_bits_for_any_thread_and_worker_count():
    ref_report, ref = _quantize(threads=1, workers=1)
    for threads, workers in ((2, 1), (1, 2)):
        report, state = _quantize(threads, workers)
        assert [e.config for e in report.entries] == [e.config for e in ref_report.entries]
        assert [e.error for e in report.entries] == [e.error for e in ref_report.entries]
        assert state.keys() == ref.keys()
        for k in ref:
            assert torch.equal(state[k], ref[k]), (threads, workers, k)
