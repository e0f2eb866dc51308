"""The reduction among the actors: one step's aggregated hypergradient from the gradients the actors kept.

The arithmetic is in reduce.py; this module runs it on the actors of a ``WorkerPool`` and recovers from
failures. The driver receives one gradient (O(d)), whatever the number of tasks B and actors W.

Every rule is sharded by coordinate, a reduce-scatter. The actors cut the flattened gradient's d coordinates
into contiguous blocks (``reduce.blocks``), one per combining actor; each actor sends block r of its share to
actor r (never through the driver), actor r combines block r of everyone's share, and the driver concatenates
the combined blocks (4d bytes in all). Each actor sends and receives about one share (d·(R-1)/R coordinates)
whatever the number R of combining actors, in parallel, so the time is flat in R where a pairwise tree would
pay log2 R rounds of a whole partial sum each.

- mean, weighted: an actor's share is its exact partial sum Σ_i round(c_i g_i 2^e) in int64 (reduce.py), on a
  grid the driver fixes from every task's max |c_i g_i|; actor r adds the int64 blocks and decodes them.
  int64 sums are exact in any order: the split of tasks and coordinates changes no bit.
- median, trimmed_mean: an actor's share is its tasks' gradients stacked to [tasks, d]; actor r sorts block r
  of every task's gradient, so per-actor memory is O(B·d/R). Coordinates are independent under these rules,
  so the blocks give the bits of the driver-side result.

Two transports move the blocks (``ClusterConfig.collective``), with the same bits:

- Ray's object store (``_through_object_store``): the R actors holding tasks put their blocks
  (``slice_kept``) and actor r fetches block r of the others (``sum_slice``, ``robust_slice``): two rounds of
  actor calls. On one node this is shared memory.
- a torch.distributed process group among all W actors, gloo or NCCL (``_through_group``, group.py): one call
  per actor, one all-to-all inside it. What a GPU cluster needs (NCCL moves device memory over NVLink and
  InfiniBand, where the object store would copy every block to the host and through TCP).

A failure anywhere restarts the round: an actor that died since computing its tasks computes them again (same
key, same x: the same gradients); the others still hold theirs. A process group is fixed at creation, so with
the group transport any failure also builds a new generation of the group, on every actor, before the round
runs again.
"""
from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..solvers.core import Params
from .config import LINEAR_AGGREGATIONS
from .errors import PoolError
from .reduce import blocks, coefficients, exponents, unflatten

if TYPE_CHECKING:
    from .ray_pool import WorkerPool


# The actors' concurrency group for the reduction's calls: its own thread, so a reduction never waits behind a
# straggler's losing copy still running on the actor's main thread (dispatch.py); the main thread keeps running
# the task calls one at a time, in submission order.
REDUCE = "reduce"


def _reducing(method: Any) -> Any:
    """An actor method, called on the actor's reduction thread."""
    return method.options(concurrency_group=REDUCE)


def _attempts(pool: WorkerPool) -> range:
    """The bound on a reduction's rounds (and on a group's builds): every actor may die and be recovered
    ``max_restarts`` times, twice over (once during the round, once while its tasks are computed again), before
    the step gives up with a PoolError instead of looping."""
    return range(1 + 2 * pool.num_workers * max(1, pool.config.max_restarts))


class _NoGroup(Exception):
    """The first build of an automatically chosen process group failed (the object store is used instead)."""


class _RoundInterrupted(Exception):
    """A reduction round that must start again (an actor lost its gradients while it ran)."""


def reduce_on_actors(pool: WorkerPool, x: Params, keys: list[tuple], results: list[dict],
                     weights: list[float] | None) -> tuple[Params, int, int]:
    """The step's aggregated gradient by ``pool.config.aggregation``, computed by the actors that hold the tasks'
    gradients (``results[i]["worker"]`` kept task i). Returns (gradient, restarts, retries)."""
    rule = pool.config.aggregation
    mine: dict[int, list[int]] = {}
    for i, r in enumerate(results):
        mine.setdefault(r["worker"], []).append(i)
    coefs = exps = None
    if rule in LINEAR_AGGREGATIONS:
        coefs = coefficients(rule, len(keys), weights)
        exps = exponents([r["grad_maxabs"] for r in results], coefs)
    like = {k: (v.shape, getattr(torch, pool.spec.dtype)) for k, v in x.items()}
    if pool._group is not None:
        try:
            return _through_group(pool, like, keys, mine, coefs, exps)
        except _NoGroup as e:  # collective="auto" chose NCCL, and the actors cannot build it: keep running
            warnings.warn(f"metaray: the actors could not build an NCCL group ({e}); reducing through Ray's object "
                          "store instead (set ClusterConfig.collective to choose)", RuntimeWarning, stacklevel=3)
            pool._events.append("no NCCL group could be built: reduction through the object store from now on")
            pool._group = None
    return _through_object_store(pool, like, keys, mine, coefs, exps)


