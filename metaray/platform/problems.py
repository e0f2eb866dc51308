"""From a problem name + options to what a run needs: a picklable problem factory (workers build the problem
locally), a task source, the initial outer params and the headline metric of the meta-test.

Names, options and builders come from the tasks layer's registry (``metaray.tasks.registry``); this module
adapts its ``ProblemSpec`` to what a run needs and checks options at config load.
"""
from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..solvers.core import BilevelProblem, Params
from ..tasks import TaskSource, registry


@dataclass(frozen=True)
class ProblemSetup:
    """Everything a run needs from the tasks layer.

    make_problem:   zero-argument picklable factory; each worker calls it once
    source:         picklable TaskSource, deterministic in the task key
    initial_params: the outer params before meta-training (seeded)
    metric:         headline meta-test metric: a key of the problem's metrics (e.g. "accuracy") or "outer_loss"
    """

    make_problem: Callable[[], BilevelProblem]
    source: TaskSource
    initial_params: Params
    metric: str = "outer_loss"

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "outer_loss" and "loss" not in self.metric


DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ----------------------------------------------------------------------------------------------------------
# Option checks
# ----------------------------------------------------------------------------------------------------------


def _options(problem: str, given: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    unknown = [k for k in given if k not in defaults]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(defaults), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown option {k!r} for problem {problem!r}{hint}; valid options: {', '.join(defaults)}")
    for k, v in given.items():
        _check_option_type(problem, k, v, defaults[k])
    return {**defaults, **given}


def _check_option_type(problem: str, key: str, value: Any, default: Any) -> None:
    """An option takes the type of its default (an int where the default is an int, a number where it is a
    float); numbers must be finite. Checked at config load, so `shots = nan` fails before any cluster starts."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"option {key!r} of problem {problem!r} must be finite, got {value}")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    expected, ok = None, True
    if isinstance(default, bool):
        expected, ok = "true or false", isinstance(value, bool)
    elif isinstance(default, int):
        expected, ok = "an integer", number and isinstance(value, int)
    elif isinstance(default, float):
        expected, ok = "a number", number
    elif isinstance(default, str):
        expected, ok = "a string", isinstance(value, str)
    if not ok:
        raise ValueError(f"option {key!r} of problem {problem!r} must be {expected} (default {default!r}), got {value!r}")


def check_problem_options(name: str, options: Mapping[str, Any]) -> None:
    """Cheap check at config load: the problem exists, its options are known, of their defaults' types, finite."""
    check_problem_name(name)
    _options(name, options, registry.problem_options(name))


# ----------------------------------------------------------------------------------------------------------
# Names and building
# ----------------------------------------------------------------------------------------------------------


def problem_names() -> list[str]:
    return sorted(registry.problem_names())


def check_problem_name(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"problem.name must be a str, got {type(name).__name__}")
    valid = problem_names()
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        from .config import ConfigError

        raise ConfigError(f"unknown problem {name!r}{hint}; valid problems: {', '.join(valid)}")


def build_problem(name: str, options: Mapping[str, Any], *, seed: int = 0, dtype: str = "float32") -> ProblemSetup:
    """Resolves a problem name to a ``ProblemSetup``; options are checked by the problem."""
    check_problem_name(name)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return _from_registry(name, dict(options), seed, dtype)


def _registry_problem(name: str, options: tuple) -> BilevelProblem:
    """Worker-side factory: rebuilds the named problem from its options (picklable: a name and plain values)."""
    return registry.make_problem(name, **dict(options)).problem


def _from_registry(name: str, options: dict[str, Any], seed: int, dtype: str) -> ProblemSetup:
    """Adapts the tasks registry's ``ProblemSpec(problem, source, x0)`` to a ProblemSetup."""
    if "seed" in registry.problem_options(name) and "seed" not in options:
        options = {**options, "seed": seed}
    spec = registry.make_problem(name, **options)
    dt = DTYPES[dtype]
    x0 = {k: v.detach().to(dt).clone() for k, v in spec.x0.items()}
    factory = functools.partial(_registry_problem, name, tuple(sorted(options.items())))
    return ProblemSetup(factory, spec.source, x0, _headline_metric(spec.problem, x0, spec.source))


def _headline_metric(problem: BilevelProblem, x0: Params, source: Any) -> str:
    """'accuracy' (few-shot), 'test_accuracy' (HPO on a held-out test set), else the outer loss."""
    try:
        task = source.sample(("test", 0, 0))
        y0 = problem.init_inner(x0, task)
        names = problem.metrics(x0, y0, task)
    except Exception:  # a problem that cannot report metrics at its start: fall back to the loss
        return "outer_loss"
    for m in ("accuracy", "test_accuracy"):
        if m in names:
            return m
    return "outer_loss"


def describe_problems() -> list[dict[str, str]]:
    return [{"name": r["name"], "description": r["description"]} for r in registry.describe_problems()]
