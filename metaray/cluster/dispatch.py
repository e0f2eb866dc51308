"""Dispatch and recovery: one step's tasks onto the Ray actors, until every task has an answer.

Scheduling (``ClusterConfig.scheduling``, ``tasks_per_batch``):

- dynamic (stateless solvers, the default): two tasks in flight per actor, one computing and one queued behind
  it (hiding the round trip); the next task goes to whichever actor answers. Who computed what changes no bit
  of the result: the aggregation is in key order, or exact in any order (reduce.py).
- static (stateful solvers, or asked for): every task goes to its owner (``worker.owner``: where its state
  lives), all at once.
- ``tasks_per_batch > 1``: one ``run_batch`` call per chunk of an owner's tasks.

Stragglers (``step_timeout_s``). The dispatcher keeps each actor's queue as Ray runs it (an actor runs the calls
of one caller in submission order), so a task's deadline counts from when it *started* (the call ahead of it on
that actor answered), never from its submission: a task waiting behind a slow one is not a straggler itself. A
task past its deadline gets a copy on the least loaded other actor; the tasks queued behind it on the slow
actor move with it, and that actor gets no new task until it answers. The first answer wins. Copies no longer
needed are cancelled (``ray.cancel``: a queued call never runs; a running one stops at its next check, once
its task is sampled). A copy still running when the step ends stays in its actor's queue, so the next step
neither waits behind it nor counts its tasks' deadlines from their submission.

Prefetch (``ClusterConfig.prefetch``): whenever a call becomes the next one an actor will run, its task keys go
to that actor's prefetch thread, which loads them onto the actor's device while the call ahead computes
(loader.py).

Stateful solvers: only the owner's copy of a task keeps its new state (a copy elsewhere is a "backup", started
from the driver's snapshot), so the owner's copy is never cancelled. A task whose snapshot is older than its
last step is never copied: the copy would start from a stale state and silently give other numbers.

Faults: a call that fails because its actor (or node) died waits for the actor's restart or replacement
(``WorkerPool._recover``) and is submitted again; a stateful task resumes from the driver's snapshot. A worker
that lost a task's state answers "state_lost" and gets the snapshot. A non-finite result is retried once.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .loader import PREFETCH
from .worker import owner, task_id

if TYPE_CHECKING:
    from .ray_pool import WorkerPool

IN_FLIGHT = 2  # dynamic scheduling: tasks per actor at once (one computing, one queued behind it)


@dataclass
class Attempt:
    """One call on one actor: a task (``index``) or a chunk of tasks (``chunk``, run_batch)."""

    index: int | None   # position of the key in the step; None: a copy left running by an earlier step
    worker: int
    backup: bool = False             # a stateful task's copy on a non-owner: its new state is not kept there
    chunk: list[int] | None = None   # run_batch: the positions of its keys (index is the first)
    started: float | None = None     # when the actor began it (monotonic s); None while queued behind another
    overdue: bool = False            # past its deadline, and dealt with
    cancelled: bool = False          # its answer is no longer wanted (ray.cancel sent)
    prefetched: bool = False         # its tasks were sent to its actor's prefetch thread (loader.py)

    @property
    def indices(self) -> list[int]:
        return [] if self.index is None else (self.chunk or [self.index])


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class StepDispatch:
    """Runs one step's ``keys`` on a ``WorkerPool``'s actors: ``run()`` returns (results, restarts, retries)."""

    def __init__(self, pool: WorkerPool, x_box: tuple, keys: list[tuple], mode: str, snapshot: bool, keep: bool):
        self.pool, self.ray, self.c = pool, pool._ray, pool.config
        self.x_box, self.keys, self.mode, self.snapshot, self.keep = x_box, keys, mode, snapshot, keep
        self.stateful_train = pool.stateful and mode == "train"
        self.results: list[dict | None] = [None] * len(keys)
        # each actor's calls in submission order (the order it runs them), including copies left by earlier steps
        self.queues: list[dict[Any, Attempt]] = pool._queues
        self.restarts = self.retries = 0
        self.tries: dict[tuple, int] = {}
        self.todo: collections.deque[int] = collections.deque()  # dynamic scheduling: tasks not yet submitted
        self.dynamic = False

    # ---- the actors' queues --------------------------------------------------------------------------------

    def _submit(self, i: int, w: int, restore: tuple | None = None, backup: bool = False) -> None:
        key = self.keys[i]
        expect = self.stateful_train and task_id(key) in self.pool._has_state
        ref = self.pool._actors[w].run_ref.remote(self.x_box, key, self.mode, restore, expect, not backup,
                                                  self.snapshot, self.keep)
        self._enqueue(ref, Attempt(i, w, backup))

    def _submit_chunk(self, chunk: list[int], w: int) -> None:
        ref = self.pool._actors[w].run_batch_ref.remote(self.x_box, [self.keys[i] for i in chunk], self.mode,
                                                        self.snapshot, self.c.tasks_per_batch, self.keep)
        self._enqueue(ref, Attempt(chunk[0], w, chunk=chunk))

    def _enqueue(self, ref: Any, a: Attempt) -> None:
        q = self.queues[a.worker]
        if not q:
            a.started = time.monotonic()  # nothing ahead of it: it starts now (give or take the round trip)
        q[ref] = a
        self._prefetch_next(a.worker)

    def _dequeue(self, ref: Any) -> Attempt:
        for w, q in enumerate(self.queues):
            if ref in q:
                head = next(iter(q)) is ref
                a = q.pop(ref)
                if head and q:  # the actor moves on to the next call
                    nxt = next(iter(q.values()))
                    nxt.started = nxt.started or time.monotonic()
                    self._prefetch_next(w)
                return a
        raise KeyError(ref)

    def _prefetch_next(self, w: int) -> None:
        """``ClusterConfig.prefetch``: the tasks of the call actor w runs after the one it runs now go to its
        prefetch thread, which loads them onto its device meanwhile (loader.py). Only the next call's: a
        queue's later calls may still move elsewhere, and their tasks would hold device memory for nothing."""
        if not self.pool._prefetch[w]:
            return
        later = iter(self.queues[w].values())
        next(later, None)  # the call running now
        a = next((b for b in later if not b.cancelled), None)
        if a is not None and a.indices and not a.prefetched:
            a.prefetched = True
            hint = self.pool._actors[w].prefetch.options(concurrency_group=PREFETCH)
            self.pool._hints.append(hint.remote([self.keys[i] for i in a.indices]))

    def _live(self, w: int) -> int:
        return sum(not a.cancelled for a in self.queues[w].values())

    def _blocked(self, w: int, now: float) -> bool:
        """Worker w is busy past the deadline with the call at the head of its queue."""
        head = next(iter(self.queues[w].values()), None)
        t = self.c.step_timeout_s
        return t is not None and head is not None and head.started is not None and now - head.started >= t

    def _free_workers(self, exclude: int | None = None) -> list[int]:
        """Workers not stuck behind a straggler, least loaded first."""
        now = time.monotonic()
        ws = [w for w in range(self.pool.num_workers) if w != exclude and not self._blocked(w, now)]
        return sorted(ws, key=lambda w: (self._live(w), w))

    def _cancel(self, ref: Any, a: Attempt) -> None:
        a.cancelled = True
        try:
            self.ray.cancel(ref)
        except Exception:  # noqa: BLE001 (already finished, or its actor is gone: nothing to stop)
            pass

    def _commits(self, a: Attempt) -> bool:
        """The call keeps a task's new state on its actor: it must run to the end."""
        return self.stateful_train and not a.backup

    # ---- the step ----------------------------------------------------------------------------------------

    def run(self) -> tuple[list[dict], int, int]:
        pool, c, n = self.pool, self.c, len(self.keys)
        self._forget_finished_leftovers()
        size = pool._batch_size(self.mode, n)
        self.dynamic = size == 1 and c.scheduling == "dynamic" and not pool.stateful
        if size > 1:
            for w in range(pool.num_workers):
                for chunk in chunks([i for i, k in enumerate(self.keys) if owner(k, pool.num_workers) == w], size):
                    self._submit(chunk[0], w) if len(chunk) == 1 else self._submit_chunk(chunk, w)
        elif self.dynamic:
            self.todo.extend(range(n))
        else:
            for i, key in enumerate(self.keys):
                self._submit(i, owner(key, pool.num_workers))
        try:
            while any(r is None for r in self.results):
                self._feed()
                refs = [ref for q in self.queues for ref in q]
                if not refs:  # cannot happen: every unanswered task is queued somewhere or waits in todo
                    raise RuntimeError(f"metaray internal error: tasks {[k for k, r in zip(self.keys, self.results) if r is None]} "
                                       "are unanswered and nothing is in flight")
                ready, _ = self.ray.wait(refs, num_returns=1, timeout=self._until_next_deadline())
                for ref in ready:
                    self._answered(ref, self._dequeue(ref))
                if c.step_timeout_s is not None:
                    self._handle_overdue()
        finally:  # also when the step fails (a non-finite task twice, an actor that never came back)
            self._leave_the_rest()
        return self.results, self.restarts, self.retries  # type: ignore[return-value]

    def _feed(self) -> None:
        """Dynamic scheduling: tops every free actor up to IN_FLIGHT tasks (every actor, if all are blocked)."""
        if not self.todo:
            return
        free = self._free_workers() or list(range(self.pool.num_workers))
        for _ in range(IN_FLIGHT):
            for w in sorted(free):
                if self.todo and self._live(w) < IN_FLIGHT:
                    self._submit(self.todo.popleft(), w)

    def _until_next_deadline(self) -> float | None:
        """Seconds until the earliest running call reaches its deadline (None: no deadline to watch)."""
        t = self.c.step_timeout_s
        if t is None:
            return None
        now = time.monotonic()
        heads = [next(iter(q.values())) for q in self.queues if q]
        waits = [h.started + t - now for h in heads if h.started is not None and not h.overdue]
        return max(0.0, min(waits)) if waits else None

    def _answered(self, ref: Any, a: Attempt) -> None:
        if a.cancelled or not self._unanswered(a):
            return  # a copy whose answer is no longer wanted (it may have failed: that changes nothing)
        pool, keys = self.pool, self.keys
        try:
            got = self.ray.get(ref)
        except pool._lost:
            what = f"tasks {[keys[i] for i in a.indices]}" if a.chunk else f"task {keys[a.index]}"
            pool._events.append(f"worker {a.worker} died while computing {what}: re-dispatched")
            self.restarts += pool._recover(a.worker)
            for i in self._unanswered(a):  # one at a time now: the recovery path is the per-task one
                self.retries += 1
                self._submit(i, a.worker, self._snapshot_of(i), a.backup)
            return
        for i, r in zip(a.indices, got if a.chunk else [got]):
            self._result(i, a, r)

    def _result(self, i: int, a: Attempt, r: dict) -> None:
        pool, key = self.pool, self.keys[i]
        self.restarts += pool._note_incarnation(a.worker, r["incarnation"])
        if self.results[i] is not None:
            return  # another copy answered first
        if r["error"] == "state_lost":
            pool._events.append(f"worker {a.worker} lost the state of task {task_id(key)}: restored from snapshot")
            self.retries += 1
            self._submit(i, a.worker, pool._restore(key), a.backup)
        elif r["error"] == "nonfinite":
            pool._nonfinite(r, self.tries)
            self.retries += 1
            self._submit(i, a.worker, self._snapshot_of(i) if a.backup else None, a.backup)
        else:
            self.results[i] = r
            for ref, b in [(ref, b) for q in self.queues for ref, b in q.items()]:
                if b is not a and not b.cancelled and not self._commits(b) and b.indices and not self._unanswered(b):
                    self._cancel(ref, b)  # the losing copy

    def _unanswered(self, a: Attempt) -> list[int]:
        """The tasks of call a that still need an answer (none for a leftover of an earlier step)."""
        return [i for i in a.indices if self.results[i] is None]

    def _snapshot_of(self, i: int) -> tuple | None:
        return self.pool._restore(self.keys[i]) if self.stateful_train else None

    # ---- stragglers --------------------------------------------------------------------------------------

    def _handle_overdue(self) -> None:
        """For each actor busy past the deadline: a copy elsewhere of the call it runs, and the calls queued
        behind it moved elsewhere (or copied, when they keep a task's state there)."""
        now, t = time.monotonic(), self.c.step_timeout_s
        for w, q in enumerate(self.queues):
            if not self._blocked(w, now):
                continue
            head = next(iter(q.values()))
            for ref, a in list(q.items()):
                todo = self._unanswered(a)
                if a.overdue or a.cancelled or not todo:
                    continue
                if not self._free_workers(exclude=w):
                    break  # every other actor is stuck too: nothing to gain now; looked at again after an answer
                a.overdue = True
                if a is head:
                    why = f"exceeded step_timeout_s={t:g}"
                elif head.index is not None:
                    why = f"is queued behind task {self.keys[head.index]}, which exceeded step_timeout_s={t:g}"
                else:
                    why = f"is queued behind a task of an earlier step that exceeded step_timeout_s={t:g}"
                if a is head or self._commits(a):
                    for i in todo:  # this call runs on; the first answer wins
                        self._copy(i, w, why)
                else:
                    self._cancel(ref, a)  # it never runs here
                    for i in todo:
                        self._move(i, w, why)

    def _copy(self, i: int, w: int, why: str) -> None:
        pool, key, c = self.pool, self.keys[i], self.c
        tid = task_id(key)
        if self.stateful_train and tid in pool._has_state and tid not in pool._current:
            pool._events.append(
                f"task {key} on worker {w} {why} but was not re-dispatched: the pool's copy of its state is older "
                f"than its last step (state_snapshot_every={c.state_snapshot_every}), so a copy would start from a "
                f"stale state; waiting for worker {w} (state_snapshot_every=1 keeps every task re-dispatchable)")
            return
        if any(i in a.indices and not a.cancelled for v, q in enumerate(self.queues) if v != w for a in q.values()):
            return  # a copy runs elsewhere already
        target = self._free_workers(exclude=w)[0]
        pool._events.append(f"task {key} on worker {w} {why}: re-dispatched to worker {target}")
        self._elsewhere(i, target)

    def _move(self, i: int, w: int, why: str) -> None:
        if self.dynamic:
            self.todo.appendleft(i)  # the next free actor takes it
            self.pool._events.append(f"task {self.keys[i]} on worker {w} {why}: moved to the next free worker")
            self.retries += 1
            return
        target = self._free_workers(exclude=w)[0]
        self.pool._events.append(f"task {self.keys[i]} on worker {w} {why}: moved to worker {target}")
        self._elsewhere(i, target)

    def _elsewhere(self, i: int, target: int) -> None:
        """Task i on another worker than the one it was queued on; a stateful task runs there as a backup, from
        the driver's snapshot of its state."""
        self.retries += 1
        self._submit(i, target, self._snapshot_of(i), backup=self.stateful_train)

    # ---- the step's end ----------------------------------------------------------------------------------

    def _leave_the_rest(self) -> None:
        """Copies still queued or running are not needed: cancelled where nothing depends on them, and kept in
        their actor's queue (as leftovers) so the next step knows the actor is busy with them."""
        for q in self.queues:
            for ref, a in q.items():
                if a.index is not None and not a.cancelled and not self._commits(a):
                    self._cancel(ref, a)
                a.index, a.chunk = None, None

    def _forget_finished_leftovers(self) -> None:
        refs = [ref for q in self.queues for ref in q]
        if refs:
            done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in done:
                self._dequeue(ref)
        hints = self.pool._hints
        if hints:  # answered prefetch calls: read, so that one sent to an actor that died is not reported unhandled
            done, self.pool._hints = self.ray.wait(hints, num_returns=len(hints), timeout=0)
            for ref in done:
                try:
                    self.ray.get(ref)
                except Exception:  # noqa: BLE001 (its actor died: the call it was sent for is recovered)
                    pass
