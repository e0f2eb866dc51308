"""Several tasks at once on threads of their own: the task loop, run in parallel.

A task with a small graph leaves torch's intra-op threads mostly idle. An example is second-order MAML on a
Conv4 with 5 support and 75 query images: its kernels are too small to split well across cores.
Computing different tasks on different threads, each with one intra-op thread, keeps every core busy. This is
the batching that wins where ``torch.func.vmap`` loses (conv4 on a CPU: benchmarks/batched.py), and torch
releases the GIL inside its kernels and its autograd engine, so threads suffice.

    threads = TaskThreads(problem, threads=2)
    hgs = threads.hypergrads(solver, x, tasks)     # == [solver.hypergrad(problem, x, t) for t in tasks]

Each thread computes with a private copy of the problem. ``functional_call`` swaps a module's parameters in
place while a forward runs, so two threads must never share one module. A task runs whole on one thread, with
``intra_op`` intra-op threads, so its result depends on the task and ``intra_op`` alone. It does not depend on
which thread computed it or on what ran beside it. The results come back in task order.
"""
from __future__ import annotations

import copy
import queue
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable, Sequence

import torch

from .core import BilevelProblem, HyperGrad, Params


class TaskThreads:
    """``threads`` worker threads, each computing one task at a time with ``intra_op`` intra-op threads, and
    ``threads`` copies of ``problem`` (the first is ``problem`` itself), one per running task."""

    def __init__(self, problem: BilevelProblem, threads: int, intra_op: int = 1):
        for name, v in (("threads", threads), ("intra_op", intra_op)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TaskThreads: {name} must be an int >= 1, got {v!r}")
        self.threads, self.intra_op = threads, intra_op
        self._problems: queue.SimpleQueue = queue.SimpleQueue()
        for p in [problem] + [copy.deepcopy(problem) for _ in range(threads - 1)]:
            self._problems.put(p)
        # torch.set_num_threads acts on the calling thread's OpenMP team: set once in each worker thread
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="metaray-task",
                                        initializer=torch.set_num_threads, initargs=(intra_op,))

    def map(self, fn: Callable[[BilevelProblem, Any], Any], items: Sequence[Any]) -> list:
        """[fn(problem copy, item) for item in items], computed on the threads, in order. The first exception
        raised by a task is raised here, after the tasks already running have ended."""
        def one(item: Any) -> Any:
            problem = self._problems.get()  # never blocks: there is a copy for every thread
            try:
                return fn(problem, item)
            finally:
                self._problems.put(problem)

        futures = [self._pool.submit(one, item) for item in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()  # the tasks not started are not wanted
            wait(futures)
            raise

    def hypergrads(self, solver: Any, x: Params, tasks: Sequence[Any], states: Sequence[Any] | None = None) -> list[HyperGrad]:
        """``solver.hypergrad`` of every task (with its state), in order, the tasks spread over the threads."""
        states = [None] * len(tasks) if states is None else list(states)
        if len(states) != len(tasks):
            raise ValueError(f"got {len(tasks)} tasks but {len(states)} states")
        return self.map(lambda problem, ts: solver.hypergrad(problem, x, *ts), list(zip(tasks, states)))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
