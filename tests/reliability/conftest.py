"""One local Ray cluster for the reliability tests that need it (started by metaray's own ``init_ray``, so the
security tests check the defaults metaray really uses)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def ray_local():
    import cloudpickle

    import faultkit
    from metaray.cluster import init_ray

    import ray

    # "local": always a fresh cluster of our own, never one another process left behind on this machine
    started = init_ray("local")
    # the test-only problems travel to the workers by value (workers cannot import tests/)
    cloudpickle.register_pickle_by_value(faultkit)
    ray.cloudpickle.register_pickle_by_value(faultkit)
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
