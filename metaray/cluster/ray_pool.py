"""The Ray pool: inner learners as named Ray actors in one placement group, and the Ray cluster they run on.

``WorkerPool`` is pool.py's step (``_PoolBase``) on Ray: it places ``metaray-<run>-inner-<i>`` actors (``-r<n>``
for the n-th replacement of one that died for good), puts x in the object store once a step, hands the step's
tasks to dispatch.py, the reduction to collective.py, and recovers lost actors (pool.py's docstring: faults).
``init_ray`` joins the cluster a run names or starts a local, loopback-only one.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Any

import torch

from ..solvers.core import Params, check_params
from .collective import reduce_on_actors
from .config import ClusterConfig, WorkerSpec, collective_backend
from .dispatch import StepDispatch
from .errors import PlacementTimeoutError, PoolError
from .group import GroupState
from .pool import _PoolBase
from .worker import TaskId, owner

ZERO_COPY_ENV = {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}
LOOPBACK = "127.0.0.1"  # the node IP of a local cluster started by init_ray

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
    # flag through its own runtime_env (_start_actor, below).
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
        """x's way to the actors at the start of a step, alone: put once, then every actor's fetch and private copy.
        Returns the seconds taken (a benchmark probe: benchmarks/scale_sim.py, cluster_scaling.py)."""
        ray = self._ray
        x = check_params(x, "outer params x")
        t0 = time.perf_counter()
        box = (self._x_ref(x),)
        counts = ray.get([a.receive.remote(box) for a in self._actors])
        seconds = time.perf_counter() - t0
        d = sum(v.numel() for v in x.values())
        if any(n != d for n in counts):
            raise PoolError(f"broadcast: the actors received {counts} elements of x, not {d} each")
        return seconds

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
