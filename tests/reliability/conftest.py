"""One local Ray cluster for the reliability tests that need it (started by metaray's own ``init_ray``, so the
security tests check the defaults metaray really uses)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def ray_local():
    import faultkit

    ray, started = faultkit.start_local_ray()
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def report_fuzz_counts():
    import faultkit

    faultkit.COUNTS.clear()
    yield
    for name, n in sorted(faultkit.COUNTS.items()):
        print(f"\n[fuzz] {name}: {n} cases")
