"""The inner learner: what one actor (or the in-process pool) does with a task key.

An ``InnerLearner`` is built from a ``WorkerSpec``: it imports plugin modules, sets its torch threads, picks
its device, builds the problem, the solver and the task source locally, and then turns
(x, task key) into one task's hypergradient. The Ray actor is this class wrapped by ``ray.remote``; the
in-process pool calls it directly, so both paths run the same code.

Task identity and ownership. A key is (split, step, index); the step changes every outer step while the task
it names persists (a warm-started inner problem, FSLA's tracked v, a learned optimizer's truncation, a
persistent HPO task). So a task's state is keyed by its **task id (split, index)**, and the task is owned by
worker ``index % num_workers``: its state lives on that actor, across outer steps, and is copied to the
driver (snapshots, ``state_dict``) so it survives the actor.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import time
import uuid
import warnings
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from ..solvers import make, memory
from ..solvers.threads import TaskThreads
from ..solvers.core import NonFiniteError, Params, check_grad_finite, check_same_keys
from ..tasks.precision import check_precision, with_precision
from . import group, reduce
from .config import WorkerSpec
from .host_memory import host_memory_kept, host_page_faults, keep_host_memory
from .loader import TaskLoader, move

TaskId = tuple[str, int]


def task_id(key: Any) -> TaskId:
    """The identity of the task a key names, stable across outer steps: (split, index)."""
    if not (isinstance(key, tuple) and len(key) == 3):
        raise TypeError(f"task key must be a tuple (split, step, index), got {key!r}")
    return (key[0], key[2])


def owner(key: Any, num_workers: int) -> int:
    """The worker that owns (computes, and keeps the state of) the task a key names."""
    return task_id(key)[1] % num_workers


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _move_problem(problem: Any, device: torch.device, dtype: torch.dtype) -> None:
    """Moves the modules and tensors a problem holds (e.g. ModelProblem's model and buffers) to the worker's
    device and dtype, so x, tasks and the problem agree."""
    for name, value in list(vars(problem).items()):
        if isinstance(value, nn.Module):
            value.to(device=device, dtype=dtype)
        elif isinstance(value, (Tensor, dict)):
            setattr(problem, name, move(value, device, dtype))


def _private(tree: Any) -> Any:
    """A writable copy of the tensors in a state that came through the object store (read-only views there)."""
    if isinstance(tree, Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _private(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(_private(v) for v in tree)
    return tree


def _out_of_memory(e: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator's."""
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)


