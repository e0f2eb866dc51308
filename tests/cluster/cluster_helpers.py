"""Task sources for the cluster tests. Ray workers import this module by name (the tests put this folder on
the workers' PYTHONPATH and list it in WorkerSpec.imports), so everything here must be module-level."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from metaray.tasks import SPLITS, quadratic_task


@dataclass(frozen=True)
class QuadraticSource:
    """A persistent quadratic bilevel task per task id (split, index): the same instance at every outer step,
    as in hyperparameter optimization, so a stateful solver's state carries over meaningfully."""

    n: int = 3
    m: int = 4

    def sample(self, key):
        split, _step, index = key
        return quadratic_task(self.n, self.m, seed=1000 * SPLITS.index(split) + index)


@dataclass(frozen=True)
class SlowSource:
    """Another source's tasks, each after ``delay`` seconds (a window to kill a worker mid-step)."""

    base: Any
    delay: float = 0.3

    def sample(self, key):
        time.sleep(self.delay)
        return self.base.sample(key)


@dataclass(frozen=True)
class StragglerSource:
    """``delay`` seconds for one task key, only in the process whose pid is written in ``pid_file`` (the test
    writes a worker's pid there once the pool is up)."""

    base: Any
    slow_key: tuple
    pid_file: str
    delay: float = 20.0

    def sample(self, key):
        import os

        if key == self.slow_key:
            try:
                slow = int(open(self.pid_file).read().strip()) == os.getpid()
            except (OSError, ValueError):
                slow = False
            if slow:
                time.sleep(self.delay)
        return self.base.sample(key)


@dataclass(frozen=True)
class PoisonedSource:
    """Another source's tasks, with NaN outer-loss targets for the (step, index) pairs in ``bad``."""

    base: Any
    bad: tuple = ()

    def sample(self, key):
        task = self.base.sample(key)
        if (key[1], key[2]) in self.bad:
            if hasattr(task, "query_y"):
                task.query_y = torch.full_like(task.query_y, math.nan)
            else:
                task.t = torch.full_like(task.t, math.nan)
        return task


@dataclass(frozen=True)
class CrashOnceSource:
    """Another source's tasks, except that the first process to sample ``crash_key`` exits at once (a real actor
    death, so the pool restarts the actor and re-dispatches); ``marker`` (a file every process of the machine
    sees) records that it happened, so the restarted actor computes the task normally."""

    base: Any
    crash_key: tuple
    marker: str

    def sample(self, key):
        import os

        if tuple(key) == tuple(self.crash_key):
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: only one process crashes
            except FileExistsError:
                pass
            else:
                os.close(fd)
                os._exit(1)
        return self.base.sample(key)

