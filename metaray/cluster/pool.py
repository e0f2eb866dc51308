"""Worker pools: one outer step = per-task hypergradients from the inner learners, aggregated.

``WorkerPool`` runs the inner learners as named Ray actors (``metaray-<run>-inner-<i>``; ``-r<n>`` appended for
the n-th replacement of one that died for good) in a placement group; ``InProcessPool`` runs the same
``InnerLearner`` code in the calling process (the reference for tests and the baseline that measures Ray's
overhead). Both have the same interface and give the same numbers.

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
import os
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
from .config import ClusterConfig, WorkerSpec, check_spec_for_config, collective_backend
from .collective import reduce_on_actors
from .dispatch import StepDispatch, chunks
from .errors import NonFiniteStepError, PlacementTimeoutError, PoolError  # noqa: F401  (public here too)
from .group import GroupState
from .host_memory import keep_host_memory
from .worker import InnerLearner, TaskId, owner, task_id

_RUN_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
ZERO_COPY_ENV = {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}
LOOPBACK = "127.0.0.1"  # the node IP of a local cluster started by init_ray


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


# ----------------------------------------------------------------------------------------------------------
# Ray
# ----------------------------------------------------------------------------------------------------------

_ACTOR_CLASS = None


def _actor_class():
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        import ray

        from .collective import REDUCE
        from .loader import PREFETCH
        from .worker import RayInnerLearner

        # one thread for the task calls (in submission order: dispatch.py relies on it), one for the reduction
        # and one that loads the next call's tasks (loader.py)
        _ACTOR_CLASS = ray.remote(concurrency_groups={REDUCE: 1, PREFETCH: 1})(RayInnerLearner)
    return _ACTOR_CLASS


INLINE_SPEC_BYTES = 64 * 1024  # below Ray's 100 KiB limit for arguments inlined in a task

def init_ray(address: str | None = None) -> bool:
    """Connects to Ray unless already connected; returns whether this call did it.

    address None: the cluster named by ``RAY_ADDRESS`` if that is set (``ray job submit`` sets it for its
    driver), else a new local cluster of our own. Never Ray's own fallback to "the latest cluster started on
    this machine" (``/tmp/ray/ray_current_cluster``): that file outlives crashed clusters, and ``ray.init``
    retries a dead one's GCS for minutes. address "local": a new local cluster; any other address (``"auto"``,
    ``"host:6379"``, ``"ray://..."``): passed to ``ray.init`` as given.

    A local cluster started here is loopback-only: node IP 127.0.0.1, so its GCS, its dashboard and its
    Prometheus metrics export (which Ray binds to 0.0.0.0, without a token, unless the node IP is a loopback
    address) listen on 127.0.0.1 only; no other machine can join it. Ray's token authentication stays on (its
    default).
    """
    import ray

    if ray.is_initialized():
        return False
    # No job-level runtime_env here: under `ray job submit` the job's own applies; each actor gets the zero-copy
    # flag through its own runtime_env (pool.py, _start_actor).
    env_address = os.environ.get("RAY_ADDRESS", "").strip()
    if address is None and env_address and env_address != "local":
        ray.init(dashboard_host="127.0.0.1")  # Ray reads RAY_ADDRESS itself (and keeps its rules for it)
    elif address is None or address == "local":
        _start_local_ray(ray)
    else:
        ray.init(address=address, dashboard_host="127.0.0.1")
    return True


def _start_local_ray(ray, **init_options: Any) -> None:
    """``ray.init(address="local")`` on the loopback interface only; ``init_options`` are further ``ray.init``
    arguments (the monitoring test gives a temp dir, ports and a metrics report interval).

    Ray turns a loopback ``_node_ip_address`` into the machine's routable IP unless its constant
    ``ENABLE_RAY_CLUSTER`` is off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read once when Ray is imported); it is
    switched off only for the duration of this call, which is when the node's IP is decided.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", dashboard_host="127.0.0.1", _node_ip_address=LOOPBACK, **init_options)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


