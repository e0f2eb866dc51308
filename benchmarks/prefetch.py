"""Tasks loaded ahead (issue #13's data path): one Ray actor with ``prefetch`` off and on, side by side.

With ``[cluster] prefetch``, each actor's next call's tasks are sampled, cast and put on its device on a thread of
their own while the call ahead computes (metaray/cluster/loader.py). The step then costs max(compute, loading)
per task instead of their sum, where a core (or the storage) is free for the loading. That is the case of a
GPU actor, whose host core mostly waits for the device, and of a CPU actor whose sampling waits on storage. On
a CPU the loading thread shares the machine's cores with the computation. This machine has 2 cores and one
actor, so the second core is free.

Workloads, 8 tasks a step, 1 actor with one torch thread, dynamic scheduling, float32:
- sinusoid, MLP 1-40-40-1, second-order MAML (5 inner steps); each task's sampling waits 15 ms, as a read from
  remote storage would (a sleep: no CPU);
- glyph episodes (the Parquet glyph set, memory-mapped), 5-way 1-shot 15 queries, every image augmented by a
  torchvision RandomAffine seeded from the key; Conv4 (32 ch, BatchNorm), MAML with 1 inner step (CPU-bound
  loading);
- the sinusoid workload without the wait (loading costs ~nothing): the cost of the prefetch calls themselves.

Reported: median ms/step over interleaved rounds, the fraction of tasks the actor found loaded ahead, and whether
the outer gradient is bit-identical with prefetching off.

    .venv/bin/python benchmarks/prefetch.py [--quick] [--json OUT.json]
"""
from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path

import torch

from common import section_main, table  # noqa: E402  (puts the checkout on sys.path)

from metaray.cluster import ClusterConfig, WorkerPool, WorkerSpec  # noqa: E402
from metaray.tasks import Conv4, FewShotSource, ModelProblem, SinusoidSource, mlp  # noqa: E402
from metaray.tasks.glyphs import glyphs_path, load_glyphs  # noqa: E402

TASKS = 8


class Waiting:
    """Another source's tasks, each after ``delay`` seconds of waiting (a read from remote storage)."""

    def __init__(self, base, delay: float):
        self.base, self.delay = base, delay

    def sample(self, key):
        time.sleep(self.delay)
        return self.base.sample(key)


def workloads(quick: bool) -> dict[str, tuple[WorkerSpec, dict]]:
    import torchvision.transforms as T

    torch.manual_seed(0)
    net = mlp([1, 40, 40, 1])
    sine = dict(problem=functools.partial(ModelProblem, net, "mse"), solver="maml",
                solver_options={"inner_steps": 5, "inner_lr": 0.01}, dtype="float32", device="cpu")
    x_sine = {k: v.detach().clone() for k, v in net.named_parameters()}
    load_glyphs(classes=100)  # built once into the cache (a few seconds), then memory-mapped by the actor
    torch.manual_seed(0)
    conv = Conv4(ways=5, in_channels=1, hidden=32)
    glyphs = FewShotSource(str(glyphs_path(100, 20, 0)), ways=5, shots=1, queries=15,
                           augment=T.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)))
    out = {
        "sinusoid MAML, sampling waits 15 ms": (WorkerSpec(source=Waiting(SinusoidSource(), 0.015), **sine), x_sine),
        "glyph episodes + RandomAffine, conv4 MAML": (
            WorkerSpec(problem=functools.partial(ModelProblem, conv, "cross_entropy"), solver="maml",
                       solver_options={"inner_steps": 1, "inner_lr": 0.4}, source=glyphs, dtype="float32", device="cpu"),
            {k: v.detach().clone() for k, v in conv.named_parameters()}),
        "sinusoid MAML, sampling costs ~0": (WorkerSpec(source=SinusoidSource(), **sine), x_sine),
    }
    return dict(list(out.items())[:1]) if quick else out


def build(quick: bool, img_dir: Path) -> dict:
    import ray

    rounds = 2 if quick else 7
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows, data, notes = [], {}, []
    try:
        for name, (s, x) in workloads(quick).items():
            pools = {p: WorkerPool(s, ClusterConfig(num_workers=1, metrics=False, prefetch=p), f"pf-{len(data)}-{p}")
                     for p in (False, True)}
            times, grads = {p: [] for p in pools}, {}
            try:
                for p, pool in pools.items():  # warm-up
                    pool.step(x, [("train", 0, i) for i in range(TASKS)])
                before = {p: pool.workers()[0]["prefetch"] for p, pool in pools.items()}
                for r in range(rounds):
                    for p, pool in pools.items():
                        t0 = time.perf_counter()
                        res = pool.step(x, [("train", 1 + r, i) for i in range(TASKS)])
                        times[p].append(time.perf_counter() - t0)
                        grads.setdefault(p, res.grad)
                after = {p: pool.workers()[0]["prefetch"] for p, pool in pools.items()}
            finally:
                for pool in pools.values():
                    pool.shutdown()
            same = all(torch.equal(grads[True][k], grads[False][k]) for k in grads[False])
            off, on = statistics.median(times[False]), statistics.median(times[True])
            hit = {p: (after[p]["hits"] - before[p]["hits"]) / (rounds * TASKS) for p in pools}
            rows.append([name, off * 1e3, on * 1e3, off / on, hit[True], "yes" if same else "NO"])
            data[name] = {"seconds": {str(p): t for p, t in times.items()}, "hit_fraction": hit[True],
                          "bit_identical": same}
            if not same:
                notes.append(f"{name}: the outer gradient changed with prefetching")
    finally:
        ray.shutdown()
    return {
        "title": "Tasks loaded ahead: prefetch off and on",
        "intro": (f"One Ray actor, one torch thread, 8 tasks a step, {rounds} interleaved rounds (median). 'loaded "
                  "ahead' is the fraction of tasks the actor found loaded by its prefetch thread (the first task "
                  "of a step never is: nothing runs ahead of it)."),
        "tables": [table("ms per outer step", ["workload", "prefetch off ms", "prefetch on ms", "speed-up",
                                               "loaded ahead", "bit-identical"], rows)],
        "plots": [],
        "notes": notes,
        "data": data,
    }


if __name__ == "__main__":
    section_main(__doc__, build)
