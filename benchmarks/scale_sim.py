"""Scale simulation (issue #17): step time and gradient bytes per step against the number of actors W, for the
reduction through the driver and among the actors, on a multi-node ``ray.cluster_utils.Cluster``.

The cluster: 4 Ray nodes on this machine (4 logical CPUs each, 16 in all, over 2 real cores; every node has
its own raylet and object store, so a gradient that crosses nodes is really copied between object stores over
loopback TCP). Actors are SPREAD over the nodes, one logical CPU each, one torch thread each.

Workload: little compute per task and a large model, so the data path dominates: first-order MAML on sinusoid
tasks, MLP 1-H-H-1 with H = 3162 (d = 10.0M outer params, 40 MB of float32 gradient a task), one inner step,
one support and one query point, B = 16 tasks a step for every W (so each actor holds 16/W tasks).

Reported per (W, path): median step seconds, the reduction's seconds (``pool_reduce_seconds``: from the last
task's answer to the aggregated gradient), gradient bytes into the driver per step, and whether the outer
gradient is bit-identical to W = 1's. Per W, x's way to the actors at the start of every step
(``WorkerPool.broadcast``: the driver puts x once, every actor fetches it from its node's object store, which
pulls it from another node's if it has none yet, and copies it privately). Also the per-byte constants behind
docs/scaling.md's cost model, measured here: int64 fixed-point encode + add (the actors' work per task
gradient), the driver's float sum, the driver's put of x, and one object-store copy of a 40 MB gradient
between two nodes.

    .venv/bin/python benchmarks/scale_sim.py [--quick] [--json OUT.json]
"""
from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path

import torch

from common import section_main, table  # noqa: E402  (puts the checkout on sys.path)

from metaray.cluster import ClusterConfig, WorkerPool, WorkerSpec  # noqa: E402
from metaray.cluster import reduce as fixed  # noqa: E402
from metaray.tasks import ModelProblem, SinusoidSource, mlp  # noqa: E402

NODES, CPUS_PER_NODE, TASKS = 4, 4, 16
# (reduction, collective): through the driver; among the actors through Ray's object store; through a gloo group
PATHS = [("driver", "object_store"), ("actors", "object_store"), ("actors", "gloo")]


def spec(hidden: int) -> tuple[WorkerSpec, dict]:
    torch.manual_seed(0)
    model = mlp([1, hidden, hidden, 1])
    s = WorkerSpec(problem=functools.partial(ModelProblem, model, "mse"), solver="fomaml",
                   solver_options={"inner_steps": 1, "inner_lr": 1e-4},
                   source=SinusoidSource(shots=1, queries=1), dtype="float32", device="cpu")
    return s, {k: v.detach().clone() for k, v in model.named_parameters()}


def constants(x: dict) -> dict[str, float]:
    """Seconds per byte of one task gradient for the reduction's building blocks, on one core here."""
    torch.set_num_threads(1)
    g = {k: torch.randn_like(v) for k, v in x.items()}
    nbytes = sum(v.numel() * 4 for v in g.values())
    exps = fixed.exponents([fixed.max_abs(g)] * TASKS, [1.0 / TASKS] * TASKS)

    def best(fn, n=5) -> float:
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    acc = fixed.encode_into(None, g, 1.0 / TASKS, exps)
    encode_add = best(lambda: fixed.encode_into(acc, g, 1.0 / TASKS, exps))
    max_abs = best(lambda: fixed.max_abs(g))
    total = {k: v.clone() for k, v in g.items()}
    float_add = best(lambda: [total[k].add_(g[k]) for k in g])
    return {"bytes_per_task_gradient": float(nbytes), "fixed_point_encode_add_s_per_byte": encode_add / nbytes,
            "max_abs_s_per_byte": max_abs / nbytes, "float_add_s_per_byte": float_add / nbytes}


def object_store_copy(ray, cluster, nbytes: int) -> float:
    """Seconds for an actor on node 1 to fetch an nbytes tensor put by an actor on node 0 (median of 3)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]

    @ray.remote(num_cpus=0)
    class Holder:
        def put(self, n):
            return [ray.put(torch.ones(n // 4))]

        def fetch(self, box):
            t0 = time.perf_counter()
            v = ray.get(box[0])
            return time.perf_counter() - t0, int(v.numel())

    a = Holder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[0], soft=False)).remote()
    b = Holder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[1], soft=False)).remote()
    ts = []
    for _ in range(3):
        box = ray.get(a.put.remote(nbytes))
        ts.append(ray.get(b.fetch.remote(box))[0])
    ray.kill(a), ray.kill(b)
    return statistics.median(ts)


def driver_put(ray, x: dict) -> float:
    """Seconds for the driver to put x into its node's object store as the pool does (NumPy arrays; best of 3)."""
    payload = {k: v.detach().contiguous().numpy() for k, v in x.items()}
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        ref = ray.put(payload)
        ts.append(time.perf_counter() - t0)
        del ref
    return min(ts)


