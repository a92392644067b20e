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


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one torch thread: tiny models/SVDs gain nothing from
    intra-op threads, and OpenMP spin-waits on a loaded 2-core runner make them ~100x
    slower. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
