"""Shared pytest setup: ``--runslow`` opt-in for tests marked ``slow`` (pyproject markers),
and a fixed seed per test so failures reproduce."""
import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (or set LQLORA_RUNSLOW=1 / LQLORA_SLOW=1)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or "1" in (os.environ.get("LQLORA_RUNSLOW"),
                                                os.environ.get("LQLORA_SLOW")):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow (or LQLORA_RUNSLOW=1) to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
