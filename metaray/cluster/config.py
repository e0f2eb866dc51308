"""What a worker pool is built from: the worker spec (what each actor builds locally) and the cluster config
(how many actors, where, how results are combined, how faults are handled). Both are frozen dataclasses,
validated on construction with messages that say what is valid.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..solvers.core import BilevelProblem
from ..tasks.precision import check_precision

STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK")
AGGREGATIONS = ("mean", "weighted", "median", "trimmed_mean")
LINEAR_AGGREGATIONS = ("mean", "weighted")  # reduced by an exact sum on the actors (reduce.py)
REDUCTIONS = ("actors", "driver")
SCHEDULINGS = ("dynamic", "static")
COLLECTIVES = ("auto", "gloo", "nccl", "object_store")
# collective="auto" on CPUs: gloo from this many actors on. Measured in benchmarks/scale_sim.py (4 Ray nodes,
# d = 10M): the object store's reduction took 0.56 s at 2 actors against gloo's 0.81 s, and 1.44 / 3.43 s at 8 / 16
# actors against gloo's 1.00 / 1.84 s.
GLOO_FROM_WORKERS = 8
DTYPES = ("float32", "float64")
DEVICES = ("auto", "cpu", "cuda")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything an inner-learner actor needs, small and picklable: each actor builds the problem, the solver
    and the task source locally, so an outer step ships only task keys and a reference to x, never modules or
    data.

    problem:        zero-argument factory returning a BilevelProblem (e.g. ``functools.partial(ModelProblem,
                    mlp([1, 40, 40, 1]), "mse")`` — the model is pickled once with the spec, not per step)
    solver:         registry name, built as ``metaray.solvers.make(solver, **solver_options)``
    solver_options: options of that solver
    source:         a TaskSource; workers call ``source.sample(key)`` locally
    dtype:          "float32" | "float64": the default dtype while the problem is built; x is cast to it
    device:         "auto" (cuda if the actor got a GPU, else cpu) | "cpu" | "cuda"
    precision:      "fp32" | "bf16": the inner loss's forward under bf16 autocast, params and gradients fp32
                    (metaray.tasks.precision; bf16 needs dtype "float32")
    imports:        modules each worker imports before making the solver (plugin solvers that register
                    themselves on import)
    """

    problem: Callable[[], BilevelProblem]
    solver: str
    solver_options: Mapping[str, Any] = field(default_factory=dict)
    source: Any = None
    dtype: str = "float32"
    device: str = "auto"
    imports: tuple[str, ...] = ()
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if not callable(self.problem):
            raise TypeError(
                f"WorkerSpec.problem must be a zero-argument factory returning a BilevelProblem (e.g. "
                f"functools.partial(ModelProblem, model, 'mse')), got {type(self.problem).__name__}"
            )
        if isinstance(self.problem, BilevelProblem):
            raise TypeError("WorkerSpec.problem must be a factory, not a problem instance: wrap it, e.g. functools.partial(MyProblem, ...)")
        if not isinstance(self.solver, str) or not self.solver:
            raise TypeError(f"WorkerSpec.solver must be a solver registry name (str), got {self.solver!r}")
        if not isinstance(self.solver_options, Mapping):
            raise TypeError(f"WorkerSpec.solver_options must be a mapping, got {type(self.solver_options).__name__}")
        if not callable(getattr(self.source, "sample", None)):
            raise TypeError(f"WorkerSpec.source must be a TaskSource with sample(key), got {type(self.source).__name__}")
        if self.dtype not in DTYPES:
            raise ValueError(f"WorkerSpec.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"WorkerSpec.device must be one of {list(DEVICES)}, got {self.device!r}")
        check_precision(self.precision, self.dtype)
        if isinstance(self.imports, str) or not all(isinstance(m, str) for m in self.imports):
            raise TypeError(f"WorkerSpec.imports must be a tuple of module names, got {self.imports!r}")
        object.__setattr__(self, "imports", tuple(self.imports))
        object.__setattr__(self, "solver_options", dict(self.solver_options))

    def check_picklable(self) -> None:
        """Actors receive the spec pickled; fail here, with the field named, rather than deep inside Ray."""
        import cloudpickle

        for f in dataclasses.fields(self):
            try:
                cloudpickle.dumps(getattr(self, f.name))
            except Exception as e:  # noqa: BLE001 (any pickling failure is reported the same way)
                raise TypeError(f"WorkerSpec.{f.name} is not picklable ({type(e).__name__}: {e}); use a module-level "
                                "class or functools.partial instead of a lambda or local closure") from e


@dataclass(frozen=True)
class ClusterConfig:
    """How a WorkerPool runs.

    num_workers:          inner-learner actors
    num_cpus_per_worker:  CPUs per actor (also its torch thread count, at least 1)
    num_gpus_per_worker:  GPUs per actor; fractional shares one GPU and caps each process's CUDA memory at that
                          fraction
    strategy:             placement-group strategy: PACK | SPREAD | STRICT_SPREAD | STRICT_PACK
    placement_timeout_s:  how long to wait for the placement group before failing with what was asked and what
                          the cluster has (a group that cannot fit never fails by itself)
    aggregation:          mean | weighted (needs weights) | median (coordinate-wise) | trimmed_mean
    trim_fraction:        fraction of tasks dropped at each end per coordinate by trimmed_mean, in [0, 0.5)
    step_timeout_s:       straggler deadline per task, counted from when the task started on its actor (not
                          from its submission); a task not back by then gets a copy on another actor, the tasks
                          queued behind it move, and the copy that loses is cancelled (None: no deadline)
    max_restarts:         Ray restarts of a dead actor; past that the actor is replaced, up to this many times
    address:              ray.init(address=...); None joins the cluster of ``ray job submit`` (RAY_ADDRESS) or
                          starts a local one
    metrics:              export metaray's metrics through ray.util.metrics
    progress:             per-actor progress bars (ray.experimental.tqdm_ray)
    state_snapshot_every: stateful solvers: the driver keeps a copy of every task's state every this many steps
                          (1: a dead actor's tasks resume exactly; 0: only at state_dict())
    tasks_per_batch:      tasks an actor computes in one ``solver.hypergrad_batch`` call (vmapped where the
                          solver and problem batch): 1 = one task per call (the default); n > 1 = chunks of n of
                          the actor's tasks; "auto" = all of its tasks in one call if a measurement on its first
                          step says batching is faster there, else one at a time. Stateful solvers, evaluation
                          and pools with ``step_timeout_s`` (stragglers are re-dispatched per task) run one at a
                          time. A batch that runs out of device memory is split in halves and computed again,
                          and the size that fitted is kept for that actor (one warning each time it shrinks).
    reduction:            "actors" (default): with a stateless solver, each actor keeps its tasks' gradients on
                          its device and the actors reduce them among themselves (cluster/reduce.py: exact int64
                          partial sums for mean and weighted, coordinate blocks for median and trimmed_mean), so
                          the driver receives one gradient; "driver": every task's gradient goes to the driver,
                          which aggregates them (what stateful solvers always do).
                          Both give the same bits.
    scheduling:           "dynamic" (default): a stateless solver's tasks go to whichever actor is free (two in
                          flight per actor); "static": task i of a step always goes to actor ``owner(key)``, as
                          stateful solvers always do (the owner holds the task's state). The reduction is exact
                          in any order, so which actor computed a task changes no bit of the result.
    collective:           how the actors' reduction moves its blocks (``reduction = "actors"``): "gloo" a
                          torch.distributed gloo group among the actors (CPU tensors), "nccl" an NCCL group
                          (each actor must have a whole GPU of its own: NCCL refuses two ranks on one GPU),
                          "object_store" Ray's object store, worker to worker; "auto" (default): nccl where
                          every actor has a whole GPU; else gloo from GLOO_FROM_WORKERS actors on, and the
                          object store below (it moves W² block objects a step, gloo one all-to-all, but on one
                          node it is shared memory, which gloo's TCP does not beat: docs/scaling.md). All give
                          the same bits.
    collective_timeout_s: how long a rank of the group waits for the others (joining, or in a collective)
                          before the round is given up and run again; a rank that dies is noticed at once.
    task_threads:         threads an actor computes a call's tasks on, at once (solvers/threads.py: the task loop
                          in parallel, each thread with its own copy of the problem and num_cpus_per_worker //
                          task_threads intra-op threads), instead of vmapping them; needs calls of several tasks
                          (tasks_per_batch > 1 or "auto": then the measurement compares the threads with the
                          one-thread loop). Small graphs (conv4 on a CPU) gain: one intra-op thread per task keeps
                          the cores busier than two per task. 1 (default): off. Same bits for any split of tasks.
    prefetch:             load an actor's next call's tasks (sample, cast, copy to its device) on a thread of its
                          own while the call ahead computes (cluster/loader.py; on a GPU through pinned memory and a
                          non-blocking copy on a side stream): True | False | "auto" (default: on for actors that
                          compute on a GPU, off on CPUs, where the loading thread would share the computation's
                          cores; True also suits a CPU actor whose sampling waits on storage). Same bits either way.
    keep_host_memory:     keep freed host memory in the driver's and every actor's process for reuse
                          (cluster/host_memory.py: glibc's mmap threshold raised and its heap padded by 1 GiB), so
                          gradient-sized tensors above 32 MiB (d > 8M in float32) stop page-faulting anew every
                          step: 1.75-1.9x faster fomaml steps at d = 10M on a CPU. A process's resident memory then
                          stays near its peak (plus up to 1 GiB) instead of shrinking after each step. True
                          (default) | False. Same bits either way.
    """

    num_workers: int = 2
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    strategy: str = "PACK"
    placement_timeout_s: float = 60.0
    aggregation: str = "mean"
    trim_fraction: float = 0.1
    step_timeout_s: float | None = None
    max_restarts: int = 3
    address: str | None = None
    metrics: bool = True
    progress: bool = False
    state_snapshot_every: int = 1
    tasks_per_batch: int | str = 1
    reduction: str = "actors"
    scheduling: str = "dynamic"
    collective: str = "auto"
    collective_timeout_s: float = 120.0
    prefetch: bool | str = "auto"
    task_threads: int = 1
    keep_host_memory: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, valid: str) -> ValueError:
            return ValueError(f"ClusterConfig.{name} must be {valid}, got {getattr(self, name)!r}")

        if not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool) or self.num_workers < 1:
            raise bad("num_workers", "an int >= 1")
        if not _is_number(self.num_cpus_per_worker) or not (0 < self.num_cpus_per_worker < math.inf):
            raise bad("num_cpus_per_worker", "a number > 0")
        g = self.num_gpus_per_worker
        if not _is_number(g) or not (0 <= g < math.inf) or (g > 1 and g != int(g)):
            raise bad("num_gpus_per_worker", "a number >= 0: a fraction in (0, 1) to share a GPU, or a whole number")
        if self.strategy not in STRATEGIES:
            raise bad("strategy", f"one of {list(STRATEGIES)}")
        if not _is_number(self.placement_timeout_s) or not (0 < self.placement_timeout_s < math.inf):
            raise bad("placement_timeout_s", "a number of seconds > 0")
        if self.aggregation not in AGGREGATIONS:
            raise bad("aggregation", f"one of {list(AGGREGATIONS)}")
        if not _is_number(self.trim_fraction) or not (0 <= self.trim_fraction < 0.5):
            raise bad("trim_fraction", "a number in [0, 0.5)")
        if self.step_timeout_s is not None and (not _is_number(self.step_timeout_s) or not (0 < self.step_timeout_s < math.inf)):
            raise bad("step_timeout_s", "None or a number of seconds > 0")
        if not isinstance(self.max_restarts, int) or isinstance(self.max_restarts, bool) or self.max_restarts < 0:
            raise bad("max_restarts", "an int >= 0")
        if self.address is not None and (not isinstance(self.address, str) or not self.address):
            raise bad("address", "None or a Ray address string such as 'auto' or 'ray://host:10001'")
        for name in ("metrics", "progress", "keep_host_memory"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")
        if not isinstance(self.state_snapshot_every, int) or isinstance(self.state_snapshot_every, bool) or self.state_snapshot_every < 0:
            raise bad("state_snapshot_every", "an int >= 0")
        b = self.tasks_per_batch
        if b != "auto" and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
            raise bad("tasks_per_batch", 'an int >= 1 or "auto"')
        if self.reduction not in REDUCTIONS:
            raise bad("reduction", f"one of {list(REDUCTIONS)}")
        if self.scheduling not in SCHEDULINGS:
            raise bad("scheduling", f"one of {list(SCHEDULINGS)}")
        if self.collective not in COLLECTIVES:
            raise bad("collective", f"one of {list(COLLECTIVES)}")
        if self.collective == "nccl" and self.num_gpus_per_worker < 1:
            raise ValueError(
                "ClusterConfig.collective='nccl' needs a whole GPU per actor (num_gpus_per_worker >= 1, got "
                f"{self.num_gpus_per_worker!r}): NCCL refuses two ranks on one GPU. Actors sharing a GPU use "
                "collective='gloo' or 'object_store'")
        t = self.collective_timeout_s
        if not _is_number(t) or not (0 < t < math.inf):
            raise bad("collective_timeout_s", "a number of seconds > 0")
        if not (isinstance(self.prefetch, bool) or self.prefetch == "auto"):
            raise bad("prefetch", 'True, False or "auto"')
        n = self.task_threads
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise bad("task_threads", "an int >= 1")
        if n > 1 and self.tasks_per_batch == 1:
            raise ValueError(f"ClusterConfig.task_threads={n} computes a call's tasks in parallel, but "
                             "tasks_per_batch=1 sends one task per call; set tasks_per_batch to an int > 1 or \"auto\"")


def collective_backend(spec: WorkerSpec, config: ClusterConfig) -> str | None:
    """The process group's backend for the actors' reduction ("gloo" or "nccl"), None for the object store."""
    import torch

    have = torch.distributed.is_available()
    if config.collective == "auto":
        if have and config.num_gpus_per_worker >= 1 and spec.device != "cpu":
            return "nccl"
        return "gloo" if have and config.num_workers >= GLOO_FROM_WORKERS else None
    if config.collective == "object_store":
        return None
    if not have:
        raise ValueError(f"ClusterConfig.collective={config.collective!r} needs torch.distributed, which this torch "
                         "build lacks; use collective='object_store'")
    return config.collective


def check_spec_for_config(spec: WorkerSpec, config: ClusterConfig) -> None:
    """Cross checks between what the actors must build and the resources they get."""
    if spec.device == "cuda" and config.num_gpus_per_worker == 0:
        raise ValueError("WorkerSpec.device='cuda' needs ClusterConfig.num_gpus_per_worker > 0 (or use device='auto')")
    if config.collective == "nccl" and spec.device == "cpu":
        raise ValueError("ClusterConfig.collective='nccl' reduces on the GPUs, but WorkerSpec.device='cpu'; "
                         "use collective='gloo' (or 'auto') for CPU actors")
