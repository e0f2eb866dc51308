"""Test-only problems and task sources for fault injection (shipped to Ray workers by value).

``PoisonSource`` samples quadratic bilevel tasks (metaray.tasks.synthetic) deterministically from the key; the
tasks whose index is in ``poisons`` ((index, mode) pairs) are made hostile:
    "nan"      its outer loss is NaN
    "explode"  its inner problem is strongly concave, so gradient descent overflows within a few inner steps
``SlowQuadratic`` sleeps ``delay`` seconds per task, so a kill lands mid-step.
``count(name)`` tallies fuzz cases by outcome; conftest.py prints the tallies after each test module.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from metaray.solvers.core import Params
from metaray.tasks.base import key_seed
from metaray.tasks.synthetic import QuadraticProblem, QuadraticTask, quadratic_task


@dataclass
class FaultTask(QuadraticTask):
    poison: str = ""


@dataclass(frozen=True)
class PoisonSource:
    n: int = 3
    m: int = 4
    poisons: tuple[tuple[int, str], ...] = ()
    poison_steps: tuple[int, ...] = ()  # empty: every step

    def sample(self, key) -> FaultTask:
        base = quadratic_task(self.n, self.m, seed=key_seed(key) % (2**31), init="random")
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(QuadraticTask)}
        poison = dict(self.poisons).get(key[2], "") if (not self.poison_steps or key[1] in self.poison_steps) else ""
        if poison == "explode":
            fields["A"] = -1e100 * fields["A"]
        return FaultTask(**fields, poison=poison)


class SlowQuadratic(QuadraticProblem):
    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.delay = delay

    def init_inner(self, x: Params, task: FaultTask) -> Params:
        if self.delay:
            time.sleep(self.delay)
        return super().init_inner(x, task)

    def outer_loss(self, x: Params, y: Params, task: FaultTask):
        loss = super().outer_loss(x, y, task)
        return loss * float("nan") if task.poison == "nan" else loss


def start_local_ray():
    """A fresh local Ray cluster started by metaray's own ``init_ray`` (so the security tests check the defaults
    metaray really uses), with this module sent to the workers by value (workers cannot import tests/). Returns
    (ray, whether this call started it)."""
    import cloudpickle

    import ray
    from metaray.cluster import init_ray

    started = init_ray("local")  # "local": never a cluster another process left behind on this machine
    this = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(this)
    ray.cloudpickle.register_pickle_by_value(this)
    return ray, started


def spec(delay: float = 0.0, poisons: tuple = (), solver: str = "rad", poison_steps: tuple = (), **options):
    from metaray.cluster import WorkerSpec

    return WorkerSpec(
        problem=functools.partial(SlowQuadratic, delay),
        solver=solver,
        solver_options={"inner_steps": 5, "inner_lr": 0.1, **options},
        source=PoisonSource(poisons=tuple(poisons), poison_steps=tuple(poison_steps)),
        dtype="float64",
        device="cpu",
    )


def x0() -> Params:
    return {"x": torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)}


def keys(step: int, n: int = 4) -> list[tuple]:
    return [("train", step, i) for i in range(n)]


def sgd(x: Params, grad: Params, lr: float = 0.05) -> Params:
    return {k: x[k] - lr * grad[k] for k in x}


def run_steps(pool, steps: int, n_tasks: int = 4, on_step=None) -> tuple[Params, list]:
    """``steps`` outer SGD steps; returns the final x and the StepResults."""
    x, results = x0(), []
    for s in range(steps):
        if on_step is not None:
            on_step(s, pool)
        r = pool.step(x, keys(s, n_tasks))
        results.append(r)
        x = sgd(x, r.grad)
    return x, results


def release_free_heap() -> None:
    """glibc's ``malloc_trim(0)``: hands freed heap pages back to the OS, so this process's RSS measures live
    memory rather than what the allocator happens to keep cached after frees (noise that a soak's RSS slope
    would otherwise read as growth). A no-op where glibc is not the C library."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def rss_bytes(pid: int | None = None) -> int:
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def listening_addresses(port: int) -> set[str]:
    """Local IP addresses with a TCP socket listening on ``port`` (from /proc/net/tcp{,6})."""
    out = set()
    for name, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = open(name).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state = parts[1], parts[3]
            if state != "0A":  # LISTEN
                continue
            ip_hex, port_hex = local.split(":")
            if int(port_hex, 16) != port:
                continue
            if width == 8:
                b = bytes.fromhex(ip_hex)[::-1]
                out.add(".".join(str(c) for c in b))
            else:
                words = [bytes.fromhex(ip_hex[i : i + 8])[::-1] for i in range(0, 32, 8)]
                raw = b"".join(words)
                out.add("::" if raw == bytes(16) else ("::1" if raw == bytes(15) + b"\x01" else raw.hex()))
    return out


def learner(pool, steps: int):
    """The platform's meta-learner (outer SGD) over ``pool``, 4 tasks per step."""
    from metaray.platform import MetaLearner, OuterConfig, TasksConfig

    return MetaLearner(pool, x0(), OuterConfig(optimizer="sgd", lr=0.05), TasksConfig(meta_batch_size=4), total_steps=steps)


# ----------------------------------------------------------------------------------------------------------
# Fuzz case counts (printed per test module by conftest.py: what `pytest -s` shows and docs/reliability.md cites)
# ----------------------------------------------------------------------------------------------------------

COUNTS: dict[str, int] = {}


def count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1
