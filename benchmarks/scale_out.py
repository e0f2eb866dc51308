"""Scale-out data path (issue #17): where the task hypergradients are summed, and what it costs per step.

Workload (the issue's): first-order MAML on sinusoid tasks, MLP 1-H-H-1 (H = 1000, 3162, 5477: d = 1.0M, 10.0M,
30.0M outer params), 5 inner steps, 8 tasks a step, float32, one torch thread per process. Configurations, timed side by side
in interleaved rounds (this machine is shared: only ratios measured in one run mean anything):

- one process (InProcessPool: no Ray), with one torch thread and with two (both cores through torch's own
  threads);
- 1 and 2 Ray actors with ``reduction="driver"`` (every task's gradient goes to the driver, as before #17);
- 1 and 2 Ray actors with ``reduction="actors"`` (exact int64 partial sums reduced among the actors; the driver
  receives one gradient), the blocks moved through Ray's object store (the CPU default), and 2 actors with
  ``collective="gloo"`` (a torch.distributed gloo group among them);
- the coordinate-wise median (1.0M params only): in one process, gathered in the driver, and sharded by
  coordinate among 2 actors;
- two plain OS processes (no Ray), each running the one-process pool on 4 of the 8 tasks at once with one
  thread, timed from "go" to both done, with no gradient moved between them: what two workers reach with no
  data path at all. Where it is well under 2x, the cores slow each other (shared caches, memory bandwidth, a
  shared host). It bounds the actors where the step is compute-bound (1M); from 10M on the actors have beaten
  it (an actor's step is itself up to 1.09x one process's there), so it is no bound at those sizes.

- host memory returned (``ClusterConfig.keep_host_memory=False``): one plain process (no Ray, a fresh process:
  the setting cannot be undone in this one) and 2 actors with glibc's default of giving freed memory back to the
  OS, so that from 10M params on every gradient-sized tensor page-faults anew each step; every other row keeps
  freed memory for reuse (the default).

Reported: median ms/step, gradient bytes into the driver per step (the pool's ``pool_grad_bytes_to_driver``),
and whether the outer gradient is bit-identical across all configurations.

    .venv/bin/python benchmarks/scale_out.py [--quick] [--json OUT.json] [--sizes 1000 3162] [--rounds N]
                                             [--only "one process" "1 actor, reduction=actors"]

``--sizes`` are hidden widths H, ``--rounds`` overrides the interleaved rounds, ``--only`` keeps the named
configurations (a longer side by side of two of them, e.g. 1 actor against one process).
"""
from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from pathlib import Path

import torch

from common import add_common_args, table, write_section  # noqa: E402  (puts the checkout on sys.path)

from metaray.cluster import ClusterConfig, InProcessPool, WorkerPool, WorkerSpec  # noqa: E402
from metaray.tasks import ModelProblem, SinusoidSource, mlp  # noqa: E402

TASKS = 8
PLAIN = "2 plain processes, compute only (no Ray, nothing moved)"
RETURNED_SHORT = "host memory returned"
RETURNED = f"one process, {RETURNED_SHORT}"  # a plain process, like PLAIN's, with keep_host_memory=False


def spec(hidden: int) -> tuple[WorkerSpec, dict]:
    torch.manual_seed(0)
    model = mlp([1, hidden, hidden, 1])
    s = WorkerSpec(problem=functools.partial(ModelProblem, model, "mse"), solver="fomaml",
                   solver_options={"inner_steps": 5, "inner_lr": 0.01 * min(1.0, (1000 / hidden) ** 2)},  # wider: smaller
                   source=SinusoidSource(shots=10, queries=10),
                   dtype="float32", device="cpu")
    return s, {k: v.detach().clone() for k, v in model.named_parameters()}


def _compute_only(hidden: int, keep_memory: bool, conn) -> None:
    """A plain process of the plain-process rows: computes the task keys it receives at the fixed x, answers the
    seconds it took, and keeps the gradients to itself."""
    torch.set_num_threads(1)
    s, x = spec(hidden)
    pool = InProcessPool(s, ClusterConfig(num_workers=1, metrics=False, keep_host_memory=keep_memory))
    while (keys := conn.recv()) is not None:
        t0 = time.perf_counter()
        pool.step(x, keys)
        conn.send(time.perf_counter() - t0)


