"""``ClusterConfig.tasks_per_batch``: actors computing their tasks in ``hypergrad_batch`` chunks (vmapped) give the
outer trajectory of the one-task-per-call path, to the reduction's precision (the batched per-task gradients
equal the loop's to rounding, and the driver reduces per-task results in key order either way); in process and
on a real Ray pool; non-finite tasks in a chunk still fail the step cleanly."""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import pytest
import ray
import torch

from metaray.cluster import ClusterConfig, InProcessPool, NonFiniteStepError, WorkerPool, WorkerSpec
from metaray.platform.config import ClusterSettings, ConfigError
from metaray.solvers import base as solver_base
from metaray.solvers import register
from metaray.solvers.batched import BatchFallbackWarning
from metaray.solvers.maml import MAML
from metaray.tasks import ModelProblem, SinusoidSource, mlp

from cluster_helpers import PoisonedSource, SlowSource

HERE = Path(__file__).resolve().parent
TASKS, STEPS, LR = 6, 3, 0.01


def spec(source=None, solver="maml", **options) -> WorkerSpec:
    torch.manual_seed(0)
    return WorkerSpec(problem=functools.partial(ModelProblem, mlp([1, 40, 40, 1]), "mse"), solver=solver,
                      solver_options=options or {"inner_steps": 2, "inner_lr": 0.01}, source=source or SinusoidSource(dtype=torch.float64),
                      dtype="float64", imports=("cluster_helpers",))


def x0() -> dict:
    torch.manual_seed(0)
    return {k: v.detach().double() for k, v in mlp([1, 40, 40, 1]).named_parameters()}


def train(pool, steps=STEPS):
    x, losses = x0(), []
    for s in range(steps):
        r = pool.step(x, [("train", s, i) for i in range(TASKS)])
        x = {k: x[k] - LR * r.grad[k] for k in x}
        losses.extend(t["outer_loss"] for t in r.per_task)
    return x, losses


def rel(a: dict, b: dict) -> float:
    return sum(float((a[k] - b[k]).norm()) ** 2 for k in a) ** 0.5 / sum(float(b[k].norm()) ** 2 for k in b) ** 0.5


@pytest.fixture(scope="module")
def loop_reference():
    with InProcessPool(spec()) as p:
        x, losses = train(p)
    assert rel(x, x0()) > 1e-4  # training moved x
    return x, losses


@pytest.mark.parametrize("per_batch", [4, "auto"])
def test_in_process_batches_follow_the_loop_trajectory(loop_reference, per_batch):
    cfg = ClusterConfig(num_workers=1, metrics=False, tasks_per_batch=per_batch)
    with InProcessPool(spec(), cfg) as p, warnings.catch_warnings():
        warnings.simplefilter("error", BatchFallbackWarning)  # the chunks are really vmapped
        x, losses = train(p)
        choice = p._learner.batch_choice
    ref_x, ref_losses = loop_reference
    assert rel(x, ref_x) < 1e-10
    assert losses == pytest.approx(ref_losses, rel=1e-10)
    if per_batch == "auto":  # measured once, on the first step, whose results are the loop's
        assert set(choice) == {"batched", "loop_s_per_task", "batched_s_per_task", "tasks", "mode"} and choice["tasks"] == TASKS
        assert choice["mode"] == "vmap"


@pytest.mark.parametrize("per_batch", [3, "auto"])
def test_task_threads_follow_the_loop_trajectory(loop_reference, per_batch):
    """task_threads=2: a call's tasks computed two at a time on threads (solvers/threads.py), not vmapped; the
    in-process pool's trajectory is the loop's, and "auto" measured the threads against the loop."""
    cfg = ClusterConfig(num_workers=1, metrics=False, tasks_per_batch=per_batch, task_threads=2)
    with InProcessPool(spec(), cfg) as p:
        x, losses = train(p)
        choice, info = p._learner.batch_choice, p.workers()[0]
    assert rel(x, loop_reference[0]) < 1e-10 and losses == pytest.approx(loop_reference[1], rel=1e-10)
    assert info["task_threads"] == 2
    if per_batch == "auto":
        assert choice["mode"] == "threads" and choice["tasks"] == TASKS


