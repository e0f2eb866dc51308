"""``[run] tensorboard = true``: the run's TensorBoard event files, read back with TensorBoard's own reader, hold
exactly metrics.parquet's values (float32, as TensorBoard stores them), step by step; after a crash and a resume
they hold the resumed run's trajectory once, with no duplicated steps."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from platform_pools import LocalPool
from tensorboard.backend.event_processing import event_accumulator  # TensorBoard's own reader (the `test` extra)

import metaray
from metaray.platform import loads_config, resume
from metaray.platform.tensorboard import TENSORBOARD_DIR, tag_of

CONFIG = """
name = "tensorboard-test"
[problem]
name = "sinusoid"
shots = 5
queries = 5
hidden = 16
[solver]
name = "maml"
inner_steps = 1
inner_lr = 0.02
[tasks]
meta_batch_size = 4
val_tasks = 6
test_tasks = 6
[outer]
lr = 0.01
[cluster]
backend = "inprocess"  # one worker (worker 0) computes every task
num_workers = 1
[run]
steps = 6
val_every = 2
checkpoint_every = 3
baseline = false
plots = false
progress = false
tensorboard = true
"""


class Crash(RuntimeError):
    pass


def read_events(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """Scalar tag -> [(step, value)] and the text tags, as TensorBoard itself loads them (it also applies the purge
    a resumed run's writer asks for)."""
    acc = event_accumulator.EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    tags = acc.Tags()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags[event_accumulator.SCALARS]}, tags["tensors"]


def expected_from_parquet(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The same series built from metrics.parquet alone: every numeric column but step, non-null entries, and each
    worker's throughput as its tasks / its compute seconds."""
    table = pq.read_table(run_dir / "metrics.parquet").to_pydict()
    steps = table.pop("step")
    out: dict[str, list[tuple[int, float]]] = {}
    for column, values in table.items():
        pairs = [(s, float(v)) for s, v in zip(steps, values) if isinstance(v, (bool, int, float))]
        if pairs:
            out[tag_of(column)] = pairs
        if column.startswith("worker") and column.endswith("_tasks"):
            w = column[len("worker"):-len("_tasks")]
            secs = table[f"worker{w}_seconds"]
            out[f"worker{w}/tasks_per_second"] = [(s, n / t) for s, n, t in zip(steps, values, secs) if n is not None and t]
    return out


def assert_same_series(events: dict, expected: dict) -> None:
    assert sorted(events) == sorted(expected), (sorted(set(events) ^ set(expected)))
    for tag, want in expected.items():
        got = events[tag]
        assert [s for s, _ in got] == [s for s, _ in want], (tag, got, want)
        # TensorBoard keeps float32: the parquet's float64 rounded to float32 is what must come back
        np.testing.assert_allclose([v for _, v in got], np.float32([v for _, v in want]), rtol=1e-7, atol=0,
                                   err_msg=tag, equal_nan=True)


def test_event_files_hold_the_parquet_values(tmp_path):
    result = metaray.launch(loads_config(CONFIG).replace(**{"run.run_dir": str(tmp_path / "run")}), pool_factory=LocalPool)
    events, texts = read_events(result.run_dir)
    assert_same_series(events, expected_from_parquet(result.run_dir))
    # what the issue asks for, by name: losses, hypergradient norm, validation, per-worker throughput
    for tag in ("loss/outer_loss", "loss/inner_loss", "optim/grad_norm", "val/outer_loss", "worker0/tasks_per_second"):
        assert tag in events, tag
    assert [s for s, _ in events["loss/outer_loss"]] == list(range(1, 7))
    assert [s for s, _ in events["val/outer_loss"]] == [2, 4, 6]  # every val_every steps, and at the end
    assert all(math.isfinite(v) and v > 0 for _, v in events["worker0/tasks_per_second"])
    assert "config/text_summary" in texts  # the resolved config, on TensorBoard's Text tab


def test_a_resumed_run_shows_each_step_once(tmp_path):
    def crash_at_5(row):
        if row["step"] == 5:
            raise Crash("driver died")

    cfg = loads_config(CONFIG).replace(**{"run.run_dir": str(tmp_path / "crashed")})
    with pytest.raises(Crash):
        metaray.launch(cfg, pool_factory=LocalPool, on_step=crash_at_5)
    # the crashed run wrote steps 1-5; its checkpoint is at 3, so the resume re-runs 4-6 into a second event file
    before, _ = read_events(tmp_path / "crashed")
    assert [s for s, _ in before["loss/outer_loss"]] == [1, 2, 3, 4, 5]
    resumed = resume(tmp_path / "crashed", pool_factory=LocalPool)
    assert len(list((resumed.run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    events, _ = read_events(resumed.run_dir)
    assert_same_series(events, expected_from_parquet(resumed.run_dir))
    assert [s for s, _ in events["loss/outer_loss"]] == list(range(1, 7))