class _PlainProcesses:
    """``n`` ``_compute_only`` processes behind a pool-like ``step``: an n-th of the tasks each, at once. A fresh
    process is what "host memory returned" needs: keeping it (cluster/host_memory.py) cannot be undone in a process."""

    def __init__(self, hidden: int, n: int, keep_memory: bool = True):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # no fork of a process that runs Ray
        self.conns, self.procs = [], []
        for _ in range(n):
            mine, theirs = ctx.Pipe()
            self.procs.append(ctx.Process(target=_compute_only, args=(hidden, keep_memory, theirs), daemon=True))
            self.procs[-1].start()
            self.conns.append(mine)

    def step(self, x, keys: list[tuple]) -> None:
        n = len(self.conns)
        for i, conn in enumerate(self.conns):
            conn.send(keys[i * len(keys) // n:(i + 1) * len(keys) // n])
        for conn in self.conns:
            conn.recv()

    def shutdown(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            conn.send(None)
            proc.join(timeout=30)


def build(quick: bool, img_dir: Path, sizes: list[int] | None = None, rounds: int | None = None,
          only: list[str] | None = None) -> dict:
    import ray

    sizes = sizes or ([1000] if quick else [1000, 3162, 5477])  # hidden width H: d = 1.0M, 10.0M, 30.0M
    rounds_of = lambda hidden: rounds or (2 if quick else (5 if hidden <= 1000 else 3))  # noqa: E731
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows, data, notes = [], {}, []
    try:
        for hidden in sizes:
            s, x = spec(hidden)
            d = sum(v.numel() for v in x.values())
            cfg = lambda n, red, rule="mean", coll="auto": ClusterConfig(  # noqa: E731
                num_workers=n, num_cpus_per_worker=0.125, metrics=False, reduction=red, aggregation=rule, collective=coll)
            makers = {"one process": lambda: InProcessPool(s), "one process, 2 torch threads": lambda: InProcessPool(s)}
            for n in (1, 2):
                for red in ("driver", "actors"):
                    makers[f"{n} actor{'s' if n > 1 else ''}, reduction={red}"] = functools.partial(
                        WorkerPool, s, cfg(n, red), f"so-{hidden}-{n}-{red}")
            makers["2 actors, reduction=actors, gloo"] = lambda: WorkerPool(s, cfg(2, "actors", coll="gloo"), f"so-{hidden}-gloo")
            if hidden == sizes[0]:  # the coordinate-wise median: gathered and sorted in the driver, or sharded
                makers["one process, median"] = lambda: InProcessPool(s, cfg(1, "driver", "median"))
                for red in ("driver", "actors"):
                    makers[f"2 actors, median, reduction={red}"] = functools.partial(
                        WorkerPool, s, cfg(2, red, "median"), f"so-med-{red}")
            makers[PLAIN] = lambda: _PlainProcesses(hidden, 2)
            # ClusterConfig.keep_host_memory=False: freed gradients go back to the OS (glibc's default) and page-fault
            # anew each step; the one-process row is a fresh process (the setting cannot be undone in this one)
            makers[RETURNED] = lambda: _PlainProcesses(hidden, 1, keep_memory=False)
            makers[f"2 actors, reduction=actors, {RETURNED_SHORT}"] = lambda: WorkerPool(
                s, dataclasses.replace(cfg(2, "actors"), keep_host_memory=False), f"so-{hidden}-returned")
            # each configuration is timed against the one-process run of its own rule, which is always kept
            base_of = lambda name: "one process, median" if "median" in name else "one process"  # noqa: E731
            keep = {n for n in makers if not only or n in only}
            pools = {name: make() for name, make in makers.items() if name in keep | {base_of(n) for n in keep}}
            times = {name: [] for name in pools}
            grads, bytes_in, reduce_s = {}, {}, {name: [] for name in pools}
            rounds = rounds_of(hidden)
            try:
                for name, pool in pools.items():  # warm-up step each
                    pool.step(x, [("train", 0, i) for i in range(TASKS)])
                for r in range(rounds):
                    for name, pool in pools.items():
                        # steps 1-5's tasks, again after round 5 (a later one diverges at this inner lr)
                        keys = [("train", 1 + r % 5, i) for i in range(TASKS)]
                        torch.set_num_threads(2 if "2 torch threads" in name else 1)
                        t0 = time.perf_counter()
                        res = pool.step(x, keys)
                        times[name].append(time.perf_counter() - t0)
                        torch.set_num_threads(1)
                        if res is None:  # the plain processes keep their gradients
                            continue
                        reduce_s[name].append(res.metrics["pool_reduce_seconds"])
                        if r == 0:
                            grads[name] = res.grad
                        bytes_in[name] = res.metrics.get("pool_grad_bytes_to_driver", float("nan"))
            finally:
                for pool in pools.values():
                    pool.shutdown()
            # (not for 2 threads: a matmul's bits depend on the thread count)
            same = {name: None if "2 torch threads" in name else all(torch.equal(g[k], grads[base_of(name)][k]) for k in g)
                    for name, g in grads.items()}
            same.update({PLAIN: None, RETURNED: None})
            for name in pools:
                med, base = statistics.median(times[name]), statistics.median(times[base_of(name)])
                moved = name not in (PLAIN, RETURNED)
                rows.append([f"{d / 1e6:.1f}M", name, med * 1e3, base / med,
                             statistics.median(reduce_s[name]) * 1e3 if moved else "n/a",
                             bytes_in[name] / 2**20 if moved else "n/a",
                             "n/a" if same[name] is None else "yes" if same[name] else "NO"])
            data[str(d)] = {"seconds": times, "reduce_seconds": reduce_s, "bytes_to_driver": bytes_in, "bit_identical": same}
            if not all(v for v in same.values() if v is not None):
                notes.append(f"d={d}: outer gradients differ between configurations: {same}")
    finally:
        ray.shutdown()
    return {
        "title": "Scale-out: reduction on the actors vs through the driver",
        "intro": ("First-order MAML, sinusoid, MLP 1-H-H-1, 5 inner steps, 8 tasks a step, float32, one thread per "
                  f"process, {rounds_of(1000)} interleaved rounds at 1M params, {rounds_of(3162)} above (median). "
                  "'reduction ms' is pool_reduce_seconds: from the last task's answer to the aggregated gradient. 'speed vs one process' > 1 is faster. Gradient "
                  "bytes are those the driver receives per step; bit-identical compares each configuration's outer "
                  "gradient with the one-process run's of the same rule."),
        "tables": [table("ms per outer step", ["params", "configuration", "ms/step", "speed vs one process",
                                               "reduction ms", "MiB of gradients to the driver", "bit-identical"], rows)],
        "plots": [],
        "notes": notes,
        "data": data,
    }


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="hidden widths H (d = H^2 + 4H + 1)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timed rounds per size")
    ap.add_argument("--only", nargs="+", default=None, help="configuration names to keep")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    write_section(args.json, build(args.quick, Path(args.img_dir), args.sizes, args.rounds, args.only))
