"""cluster/loader.py: tasks loaded ahead on a second thread are the tasks the main thread would have sampled,
a task still loading is waited for (and sampled once), a failed load ahead surfaces on the main thread, stale
tasks are dropped, and a source that draws from the global RNG stays deterministic with two threads."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
import torch

from metaray.cluster.loader import TaskLoader, move
from metaray.tasks import SinusoidSource

CPU = torch.device("cpu")


@dataclass
class CountingSource:
    """A sinusoid source that counts its calls and the threads they ran on, waiting ``delay`` s in each."""

    delay: float = 0.0
    fail: tuple = ()

    def __post_init__(self):
        self.base, self.calls, self.threads = SinusoidSource(dtype=torch.float64), [], set()

    def sample(self, key):
        self.calls.append(key)
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)
        if key in self.fail:
            raise OSError(f"cannot read task {key}")
        return self.base.sample(key)


def same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("support_x", "support_y", "query_x", "query_y"))


def keys(step, n):
    return [("train", step, i) for i in range(n)]


def test_tasks_loaded_ahead_are_the_sampled_ones_and_come_from_the_other_thread():
    source = CountingSource()
    loader = TaskLoader(source, CPU, torch.float32)
    ahead = threading.Thread(target=loader.fetch, args=(keys(0, 4),))
    ahead.start()
    ahead.join()
    assert source.threads == {ahead.ident}
    got = [loader.take(k) for k in keys(0, 5)]  # the fifth was never fetched: loaded here
    want = [move(SinusoidSource(dtype=torch.float64).sample(k), CPU, torch.float32) for k in keys(0, 5)]
    assert all(same(g, w) for g, w in zip(got, want)) and got[0].support_x.dtype == torch.float32
    assert loader.stats() == {"hits": 4, "misses": 1, "loaded_ahead": 4}
    assert len(source.calls) == 5  # nothing sampled twice
    assert loader.fetch(keys(0, 4)) == 4 and loader.fetch(keys(0, 4)) == 0  # taken tasks load again; loaded ones not


def test_take_waits_for_a_task_still_loading_instead_of_sampling_it_again():
    source = CountingSource(delay=0.5)
    loader = TaskLoader(source, CPU, torch.float64)
    key = ("train", 0, 0)
    ahead = threading.Thread(target=loader.fetch, args=([key],))
    ahead.start()
    deadline = time.monotonic() + 30
    while key not in loader._loading and time.monotonic() < deadline:  # the load has begun
        time.sleep(0.005)
    assert key in loader._loading
    task = loader.take(key)
    ahead.join()
    assert same(task, SinusoidSource(dtype=torch.float64).sample(key))
    assert source.calls == [key] and loader.stats()["hits"] == 1 and loader.stats()["misses"] == 0


def test_a_failed_load_ahead_surfaces_on_the_main_thread():
    bad = ("train", 0, 1)
    loader = TaskLoader(CountingSource(fail=(bad,)), CPU, torch.float64)
    assert loader.fetch(keys(0, 3)) == 2
    loader.take(("train", 0, 0))
    with pytest.raises(OSError, match=r"cannot read task \('train', 0, 1\)"):
        loader.take(bad)


def test_tasks_of_earlier_steps_are_dropped_and_capacity_bounds_what_is_kept():
    source = CountingSource()
    loader = TaskLoader(source, CPU, torch.float64, capacity=3)
    loader.fetch(keys(0, 2) + [("val", 0, 0)])
    loader.take(("train", 1, 0))  # a later step of train: train's step-0 tasks (a cancelled call's) go
    assert list(loader._ready) == [("val", 0, 0)]
    loader.fetch(keys(2, 4))  # four into a capacity of three: the oldest goes first
    assert list(loader._ready) == keys(2, 4)[1:]


@dataclass
class GlobalRNGSource:
    """Draws from torch's global generator, seeded from the key (as augmentations and learn2learn task sets do),
    with a pause between seeding and drawing: two unguarded threads would draw from each other's seed."""

    def sample(self, key):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1000 * key[1] + key[2])
            time.sleep(0.002)
            return {"x": torch.rand(8, dtype=torch.float64)}


def test_a_source_drawing_from_the_global_rng_stays_deterministic_with_two_threads():
    want = {k: GlobalRNGSource().sample(k)["x"] for s in range(3) for k in keys(s, 8)}
    loader = TaskLoader(GlobalRNGSource(), CPU, torch.float64, capacity=100)
    for s in range(3):
        ahead = threading.Thread(target=loader.fetch, args=(keys(s, 8)[1::2],))  # odd tasks on the other thread
        ahead.start()
        got = {k: loader.take(k)["x"] for k in keys(s, 8)[0::2]}  # even ones sampled here meanwhile
        ahead.join()
        got.update({k: loader.take(k)["x"] for k in keys(s, 8)[1::2]})
        assert all(torch.equal(got[k], want[k]) for k in keys(s, 8))
    assert loader.stats()["hits"] == 12 and loader.stats()["misses"] == 12
