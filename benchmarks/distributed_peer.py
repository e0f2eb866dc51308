"""Distributed MAML against the peer's distributed path (issue #17): metaray with 2 Ray actors vs TorchOpt's
``torchopt.distributed`` (RPC, launched with torchrun as TorchOpt's own few-shot example is) with 2 workers.

Workload: ``benchmarks/peers.py``'s "maml" workload, the same tasks on both sides: second-order MAML
meta-gradient, Conv4 (32 channels, BatchNorm with batch statistics), 5-way 1-shot, 15 queries per class, 28x28
synthetic inputs, 5 inner steps of 0.4, 8 tasks a step, one torch thread per process. TorchOpt runs in the peer
environment (.venv-bench, tools/setup_bench_env.sh) through ``benchmarks/peers_distributed/torchopt_maml.py``,
in both of its partitions (``batch``: one RPC per worker with its share of the tasks; ``exclusive``: one RPC per
task, as its example does). Rounds alternate the three configurations (this machine is shared: only ratios
measured side by side mean anything); each round is 3 warm-up and 10 timed steps, and the figure is the
median of the per-round medians. Also checked: metaray's 2-actor gradient is bit-identical to its one-process
one, and TorchOpt's distributed gradient agrees with metaray's (relative norm of the difference).

    .venv/bin/python benchmarks/distributed_peer.py [--quick] [--json OUT.json]
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import section_main, table  # noqa: E402  (puts the checkout on sys.path)
from peers import MAML, maml_setup  # noqa: E402

from metaray.cluster import ClusterConfig, InProcessPool, WorkerPool, WorkerSpec  # noqa: E402
from metaray.tasks import Episode, ModelProblem  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"
TASKS = 8


@dataclass(frozen=True)
class ListSource:
    """peers.py's tasks, served by index (key (split, step, i) -> task i): both sides compute the same tasks."""

    tasks: tuple

    def sample(self, key):
        return Episode(*self.tasks[key[2]])


def torchopt_round(partition: str, warmup: int, repeats: int, grads_out: str | None) -> dict:
    cmd = [str(BENCH_PY), "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(29500 + os.getpid() % 400),
           str(HERE / "peers_distributed" / "torchopt_maml.py"), "--tasks", str(TASKS), "--warmup", str(warmup),
           "--repeats", str(repeats), "--partition", partition] + (["--grads-out", grads_out] if grads_out else [])
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"torchopt.distributed failed (rc {out.returncode}): {out.stderr[-1500:]}")
    return json.loads(lines[-1])


def build(quick: bool, img_dir: Path) -> dict:
    import ray

    if not BENCH_PY.exists():
        raise SystemExit(f"{BENCH_PY} is missing: run tools/setup_bench_env.sh (make bench does)")
    rounds, warmup, repeats = (1, 1, 3) if quick else (4, 3, 10)
    torch.set_num_threads(1)
    model, tasks = maml_setup(TASKS)
    spec = WorkerSpec(problem=functools.partial(ModelProblem, model, "cross_entropy"), solver="maml",
                      solver_options={"inner_steps": MAML["steps"], "inner_lr": MAML["lr"]},
                      source=ListSource(tuple(tasks)), dtype="float32", device="cpu")
    x = {k: v.detach().clone() for k, v in model.named_parameters()}
    keys = lambda s: [("train", s, i) for i in range(TASKS)]  # noqa: E731
    names = ["metaray, 2 actors", "torchopt.distributed, batch", "torchopt.distributed, exclusive"]
    medians: dict[str, list[float]] = {n: [] for n in names}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with WorkerPool(spec, ClusterConfig(num_workers=2, num_cpus_per_worker=1, metrics=False), "peer-2") as pool, \
                InProcessPool(spec) as one:
            g_one = one.step(x, keys(0)).grad
            step = 0
            with tempfile.TemporaryDirectory() as tmp:
                for r in range(rounds):
                    for _ in range(warmup):
                        g_two = pool.step(x, keys(step)).grad
                        step += 1
                    ts = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        pool.step(x, keys(step))
                        ts.append(time.perf_counter() - t0)
                        step += 1
                    medians[names[0]].append(statistics.median(ts))
                    for part, name in zip(("batch", "exclusive"), names[1:]):
                        got = torchopt_round(part, warmup, repeats, f"{tmp}/g.pt" if r == 0 and part == "batch" else None)
                        medians[name].append(got["median_ms"] / 1e3)
                        if r == 0 and part == "batch":
                            g_peer = torch.load(f"{tmp}/g.pt")
    finally:
        ray.shutdown()
    same = all(torch.equal(g_two[k], g_one[k]) for k in x)
    flat = torch.cat([g_two[k].double().reshape(-1) for k in x])
    peer = torch.cat([g.double().reshape(-1) for g in g_peer])
    agree = float((flat - peer).norm() / flat.norm())
    ms = {n: statistics.median(v) * 1e3 for n, v in medians.items()}
    rows = [[n, ms[n], ms[n] / ms[names[0]], " ".join(f"{v * 1e3:.0f}" for v in medians[n])] for n in names]
    return {
        "title": "Distributed MAML: metaray's actors vs torchopt.distributed",
        "intro": (f"Second-order MAML, conv4 5-way 1-shot, {TASKS} tasks a step, 2 workers, one thread each, "
                  f"{rounds} alternating rounds of {warmup} warm-up + {repeats} timed steps (median of the round "
                  "medians). 'peer time / metaray time' > 1 means metaray is faster."),
        "tables": [table("ms per meta-gradient", ["configuration", "ms/step", "peer time / metaray time",
                                                  "round medians (ms)"], rows)],
        "plots": [],
        "notes": [f"metaray's 2-actor gradient bit-identical to its one-process one: {'yes' if same else 'NO'}; "
                  f"torchopt.distributed vs metaray gradient, relative difference: {agree:.1e}"],
        "data": {"medians_s": medians, "bit_identical": same, "relative_difference_to_peer": agree},
    }


if __name__ == "__main__":
    sys.exit(section_main(__doc__, build))