def test_task_threads_is_validated():
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="task_threads must be an int >= 1"):
            ClusterConfig(task_threads=bad, tasks_per_batch="auto")
    with pytest.raises(ValueError, match="tasks_per_batch=1 sends one task per call"):
        ClusterConfig(task_threads=2)
    with pytest.raises(ConfigError, match=r"^cluster\.task_threads=2 computes .* tasks_per_batch=1 sends one task per call"):
        ClusterSettings(task_threads=2)
    assert ClusterSettings(task_threads=2, tasks_per_batch=4).cluster_config().task_threads == 2


def test_imaml_batched_cg_chunks_follow_the_loop_trajectory():
    """iMAML's batched CG in the worker: each task's system solved with its own steps, the same trajectory and
    the same per-task CG diagnostics as one task per call."""
    imaml = dict(solver="imaml", inner_steps=4, inner_lr=0.05, lam=1.0, cg_steps=6, cg_tol=1e-3)
    runs = {}
    for per_batch in (1, 3):
        with InProcessPool(spec(**imaml), ClusterConfig(num_workers=1, metrics=False, tasks_per_batch=per_batch)) as p, \
                warnings.catch_warnings():
            warnings.simplefilter("error", BatchFallbackWarning)
            x, steps = x0(), []
            for s in range(STEPS):
                r = p.step(x, [("train", s, i) for i in range(TASKS)])
                x = {k: x[k] - LR * r.grad[k] for k in x}
                steps.append([t["linsolve_steps"] for t in r.per_task])
            runs[per_batch] = x, steps
    assert rel(runs[3][0], runs[1][0]) < 1e-10 and rel(runs[1][0], x0()) > 1e-5
    assert runs[3][1] == runs[1][1] and len({v for row in runs[1][1] for v in row}) > 1  # tasks stopped apart


class DeviceLimitedMAML(MAML):
    """MAML on a device whose memory holds at most 2 vmapped tasks: a larger batch raises the error CUDA's
    allocator raises (there is no GPU here to run out of). Results are MAML's."""

    name = "maml-device-limited"

    def hypergrad_batch(self, problem, x, tasks, states=None):
        if len(tasks) > 2:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(tasks)} tasks' graphs")
        return super().hypergrad_batch(problem, x, tasks, states)


@pytest.fixture
def device_limited_maml():
    """Registered for this test only (the in-process pool builds its solver by name): the registry-wide
    batteries (tests/solvers/test_conformance.py) must not see a test double."""
    register(DeviceLimitedMAML)
    yield DeviceLimitedMAML.name
    solver_base._REGISTRY.pop(DeviceLimitedMAML.name)


@pytest.mark.parametrize("per_batch", [6, "auto"])
def test_a_batch_that_runs_out_of_memory_is_halved_and_the_step_survives(loop_reference, per_batch, device_limited_maml):
    """A device that holds 2 vmapped tasks: a chunk of 6 runs out of memory, is computed as 3 then 2 at a time,
    said once, and the trajectory is the loop's; later calls start at the size that fitted."""
    cfg = ClusterConfig(num_workers=1, metrics=False, tasks_per_batch=per_batch)
    with InProcessPool(spec(solver=device_limited_maml, inner_steps=2, inner_lr=0.01), cfg) as p:
        with pytest.warns(RuntimeWarning, match="ran out of memory") as caught:
            x, losses = train(p)
        choice = p._learner.batch_choice
    assert choice["max_tasks"] == 2
    said = [str(w.message).split("; ")[-1] for w in caught if "ran out of memory" in str(w.message)]
    assert said == ["computing at most 3 at once from now on", "computing at most 2 at once from now on"]
    assert rel(x, loop_reference[0]) < 1e-10
    assert losses == pytest.approx(loop_reference[1], rel=1e-10)


