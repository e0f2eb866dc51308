"""Cluster scaling benchmark: prints, in one run,

1. tasks/s of meta-training with 1 and 2 inner-learner actors (1 CPU each) and the speed-up (target >= 1.7x
   on 2 cores);
2. the per-step overhead of the Ray path against the in-process pool on the same tasks (target <= 5%), both at
   1 torch thread;
3. the time to broadcast 100 MB of outer params to 2 actors (put once + every actor fetches and converts).

Workload (NOTES.md's MAML anchor): second-order MAML, conv4 (32 channels, BatchNorm), 5-way 1-shot, 15 queries
per class, 8 tasks per step, 5 inner steps, float32. Images are random normal, deterministic per task key.

    .venv/bin/python benchmarks/cluster_scaling.py [--steps 5] [--tasks 8]

Starts its own local Ray cluster (2 CPUs), whatever else runs on the machine.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time
from dataclasses import dataclass

import ray
import torch

from metaray.cluster import ClusterConfig, InProcessPool, WorkerPool, WorkerSpec
from metaray.tasks import Conv4, Episode, ModelProblem, key_generator


@dataclass(frozen=True)
class RandomImages:
    """N-way K-shot episodes of random-normal 28x28 images (the compute of Omniglot-style episodes)."""

    ways: int = 5
    shots: int = 1
    queries: int = 15
    size: int = 28

    def sample(self, key):
        g = key_generator(key)
        n_s, n_q = self.ways * self.shots, self.ways * self.queries
        xs = torch.randn(n_s + n_q, 1, self.size, self.size, generator=g)
        ys = torch.arange(self.ways).repeat_interleave(self.shots + self.queries)
        ys = ys.view(self.ways, -1)
        sy, qy = ys[:, : self.shots].reshape(-1), ys[:, self.shots :].reshape(-1)
        return Episode(xs[:n_s], sy, xs[n_s:], qy)


def make_spec() -> tuple[WorkerSpec, dict]:
    torch.manual_seed(0)
    model = Conv4(ways=5, hidden=32)
    spec = WorkerSpec(problem=functools.partial(ModelProblem, model, "cross_entropy"), solver="maml",
                      solver_options={"inner_steps": 5, "inner_lr": 0.4}, source=RandomImages())
    return spec, {k: v.detach().clone() for k, v in model.named_parameters()}


def time_steps(pool, x, steps: int, tasks: int, offset: int = 0) -> list[float]:
    out = []
    for s in range(steps + 1):  # the first step warms up (allocations, first touches)
        t0 = time.perf_counter()
        pool.step(x, [("train", offset + s, i) for i in range(tasks)])
        if s:
            out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed outer steps per configuration (after one warm-up)")
    ap.add_argument("--tasks", type=int, default=8, help="tasks per outer step")
    ap.add_argument("--broadcast-mb", type=float, default=100.0)
    args = ap.parse_args()

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    spec, x = make_spec()
    n_params = sum(v.numel() for v in x.values())
    print(f"workload: maml conv4-32 BN, 5-way 1-shot 15 queries, {args.tasks} tasks/step, 5 inner steps, "
          f"{n_params} outer params; {args.steps} timed steps each (median)")

    # 1. throughput with 1 and 2 actors
    rates = {}
    for n in (1, 2):
        with WorkerPool(spec, ClusterConfig(num_workers=n, num_cpus_per_worker=1, metrics=False), f"bench-{n}") as pool:
            med = statistics.median(time_steps(pool, x, args.steps, args.tasks))
            rates[n] = args.tasks / med
            print(f"  {n} actor(s): {med * 1e3:8.1f} ms/step  {rates[n]:6.2f} tasks/s")
    print(f"speed-up 2 vs 1 actor: {rates[2] / rates[1]:.2f}x (target >= 1.7x)")

    # 2. Ray overhead vs in-process, same tasks, 1 torch thread each, interleaved to share the machine's noise
    torch.set_num_threads(1)
    ray_t, local_t = [], []
    with WorkerPool(spec, ClusterConfig(num_workers=1, num_cpus_per_worker=1, metrics=False), "bench-ovh") as pool, \
            InProcessPool(spec) as local:
        time_steps(pool, x, 0, args.tasks, 100)
        time_steps(local, x, 0, args.tasks, 100)
        for s in range(args.steps):
            ray_t += time_steps(pool, x, 1, args.tasks, 200 + 10 * s)[:1]
            local_t += time_steps(local, x, 1, args.tasks, 200 + 10 * s)[:1]
            # (each call above times one step after a warm-up step of its own)
        # The same overhead measured inside each step, so insensitive to load changing between steps on a
        # shared machine: wall clock of the step minus the compute time the actor measured around its tasks.
        inside = []
        for s in range(args.steps):
            res = pool.step(x, [("train", 300 + s, i) for i in range(args.tasks)])
            compute = sum(w["seconds"] for w in res.per_worker.values())
            inside.append((res.seconds - compute, res.seconds))
    r, l = statistics.median(ray_t), statistics.median(local_t)
    print(f"per-step time, Ray (1 actor) vs in-process: {r * 1e3:.1f} vs {l * 1e3:.1f} ms = "
          f"{(r - l) * 1e3:+.1f} ms ({(r / l - 1) * 100:+.1f}%, target <= 5%)")
    o, t = statistics.median(i[0] for i in inside), statistics.median(i[1] for i in inside)
    print(f"per-step overhead inside the Ray step (wall - actor compute): {o * 1e3:.1f} ms of {t * 1e3:.1f} ms "
          f"({o / t * 100:.2f}%)")

    # 3. broadcast of 100 MB of params to 2 actors
    numel = int(args.broadcast_mb * 1e6 / 4)
    big = {"w": torch.randn(numel)}
    with WorkerPool(spec, ClusterConfig(num_workers=2, num_cpus_per_worker=1, metrics=False), "bench-bcast") as pool:
        pool.broadcast({"w": torch.zeros(10)})
        times = [pool.broadcast(big) for _ in range(5)]
    print(f"broadcast {args.broadcast_mb:.0f} MB to 2 actors (put once, each fetches zero-copy and copies once): "
          f"median {statistics.median(times) * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms")
    ray.shutdown()


if __name__ == "__main__":
    main()
