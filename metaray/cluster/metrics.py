"""metaray's monitoring series, exported through ``ray.util.metrics`` to Ray's Prometheus endpoint (the
metrics export port of every node), so they appear in the Ray dashboard's Grafana next to Ray's own.

Prometheus names are Ray's prefix + ours: a Gauge ``metaray_outer_loss`` is scraped as
``ray_metaray_outer_loss``, a Counter ``metaray_restarts`` as ``ray_metaray_restarts_total``, a Histogram
``metaray_step_seconds`` as ``ray_metaray_step_seconds_bucket`` / ``_sum`` / ``_count``. Every series has a
``run`` tag; per-worker series also a ``worker`` tag. ``grafana_dashboard.json`` (next to this file) plots them.

They are recorded by the driver (the meta-learner process) once per outer step. Ray exports a series only once it
has been recorded (a counter: once incremented, which ``inc(0)`` refuses), so a panel over a series that a healthy
run never records needs a fallback (see the restarts panel's ``or ... * 0``).
``tests/cluster/test_monitoring_prometheus.py`` runs every panel's query against a real Prometheus and checks that
every series listed here reaches it.
"""
from __future__ import annotations

from typing import Any

# name -> (kind, description, tag keys); the single list the dashboard JSON is checked against.
SERIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "metaray_outer_loss": ("gauge", "mean outer (upper-level) loss over the step's tasks", ("run",)),
    "metaray_inner_loss": ("gauge", "mean inner (lower-level) loss of each worker's tasks", ("run", "worker")),
    "metaray_worker_tasks_per_second": ("gauge", "tasks per second of compute on each worker", ("run", "worker")),
    "metaray_tasks_per_second": ("gauge", "tasks per second of the whole step (wall clock)", ("run",)),
    "metaray_hypergrad_norm": ("gauge", "L2 norm of the aggregated hypergradient", ("run",)),
    "metaray_task_peak_memory_bytes": ("gauge", "peak bytes of one task hypergradient on each worker (the largest "
                                       "of the step; CUDA allocator peak, or on the CPU the bytes autograd holds for "
                                       "the backward pass: see metaray/solvers/memory.py)", ("run", "worker")),
    "metaray_step_seconds": ("histogram", "wall-clock seconds of one outer step", ("run",)),
    "metaray_steps": ("counter", "outer steps completed", ("run",)),
    "metaray_tasks": ("counter", "task hypergradients computed", ("run",)),
    "metaray_restarts": ("counter", "inner-learner actor restarts and replacements", ("run",)),
    "metaray_retries": ("counter", "task re-dispatches (dead actor, straggler, lost state, non-finite)", ("run",)),
}
STEP_SECONDS_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]

_metrics: dict[str, Any] = {}


def _get(name: str) -> Any:
    if name not in _metrics:
        from ray.util import metrics as rm

        kind, doc, tags = SERIES[name]
        if kind == "gauge":
            _metrics[name] = rm.Gauge(name, description=doc, tag_keys=tags)
        elif kind == "counter":
            _metrics[name] = rm.Counter(name, description=doc, tag_keys=tags)
        else:
            _metrics[name] = rm.Histogram(name, description=doc, boundaries=STEP_SECONDS_BOUNDARIES, tag_keys=tags)
    return _metrics[name]


def record_step(run: str, result: Any, train: bool) -> None:
    """Records one StepResult (see pool.py)."""
    tags = {"run": run}
    if train:
        _get("metaray_outer_loss").set(result.outer_loss, tags=tags)
        _get("metaray_hypergrad_norm").set(result.metrics["pool_hypergrad_norm"], tags=tags)
        _get("metaray_steps").inc(1.0, tags=tags)
    _get("metaray_tasks_per_second").set(result.metrics["pool_tasks_per_second"], tags=tags)
    _get("metaray_step_seconds").observe(result.seconds, tags=tags)
    _get("metaray_tasks").inc(float(len(result.per_task)), tags=tags)
    if result.restarts:
        _get("metaray_restarts").inc(float(result.restarts), tags=tags)
    if result.retries:
        _get("metaray_retries").inc(float(result.retries), tags=tags)
    for worker, row in result.per_worker.items():
        wtags = {"run": run, "worker": str(worker)}
        _get("metaray_inner_loss").set(row["inner_loss"], tags=wtags)
        if row["seconds"] > 0:
            _get("metaray_worker_tasks_per_second").set(row["tasks"] / row["seconds"], tags=wtags)
        if row.get("peak_memory_bytes") is not None:
            _get("metaray_task_peak_memory_bytes").set(float(row["peak_memory_bytes"]), tags=wtags)