def test_a_nonfinite_task_in_a_batch_fails_the_step_cleanly():
    cfg = ClusterConfig(num_workers=1, metrics=False, tasks_per_batch=3)
    with InProcessPool(spec(PoisonedSource(SinusoidSource(dtype=torch.float64), bad=((0, 4),))), cfg) as p:
        with pytest.warns(RuntimeWarning, match=r"task \('train', 0, 4\)"):
            with pytest.raises(NonFiniteStepError, match=r"\('train', 0, 4\)"):
                p.step(x0(), [("train", 0, i) for i in range(TASKS)])


def test_tasks_per_batch_is_validated():
    for bad in (0, -1, "fast", 2.5, True):
        with pytest.raises(ValueError, match="tasks_per_batch"):
            ClusterConfig(tasks_per_batch=bad)
    assert ClusterSettings(tasks_per_batch="auto").cluster_config().tasks_per_batch == "auto"
    with pytest.raises(ConfigError, match="tasks_per_batch"):
        ClusterSettings(tasks_per_batch=0)


@pytest.fixture(scope="module")
def two_cpus():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(HERE)}})
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_actors_running_batches_follow_the_loop_trajectory(loop_reference, two_cpus):
    for per_batch, threads in ((2, 1), ("auto", 1), (3, 2)):  # (3, 2): each actor's chunks on 2 task threads
        cfg = ClusterConfig(num_workers=2, num_cpus_per_worker=1, metrics=False, tasks_per_batch=per_batch,
                            task_threads=threads)
        with WorkerPool(spec(), cfg, f"batch-{per_batch}-{threads}") as pool:
            x, losses = train(pool)
            assert all(w["task_threads"] == threads for w in pool.workers().values())
        assert rel(x, loop_reference[0]) < 1e-10, per_batch
        assert losses == pytest.approx(loop_reference[1], rel=1e-10)


@pytest.mark.slow
def test_prefetching_the_next_calls_tasks_changes_no_bit(loop_reference, two_cpus):
    """``prefetch=True``: each actor loads its next call's tasks on its prefetch thread while the call ahead
    computes (sampling here waits 50 ms, as a read from storage would). Dynamic scheduling one task a call gives
    the loop's params bit for bit, static chunks of 2 its trajectory; the actors took tasks loaded ahead, and every
    task was sampled once. "auto" leaves CPU actors without prefetching."""
    slow = SlowSource(SinusoidSource(dtype=torch.float64), delay=0.05)
    runs = [("dynamic", 1, True), ("static", 2, True), ("dynamic", 1, "auto")]
    for scheduling, per_batch, prefetch in runs:
        cfg = ClusterConfig(num_workers=2, num_cpus_per_worker=1, metrics=False, scheduling=scheduling,
                            tasks_per_batch=per_batch, prefetch=prefetch)
        with WorkerPool(spec(slow), cfg, f"prefetch-{scheduling}-{prefetch}") as pool:
            x, losses = train(pool)
            stats = [w["prefetch"] for w in pool.workers().values()]
            enabled = list(pool._prefetch)
        what = (scheduling, per_batch, prefetch)
        if per_batch == 1:
            assert all(torch.equal(x[k], loop_reference[0][k]) for k in x), what
        assert rel(x, loop_reference[0]) < 1e-10 and losses == pytest.approx(loop_reference[1], rel=1e-10), what
        hits, misses = sum(s["hits"] for s in stats), sum(s["misses"] for s in stats)
        assert hits + misses == STEPS * TASKS, (what, stats)  # each task taken once, and loaded once
        assert enabled == [prefetch is True] * 2, what
        if prefetch is True:
            assert hits >= 1 and sum(s["loaded_ahead"] for s in stats) >= hits, (what, stats)
        else:
            assert hits == 0 and sum(s["loaded_ahead"] for s in stats) == 0, (what, stats)


def test_prefetch_is_validated():
    for bad in ("yes", 1, 0, None):
        with pytest.raises(ValueError, match=r"prefetch must be True, False or \"auto\""):
            ClusterConfig(prefetch=bad)
    assert ClusterSettings(prefetch=True).cluster_config().prefetch is True
    with pytest.raises(ConfigError, match="prefetch"):
        ClusterSettings(prefetch="always")
