"""The launch API: ``metaray.launch(config) -> RunResult``.

A run directory holds the resolved ``config.toml``, ``checkpoints/``, ``metrics.parquet``, ``summary.json``,
``final_params.pt``, ``plots/`` and, with ``run.tensorboard``, ``tensorboard/`` (TensorBoard event files).
``launch`` works the same in a notebook, a script and inside ``ray job submit`` (the worker pool joins the job's
cluster). ``resume(run_dir)`` continues from the newest checkpoint on exactly the trajectory an uninterrupted run
would have followed; ``evaluate(run_dir)`` re-runs the meta-test of a finished (or interrupted) run.
"""
from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import torch

from ..solvers.core import Params
from .checkpoint import atomic_torch_save, atomic_write_text, has_checkpoint, load_latest, save_checkpoint, set_rng_state
from .integrity import safe_torch_load
from .jobs import RUN_DIR_MARKER
from .config import ConfigError, ExperimentConfig, load_config
from .learner import MetaLearner, TestResult, _progress
from .problems import ProblemSetup, build_problem
from .reports import _jsonable, plot_run, read_metrics, write_metrics, write_summary

CONFIG_FILE = "config.toml"
FINAL_PARAMS = "final_params.pt"

PoolFactory = Callable[[Any, Any, str], Any]  # (WorkerSpec, ClusterConfig, run_name) -> pool


@dataclass
class RunResult:
    """What a run produced. ``table`` reads ``metrics.parquet`` (a ``pyarrow.Table``, one row per outer step)."""

    run_dir: Path
    metrics: dict[str, Any]
    test: TestResult | None = None
    baseline: TestResult | None = None
    final_params: Params = field(default_factory=dict, repr=False)

    @property
    def table(self) -> pa.Table:
        return read_metrics(self.run_dir)

    @property
    def config(self) -> ExperimentConfig:
        return load_config(self.run_dir / CONFIG_FILE)


# ----------------------------------------------------------------------------------------------------------
# Pools
# ----------------------------------------------------------------------------------------------------------


def make_pool(config: ExperimentConfig, setup: ProblemSetup, run_name: str, pool_factory: PoolFactory | None = None):
    """The run's worker pool: Ray actors (``cluster.backend = "ray"``) or the in-process pool."""
    from ..cluster.config import WorkerSpec

    spec = WorkerSpec(
        problem=setup.make_problem,
        solver=config.solver.name,
        solver_options=dict(config.solver.options),
        source=setup.source,
        dtype=config.run.dtype,
        device=config.run.device,
        precision=config.run.precision,
    )
    if pool_factory is None:
        from ..cluster import InProcessPool, WorkerPool

        pool_factory = WorkerPool if config.cluster.backend == "ray" else InProcessPool
    return pool_factory(spec, config.cluster.cluster_config(), run_name)


def check_memory_budget(config: ExperimentConfig, setup: ProblemSetup) -> Any:
    """``[solver] memory_budget_mb``: probes one inner step of the training task ("train", 0, 0), built on the
    driver as a worker builds it (on the CPU: tensor bytes are the same on a GPU, up to the allocator's
    rounding), and raises ``MemoryBudgetError`` (a ValueError naming what would fit) before any worker starts.
    Returns the solver's ``MemoryPlan``, or None without a budget."""
    if config.solver.options.get("memory_budget_mb") is None:
        return None
    from ..cluster.config import WorkerSpec
    from ..cluster.worker import InnerLearner

    spec = WorkerSpec(problem=setup.make_problem, solver=config.solver.name, solver_options=dict(config.solver.options),
                      source=setup.source, dtype=config.run.dtype, device="cpu", precision=config.run.precision)
    return InnerLearner(spec, set_threads=False).memory_plan(setup.initial_params, ("train", 0, 0))


def _run_name(run_dir: Path) -> str:
    # Actor names are metaray-<run>-inner-<i>: keep them short and unique per run directory.
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in run_dir.name)[:48]