def _through_object_store(pool: WorkerPool, like: dict, keys: list[tuple], mine: dict[int, list[int]],
                          coefs: list[float] | None, exps: dict[str, int] | None) -> tuple[Params, int, int]:
    """The reduce-scatter as Ray calls: ``slice_kept`` on the R actors holding tasks, then ``sum_slice`` /
    ``robust_slice`` of block r on the r-th of them, fetching the others' blocks directly."""
    ray, actors, c = pool._ray, pool._actors, pool.config
    ranks = sorted(mine)  # the actors holding tasks; rank r combines coordinate block r
    d = sum(math.prod(shape) for shape, _ in like.values())
    starts = [a for a, _ in blocks(d, len(ranks))]

    def submit(w: int) -> list:
        # the block actor w combines itself stays on it (own=): only the others' blocks travel
        return actors[w].slice_kept.options(num_returns=1 + len(ranks), concurrency_group=REDUCE).remote(
            [keys[i] for i in mine[w]], len(ranks), [coefs[i] for i in mine[w]] if coefs else None, exps,
            own=ranks.index(w))

    def finish(parts: dict[int, list]) -> Params:
        if coefs:
            refs = [_reducing(actors[w].sum_slice).remote(exps, starts[r], *[parts[v][r] for v in ranks])
                    for r, w in enumerate(ranks)]
        else:
            refs = [_reducing(actors[w].robust_slice).remote(c.aggregation, c.trim_fraction, *[parts[v][r] for v in ranks])
                    for r, w in enumerate(ranks)]
        combined = ray.get(refs)
        if any(b is None for b in combined):  # an actor restarted between the two calls: its own block is gone
            raise _RoundInterrupted("a combining actor lost its own block")
        return unflatten(torch.cat(combined), like)

    return _round(pool, mine, keys, submit, finish)


def _through_group(pool: WorkerPool, like: dict, keys: list[tuple], mine: dict[int, list[int]],
                   coefs: list[float] | None, exps: dict[str, int] | None) -> tuple[Params, int, int]:
    """The reduce-scatter as one all-to-all in the pool's process group (group.py): every actor calls
    ``reduce_in_group`` at once and answers its coordinate block; the driver concatenates them.

    Any failure (an actor that died, lost its gradients, or a collective that broke) marks the group stale:
    the lost gradients are computed again, a new generation of the group is built, and the round runs again."""
    ray, actors, c, state = pool._ray, pool._actors, pool.config, pool._group
    counts = [len(mine.get(w, [])) for w in range(pool.num_workers)]
    restarts = retries = 0
    for _ in _attempts(pool):
        restarts += _ensure_group(pool)
        calls = {w: _reducing(actors[w].reduce_in_group).remote(
            state.generation, [keys[i] for i in mine.get(w, [])], counts,
            None if coefs is None else [coefs[i] for i in mine.get(w, [])], exps, c.aggregation, c.trim_fraction)
            for w in range(pool.num_workers)}
        parts: dict[int, torch.Tensor] = {}
        for w, ref in calls.items():
            try:
                status, block = ray.get(ref)
            except pool._lost as e:
                pool._events.append(f"worker {w} died during the reduction ({type(e).__name__}): reduction restarted")
                restarts += pool._recover(w)
                status, block = {"missing": [keys[i] for i in mine.get(w, [])], "incarnation": pool._incarnation[w]}, None
            restarts += pool._note_incarnation(w, status["incarnation"])
            if status.get("error"):
                pool._events.append(f"worker {w}: {status['error']}")
            if status["missing"]:  # restarted since computing them: it computes its tasks again
                retries += len(status["missing"])
                pool._events.append(f"worker {w} lost its tasks' gradients before the reduction: computed again")
                restarts += _recompute(pool, w, status["missing"])
            if block is not None:
                parts[w] = block
        if len(parts) == pool.num_workers:
            return unflatten(torch.cat([parts[w] for w in range(pool.num_workers)]), like), restarts, retries
        state.stale = True
        pool._events.append("the reduction's collective did not complete on every actor: group rebuilt, round run again")
    raise PoolError("the reduction among the actors kept failing; the step's events: " + "; ".join(pool._events[-3:]))


