"""Worker pools: one outer step = per-task hypergradients from the inner learners, aggregated.

``WorkerPool`` (ray_pool.py) runs the inner learners as named Ray actors (``metaray-<run>-inner-<i>``; ``-r<n>``
appended for the n-th replacement of one that died for good) in a placement group; ``InProcessPool`` (here)
runs the same ``InnerLearner`` code in the calling process (the reference for tests and the baseline that
measures Ray's overhead). Both are ``_PoolBase``'s step, which this file holds: they have the same interface and
give the same numbers.

One outer step (``step``):
1. x is put in the object store once, as NumPy arrays (zero-copy reads on every actor of the node); each
   call carries only the reference and one task key.
2. The tasks are dispatched to the actors (dispatch.py): a stateless solver's to whichever actor is free, a
   stateful one's to its owner, worker ``i % num_workers`` (worker.py: the task's state lives there).
3. The gradients are aggregated, in the order of the keys the caller gave or exactly in any order: among the
   actors (collective.py, reduce.py; the driver receives one gradient) or in the driver (aggregate.py). The
   result does not depend on how many actors computed it, nor on which.

Faults are handled in the driver (Ray's own method retries are off: a method that kills its process would be
retried into every restart). An actor that dies is waited for while Ray restarts it (ActorUnavailableError),
or replaced in its placement-group bundle once it is gone for good (ActorDiedError); its tasks are dispatched
again, a stateful one from the driver's snapshot of its state (the worker refuses to start a task it should
hold state for but does not, so lost state is never silently reset). Stragglers and non-finite results:
dispatch.py.
"""
from __future__ import annotations

import abc
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..solvers import get as get_solver
from ..solvers.core import Params, check_params, check_same_keys, tnorm
from ..tasks.base import check_key
from .aggregate import aggregate
from .config import ClusterConfig, WorkerSpec, check_spec_for_config
from .dispatch import chunks
from .errors import NonFiniteStepError, PlacementTimeoutError, PoolError  # noqa: F401  (public here too)
from .host_memory import keep_host_memory
from .worker import InnerLearner, TaskId, owner, task_id

_RUN_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass
class StepResult:
    """What one outer step (or evaluation) returns to the meta-learner.

    grad:       the aggregated hypergradient (same keys, dtype and device as x; zeros for ``evaluate``)
    outer_loss: mean over tasks;  inner_loss: mean over tasks
    metrics:    mean over tasks of each task metric, plus pool diagnostics prefixed ``pool_``
    per_task:   [{"key", "worker", "outer_loss", "inner_loss", **metrics}] in key order
    per_worker: {i: {"tasks", "inner_loss" (mean), "seconds" (compute), "peak_memory_bytes" (the largest peak of
                a hypergradient of worker i this step: solvers/memory.py says what is measured; None if not)}}
    restarts:   actor restarts / replacements seen during this step;  retries: task re-dispatches
    seconds:    wall clock of the step
    """

    grad: Params
    outer_loss: float
    inner_loss: float
    metrics: dict[str, float]
    per_task: list[dict]
    per_worker: dict[int, dict]
    restarts: int
    retries: int
    seconds: float
    events: list[str] = field(default_factory=list)  # what went wrong and how it was handled, in order


def _check_run_name(run_name: Any) -> str:
    if not isinstance(run_name, str) or not _RUN_NAME.match(run_name):
        raise ValueError(f"run_name must be 1-64 characters from [A-Za-z0-9_.-] (it names Ray actors), got {run_name!r}")
    return run_name


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