def _new_run_dir(config: ExperimentConfig) -> Path:
    if config.run.run_dir:
        return Path(config.run.run_dir)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(config.run.output_dir) / f"{config.name}-{stamp}"
    path, i = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    return path


# ----------------------------------------------------------------------------------------------------------
# Launch / resume / evaluate
# ----------------------------------------------------------------------------------------------------------


def launch(
    config: ExperimentConfig | str | Path,
    *,
    pool_factory: PoolFactory | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Runs an experiment from a config (an ``ExperimentConfig`` or a TOML path) and returns its ``RunResult``.

    ``on_step(row)`` is called after every outer step (e.g. to report to Ray Tune).
    """
    if isinstance(config, (str, Path)):
        config = load_config(config)
    if not isinstance(config, ExperimentConfig):
        raise TypeError(f"launch() takes an ExperimentConfig or a path to a TOML config, got {type(config).__name__}")
    run_dir = _new_run_dir(config)
    if has_checkpoint(run_dir):
        raise FileExistsError(f"{run_dir} already holds a run with checkpoints; use `metaray resume {run_dir}`")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_FILE, config.to_toml())
    return _execute(config, run_dir, pool_factory=pool_factory, resume=False, on_step=on_step)


def resume(run_dir: str | Path, *, pool_factory: PoolFactory | None = None, steps: int | None = None) -> RunResult:
    """Continues a run from its newest checkpoint (same trajectory as an uninterrupted run)."""
    run_dir = Path(run_dir)
    config = _config_of(run_dir)
    if steps is not None:
        config = config.replace(**{"run.steps": steps})
    return _execute(config, run_dir, pool_factory=pool_factory, resume=True)


def _config_of(run_dir: Path) -> ExperimentConfig:
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir} is not a metaray run directory (no {CONFIG_FILE})")
    return load_config(run_dir / CONFIG_FILE)


def _execute(config: ExperimentConfig, run_dir: Path, *, pool_factory, resume: bool, on_step=None) -> RunResult:
    run = config.run
    # One line a person (or `metaray submit`, reading a Ray job's log) can find the results by: the absolute path.
    print(f"{RUN_DIR_MARKER} {run_dir.resolve()}", flush=True)
    torch.manual_seed(run.seed)
    setup = build_problem(config.problem.name, config.problem.options, seed=run.seed, dtype=run.dtype)
    check_memory_budget(config, setup)  # a budget nothing fits fails here, before any worker starts
    started = time.perf_counter()
    with make_pool(config, setup, _run_name(run_dir), pool_factory) as pool:
        learner = MetaLearner(pool, setup.initial_params, config.outer, config.tasks, total_steps=run.steps, metric=setup.metric)
        rows: list[dict[str, Any]] = []
        if resume:
            if not has_checkpoint(run_dir):
                raise FileNotFoundError(f"{run_dir} has no checkpoint to resume from")
            _, ckpt = load_latest(run_dir)
            learner.load_state_dict(ckpt["learner"])
            pool.load_state_dict(ckpt["pool"])
            set_rng_state(ckpt["rng"])
            rows = list(ckpt["rows"])

        def checkpoint() -> None:
            payload = {"learner": learner.state_dict(), "pool": pool.state_dict(), "rows": rows}
            save_checkpoint(run_dir, learner.step_count, payload, keep=run.keep_checkpoints)
            write_metrics(rows, run_dir)

        # TensorBoard events (run.tensorboard): written as each row is made, so the curves are live.
        tb = None
        if run.tensorboard:
            from .tensorboard import TensorBoardLog

            tb = TensorBoardLog(run_dir, first_step=learner.step_count + 1, config_toml=None if resume else config.to_toml())
        bar = _progress(total=run.steps, desc=f"{config.name} outer steps", enabled=run.progress, initial=learner.step_count)
        try:
            while learner.step_count < run.steps:
                row = learner.step()
                s = learner.step_count
                if run.val_every and s % run.val_every == 0 and s < run.steps:
                    row.update(learner.validate())
                rows.append(row)
                if tb is not None:
                    tb.write(row)
                bar.update(1)
                bar.set_postfix(outer_loss=f"{row['outer_loss']:.4g}", refresh=False)
                if on_step is not None:
                    on_step(row)
                if run.checkpoint_every and s % run.checkpoint_every == 0 and s < run.steps:
                    checkpoint()
        except BaseException:
            if tb is not None:
                tb.close()  # drains tensorboardX's queue, so what the run wrote is on disk for a resume
            raise
        finally:
            bar.close()
        # The end of training: validate, checkpoint, then meta-test (and the no-meta-learning baseline).
        if rows and not any(k.startswith("val_") for k in rows[-1]):
            rows[-1].update(learner.validate())
        if tb is not None:
            if rows:
                tb.write(rows[-1])  # only what the row gained: the end-of-training validation
            tb.close()
        checkpoint()
        final = learner.x
        atomic_torch_save({k: v.clone() for k, v in final.items()}, run_dir / FINAL_PARAMS)
        test = learner.test(progress=run.progress) if config.tasks.test_tasks else None
        baseline = None
        if run.baseline and config.tasks.test_tasks:
            baseline = learner.test(x=setup.initial_params, progress=run.progress, desc="baseline (no meta-learning)")
    write_metrics(rows, run_dir)
    plots = plot_run(rows, run_dir, setup.metric) if run.plots else []
    last = rows[-1] if rows else {}
    summary = {
        "name": config.name,
        "run_dir": str(run_dir),
        "problem": config.problem.name,
        "solver": config.solver.name,
        "steps": learner.step_count,
        "metric": setup.metric,
        "higher_is_better": setup.higher_is_better,
        "final": {k: v for k, v in last.items() if k in ("outer_loss", "inner_loss", "grad_norm") or k.startswith("val_")},
        "test": test.as_dict() if test else None,
        "baseline": baseline.as_dict() if baseline else None,
        "seconds": time.perf_counter() - started,
        "resumed": resume,
        "plots": [str(p.relative_to(run_dir)) for p in plots],
    }
    write_summary(summary, run_dir)
    return RunResult(run_dir, summary, test, baseline, final)


def evaluate(run_dir: str | Path, *, num_tasks: int | None = None, pool_factory: PoolFactory | None = None, progress: bool = True) -> dict[str, Any]:
    """Meta-tests a run's final params (or its newest checkpoint's) and writes ``eval.json``."""
    run_dir = Path(run_dir)
    config = _config_of(run_dir)
    setup = build_problem(config.problem.name, config.problem.options, seed=config.run.seed, dtype=config.run.dtype)
    if (run_dir / FINAL_PARAMS).is_file():
        x = safe_torch_load(run_dir / FINAL_PARAMS)
        source = FINAL_PARAMS
    else:
        if not has_checkpoint(run_dir):
            raise FileNotFoundError(f"{run_dir} has neither {FINAL_PARAMS} nor a checkpoint")
        path, ckpt = load_latest(run_dir)
        x = ckpt["learner"]["params"]
        source = str(path.relative_to(run_dir))
    n = config.tasks.test_tasks if num_tasks is None else num_tasks
    if n < 1:
        raise ValueError(f"num_tasks must be >= 1, got {n}")
    with make_pool(config, setup, _run_name(run_dir) + "-eval", pool_factory) as pool:
        learner = MetaLearner(pool, setup.initial_params, config.outer, config.tasks, metric=setup.metric)
        test = learner.test(n, x=x, progress=progress)
    out = {"params": source, "test": test.as_dict()}
    atomic_write_text(run_dir / "eval.json", json.dumps(_jsonable(out), indent=2) + "\n")
    return {**out, "result": test}


def example_dir() -> Path:
    """Where the example configs live in a source checkout."""
    return Path(__file__).resolve().parents[2] / "examples"


__all__ = ["RunResult", "launch", "resume", "evaluate", "make_pool"]
