"""The reduction among the actors: one step's aggregated hypergradient from the gradients the actors kept.

The arithmetic is in reduce.py; this module runs it on the actors of a ``WorkerPool`` and recovers from
failures. The driver receives one gradient (O(d)), whatever the number of tasks B and actors W.

Every rule is sharded by coordinate, a reduce-scatter through the object store. The R actors holding tasks
cut the flattened gradient's d coordinates into R contiguous blocks (``reduce.blocks``); each actor sends block
r of its share to actor r (``slice_kept``: actor r fetches it directly, never through the driver), actor r
combines block r of everyone's share, and the driver concatenates the R combined blocks (4d bytes in all). Each
actor sends and receives about one share (d·(R-1)/R coordinates) whatever R, in parallel, so the time is flat in
R where a pairwise tree would pay log2 R rounds of a whole partial sum each.

- mean, weighted: an actor's share is its exact partial sum Σ_i round(c_i g_i 2^e) in int64 (reduce.py), on a
  grid the driver fixes from every task's max |c_i g_i|; actor r adds the int64 blocks and decodes them
  (``sum_slice``). int64 sums are exact in any order: the split of tasks and coordinates changes no bit.
- median, trimmed_mean: an actor's share is its tasks' gradients stacked to [tasks, d]; actor r sorts block r
  of every task's gradient (``robust_slice``), so per-actor memory is O(B·d/R). Coordinates are independent
  under these rules, so the blocks give the bits of the driver-side result.

Why Ray's object store and not a torch.distributed or ray.util.collective group (docs/scaling.md): a group is
fixed at creation, so a restarted or replaced actor means rebuilding it on every rank, while here a round is
just a few actor calls, and a failed one is started again. The exactness comes from the int64 sum, not from the
transport: a ring allreduce of the same int64 partials would give the same bits.

A failure anywhere restarts the round: an actor that died since computing its tasks computes them again (same
key, same x: the same gradients); the others still hold theirs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from ..solvers.core import Params
from .config import LINEAR_AGGREGATIONS
from .errors import PoolError
from .reduce import blocks, coefficients, exponents, unflatten

if TYPE_CHECKING:
    from .pool import WorkerPool


class _RoundInterrupted(Exception):
    """A reduction round that must start again (an actor lost its gradients while it ran)."""


def reduce_on_actors(pool: WorkerPool, x: Params, keys: list[tuple], results: list[dict],
                     weights: list[float] | None) -> tuple[Params, int, int]:
    """The step's aggregated gradient by ``pool.config.aggregation``, computed by the actors that hold the tasks'
    gradients (``results[i]["worker"]`` kept task i). Returns (gradient, restarts, retries)."""
    ray, rule, actors = pool._ray, pool.config.aggregation, pool._actors
    dtype = getattr(torch, pool.spec.dtype)
    mine: dict[int, list[int]] = {}
    for i, r in enumerate(results):
        mine.setdefault(r["worker"], []).append(i)
    ranks = sorted(mine)  # the actors holding tasks; rank r combines coordinate block r
    linear = rule in LINEAR_AGGREGATIONS
    if linear:
        coefs = coefficients(rule, len(keys), weights)
        exps = exponents([r["grad_maxabs"] for r in results], coefs)
    d = sum(v.numel() for v in x.values())
    starts = [a for a, _ in blocks(d, len(ranks))]

    def submit(w: int) -> list:
        args = ([keys[i] for i in mine[w]], len(ranks)) + (([coefs[i] for i in mine[w]], exps) if linear else ())
        return actors[w].slice_kept.options(num_returns=1 + len(ranks)).remote(*args)

    def finish(parts: dict[int, list]) -> Params:
        if linear:
            refs = [actors[w].sum_slice.remote(exps, starts[r], *[parts[v][r] for v in ranks]) for r, w in enumerate(ranks)]
        else:
            refs = [actors[w].robust_slice.remote(rule, pool.config.trim_fraction, *[parts[v][r] for v in ranks])
                    for r, w in enumerate(ranks)]
        return unflatten(torch.cat(ray.get(refs)), {k: (v.shape, dtype) for k, v in x.items()})

    return _round(pool, mine, keys, submit, finish)


def _round(pool: WorkerPool, mine: dict[int, list[int]], keys: list[tuple], submit: Callable[[int], list],
           finish: Callable[[dict[int, list]], Params]) -> tuple[Params, int, int]:
    """One reduction over the gradients the actors kept: ``submit(w)`` starts worker w's part (refs: [status,
    payload...]), ``finish(payloads by worker)`` combines them. Workers that lost their gradients compute them
    again; a worker dying mid-way restarts the round. Returns (gradient, restarts, retries)."""
    ray = pool._ray
    restarts = retries = 0
    for _ in range(1 + 2 * pool.num_workers * max(1, pool.config.max_restarts)):
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
    rs: list[Any]
    while True:
        try:
            rs = ray.get([pool._actors[w].run_ref.remote(pool._x_box, k, "train", None, False, True, False, True)
                          for k in keys])
            break
        except pool._lost:
            restarts += pool._recover(w)
    bad = [r for r in rs if r["error"]]
    if bad:  # it was finite a moment ago: a non-deterministic problem or solver
        raise PoolError(f"task {bad[0]['key']} computed again on worker {w} for the reduction failed: "
                        f"{bad[0].get('message', bad[0]['error'])}")
    return restarts + pool._note_incarnation(w, rs[0]["incarnation"])