class _PoolBase(abc.ABC):
    """Validation, the step's bookkeeping and the result; subclasses run the tasks (``_run``)."""

    def __init__(self, spec: WorkerSpec, config: ClusterConfig, run_name: str):
        if not isinstance(spec, WorkerSpec):
            raise TypeError(f"spec must be a WorkerSpec, got {type(spec).__name__}")
        if not isinstance(config, ClusterConfig):
            raise TypeError(f"config must be a ClusterConfig, got {type(config).__name__}")
        check_spec_for_config(spec, config)
        self.spec, self.config, self.run_name = spec, config, _check_run_name(run_name)
        if config.keep_host_memory:  # the driver's copies of x and the step's gradient (host_memory.py)
            keep_host_memory()
        import importlib

        for module in spec.imports:
            importlib.import_module(module)
        # Validate the solver name and options here, not inside every actor.
        self.stateful = bool(get_solver(spec.solver)(**spec.solver_options).stateful)
        self.num_workers = config.num_workers
        self._snapshot: dict[TaskId, Any] = {}  # the driver's copy of per-task state (stateful solvers)
        self._has_state: set[TaskId] = set()    # tasks whose state some worker must hold
        self._current: set[TaskId] = set()      # tasks whose snapshot is their newest state (exact to restart from)
        self._steps = 0
        self._closed = False
        self._events: list[str] = []

    # ---- context manager -----------------------------------------------------------------------------

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        self._closed = True

    # ---- steps -------------------------------------------------------------------------------------------

    def step(self, x: Params, keys: Sequence[Any], weights: Sequence[float] | None = None) -> StepResult:
        """Task hypergradients at x for ``keys``, aggregated by ``config.aggregation`` in key order."""
        return self._step(x, keys, weights, "train")

    def evaluate(self, x: Params, keys: Sequence[Any]) -> StepResult:
        """Losses and metrics after adaptation (``solver.evaluate``): no hypergradient (grad is zeros) and no
        state is changed."""
        return self._step(x, keys, None, "eval")

    def _check_keys(self, keys: Sequence[Any], mode: str) -> list[tuple]:
        if isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence):
            raise TypeError(f"keys must be a sequence of task keys (split, step, index), got {type(keys).__name__}")
        keys = [check_key(tuple(k) if isinstance(k, list) else k) for k in keys]
        if not keys:
            raise ValueError("a step needs at least one task key")
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise ValueError(f"duplicate task keys in one step: {dup}")
        if self.stateful and mode == "train":
            ids = [task_id(k) for k in keys]
            if len(set(ids)) != len(ids):
                raise ValueError(
                    f"solver {self.spec.solver!r} is stateful and a task's state is identified by (split, index): "
                    f"one step cannot hold two keys of the same task, got {keys}"
                )
        return keys

    def _check_weights(self, weights: Sequence[float] | None, n: int, mode: str) -> list[float] | None:
        rule = self.config.aggregation
        if mode != "train":
            if weights is not None:
                raise ValueError("evaluate takes no weights")
            return None
        if rule == "weighted" and weights is None:
            raise ValueError("ClusterConfig.aggregation='weighted' needs weights: step(x, keys, weights=[...]) with one per key")
        if rule != "weighted" and weights is not None:
            raise ValueError(f"weights are only used with ClusterConfig.aggregation='weighted', not {rule!r}")
        if weights is None:
            return None
        w = [float(v) for v in weights]
        if len(w) != n:
            raise ValueError(f"got {len(w)} weights for {n} task keys")
        if any(not math.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all zero, got {w}")
        return w

    def _step(self, x: Params, keys: Sequence[Any], weights: Sequence[float] | None, mode: str) -> StepResult:
        if self._closed:
            raise PoolError(f"pool {self.run_name!r} is shut down")
        x = check_params(x, "outer params x")
        keys = self._check_keys(keys, mode)
        w = self._check_weights(weights, len(keys), mode)
        t0 = time.perf_counter()
        every = self.config.state_snapshot_every
        snapshot = self.stateful and mode == "train" and every > 0 and self._steps % every == 0
        self._events: list[str] = []
        keep = mode == "train" and self._reduces_on_actors()
        try:
            results, restarts, retries = self._run(x, keys, mode, snapshot, keep)
        except NonFiniteStepError:
            if self.stateful and mode == "train":
                self._rollback(keys)
            raise

        grad_bytes = 0  # gradient bytes the driver received this step
        t_reduce, reduce_seconds = time.perf_counter(), 0.0
        if mode == "train":
            if keep:  # the gradients stayed on the actors: combine their exact partial sums
                agg, more_restarts, more_retries = self._reduce_on_actors(x, keys, results, w)
                restarts, retries = restarts + more_restarts, retries + more_retries
                received = [agg]
            else:
                for r in results:
                    check_same_keys(x, r["grad"], "outer params x", f"hypergradient of task {r['key']}")
                agg = aggregate([r["grad"] for r in results], self.config.aggregation, w, self.config.trim_fraction)
                received = [r["grad"] for r in results]
            grad_bytes = sum(v.numel() * v.element_size() for g in received for v in g.values())
            grad = {k: agg[k].to(device=x[k].device, dtype=x[k].dtype) for k in x}
            reduce_seconds = time.perf_counter() - t_reduce
            if self.stateful:
                for r in results:
                    self._has_state.add(task_id(r["key"]))
                    if r["state"] is not None:
                        self._snapshot[task_id(r["key"])] = r["state"][0]
                        self._current.add(task_id(r["key"]))
                    else:  # the task moved on; the pool's copy of its state is older now
                        self._current.discard(task_id(r["key"]))
            self._steps += 1
        else:
            grad = {k: torch.zeros_like(v) for k, v in x.items()}
        seconds = time.perf_counter() - t0
        result = self._result(x, grad, results, restarts, retries, seconds, mode, grad_bytes, reduce_seconds)
        if self.config.metrics:
            self._record(result, mode == "train")
        return result

    def _result(self, x, grad, results, restarts, retries, seconds, mode, grad_bytes, reduce_seconds) -> StepResult:
        per_task = [
            {"key": r["key"], "worker": r["worker"], "outer_loss": r["outer_loss"], "inner_loss": r["inner_loss"], **r["metrics"]}
            for r in results
        ]
        names = [k for k in results[0]["metrics"] if all(k in r["metrics"] for r in results)]
        metrics = {k: _mean([r["metrics"][k] for r in results]) for k in names}
        per_worker: dict[int, dict] = {}
        for r in results:
            row = per_worker.setdefault(r["worker"], {"tasks": 0, "inner_loss": [], "seconds": 0.0, "peak_memory_bytes": None})
            row["tasks"] += 1
            row["inner_loss"].append(r["inner_loss"])
            row["seconds"] += r["seconds"]
            if r.get("peak_memory_bytes") is not None:
                row["peak_memory_bytes"] = max(row["peak_memory_bytes"] or 0, int(r["peak_memory_bytes"]))
        for row in per_worker.values():
            row["inner_loss"] = _mean(row["inner_loss"])
        metrics.update(
            pool_tasks_per_second=len(results) / seconds if seconds > 0 else float("inf"),
            pool_step_seconds=seconds,
            pool_hypergrad_norm=float(tnorm(grad)) if mode == "train" else 0.0,
            pool_restarts=float(restarts),
            pool_retries=float(retries),
            pool_workers=float(self.num_workers),
            # gradient bytes that reached the driver this step: B·4d gathered, 4d (float32) reduced on the actors
            pool_grad_bytes_to_driver=float(grad_bytes),
            # from the last task's answer to the aggregated gradient in the driver (the reduction's share of the step)
            pool_reduce_seconds=reduce_seconds,
        )
        return StepResult(
            grad=grad,
            outer_loss=_mean([r["outer_loss"] for r in results]),
            inner_loss=_mean([r["inner_loss"] for r in results]),
            metrics=metrics,
            per_task=per_task,
            per_worker=dict(sorted(per_worker.items())),
            restarts=restarts,
            retries=retries,
            seconds=seconds,
            events=list(self._events),
        )

    def _record(self, result: StepResult, train: bool) -> None:
        try:
            from .metrics import record_step

            record_step(self.run_name, result, train)
        except Exception as e:  # noqa: BLE001 (monitoring must never fail a training step)
            warnings.warn(f"metaray metrics not recorded: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=3)

    def _nonfinite(self, r: dict, tries: dict[tuple, int]) -> None:
        """Reports a non-finite task result; raises once the task has failed twice."""
        key = r["key"]
        tries[key] = tries.get(key, 0) + 1
        msg = f"non-finite result for task {key} on worker {r['worker']}: {r['message']}"
        self._events.append(msg + (" (retrying once)" if tries[key] == 1 else ""))
        if tries[key] == 1:
            warnings.warn(msg + " — retrying once", RuntimeWarning, stacklevel=4)
        else:
            raise NonFiniteStepError(
                f"{msg}, again after a retry: step abandoned, the outer params and all task states are unchanged. "
                "Lower the learning rates, check the problem's losses at these params, or use a robust aggregation "
                "only if a few bad tasks are expected (non-finite values still fail the step).",
                where=r.get("where", ""),
                task=key,
            )

    def _restore(self, key: tuple) -> tuple | None:
        """The snapshot state of a task that has state, for a worker that lost it."""
        tid = task_id(key)
        if tid not in self._has_state:
            return None
        if tid not in self._snapshot:
            raise PoolError(
                f"the state of task {tid} was lost with its worker and the pool holds no snapshot of it; "
                "set ClusterConfig.state_snapshot_every >= 1 (or call state_dict() periodically)"
            )
        return (self._snapshot[tid],)

    # ---- checkpoints -------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Per-task state of a stateful solver, keyed by task id (split, index), on the CPU. Also refreshes the
        pool's own snapshot. Stateless solvers: empty ``tasks``."""
        tasks = self._gather_states() if self.stateful else {}
        self._snapshot.update(tasks)
        self._current.update(tasks)
        return {"solver": self.spec.solver, "stateful": self.stateful, "steps": self._steps, "tasks": dict(tasks)}

    def load_state_dict(self, state: dict) -> None:
        """Restores ``state_dict()`` output: each task's state goes to its owner (whatever the number of workers
        was when it was saved)."""
        if not isinstance(state, dict) or "tasks" not in state:
            raise ValueError("load_state_dict expects the dict returned by state_dict() (with a 'tasks' entry)")
        if state.get("solver") not in (None, self.spec.solver):
            raise ValueError(f"state_dict is from solver {state.get('solver')!r}, this pool runs {self.spec.solver!r}")
        tasks = {tuple(tid): s for tid, s in state["tasks"].items()}
        for tid in tasks:
            if not (len(tid) == 2 and isinstance(tid[0], str) and isinstance(tid[1], int)):
                raise ValueError(f"state_dict task ids must be (split, index), got {tid!r}")
        self._steps = int(state.get("steps", 0))
        self._snapshot = dict(tasks)
        self._has_state = set(tasks)
        self._current = set(tasks)
        self._scatter_states(tasks)

    def _rollback(self, keys: list[tuple]) -> None:
        """A failed step's tasks go back to their state before it (the driver's snapshot; none if they had none),
        so tasks that finished before the failure do not run ahead of the others."""
        ids = [task_id(k) for k in keys]
        restore = {tid: self._snapshot[tid] for tid in ids if tid in self._snapshot}
        self._current.update(restore)
        self._update_states(restore, [tid for tid in ids if tid not in self._has_state])

    def _batch_size(self, mode: str, n: int) -> int:
        """Tasks per ``run_batch`` call on one worker (``ClusterConfig.tasks_per_batch``); 1 = one call per task,
        which stateful solvers, evaluation and straggler re-dispatch (``step_timeout_s``) always use."""
        b = self.config.tasks_per_batch
        if b == 1 or mode != "train" or self.stateful or self.config.step_timeout_s is not None:
            return 1
        return n if b == "auto" else int(b)

    def _reduces_on_actors(self) -> bool:
        """Whether this step's gradients are reduced on the actors (``ClusterConfig.reduction``). Only the Ray
        pool does (``WorkerPool._reduce_on_actors``); the in-process pool has its one learner's gradients at hand."""
        return False

    # ---- what each pool (in-process, Ray actors) implements ----------------------------------------------

    @abc.abstractmethod
    def _update_states(self, restore: dict[TaskId, Any], drop: list[TaskId]) -> None:
        """Sets the given tasks' states on their owners and forgets the ``drop`` tasks' states."""

    @abc.abstractmethod
    def _run(self, x: Params, keys: list[tuple], mode: str, snapshot: bool, keep: bool) -> tuple[list[dict], int, int]:
        """Runs ``keys`` at x; returns (per-task results, restarts, retries). ``keep``: the actors keep the
        gradients for ``_reduce_on_actors`` and the results carry their per-tensor max |g| instead."""

    @abc.abstractmethod
    def _gather_states(self) -> dict[TaskId, Any]:
        """Every task's solver state, on the CPU."""

    @abc.abstractmethod
    def _scatter_states(self, tasks: dict[TaskId, Any]) -> None:
        """Sends each task's state to its owner."""


# ----------------------------------------------------------------------------------------------------------
# In-process
# ----------------------------------------------------------------------------------------------------------


class InProcessPool(_PoolBase):
    """The same interface without Ray: one InnerLearner in this process computes every task in key order.

    From ``config`` the aggregation settings, ``tasks_per_batch`` and ``task_threads`` apply: every task runs
    here, reported as worker 0, nothing is exported (the StepResult carries the metrics), and torch threads stay
    as the caller set them (task threads get ``num_cpus_per_worker // task_threads`` each).
    """

    def __init__(self, spec: WorkerSpec, config: ClusterConfig | None = None, run_name: str = "inprocess"):
        config = config or ClusterConfig(num_workers=1, metrics=False)
        super().__init__(spec, config, run_name)
        self.num_workers = 1
        self._learner = InnerLearner(spec, 0, num_cpus=config.num_cpus_per_worker, num_gpus=config.num_gpus_per_worker,
                                     set_threads=False, task_threads=config.task_threads)

    def _record(self, result: StepResult, train: bool) -> None:
        """No Ray, no exported metrics: the StepResult carries them."""

    def _run(self, x, keys, mode, snapshot, keep):
        xw = self._learner.set_x(x)
        results, retries, tries = [], 0, {}
        first = {}
        for chunk in chunks(keys, self._batch_size(mode, len(keys))):  # tasks_per_batch; [key] chunks by default
            if len(chunk) > 1:
                first.update({r["key"]: r for r in self._learner.run_batch(
                    xw, chunk, mode, snapshot=snapshot, tasks_per_batch=self.config.tasks_per_batch)})
        for key in keys:
            while True:
                r = first.pop(key, None) or self._learner.run(xw, key, mode, snapshot=snapshot)
                if r["error"] == "nonfinite":
                    self._nonfinite(r, tries)
                    retries += 1
                    continue
                break
            results.append(r)
        return results, 0, retries

    def shutdown(self) -> None:
        self._learner.close()
        super().shutdown()

    def workers(self) -> dict[int, dict]:
        """The one in-process learner's ``info()`` (WorkerPool.workers)."""
        return {0: self._learner.info()}

    def _gather_states(self):
        return self._learner.get_states()

    def _scatter_states(self, tasks):
        self._learner.set_states(tasks)

    def _update_states(self, restore, drop):
        self._learner.update_states(restore, drop)
