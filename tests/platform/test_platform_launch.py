"""metaray.launch end to end (in-process pool): the run directory, metrics.parquet, summary.json, plots,
checkpoints, resume after a crash on the exact trajectory, and eval."""
import json

import pyarrow.parquet as pq
import pytest
import torch
from platform_pools import LocalPool

import metaray
from metaray.platform import evaluate, loads_config, resume
from metaray.platform.checkpoint import latest_checkpoint, load_latest

CONFIG = """
name = "launch-test"
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
meta_batch_size = 3
val_tasks = 8
test_tasks = 25
[outer]
optimizer = "adam"
lr = 0.01
schedule = "cosine"
clip_norm = 5.0
[cluster]
backend = "inprocess"
num_workers = 2
[run]
steps = 10
val_every = 4
checkpoint_every = 4
progress = false
dtype = "float64"
"""


def config(tmp_path, name="run", **overrides):
    cfg = loads_config(CONFIG).replace(**{"run.run_dir": str(tmp_path / name)})
    return cfg.replace(**overrides) if overrides else cfg


def test_launch_writes_a_complete_run_directory(tmp_path):
    result = metaray.launch(config(tmp_path), pool_factory=LocalPool)
    d = result.run_dir
    assert metaray.load_config(d / "config.toml") == config(tmp_path)  # the resolved config is saved
    table = pq.read_table(d / "metrics.parquet")
    assert table.num_rows == 10 and table.column("step").to_pylist() == list(range(1, 11))
    assert table.equals(result.table)
    cols = set(table.column_names)
    assert {"lr", "outer_loss", "inner_loss", "grad_norm", "update_norm", "seconds", "val_outer_loss"} <= cols
    assert any(c.startswith("worker") and c.endswith("_inner_loss") for c in cols)  # per-worker columns
    val = table.column("val_outer_loss").to_pylist()
    assert [s for s, v in zip(range(1, 11), val) if v is not None] == [4, 8, 10]
    # The cosine schedule really ran: lr(step 1) = lr, then decreasing.
    lrs = table.column("lr").to_pylist()
    assert lrs[0] == pytest.approx(0.01) and all(a > b for a, b in zip(lrs, lrs[1:]))
    summary = json.loads((d / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["test"]["num_tasks"] == 25 and summary["metric"] == "outer_loss"
    assert summary["test"]["mean"] == pytest.approx(result.test.mean)
    assert summary["baseline"]["mean"] == pytest.approx(result.baseline.mean)
    for name in ("learning_curves.png", "meta_validation.png", "hypergradient_norm.png"):
        assert (d / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # final params are what the last checkpoint holds and what eval re-tests
    ckpt = load_latest(d)[1]
    assert ckpt["step"] == 10
    final = torch.load(d / "final_params.pt", weights_only=True)
    for k, v in final.items():
        assert torch.equal(v, ckpt["learner"]["params"][k]) and torch.equal(v, result.final_params[k])
    out = evaluate(d, pool_factory=LocalPool, progress=False)
    assert out["result"].mean == pytest.approx(result.test.mean, rel=1e-12)
    assert json.loads((d / "eval.json").read_text())["test"]["num_tasks"] == 25
    assert sorted(p.name for p in (d / "checkpoints").glob("ckpt_*.pt")) == ["ckpt_0000008.pt", "ckpt_0000010.pt"]


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_continues_the_exact_trajectory(tmp_path):
    full = metaray.launch(config(tmp_path, "full"), pool_factory=LocalPool)

    def crash_at_6(row):
        if row["step"] == 6:
            raise Crash("driver died")

    with pytest.raises(Crash):
        metaray.launch(config(tmp_path, "crashed"), pool_factory=LocalPool, on_step=crash_at_6)
    assert load_latest(tmp_path / "crashed")[1]["step"] == 4
    resumed = resume(tmp_path / "crashed", pool_factory=LocalPool)
    for k, v in full.final_params.items():
        assert torch.equal(resumed.final_params[k], v), k
    # the metrics table is the uninterrupted one too (steps 1-4 from the checkpoint, 5-10 re-run)
    a, b = full.table, resumed.table
    assert a.column("step").to_pylist() == b.column("step").to_pylist()
    assert a.column("outer_loss").to_pylist() == b.column("outer_loss").to_pylist()


def test_launch_refuses_to_overwrite_a_run(tmp_path):
    metaray.launch(config(tmp_path, **{"run.steps": 1, "tasks.test_tasks": 0}), pool_factory=LocalPool)
    with pytest.raises(FileExistsError, match="metaray resume"):
        metaray.launch(config(tmp_path, **{"run.steps": 1}), pool_factory=LocalPool)


def test_single_task_hpo_runs_through_the_same_loop(tmp_path):
    cfg = loads_config(
        """
name = "hpo"
[problem]
name = "quadratic"
[solver]
name = "rad"
inner_steps = 20
inner_lr = 0.1
[tasks]
meta_batch_size = 1
persistent = true
val_tasks = 1
test_tasks = 1
[outer]
optimizer = "sgd"
lr = 0.1
[cluster]
backend = "inprocess"
num_workers = 1
[run]
steps = 30
dtype = "float64"
progress = false
"""
    ).replace(**{"run.run_dir": str(tmp_path / "hpo")})
    result = metaray.launch(cfg, pool_factory=LocalPool)
    losses = result.table.column("outer_loss").to_pylist()
    assert losses[-1] < 0.9 * losses[0]  # the upper-level objective goes down on its one task
    assert result.test.num_tasks == 1 and result.test.mean < result.baseline.mean


def test_bf16_precision_runs_end_to_end_close_to_fp32(tmp_path):
    """``[run] precision = "bf16"`` reaches the workers: the trajectory differs from fp32 (the inner loop really
    ran in bf16) but stays close on this sinusoid MLP."""
    finals = {}
    for precision in ("fp32", "bf16"):
        cfg = config(tmp_path, precision, **{"run.dtype": "float32", "run.precision": precision, "run.steps": 3,
                                              "run.val_every": 0, "run.checkpoint_every": 0, "tasks.test_tasks": 0})
        finals[precision] = metaray.launch(cfg, pool_factory=LocalPool).final_params
        assert metaray.load_config(tmp_path / precision / "config.toml").run.precision == precision
    x, ref = finals["bf16"], finals["fp32"]
    diff = sum(float((x[k] - ref[k]).norm()) ** 2 for k in ref) ** 0.5
    assert 0 < diff < 1e-3 * sum(float(ref[k].norm()) ** 2 for k in ref) ** 0.5
