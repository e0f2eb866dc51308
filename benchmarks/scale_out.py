"""Scale-out data path (issue #17): where the task hypergradients are summed, and what it costs per step.

Workload (the issue's): first-order MAML on sinusoid tasks, MLP 1-H-H-1 (H = 1000: 1.0M outer params; H = 2000:
4.0M), 5 inner steps, 8 tasks a step, float32, one torch thread per process. Configurations, timed side by side
in interleaved rounds (this machine is shared: only ratios measured in one run mean anything):

- one process (InProcessPool: no Ray);
- 1 and 2 Ray actors with ``reduction="driver"`` (every task's gradient goes to the driver, as before #17);
- 1 and 2 Ray actors with ``reduction="actors"`` (exact int64 partial sums reduced among the actors; the driver
  receives one gradient).

Reported: median ms/step, gradient bytes into the driver per step (the pool's ``pool_grad_bytes_to_driver``),
and whether the outer gradient is bit-identical across all configurations.

    .venv/bin/python benchmarks/scale_out.py [--quick] [--json OUT.json]
"""
from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path

import torch

from common import section_main, table  # noqa: E402  (puts the checkout on sys.path)

from metaray.cluster import ClusterConfig, InProcessPool, WorkerPool, WorkerSpec  # noqa: E402
from metaray.tasks import ModelProblem, SinusoidSource, mlp  # noqa: E402

TASKS = 8


def spec(hidden: int) -> tuple[WorkerSpec, dict]:
    torch.manual_seed(0)
    model = mlp([1, hidden, hidden, 1])
    s = WorkerSpec(problem=functools.partial(ModelProblem, model, "mse"), solver="fomaml",
                   solver_options={"inner_steps": 5, "inner_lr": 0.01 * (1000 / hidden) ** 2},  # wider: smaller steps
                   source=SinusoidSource(shots=10, queries=10),
                   dtype="float32", device="cpu")
    return s, {k: v.detach().clone() for k, v in model.named_parameters()}


def build(quick: bool, img_dir: Path) -> dict:
    import ray

    sizes = [1000] if quick else [1000, 2000]
    rounds = 2 if quick else 5
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows, data, notes = [], {}, []
    try:
        for hidden in sizes:
            s, x = spec(hidden)
            d = sum(v.numel() for v in x.values())
            cfg = lambda n, red: ClusterConfig(num_workers=n, num_cpus_per_worker=0.25, metrics=False, reduction=red)  # noqa: E731
            pools = {"one process": InProcessPool(s)}
            for n in (1, 2):
                for red in ("driver", "actors"):
                    pools[f"{n} actor{'s' if n > 1 else ''}, reduction={red}"] = WorkerPool(s, cfg(n, red), f"so-{hidden}-{n}-{red}")
            times = {name: [] for name in pools}
            grads, bytes_in = {}, {}
            try:
                for name, pool in pools.items():  # warm-up step each
                    pool.step(x, [("train", 0, i) for i in range(TASKS)])
                for r in range(rounds):
                    for name, pool in pools.items():
                        keys = [("train", 1 + r, i) for i in range(TASKS)]
                        t0 = time.perf_counter()
                        res = pool.step(x, keys)
                        times[name].append(time.perf_counter() - t0)
                        if r == 0:
                            grads[name] = res.grad
                        bytes_in[name] = res.metrics.get("pool_grad_bytes_to_driver", float("nan"))
            finally:
                for pool in pools.values():
                    pool.shutdown()
            base = statistics.median(times["one process"])
            ref = grads["one process"]
            same = {name: all(torch.equal(g[k], ref[k]) for k in ref) for name, g in grads.items()}
            for name in pools:
                med = statistics.median(times[name])
                rows.append([f"{d / 1e6:.1f}M", name, med * 1e3, base / med, bytes_in[name] / 2**20,
                             "yes" if same[name] else "NO"])
            data[str(d)] = {"seconds": times, "bytes_to_driver": bytes_in, "bit_identical": same}
            if not all(same.values()):
                notes.append(f"d={d}: outer gradients differ between configurations: {same}")
    finally:
        ray.shutdown()
    return {
        "title": "Scale-out: reduction on the actors vs through the driver",
        "intro": ("First-order MAML, sinusoid, MLP 1-H-H-1, 5 inner steps, 8 tasks a step, float32, one thread per "
                  f"process, {rounds} interleaved rounds (median). 'speed vs one process' > 1 is faster. Gradient "
                  "bytes are those the driver receives per step; bit-identical compares each configuration's outer "
                  "gradient with the one-process run's."),
        "tables": [table("ms per outer step", ["params", "configuration", "ms/step", "speed vs one process",
                                               "MiB of gradients to the driver", "bit-identical"], rows)],
        "plots": [],
        "notes": notes,
        "data": data,
    }


if __name__ == "__main__":
    section_main(__doc__, build)
