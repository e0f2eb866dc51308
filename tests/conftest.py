"""Suite-wide: tests marked ``gpu`` are skipped cleanly, with the reason, where torch sees no CUDA device; the
``one_thread`` fixture for modules of tiny problems."""
from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after. Tiny problems gain nothing from a second thread and on a
    loaded 2-core machine they lose a lot (measured: l2o meta-training 8 s with 1 thread, > 5 min with 2; an FSLA
    call ~5 ms against ~120 ms). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