def _ensure_group(pool: WorkerPool) -> int:
    """Builds a new generation of the pool's process group if the current one may be broken: every actor
    joins at once; if one died meanwhile, it is recovered and the build runs again. Returns the restarts counted."""
    ray, state, restarts = pool._ray, pool._group, 0
    failure: BaseException | None = None
    for _ in _attempts(pool):
        if not state.stale:
            return restarts
        host, port = state.address(ray.util.get_node_ip_address())
        state.generation += 1
        refs = [_reducing(a.join_group).remote(host, port, state.generation, rank, pool.num_workers, state.backend, state.timeout_s)
                for rank, a in enumerate(pool._actors)]
        try:
            for w, ref in enumerate(refs):
                restarts += pool._note_incarnation(w, ray.get(ref))
        except pool._lost as e:
            failure = e
            for w in range(pool.num_workers):
                restarts += pool._recover(w)
            continue
        except ray.exceptions.RayTaskError as e:  # a rank could not join (a peer gone while joining, a timeout)
            if state.builds == 0 and pool.config.collective == "auto":
                raise _NoGroup(str(e).strip().splitlines()[-1]) from e
            failure = e
            continue
        state.builds += 1
        state.stale = False
    raise PoolError(f"the actors could not build their {state.backend} process group: {failure}")


def _round(pool: WorkerPool, mine: dict[int, list[int]], keys: list[tuple], submit: Callable[[int], list],
           finish: Callable[[dict[int, list]], Params]) -> tuple[Params, int, int]:
    """One reduction over the gradients the actors kept: ``submit(w)`` starts worker w's part (refs: [status,
    payload...]), ``finish(payloads by worker)`` combines them. Workers that lost their gradients compute them
    again; a worker dying mid-way restarts the round. Returns (gradient, restarts, retries)."""
    ray = pool._ray
    restarts = retries = 0
    for _ in _attempts(pool):
        try:
            calls = {w: submit(w) for w in mine}
            parts: dict[int, list] = {}
            for w, (status_ref, *payload) in calls.items():
                status = ray.get(status_ref)
                restarts += pool._note_incarnation(w, status["incarnation"])
                if status["missing"]:  # restarted since: it computes its tasks again, then takes part
                    retries += len(mine[w])
                    pool._events.append(f"worker {w} lost its tasks' gradients before the reduction: computed again")
                    restarts += _recompute(pool, w, [keys[i] for i in mine[w]])
                    status_ref, *payload = submit(w)
                    if ray.get(status_ref)["missing"]:
                        raise _RoundInterrupted(f"worker {w} lost its gradients again")
                parts[w] = payload
            return finish(parts), restarts, retries
        except (*pool._lost, _RoundInterrupted) as e:
            pool._events.append(f"worker died during the reduction ({type(e).__name__}): reduction restarted")
            for w in mine:
                restarts += pool._recover(w)
    raise PoolError("the reduction among the actors kept failing; the step's events: " + "; ".join(pool._events[-3:]))


def _recompute(pool: WorkerPool, w: int, keys: list[tuple]) -> int:
    """Worker w computes ``keys`` again at this step's x and keeps the gradients; returns the restarts counted."""
    ray, restarts = pool._ray, 0
    rs: list[Any] = []
    for _ in _attempts(pool):
        try:
            rs = ray.get([pool._actors[w].run_ref.remote(pool._x_box, k, "train", None, False, True, False, True)
                          for k in keys])
            break
        except pool._lost:
            restarts += pool._recover(w)
    else:
        raise PoolError(f"worker {w} kept dying while it computed its tasks again for the reduction")
    bad = [r for r in rs if r["error"]]
    if bad:  # it was finite a moment ago: a non-deterministic problem or solver
        raise PoolError(f"task {bad[0]['key']} computed again on worker {w} for the reduction failed: "
                        f"{bad[0].get('message', bad[0]['error'])}")
    return restarts + pool._note_incarnation(w, rs[0]["incarnation"])
