"""Soak: many outer steps with 2 actors on a tiny problem; object-store memory, driver RSS and the driver's live
object references must stay flat. Slow (``pytest -m slow tests/reliability/test_soak.py -s``); the step count is
``METARAY_SOAK_STEPS`` (default 1000, what CI runs; docs/reliability.md reports a 2000-step run;
``METARAY_SOAK_METRICS=0`` turns the metrics export off). The numbers are printed and, if ``METARAY_SOAK_REPORT`` names a file,
written there as JSON. A second soak runs 300 steps of second-order MAML (checkpointed, with the per-task memory
meter on) on an MLP and asserts the actors' RSS and the driver's stay flat too (issue #14: no leaks).

Each soak runs in a driver process of its own (this file run as a script, with a local Ray cluster of its own), as a
real run's driver is: the pytest process has run hundreds of tests by then and holds ~1.5 GB, and its allocator's
churn read as 4-22 KiB/step of "growth" in CI while a fresh driver stays under 1 KiB/step."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import faultkit as K
from metaray.cluster import ClusterConfig, InProcessPool, WorkerPool

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def live_refs(ray) -> int:
    return len(ray._private.worker.global_worker.core_worker.get_all_reference_counts())


def object_store_used(ray) -> float:
    total = ray.cluster_resources().get("object_store_memory", 0.0)
    return total - ray.available_resources().get("object_store_memory", total)


def soak(ray, steps: int, sample_every: int = 50, metrics: bool = True, spec=None, x0=None, name: str = "rel-soak",
         warmup: int | None = None) -> dict:
    samples, peaks = [], []
    with WorkerPool(spec or K.spec(), ClusterConfig(num_workers=2, metrics=metrics), name) as pool:
        x = x0 or K.x0()
        t0 = time.perf_counter()
        for s in range(steps):
            r = pool.step(x, K.keys(s))
            x = K.sgd(x, r.grad, lr=0.01)
            peaks.append([r.per_worker[w].get("peak_memory_bytes") for w in sorted(r.per_worker)])
            if s % sample_every == 0 or s == steps - 1:
                gc.collect()
                K.release_free_heap()  # RSS then counts live memory, not heap pages malloc kept after frees
                samples.append({"step": s, "rss": K.rss_bytes(), "store": object_store_used(ray), "refs": live_refs(ray),
                                "worker_rss": [K.rss_bytes(p) for p in pool.pids]})
        seconds = time.perf_counter() - t0
    half = [p for p in samples if p["step"] >= (steps // 4 if warmup is None else warmup)]  # after warm-up
    steps_ = [p["step"] for p in half]
    return {
        "steps": steps,
        "seconds": seconds,
        "steps_per_second": steps / seconds,
        "rss_start_mb": samples[0]["rss"] / 2**20,
        "rss_end_mb": samples[-1]["rss"] / 2**20,
        "rss_slope_bytes_per_step": slope(steps_, [p["rss"] for p in half]),
        "worker_rss_slope_bytes_per_step": [slope(steps_, [p["worker_rss"][w] for p in half]) for w in range(2)],
        "store_used_start_bytes": samples[0]["store"],
        "store_used_end_bytes": samples[-1]["store"],
        "store_slope_bytes_per_step": slope(steps_, [p["store"] for p in half]),
        "refs_start": samples[0]["refs"],
        "refs_end": samples[-1]["refs"],
        "refs_max": max(p["refs"] for p in samples),
        "final_x": x["x"].tolist() if "x" in x else None,
        "peak_memory_bytes_first_last": [peaks[0], peaks[-1]],
        "samples": len(samples),
        "metrics_export": metrics,
    }


def soak_in_fresh_driver(kind: str, steps: int, **options) -> dict:
    """Runs ``soak`` in a new Python process (its own driver and local Ray cluster) and returns its result."""
    arg = json.dumps({"kind": kind, "steps": steps, **options})
    done = subprocess.run([sys.executable, os.path.abspath(__file__), arg], capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, f"soak driver failed (exit {done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_soak_here(kind: str, steps: int, **options) -> dict:
    """The driver side of ``soak_in_fresh_driver``: the same set-up as the ``ray_local`` fixture, then one soak."""
    ray, _ = K.start_local_ray()
    try:
        if kind == "maml":
            spec = _maml_spec()
            x0 = {k: v.detach().clone() for k, v in spec.problem().initial_params().items()}
            return soak(ray, steps, spec=spec, x0=x0, name="rel-soak-maml", **options)
        return soak(ray, steps, **options)
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_soak_memory_and_refs_stay_flat():
    steps = int(os.environ.get("METARAY_SOAK_STEPS", "1000"))
    out = soak_in_fresh_driver("quadratic", steps, metrics=os.environ.get("METARAY_SOAK_METRICS", "1") != "0")
    print("\n[soak] " + json.dumps({k: v for k, v in out.items() if k != "final_x"}, indent=1))
    if os.environ.get("METARAY_SOAK_REPORT"):
        with open(os.environ["METARAY_SOAK_REPORT"], "w") as f:
            json.dump(out, f, indent=1)
    # the same steps in-process give the same x (nothing drifted over the long run)
    x = K.x0()
    ref = InProcessPool(K.spec())
    for s in range(steps):
        x = K.sgd(x, ref.step(x, K.keys(s)).grad, lr=0.01)
    assert out["final_x"] == x["x"].tolist()
    assert abs(out["rss_slope_bytes_per_step"]) < 2048, out          # < 2 KiB a step: < 4 MB over 2,000 steps
    assert abs(out["store_slope_bytes_per_step"]) < 256, out
    assert out["refs_end"] <= out["refs_start"] + 4, out               # no refs pile up in the driver


def _maml_spec():
    import functools

    from metaray.cluster import WorkerSpec
    from metaray.tasks import ModelProblem, SinusoidSource, mlp

    torch.manual_seed(0)
    return WorkerSpec(problem=functools.partial(ModelProblem, mlp([1, 32, 32, 1]), "mse"), solver="maml",
                      solver_options={"inner_steps": 6, "inner_lr": 0.02, "checkpoint_every": 2},
                      source=SinusoidSource(shots=10, queries=10), dtype="float32", device="cpu")


@pytest.mark.slow
def test_maml_soak_actor_and_driver_memory_stay_flat():
    """300 outer steps of checkpointed second-order MAML on 2 actors, the memory meter recording every task."""
    # allocator and Ray caches settle within ~200 steps (in-process: flat from step ~200, to the KiB, over 1,500)
    out = soak_in_fresh_driver("maml", 300, sample_every=10, warmup=150)
    print("\n[soak maml] " + json.dumps(out, indent=1))
    first, last = out["peak_memory_bytes_first_last"]
    assert len(first) == 2 and all(p and p > 0 for p in first + last)  # both actors report their peak
    assert first == last  # the same computation holds the same bytes at step 1 and step 300
    # A leaked graph of one task (~60 KiB of saved tensors here) per step would be a slope of >= 60 KiB/step.
    assert abs(out["rss_slope_bytes_per_step"]) < 8192, out
    assert all(abs(s) < 8192 for s in out["worker_rss_slope_bytes_per_step"]), out
    assert abs(out["store_slope_bytes_per_step"]) < 256, out
    assert out["refs_end"] <= out["refs_start"] + 4, out


if __name__ == "__main__":  # the fresh driver of soak_in_fresh_driver: one JSON argument in, one JSON line out
    result = _run_soak_here(**json.loads(sys.argv[1]))
    print(json.dumps(result))