class WorkerPool(_PoolBase):
    """Named Ray actors ``metaray-<run_name>-inner-<i>`` holding the inner learners, in one placement group."""

    def __init__(self, spec: WorkerSpec, config: ClusterConfig, run_name: str):
        super().__init__(spec, config, run_name)
        spec.check_picklable()
        import ray

        # Gradients come back as zero-copy, read-only tensors; the pool only reads them (aggregation makes new ones).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable",
                                module="ray._private.tensor_serialization_utils")
        # States sent back to workers (restores, checkpoints) are copied there before any use.
        warnings.filterwarnings("ignore", message="Zero-copy tensor serialization is enabled")
        self._ray = ray
        # What a lost worker looks like: its process died (RayActorError), or its node did, taking the objects it
        # held (NodeDiedError, ObjectLostError: not RayActorError subclasses in Ray 2.60). All mean the same here:
        # recover the actor and compute its tasks again.
        self._lost = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError)
        self._owns_ray = init_ray(config.address)
        self._pg = None
        self._bundle_offset, self._owns_pg = 0, True  # actor i goes to bundle offset + i of self._pg
        # Pickled to bytes: each actor unpickles its own private, writable copy of the problem (Ray's zero-copy
        # path would hand every actor read-only views of the model's tensors). A small spec travels inline in each
        # actor's creation task, so a restart never depends on the object store; a large one goes to the object
        # store once, and holding the reference keeps it there for as long as the pool lives, so Ray can re-run
        # an actor's constructor on restart (ray-project/ray#53727).
        import cloudpickle

        spec_bytes = cloudpickle.dumps(spec)
        self._spec_ref = spec_bytes if len(spec_bytes) < INLINE_SPEC_BYTES else ray.put(spec_bytes)
        self._actors: list[Any] = [None] * config.num_workers
        self._queues: list[dict] = [{} for _ in range(config.num_workers)]  # each actor's calls (dispatch.py)
        self._prefetch = [False] * config.num_workers  # whether actor i loads its next call's tasks ahead
        self._hints: list = []  # prefetch calls not yet answered (dispatch.py)
        self._incarnation: list[str | None] = [None] * config.num_workers
        self._replacements = [0] * config.num_workers
        self.pids: list[int] = [0] * config.num_workers
        # the reduction's transport (collective.py): a process group among the actors, built at the first
        # reduction, or None for Ray's object store
        backend = collective_backend(spec, config)
        self._group = GroupState(backend, config.collective_timeout_s) if backend else None
        try:
            self._pg = self._place()
            for i in range(config.num_workers):
                self._actors[i] = self._start_actor(i)
            infos = self._wait_ready(range(config.num_workers))
            for i, info in infos.items():
                self._incarnation[i] = info["incarnation"]
                self.pids[i] = info["pid"]
            self.worker_info = infos
            # prefetch="auto": on for the actors that compute on a GPU (their host-side loading then overlaps
            # the device's work), off on CPUs, where a loading thread would take its core from the computation
            self._prefetch = [config.prefetch is True or (config.prefetch == "auto" and info["device"].startswith("cuda"))
                              for _, info in sorted(infos.items())]
        except BaseException:
            self.shutdown()
            raise

    # ---- placement and actors ----------------------------------------------------------------------------

    def _bundle(self) -> dict[str, float]:
        b = {"CPU": float(self.config.num_cpus_per_worker)}
        if self.config.num_gpus_per_worker > 0:
            b["GPU"] = float(self.config.num_gpus_per_worker)
        return b

    def _place(self):
        from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group

        ray, c = self._ray, self.config
        bundle = self._bundle()
        # Inside a Tune trial (metaray.platform.tune), the trial has already reserved bundle 0 for this driver and
        # bundles 1..n for the actors: use them, since a placement group of our own would wait for resources the
        # trial holds.
        current = get_current_placement_group()
        if current is not None:
            specs = current.bundle_specs
            fits = len(specs) > c.num_workers and all(
                specs[1 + i].get(k, 0.0) >= v for i in range(c.num_workers) for k, v in bundle.items())
            if fits:
                self._bundle_offset, self._owns_pg = 1, False
                return current
        pg = placement_group([dict(bundle) for _ in range(c.num_workers)], strategy=c.strategy,
                             name=f"metaray-{self.run_name}-pg")
        try:
            ray.get(pg.ready(), timeout=c.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            per_node = [{k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU")} for n in nodes]
            raise PlacementTimeoutError(
                f"could not place {c.num_workers} workers x {bundle} with strategy {c.strategy} within "
                f"{c.placement_timeout_s:g} s. The cluster has {len(nodes)} node(s) with {per_node} "
                f"(available now: { {k: v for k, v in ray.available_resources().items() if k in ('CPU', 'GPU')} }). "
                "Lower num_workers or the per-worker CPUs/GPUs, use strategy PACK/SPREAD instead of a STRICT_ one, "
                "add nodes, or raise placement_timeout_s if the cluster is autoscaling."
            ) from None
        return pg

    def _actor_name(self, i: int) -> str:
        """``metaray-<run>-inner-<i>``; a replacement of an actor that died for good gets ``-r<n>`` appended (its
        n-th replacement): Ray releases a dead actor's name only some time after reporting it dead, so reusing the
        name at once could fail with "already exists"."""
        n = self._replacements[i]
        return f"metaray-{self.run_name}-inner-{i}" + (f"-r{n}" if n else "")

    def _start_actor(self, i: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        c = self.config
        env = dict(ZERO_COPY_ENV)
        if c.keep_host_memory:  # every thread of the actor allocates from the heap keep_host_memory pads (host_memory.py)
            env["MALLOC_ARENA_MAX"] = "1"
        if c.num_gpus_per_worker == 0:
            env["CUDA_VISIBLE_DEVICES"] = ""  # Ray >= 2.60 no longer hides GPUs from zero-GPU actors
        try:
            return _actor_class().options(
                name=self._actor_name(i),
                num_cpus=c.num_cpus_per_worker,
                num_gpus=c.num_gpus_per_worker,
                max_restarts=c.max_restarts,
                max_task_retries=0,  # re-dispatch from the driver instead (see the module docstring)
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=self._bundle_offset + i),
                runtime_env={"env_vars": env},
            ).remote(self._spec_ref, i, c.num_cpus_per_worker, c.num_gpus_per_worker, c.progress, self.run_name,
                     c.task_threads, c.keep_host_memory)
        except ValueError as e:
            if "already" in str(e).lower():
                raise PoolError(
                    f"a Ray actor named {self._actor_name(i)!r} already exists in this namespace: run names must be "
                    "unique among live pools (shut the other pool down or choose another run_name)"
                ) from e
            raise

    def _wait_ready(self, workers) -> dict[int, dict]:
        ray = self._ray
        refs = {i: self._actors[i].info.remote() for i in workers}
        out = {}
        for i, ref in refs.items():
            try:
                out[i] = ray.get(ref, timeout=max(60.0, self.config.placement_timeout_s))
            except ray.exceptions.RayActorError as e:
                raise PoolError(f"inner-learner actor {self._actor_name(i)} failed to start: {e}") from e
            except ray.exceptions.GetTimeoutError as e:
                raise PoolError(f"inner-learner actor {self._actor_name(i)} did not start in time") from e
        return out

    def _note_incarnation(self, w: int, incarnation: str) -> int:
        """1 if worker w is a new process since we last heard from it (restart or replacement), else 0. A new
        process is in no process group: the next reduction builds a new one."""
        if incarnation != self._incarnation[w]:
            self._incarnation[w] = incarnation
            self._events.append(f"worker {w} restarted (new process)")
            if self._group is not None:
                self._group.stale = True
            return 1
        return 0

    def _recover(self, w: int) -> int:
        """Waits until worker w answers again (Ray restarts it) or replaces it (restarts exhausted). Returns the
        restarts counted."""
        ray = self._ray
        deadline = time.monotonic() + max(60.0, self.config.placement_timeout_s)
        while True:
            try:
                info = ray.get(self._actors[w].info.remote(), timeout=max(1.0, deadline - time.monotonic()))
                self.pids[w] = info["pid"]
                return self._note_incarnation(w, info["incarnation"])
            except ray.exceptions.ActorUnavailableError:
                pass  # restarting
            except ray.exceptions.ActorDiedError:
                if self._replacements[w] >= max(1, self.config.max_restarts):
                    raise PoolError(
                        f"worker {w} ({self._actor_name(w)}) died and was already replaced {self._replacements[w]} "
                        "times; giving up (see the Ray logs of that actor for why it dies)"
                    ) from None
                dead = self._actor_name(w)
                self._replacements[w] += 1  # a fresh name: the dead actor's may not be released yet
                self._events.append(f"worker {w} is dead for good: replaced ({dead} -> {self._actor_name(w)})")
                self._actors[w] = self._start_actor(w)
            except ray.exceptions.GetTimeoutError:
                pass
            if time.monotonic() > deadline:
                raise PoolError(f"worker {w} ({self._actor_name(w)}) did not come back after dying")
            time.sleep(0.05)

    # ---- the step ----------------------------------------------------------------------------------------

    def _x_ref(self, x: Params):
        # NumPy arrays are zero-copy in Ray's object store whatever the flags; other dtypes go as tensors
        # (zero-copy too with RAY_ENABLE_ZERO_COPY_TORCH_TENSORS, set by metaray.cluster before importing ray).
        payload = {}
        for k, v in x.items():
            v = v.detach().cpu().contiguous()
            payload[k] = v.numpy() if v.dtype in (torch.float32, torch.float64, torch.float16) else v
        return self._ray.put(payload)

    def _run(self, x, keys, mode, snapshot, keep):
        self._x_box = (self._x_ref(x),)  # kept for the reduction, which may compute a lost actor's tasks again
        return StepDispatch(self, self._x_box, keys, mode, snapshot, keep).run()

    # ---- the reduction (collective.py) -------------------------------------------------------------------

    def _reduces_on_actors(self) -> bool:
        # stateless solvers only: a stateful step already returns every task's new state to the driver. Stragglers
        # do not hold the reduction up: its calls run on the actors' reduction thread (collective.REDUCE), beside a
        # losing copy still running on the main one.
        return self.config.reduction == "actors" and not self.stateful

    def _reduce_on_actors(self, x, keys, results, weights):
        return reduce_on_actors(self, x, keys, results, weights)

    # ---- states ------------------------------------------------------------------------------------------

    def _gather_states(self):
        ray = self._ray
        out: dict[TaskId, Any] = {}
        for w in range(self.num_workers):
            try:
                states = ray.get(self._actors[w].get_states.remote())
            except self._lost:
                self._recover(w)
                states = {}
            for tid, s in states.items():
                if owner((tid[0], 0, tid[1]), self.num_workers) == w:
                    out[tid] = s
        # tasks whose owner lost them since the last snapshot: the snapshot is the newest copy there is
        for tid in self._has_state:
            if tid not in out and tid in self._snapshot:
                out[tid] = self._snapshot[tid]
        return out

    def _scatter_states(self, tasks):
        ray = self._ray
        parts: list[dict] = [{} for _ in range(self.num_workers)]
        for tid, s in tasks.items():
            parts[owner((tid[0], 0, tid[1]), self.num_workers)][tid] = s
        ray.get([self._actors[w].set_states.remote(parts[w]) for w in range(self.num_workers)])

    def _update_states(self, restore, drop):
        # Sent after the failed step's calls on each actor handle, so Ray runs it after any still in flight.
        ray = self._ray
        parts: list[tuple[dict, list]] = [({}, []) for _ in range(self.num_workers)]
        for tid, s in restore.items():
            parts[owner((tid[0], 0, tid[1]), self.num_workers)][0][tid] = s
        for tid in drop:
            parts[owner((tid[0], 0, tid[1]), self.num_workers)][1].append(tid)
        ray.get([self._actors[w].update_states.remote(*parts[w]) for w in range(self.num_workers)])

    # ---- utilities ---------------------------------------------------------------------------------------

    def workers(self) -> dict[int, dict]:
        """Each actor's ``info()`` now (asks them): device, threads, calls cancelled, tasks prefetched; also
        refreshes ``worker_info``."""
        ray = self._ray
        self.worker_info = dict(enumerate(ray.get([a.info.remote() for a in self._actors])))
        return dict(self.worker_info)

    def worker_pids(self) -> list[int]:
        """The current process id of each actor (asks them)."""
        ray = self._ray
        self.pids = list(ray.get([a.pid.remote() for a in self._actors]))
        return list(self.pids)

    def broadcast(self, x: Params) -> float:
        """Puts x once and has every actor fetch and convert it; returns the seconds taken (a benchmark probe)."""
        ray = self._ray
        t0 = time.perf_counter()
        box = (self._x_ref(x),)
        ray.get([a.receive.remote(box) for a in self._actors])
        return time.perf_counter() - t0

    def shutdown(self) -> None:
        """Kills the actors, removes the placement group, and disconnects Ray if this pool connected it."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        ray = getattr(self, "_ray", None)
        if ray is None or not ray.is_initialized():
            return
        for a in getattr(self, "_actors", []):
            if a is not None:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001 (already gone)
                    pass
        if getattr(self, "_pg", None) is not None and getattr(self, "_owns_pg", True):
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001
                pass
        if getattr(self, "_group", None) is not None:
            self._group.close()
        if getattr(self, "_owns_ray", False):
            ray.shutdown()
