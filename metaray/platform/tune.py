"""Ray Tune over outer hyperparameters (outer learning rate, inner steps, ...).

    from ray import tune
    from metaray.platform.tune import tune_search

    grid = tune_search(base_config, {"outer.lr": tune.grid_search([1e-3, 3e-3])}, metric="val_outer_loss", mode="min")

Each trial is ``metaray.launch`` of the base config with the trial's dotted-key overrides. The trial reserves its
inner-learner actors up front through a placement group factory: one bundle for the trial's driver plus one per
actor (``cluster.num_cpus_per_worker`` CPUs, ``cluster.num_gpus_per_worker`` GPUs), so Tune never starts a trial
whose actors could not be placed. Needs ``ray[tune]`` (which brings pandas).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from .config import ExperimentConfig


def _tune():
    try:
        from ray import tune
    except ImportError as e:
        raise ImportError(f"Ray Tune is not installed ({e}); install it with: pip install 'ray[tune]'") from None
    return tune


def bundles(config: ExperimentConfig) -> list[dict[str, float]]:
    """The trial's resource bundles: the driver (1 CPU), then one per inner-learner actor."""
    c = config.cluster
    worker = {"CPU": c.num_cpus_per_worker}
    if c.num_gpus_per_worker:
        worker["GPU"] = c.num_gpus_per_worker
    actors = c.num_workers if c.backend == "ray" else 0
    return [{"CPU": 1.0}] + [dict(worker) for _ in range(actors)]


def placement_group_factory(config: ExperimentConfig):
    tune = _tune()
    return tune.PlacementGroupFactory(bundles(config), strategy=config.cluster.strategy)


def trainable(base: ExperimentConfig) -> Callable[[Mapping[str, Any]], None]:
    """A Tune function trainable running ``base`` with each trial's overrides, resources reserved per trial."""
    tune = _tune()
    if not isinstance(base, ExperimentConfig):
        raise TypeError(f"trainable() takes an ExperimentConfig, got {type(base).__name__}")
    base_dict = base.to_dict()

    def run_trial(trial_config: Mapping[str, Any]) -> None:
        from .launch import launch

        cfg = ExperimentConfig.from_dict(base_dict).replace(**dict(trial_config))
        ctx = tune.get_context()
        # the run directory's name becomes the run name (actor and placement group names): one per trial
        trial_dir = Path(ctx.get_trial_dir() or ".") / f"metaray-{ctx.get_trial_id() or 'trial'}"
        cfg = cfg.replace(**{"run.run_dir": str(trial_dir), "run.progress": False})

        def report(row: dict[str, Any]) -> None:
            # Tune checks that every report carries the search metric, and the validation metrics exist only
            # on validation steps (run.val_every), so those steps are what a trial reports while it runs.
            if any(k.startswith("val_") for k in row):
                tune.report({k: v for k, v in row.items() if isinstance(v, (int, float))})

        result = launch(cfg, on_step=report)
        final = {f"test_{k}": v for k, v in (result.test.as_dict() if result.test else {}).items() if k != "metric"}
        tune.report({**{k: v for k, v in result.metrics["final"].items() if isinstance(v, (int, float))}, **final, "step": result.metrics["steps"]})

    return tune.with_resources(run_trial, placement_group_factory(base))


def tune_search(
    base: ExperimentConfig,
    param_space: Mapping[str, Any],
    *,
    metric: str = "val_outer_loss",
    mode: str = "min",
    num_samples: int = 1,
    storage_path: str | None = None,
    name: str | None = None,
):
    """Runs a Tune search over dotted config keys; returns Tune's ``ResultGrid``."""
    tune = _tune()
    from ray.tune import RunConfig, TuneConfig, Tuner

    bad = [k for k in param_space if "." not in k]
    if bad:
        raise ValueError(f"param_space keys are dotted config keys such as 'outer.lr', got {bad}")
    base.replace(**{k: _sample_value(v) for k, v in param_space.items()})  # fail fast on unknown keys
    import ray

    if not ray.is_initialized():
        # Tune would call a bare ray.init(), which may follow a stale cluster pointer; metaray's rule instead:
        # the job's cluster under `ray job submit` (RAY_ADDRESS), else a fresh local one.
        from ..cluster import init_ray

        init_ray(base.cluster.address)
    tuner = Tuner(
        trainable(base),
        param_space=dict(param_space),
        tune_config=TuneConfig(metric=metric, mode=mode, num_samples=num_samples),
        run_config=RunConfig(name=name or f"{base.name}-tune", storage_path=storage_path),
    )
    del tune
    return tuner.fit()


def _sample_value(v: Any) -> Any:
    """A representative value of a Tune search-space entry (for validating the keys before the search)."""
    if isinstance(v, Mapping) and "grid_search" in v:
        return v["grid_search"][0]
    sample = getattr(v, "sample", None)
    return sample() if callable(sample) else v
