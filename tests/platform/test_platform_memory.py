"""Memory through the platform: ``[solver] memory_budget_mb`` fails before a run starts when nothing fits, a
budget that fits runs checkpointed, and every run's metrics.parquet has each worker's peak hypergradient
memory (the series the dashboard plots as metaray_task_peak_memory_bytes; the Ray pool's two actors are checked
by tests/reliability/test_soak.py)."""
import pyarrow.parquet as pq
import pytest
from platform_pools import LocalPool

import metaray
from metaray.platform import loads_config
from metaray.platform.launch import check_memory_budget
from metaray.platform.problems import build_problem
from metaray.solvers import MemoryBudgetError

CONFIG = """
name = "memory-test"
[problem]
name = "sinusoid"
shots = 5
queries = 5
hidden = 16
[solver]
name = "maml"
inner_steps = 30
inner_lr = 0.02
[tasks]
meta_batch_size = 4
val_tasks = 0
test_tasks = 0
[cluster]
backend = "inprocess"
num_workers = 2
[run]
steps = 2
progress = false
plots = false
baseline = false
"""


def config(tmp_path, **overrides):
    cfg = loads_config(CONFIG).replace(**{"run.run_dir": str(tmp_path / "run")})
    return cfg.replace(**overrides) if overrides else cfg


def test_a_budget_nothing_fits_fails_before_any_worker_starts(tmp_path):
    built = []

    def factory(*args):
        built.append(args)
        return LocalPool(*args)

    with pytest.raises(MemoryBudgetError, match=r"inner_steps <= \d+.*trad with truncate.*imaml.*fomaml"):
        metaray.launch(config(tmp_path, **{"solver.memory_budget_mb": 0.02}), pool_factory=factory)
    assert not built and not (tmp_path / "run" / "metrics.parquet").exists()


def test_a_budget_that_fits_runs_checkpointed_and_every_run_reports_peak_memory(tmp_path):
    cfg = config(tmp_path)
    full = metaray.launch(cfg, pool_factory=LocalPool).table
    peaks = full.column("worker0_peak_memory_bytes").to_pylist()  # the in-process pool reports as worker 0
    assert len(peaks) == 2 and all(p > 0 for p in peaks), peaks
    # half the full unroll's peak: the pre-run check accepts it, the run checkpoints and stays under it
    budget_mb = max(peaks) / 2 / 2**20
    cfg = config(tmp_path / "b", **{"solver.memory_budget_mb": budget_mb})
    plan = check_memory_budget(cfg, build_problem("sinusoid", cfg.problem.options, dtype=cfg.run.dtype))
    assert plan.checkpoint_every > 0
    table = metaray.launch(cfg, pool_factory=LocalPool).table
    assert table.column("train_checkpoint_every").to_pylist() == [float(plan.checkpoint_every)] * 2
    assert all(0 < p <= budget_mb * 2**20 for p in table.column("worker0_peak_memory_bytes").to_pylist())
    assert pq.read_table(tmp_path / "b" / "run" / "metrics.parquet").num_rows == 2


def test_the_gauge_is_recorded_per_worker(monkeypatch):
    from metaray.cluster import metrics
    from metaray.cluster.pool import StepResult

    recorded = {}

    class Fake:
        def __init__(self, name):
            self.name = name

        def set(self, value, tags):
            recorded[(self.name, tuple(sorted(tags.items())))] = value

        inc = observe = set

    monkeypatch.setattr(metrics, "_get", Fake)
    result = StepResult(grad={}, outer_loss=1.0, inner_loss=1.0, per_task=[{}], restarts=0, retries=0, seconds=0.1,
                        metrics={"pool_hypergrad_norm": 1.0, "pool_tasks_per_second": 10.0},
                        per_worker={0: {"tasks": 1, "inner_loss": 1.0, "seconds": 0.1, "peak_memory_bytes": 1234},
                                    1: {"tasks": 1, "inner_loss": 1.0, "seconds": 0.1, "peak_memory_bytes": None}})
    metrics.record_step("r", result, train=True)
    assert recorded[("metaray_task_peak_memory_bytes", (("run", "r"), ("worker", "0")))] == 1234.0
    assert not any(k[0] == "metaray_task_peak_memory_bytes" and ("worker", "1") in k[1] for k in recorded)
    assert "metaray_task_peak_memory_bytes" in metrics.SERIES