def _to_cpu(tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree


def resolve_device(requested: str, num_gpus: float, gpu_ids: list | None) -> torch.device:
    """"auto": cuda when this worker was given a GPU (and torch sees one), else cpu."""
    if requested == "cpu":
        return torch.device("cpu")
    has_gpu = num_gpus > 0 and torch.cuda.is_available() and (gpu_ids is None or len(gpu_ids) > 0)
    if requested == "cuda":
        if not has_gpu:
            raise RuntimeError(f"WorkerSpec.device='cuda' but this worker has no usable GPU (num_gpus={num_gpus}, "
                               f"torch.cuda.is_available()={torch.cuda.is_available()})")
        return torch.device("cuda")
    return torch.device("cuda" if has_gpu else "cpu")


class InnerLearner:
    """Per-task hypergradients for the tasks one worker owns. Holds the stateful solvers' per-task state."""

    def __init__(
        self,
        spec: WorkerSpec,
        worker: int = 0,
        *,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        gpu_ids: list | None = None,
        set_threads: bool = True,
        progress: bool = False,
        run_name: str = "",
        task_threads: int = 1,
    ):
        for module in spec.imports:
            importlib.import_module(module)
        if set_threads:
            # Ray leaves workers at 1 intra-op thread unless told; use the CPUs this actor was given.
            torch.set_num_threads(max(1, int(num_cpus)))
        self.worker = worker
        self.device = resolve_device(spec.device, num_gpus, gpu_ids)
        if self.device.type == "cuda" and 0 < num_gpus < 1:
            # a fractional GPU is a memory budget: keep this process inside its share
            torch.cuda.set_per_process_memory_fraction(float(num_gpus), device=torch.cuda.current_device())
        self.dtype: torch.dtype = getattr(torch, spec.dtype)
        with _default_dtype(self.dtype), torch.device(self.device):
            self.problem = spec.problem()
        _move_problem(self.problem, self.device, self.dtype)
        check_precision(spec.precision, spec.dtype, self.device)
        self.problem = with_precision(self.problem, spec.precision, self.device)
        self.solver = make(spec.solver, **spec.solver_options)
        self.stateful = bool(getattr(self.solver, "stateful", False))
        # ClusterConfig.task_threads: a call's several tasks computed on threads of their own (solvers/threads.py),
        # the actor's CPUs shared among them, instead of vmapped
        self._threads = (TaskThreads(self.problem, task_threads, intra_op=max(1, int(num_cpus) // task_threads))
                         if task_threads > 1 else None)
        self.tasks = TaskLoader(spec.source, self.device, self.dtype)  # loader.py: tasks loaded ahead, on request
        self.states: dict[TaskId, Any] = {}
        self._track_memory = True  # off once the CPU meter is refused (torch.func.grad inside the solver)
        self.incarnation = uuid.uuid4().hex  # changes when the process is restarted: lost state is detectable
        self._x_id: Any = None
        self._x: Params | None = None
        self._kept: dict[Any, Params] = {}  # this step's task gradients, kept here for the reduction (slice_kept)
        self._own_block: Tensor | None = None  # the block of its share this worker combines itself (slice_kept)
        self._group: Any = None  # this process's rank in the pool's process group (join_group), if any
        self._group_generation, self._group_backend = -1, "gloo"
        self.cancelled = 0  # calls that stopped early because the driver cancelled them (a straggler's losing copy)
        self._bar = None
        if progress:
            from ray.experimental import tqdm_ray

            self._bar = tqdm_ray.tqdm(desc=f"metaray {run_name} worker {worker}", total=None)

    # ---- small queries -------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "pid": os.getpid(),
            "incarnation": self.incarnation,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "stateful": self.stateful,
            "memory_method": memory.PeakMemory(self.device).method,
            "cancelled": self.cancelled,
            "prefetch": self.tasks.stats(),
            "task_threads": self._threads.threads if self._threads is not None else 1,
            "host_memory_kept": host_memory_kept(),
            # the process's page faults so far: a count that grows by d/1024 per gradient-sized tensor a step says
            # freed host memory went back to the OS (host_memory.py)
            "host_page_faults": host_page_faults(),
        }

    def pid(self) -> int:
        return os.getpid()

    def get_states(self) -> dict[TaskId, Any]:
        return {tid: _to_cpu(s) for tid, s in self.states.items()}

    def set_states(self, states: Mapping[TaskId, Any]) -> None:
        self.states = {tuple(tid): _private(move(s, self.device, self.dtype)) for tid, s in states.items()}

    def update_states(self, states: Mapping[TaskId, Any], drop: list[TaskId]) -> None:
        """Puts back the given task states and forgets ``drop`` (rolling back a failed step)."""
        for tid in drop:
            self.states.pop(tuple(tid), None)
        self.states.update({tuple(tid): _private(move(s, self.device, self.dtype)) for tid, s in states.items()})

    # ---- x -----------------------------------------------------------------------------------------------

    def set_x(self, x: Mapping[str, Any], x_id: Any = None) -> Params:
        """x on this worker's device and dtype, converted once per outer step (``x_id`` names the step's x)."""
        if x_id is not None and x_id == self._x_id and self._x is not None:
            return self._x
        # A private copy: tensors that come out of the object store are read-only shared memory, and a solver
        # must be free to build on x without ever touching the driver's copy.
        self._x = {
            k: (v.to(self.device, self.dtype, copy=True) if isinstance(v, Tensor)
                else torch.tensor(v, device=self.device, dtype=self.dtype))
            for k, v in x.items()
        }
        self._x_id = x_id
        self._kept.clear()  # a new step: gradients kept for an earlier one (a late straggler's) are not wanted
        self._own_block = None
        return self._x

    # ---- the reduction (cluster/reduce.py) ---------------------------------------------------------------

    def _grad_fields(self, x: Params, keys: list, grads: list[Params], keep: bool) -> list[dict[str, Any]]:
        """The results' gradients: the tensors themselves (to the CPU), or, with ``keep``, only their per-tensor
        max |g| (read from the device in one transfer for all of ``keys``) while the gradients stay here on the
        device until the reduction."""
        if not keep:
            return [{"grad": _to_cpu(grad)} for grad in grads]
        for key, grad in zip(keys, grads):
            check_same_keys(x, grad, "outer params x", f"hypergradient of task {key}")
            self._kept[key] = {k: v.detach() for k, v in grad.items()}
        return [{"grad": None, "grad_maxabs": m} for m in reduce.max_abs_many(grads)]

    def _kept_status(self, keys: list) -> dict[str, Any]:
        """What a reduction call answers first: the keys whose gradients this process does not hold (it was
        restarted since computing them) and this process's incarnation."""
        return {"missing": [key for key in keys if key not in self._kept], "incarnation": self.incarnation}

    def _share(self, keys: list, coefs: list[float] | None, exps: Mapping[str, int] | None) -> Tensor:
        """This worker's share of a reduction, flattened in x's key order: with ``coefs`` and ``exps`` (mean,
        weighted) its exact partial sum Σ_i round(c_i g_i 2^e) as one int64 vector [d] (reduce.py); without
        (median, trimmed_mean) its tasks' gradients stacked to [len(keys), d]. No keys: zeros, or no rows."""
        d = sum(v.numel() for v in self._x.values())
        if coefs is None:
            if not keys:
                return torch.empty(0, d, dtype=self.dtype, device=self.device)
            return torch.stack([torch.cat([self._kept[key][k].reshape(-1) for k in self._x]) for key in keys])
        # encoded straight into one flat int64 buffer: its blocks are views, no copies
        if not keys:
            return torch.zeros(d, dtype=torch.int64, device=self.device)
        flat = torch.empty(d, dtype=torch.int64, device=self.device)
        views, offset = {}, 0
        for k, v in self._x.items():
            views[k] = flat[offset : offset + v.numel()].view(v.shape)
            offset += v.numel()
        reduce.encode_sum([self._kept[key] for key in keys], coefs, exps, views)
        return flat

    def slice_kept(self, keys: list, ranks: int, coefs: list[float] | None = None,
                   exps: Mapping[str, int] | None = None, own: int | None = None) -> tuple:
        """(status, block_0, ..., block_{ranks-1}): this worker's share (``_share``) cut into ``ranks``
        contiguous blocks of coordinates (``reduce.blocks``); block r goes to the worker that combines
        coordinates r (``sum_slice`` for mean and weighted, ``robust_slice`` for median and trimmed_mean).
        Block ``own``, the one this worker combines itself, stays here, on its device, and is answered as None:
        it never goes through the object store (with one actor, that is the whole share).

        Keys not kept here (the process was restarted since) are listed in status["missing"], and no block is
        made. The kept gradients stay until the next step's x arrives, so a failed reduction can run again."""
        status = self._kept_status(keys)
        if status["missing"]:
            return (status, *[None] * ranks)
        flat = self._share(keys, coefs, exps)
        cut = [flat[..., a:b] for a, b in reduce.blocks(flat.shape[-1], ranks)]
        self._own_block = None if own is None else cut[own]
        return (status, *[None if r == own else _to_cpu(c.contiguous()) for r, c in enumerate(cut)])

    def _with_own(self, blocks: tuple) -> list[Tensor] | None:
        """Every worker's block of one coordinate range, on this device: None in ``blocks`` stands for the one
        ``slice_kept`` left here. None if it is gone (this process was restarted since): the round runs again."""
        if any(b is None for b in blocks) and self._own_block is None:
            return None
        return [self._own_block if b is None else b.to(self.device) for b in blocks]

    def sum_slice(self, exps: Mapping[str, int], start: int, *blocks: Tensor | None) -> Tensor | None:
        """Coordinates start.. of the linear rule's result: the int64 sum of every worker's block of them
        (fetched here, worker to worker; None: this worker's own, kept by ``slice_kept``), decoded to this
        worker's dtype with each coordinate's tensor exponent. None if the own block is gone."""
        if (parts := self._with_own(blocks)) is None:
            return None
        total = parts[0]  # never added to in place: it may be this worker's own block, a view of its share
        for b in parts[1:]:
            total = total + b
        sizes = {k: v.numel() for k, v in self._x.items()}
        return _to_cpu(reduce.decode_flat(total, start, sizes, exps, self.dtype))

    def robust_slice(self, rule: str, trim_fraction: float, *blocks: Tensor | None) -> Tensor | None:
        """One column block of the robust rule: ``blocks`` are every worker's rows of it (fetched here; None:
        this worker's own). None if the own block is gone."""
        if (parts := self._with_own(blocks)) is None:
            return None
        return _to_cpu(reduce.robust(torch.cat(parts), rule, trim_fraction))

    # ---- the reduction through a process group (cluster/group.py) ---------------------------------------

    def join_group(self, host: str, port: int, generation: int, rank: int, world: int, backend: str,
                   timeout_s: float) -> str:
        """Joins generation ``generation`` of the pool's process group as ``rank`` (every rank must call this
        at once); returns this process's incarnation."""
        node_ip = self._node_ip()
        self._group = None  # the previous generation's group, if any, is never used again
        self._group = group.join(host, port, generation, rank, world, backend, node_ip, timeout_s)
        self._group_generation, self._group_backend = generation, backend
        return self.incarnation

    def reduce_in_group(self, generation: int, keys: list, counts: list[int], coefs: list[float] | None,
                        exps: Mapping[str, int] | None, rule: str, trim_fraction: float) -> tuple[dict, Tensor | None]:
        """(status, block): this rank's coordinate block of the step's reduced gradient, through the group.

        Every rank of the group calls this at once. ``keys`` are the tasks whose gradients this worker kept,
        ``counts`` the number of tasks of every rank; ``coefs``/``exps`` as for ``slice_kept`` (None: the
        robust ``rule``). status["missing"]: keys this process does not hold; status["error"]: why no block
        came (not in this generation, a rank not ready, the collective failed); the driver then rebuilds the
        group and runs the round again."""
        status = self._kept_status(keys)
        g = self._group
        if g is None or self._group_generation != generation:
            return {**status, "error": f"not in generation {generation} of the group"}, None
        rank, world = g.rank(), g.size()
        on = self.device if self._group_backend == "nccl" else torch.device("cpu")
        try:
            if not group.all_ready(g, not status["missing"], on):
                return {**status, "error": "a rank lacks gradients it computed"}, None
            share = self._share(keys, coefs, exps).to(on)
            d = share.shape[-1]
            cuts = reduce.blocks(d, world)
            width = [b - a for a, b in cuts]
            rows = share.shape[0] if coefs is None else 1  # one row: the int64 partial sum
            # a piece per rank, in rank order: the int64 partial's blocks are already that (contiguous ranges)
            send = share if coefs is not None else torch.cat([share[:, a:b].reshape(-1) for a, b in cuts])
            recv = group.all_to_all(g, send, [rows * w for w in width],
                                    [(n if coefs is None else 1) * width[rank] for n in counts])
            # every rank's rows of block `rank`, in rank order
            mine = recv.view(sum(counts) if coefs is None else world, width[rank])
            if coefs is None:
                block = reduce.robust(mine.to(self.device), rule, trim_fraction)
            else:
                sizes = {k: v.numel() for k, v in self._x.items()}
                block = reduce.decode_flat(mine.sum(dim=0), cuts[rank][0], sizes, exps, self.dtype)
        except RuntimeError as e:  # a rank died or hung: this generation is broken
            self._group = None
            return {**status, "error": f"the collective failed: {str(e).splitlines()[0][:300]}"}, None
        return status, _to_cpu(block)

    def _node_ip(self) -> str:
        """The address other ranks reach this process at (a Ray actor: its node's IP)."""
        return "127.0.0.1"

    # ---- tasks loaded ahead (loader.py) ------------------------------------------------------------------

    def prefetch(self, keys: list) -> int:
        """Loads these tasks onto this worker's device ahead of the call that needs them (the dispatcher sends
        it on the actor's prefetch thread, beside the call computing now); returns how many it loaded."""
        return self.tasks.fetch(list(keys))

    # ---- one task ----------------------------------------------------------------------------------------

    def run(
        self,
        x: Params,
        key: Any,
        mode: str = "train",
        *,
        restore: tuple | None = None,
        expect_state: bool = False,
        commit: bool = True,
        snapshot: bool = False,
        keep: bool = False,
    ) -> dict[str, Any]:
        """One task's hypergradient (mode "train") or evaluation (mode "eval") at x.

        restore:      (state,) to start this task from (a snapshot the driver holds), instead of local state
        expect_state: the driver knows this task has state; if this worker has none (it was restarted) and no
                      restore is given, answer ``{"error": "state_lost"}`` rather than silently starting over
        commit:       keep the new state here (False for a straggler's backup run on a non-owner)
        snapshot:     return the new state (CPU) so the driver can keep a copy
        keep:         keep the hypergradient here for ``slice_kept`` and return its per-tensor max |g| instead
        Non-finite losses or hypergradients answer ``{"error": "nonfinite", ...}``; no state is kept.
        """
        t0 = time.perf_counter()
        tid = task_id(key)
        state = None
        if self.stateful:
            if restore is not None:
                state = _private(move(restore[0], self.device, self.dtype))
            elif tid in self.states:
                state = self.states[tid]
            elif expect_state and mode == "train":
                return {"key": key, "error": "state_lost", "worker": self.worker, "incarnation": self.incarnation}
        task = self.tasks.take(key)
        if self._cancelled():  # a straggler's losing copy (dispatch.py): its answer is no longer wanted
            self.cancelled += 1
            return {"key": key, "error": "cancelled", "worker": self.worker, "incarnation": self.incarnation}
        try:
            peak = None
            if mode == "train":
                hg, peak = self._hypergrad(x, task, state)
                check_grad_finite(hg.grad, "hypergradient", key)
            else:
                hg = self.solver.evaluate(self.problem, x, task, state)
            for name in ("outer_loss", "inner_loss"):
                if not torch.isfinite(torch.tensor(float(getattr(hg, name)))):
                    raise NonFiniteError(f"{name} is not finite ({getattr(hg, name)})", where=name, task=key)
        except NonFiniteError as e:
            return {
                "key": key,
                "error": "nonfinite",
                "message": str(e),
                "where": e.where,
                "worker": self.worker,
                "incarnation": self.incarnation,
            }
        if self.stateful and mode == "train" and commit:
            self.states[tid] = hg.state
        if self._bar is not None:
            self._bar.update(1)
        return {
            "key": key,
            "error": None,
            **(self._grad_fields(x, [key], [hg.grad], keep)[0] if mode == "train" else {"grad": None}),
            "outer_loss": float(hg.outer_loss),
            "inner_loss": float(hg.inner_loss),
            "metrics": {k: float(v) for k, v in (hg.metrics or {}).items() if isinstance(v, (int, float, Tensor))},
            "state": (_to_cpu(hg.state),) if (snapshot and self.stateful and mode == "train") else None,
            "seconds": time.perf_counter() - t0,
            "peak_memory_bytes": peak,
            "worker": self.worker,
            "incarnation": self.incarnation,
        }

    # ---- several tasks at once (ClusterConfig.tasks_per_batch) -------------------------------------------

    def run_batch(self, x: Params, keys: list, mode: str = "train", *, snapshot: bool = False,
                  tasks_per_batch: int | str = 1, keep: bool = False) -> list[dict[str, Any]]:
        """``run`` for several keys, in order: one ``solver.hypergrad_batch`` call for the lot (the solver
        batches them where it can, else loops). The results are ``run``'s, one per key; each task's "seconds" is
        its share of the batch. A NonFiniteError in the batch reruns its tasks one at a time, so each task gets
        its own verdict. Stateful solvers and evaluation run task by task.

        ``tasks_per_batch="auto"``: the first call with two tasks or more measures the loop and the batched
        call (the task threads, with ``task_threads`` > 1) on its own tasks, returning the loop's results, and
        keeps whichever was faster per task for every later call of this worker (``batch_choice`` says which,
        the mode and the times).
        """
        keys = list(keys)
        if mode != "train" or self.stateful or len(keys) < 2 or self.batch_choice.get("batched") is False:
            return [self.run(x, k, mode, snapshot=snapshot, keep=keep) for k in keys]
        if tasks_per_batch == "auto" and "batched" not in self.batch_choice:
            return self._choose_batching(x, keys, snapshot, keep)
        t0 = time.perf_counter()
        tasks = [self.tasks.take(k) for k in keys]
        try:
            hgs = self._hypergrad_chunks(x, tasks)
        except NonFiniteError:
            return [self.run(x, k, mode, snapshot=snapshot, keep=keep) for k in keys]
        share = (time.perf_counter() - t0) / len(keys)
        if self._bar is not None:
            self._bar.update(len(keys))
        grads = self._grad_fields(x, keys, [hg.grad for hg in hgs], keep)
        return [{
            "key": key,
            "error": None,
            **grad,
            "outer_loss": float(hg.outer_loss),
            "inner_loss": float(hg.inner_loss),
            "metrics": {k: float(v) for k, v in (hg.metrics or {}).items() if isinstance(v, (int, float, Tensor))},
            "state": None,
            "seconds": share,
            "peak_memory_bytes": None,  # the CPU meter cannot watch torch.func; a batch has no per-task peak
            "worker": self.worker,
            "incarnation": self.incarnation,
        } for key, hg, grad in zip(keys, hgs, grads)]

    @property
    def batch_choice(self) -> dict[str, Any]:
        return self.__dict__.setdefault("_batch_choice", {})

    def _hypergrad_chunks(self, x: Params, tasks: list) -> list:
        """``solver.hypergrad_batch`` over ``tasks`` in chunks of at most ``batch_choice["max_tasks"]`` (all at
        once until a batch has run out of memory). A chunk that runs out of device memory is halved and computed
        again, down to one task (the loop), and the size that fitted is kept for this worker's later calls, so a
        ``tasks_per_batch`` too large for the device costs one failed attempt, not the step.

        With ``task_threads`` > 1 the tasks are spread over this worker's task threads instead (each task a
        ``solver.hypergrad`` call of its own)."""
        if self._threads is not None:
            return self._threads.hypergrads(self.solver, x, tasks)
        out: list = []
        while len(out) < len(tasks):
            size = min(self.batch_choice.get("max_tasks", len(tasks)), len(tasks) - len(out))
            try:
                out.extend(self.solver.hypergrad_batch(self.problem, x, tasks[len(out):len(out) + size]))
            except RuntimeError as e:
                if size == 1 or not _out_of_memory(e):
                    raise
                self.batch_choice["max_tasks"] = half = (size + 1) // 2
                warnings.warn(f"worker {self.worker}: a batch of {size} tasks ran out of memory on {self.device} "
                              f"({str(e).splitlines()[0][:120]}); computing at most {half} at once from now on",
                              RuntimeWarning, stacklevel=2)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return out

    def _choose_batching(self, x: Params, keys: list, snapshot: bool, keep: bool) -> list[dict[str, Any]]:
        """Times the loop and the batched call (twice: the first vmapped call traces) on these tasks; keeps the
        faster for this worker. Returns the loop's results, so the step is the loop's whatever is chosen."""
        t0 = time.perf_counter()
        results = [self.run(x, k, "train", snapshot=snapshot, keep=keep) for k in keys]
        loop = (time.perf_counter() - t0) / len(keys)
        if any(r["error"] for r in results):
            return results  # decide on a later, healthy step
        tasks = [self.tasks.load(k) for k in keys]
        try:
            self._hypergrad_chunks(x, tasks)
            t0 = time.perf_counter()
            self._hypergrad_chunks(x, tasks)
            batched = (time.perf_counter() - t0) / len(keys)
        except NonFiniteError:
            return results
        self.batch_choice.update(batched=batched < loop, loop_s_per_task=loop, batched_s_per_task=batched, tasks=len(keys),
                                 mode="threads" if self._threads is not None else "vmap")
        return results

    def _cancelled(self) -> bool:
        """Whether the driver has cancelled the call running now (only Ray actors can be cancelled)."""
        return False

    def close(self) -> None:
        """Stops the task threads, if any."""
        if self._threads is not None:
            self._threads.close()

    def memory_plan(self, x: Mapping[str, Any], key: Any) -> Any:
        """The solver's memory plan (checkpoint spacing, predicted peak) for the task ``key`` at x, from a probe
        of one inner step; raises ``MemoryBudgetError`` when its ``memory_budget_mb`` cannot be met. None for
        solvers without one (they do not differentiate through an unroll)."""
        plan = getattr(self.solver, "memory_plan", None)
        if plan is None:
            return None
        return plan(self.problem, self.set_x(x), self.tasks.load(key))

    def _hypergrad(self, x: Params, task: Any, state: Any) -> tuple[Any, int | None]:
        """The task's hypergradient and the peak memory of the call in bytes (solvers/memory.py: the CUDA
        allocator's peak on a GPU, the bytes autograd holds for the backward pass on the CPU; None where the
        CPU meter cannot run, and from then on for this worker)."""
        hg, peak, _ = memory.measure(lambda: self.solver.hypergrad(self.problem, x, task, state), self.device,
                                     track=self._track_memory)
        if peak is None:
            self._track_memory = False
        return hg, peak


class RayInnerLearner(InnerLearner):
    """The actor body: resolves the step's x reference once per step, then runs tasks like InnerLearner."""

    def __init__(self, spec: WorkerSpec | bytes, worker: int, num_cpus: float, num_gpus: float, progress: bool,
                 run_name: str, task_threads: int = 1, keep_freed_host_memory: bool = True):
        import pickle
        import warnings

        if keep_freed_host_memory:  # before the problem is built: every allocation after this is reused (host_memory.py)
            keep_host_memory()

        if isinstance(spec, bytes):
            spec = pickle.loads(spec)

        import ray

        # Results (gradients, states) are detached, contiguous and never written after they are returned: the
        # condition under which Ray's zero-copy tensor path is safe, so its per-call warning is noise here.
        warnings.filterwarnings("ignore", message="Zero-copy tensor serialization is enabled")
        # Tensors that arrive from the object store are read-only views of shared memory; metaray never writes
        # them (set_x takes a private copy), so torch's warning about non-writable arrays says nothing here.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        gpu_ids = ray.get_gpu_ids() if num_gpus > 0 else []
        super().__init__(spec, worker, num_cpus=num_cpus, num_gpus=num_gpus, gpu_ids=gpu_ids, progress=progress,
                         run_name=run_name, task_threads=task_threads)

    def info(self) -> dict[str, Any]:
        import ray

        return {**super().info(), "node_id": ray.get_runtime_context().get_node_id()}

    def _node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def _cancelled(self) -> bool:
        import ray

        # Ray cannot interrupt a running call of a regular actor; it sets this flag for the call to read
        return ray.get_runtime_context().is_canceled()

    def run_ref(self, x_box: tuple, key: Any, mode: str, restore: tuple | None, expect_state: bool, commit: bool,
                snapshot: bool, keep: bool = False) -> dict[str, Any]:
        """``x_box = (ref,)``: a reference nested in a tuple is not resolved by Ray on every call; it is
        fetched (zero-copy) and converted once per step and per actor."""
        import ray

        ref = x_box[0]
        x = self._x if (self._x is not None and self._x_id == ref.hex()) else self.set_x(ray.get(ref), ref.hex())
        return self.run(x, key, mode, restore=restore, expect_state=expect_state, commit=commit, snapshot=snapshot,
                        keep=keep)

    def run_batch_ref(self, x_box: tuple, keys: list, mode: str, snapshot: bool, tasks_per_batch: int | str,
                      keep: bool = False) -> list[dict[str, Any]]:
        """``run_batch`` with x by reference, like ``run_ref``."""
        import ray

        ref = x_box[0]
        x = self._x if (self._x is not None and self._x_id == ref.hex()) else self.set_x(ray.get(ref), ref.hex())
        return self.run_batch(x, keys, mode, snapshot=snapshot, tasks_per_batch=tasks_per_batch, keep=keep)

    def receive(self, x_box: tuple) -> int:
        """Fetches and converts x only (the broadcast benchmark); returns the number of elements received."""
        import ray

        ref = x_box[0]
        x = self.set_x(ray.get(ref), ref.hex())
        return sum(v.numel() for v in x.values())