def x_to_actors(pool: WorkerPool, x: dict, n: int = 3) -> float:
    """Median seconds of x's way to every actor (put, fetch, private copy), each time a new x as in a step."""
    ts = []
    for i in range(n):
        ts.append(pool.broadcast({k: v + (i + 1) * 1e-3 for k, v in x.items()}))
    return statistics.median(ts)


def build(quick: bool, img_dir: Path, workers: tuple[int, ...] | None = None) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    hidden = 1000 if quick else 3162
    workers = workers or ((1, 2, 4) if quick else (1, 2, 4, 8, 16))
    steps = 2 if quick else 3
    s, x = spec(hidden)
    d = sum(v.numel() for v in x.values())
    consts = constants(x)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": CPUS_PER_NODE, "object_store_memory": 2 * 2**30,
                                                             "include_dashboard": False})
    for _ in range(NODES - 1):
        cluster.add_node(num_cpus=CPUS_PER_NODE, object_store_memory=2 * 2**30)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    rows, xrows, data, ref = [], [], {}, None
    try:
        consts["object_store_copy_s_per_byte"] = object_store_copy(ray, cluster, int(consts["bytes_per_task_gradient"])) \
            / consts["bytes_per_task_gradient"]
        consts["driver_put_s_per_byte"] = driver_put(ray, x) / consts["bytes_per_task_gradient"]
        for n in workers:
            for red, collective in PATHS:
                cfg = ClusterConfig(num_workers=n, num_cpus_per_worker=1, strategy="SPREAD", metrics=False,
                                    reduction=red, collective=collective, placement_timeout_s=120)
                if red == "actors":
                    red = f"actors, {collective.replace('_', ' ')}"
                with WorkerPool(s, cfg, f"sim-{n}-{collective}-{red[:6]}") as pool:
                    nodes = len({i["node_id"] for i in pool.worker_info.values()})
                    pool.step(x, [("train", 0, i) for i in range(TASKS)])  # warm-up
                    times, reduce_s, compute_s = [], [], []
                    for t in range(steps):
                        res = pool.step(x, [("train", 1 + t, i) for i in range(TASKS)])
                        times.append(res.seconds)
                        reduce_s.append(res.metrics["pool_reduce_seconds"])
                        compute_s.append(max(w["seconds"] for w in res.per_worker.values()))
                        if t == 0:
                            grad = res.grad
                    if ref is None:
                        ref = grad
                    same = all(torch.equal(grad[k], ref[k]) for k in ref)
                    mib = res.metrics["pool_grad_bytes_to_driver"] / 2**20
                    row = {"workers": n, "nodes": nodes, "reduction": red, "step_s": statistics.median(times),
                           "reduce_s": statistics.median(reduce_s), "busiest_actor_compute_s": statistics.median(compute_s),
                           "mib_to_driver": mib, "bit_identical": same}
                    data[f"{n}-{red}"] = row
                    rows.append([n, nodes, red, row["step_s"] * 1e3, row["reduce_s"] * 1e3,
                                 row["busiest_actor_compute_s"] * 1e3, mib, "yes" if same else "NO"])
                    if (red, collective) == ("driver", "object_store"):  # the same for every path: once per W
                        xs = x_to_actors(pool, x)
                        data[f"{n}-x"] = {"workers": n, "nodes": nodes, "x_to_actors_s": xs}
                        xrows.append([n, nodes, xs * 1e3])
    finally:
        ray.shutdown()
        cluster.shutdown()
    crow = [[k, f"{v:.3g}"] for k, v in consts.items()]
    return {
        "title": "Scale simulation: a 4-node Ray cluster on this machine, up to 16 actors",
        "intro": (f"First-order MAML, MLP 1-{hidden}-{hidden}-1 (d = {d / 1e6:.1f}M), one inner step, one support and "
                  f"one query point, {TASKS} tasks a step, float32, {NODES} Ray nodes x {CPUS_PER_NODE} logical CPUs on "
                  "2 real cores, actors SPREAD, one thread each; median of "
                  f"{steps} steps after a warm-up. Compute is oversubscribed above 2 actors: read the bytes and the "
                  "reduction's time, not the speed-up. The constants feed docs/scaling.md."),
        "tables": [table("per step", ["actors W", "nodes used", "path", "step ms", "reduction ms",
                                      "busiest actor's compute ms", "MiB to the driver", "bit-identical to W=1"], rows),
                   table("x to the actors at the start of a step (the driver's put, every actor's fetch and copy)",
                         ["actors W", "nodes used", "ms"], xrows),
                   table("measured constants (one core)", ["constant", "value"], crow)],
        "plots": [],
        "notes": [],
        "data": {"rows": data, "constants": consts, "d": d},
    }


if __name__ == "__main__":
    section_main(__doc__, build)
