"""From a problem name + options to what a run needs: a picklable problem factory (workers build the problem
locally), a task source, the initial outer params and the headline metric of the meta-test.

Names come from the tasks layer's registry (``metaray.tasks.registry``) when it is installed, plus two
built-ins that need nothing but the core tasks module: ``sinusoid`` (Finn et al. 2017 regression) and
``quadratic`` (one persistent synthetic task with a closed-form hypergradient, for single-task HPO smoke runs).
"""
from __future__ import annotations

import difflib
import math
import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..solvers.core import BilevelProblem, Params
from ..tasks import ModelProblem, QuadraticProblem, SinusoidSource, TaskSource, mlp, quadratic_task


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
# Built-ins
# ----------------------------------------------------------------------------------------------------------


def _sinusoid_model(hidden: tuple[int, ...], dtype: torch.dtype) -> torch.nn.Module:
    return mlp([1, *hidden, 1]).to(dtype)


def _sinusoid_problem(hidden: tuple[int, ...], dtype_name: str) -> BilevelProblem:
    return ModelProblem(_sinusoid_model(hidden, DTYPES[dtype_name]), loss="mse")


SINUSOID_OPTIONS = {"shots": 10, "queries": 10, "hidden": [40, 40]}
QUADRATIC_OPTIONS = {"n": 3, "m": 4, "cond": 5.0}


def _sinusoid(options: Mapping[str, Any], seed: int, dtype: str) -> ProblemSetup:
    opts = _options("sinusoid", options, SINUSOID_OPTIONS)
    hidden = tuple(int(h) for h in opts["hidden"])
    if not hidden or any(h < 1 for h in hidden):
        raise ValueError(f"problem option 'hidden' must be a non-empty list of positive layer sizes, got {opts['hidden']!r}")
    source = SinusoidSource(shots=int(opts["shots"]), queries=int(opts["queries"]), seed=seed, dtype=DTYPES[dtype])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _sinusoid_model(hidden, DTYPES[dtype])
    x0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    factory = functools.partial(_sinusoid_problem, hidden, dtype)
    return ProblemSetup(factory, source, x0, metric="outer_loss")


@dataclass(frozen=True)
class QuadraticSource:
    """One persistent synthetic task: every key returns the same quadratic instance (single-task HPO)."""

    n: int = 3
    m: int = 4
    cond: float = 5.0
    seed: int = 0
    dtype: str = "float64"

    def sample(self, key) -> Any:
        t = quadratic_task(self.n, self.m, seed=self.seed, cond=self.cond)
        dt = DTYPES[self.dtype]
        return type(t)(**{k: (v.to(dt) if isinstance(v, torch.Tensor) else v) for k, v in vars(t).items()})


def _quadratic_problem() -> BilevelProblem:
    return QuadraticProblem()


def _quadratic(options: Mapping[str, Any], seed: int, dtype: str) -> ProblemSetup:
    opts = _options("quadratic", options, QUADRATIC_OPTIONS)
    source = QuadraticSource(int(opts["n"]), int(opts["m"]), float(opts["cond"]), seed, dtype)
    x0 = QuadraticProblem().initial_params(source.sample(("train", 0, 0)), seed=seed + 1)
    return ProblemSetup(_quadratic_problem, source, {k: v.to(DTYPES[dtype]) for k, v in x0.items()}, "outer_loss")


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


BUILTINS: dict[str, tuple[Callable[[Mapping[str, Any], int, str], ProblemSetup], str, Mapping[str, Any]]] = {
    "sinusoid": (_sinusoid, "sinusoid regression, Finn et al. 2017 (MLP 1-40-40-1, MSE); options shots, queries, hidden", SINUSOID_OPTIONS),
    "quadratic": (_quadratic, "one persistent synthetic quadratic bilevel task (single-task HPO); options n, m, cond", QUADRATIC_OPTIONS),
}


def check_problem_options(name: str, options: Mapping[str, Any]) -> None:
    """Cheap check of option names at config load (the registry's problems check theirs when built)."""
    check_problem_name(name)
    reg = _registry()
    if reg is not None and name in reg.problem_names():
        _options(name, options, reg.problem_options(name))
        return
    _options(name, options, BUILTINS[name][2])


# ----------------------------------------------------------------------------------------------------------
# Registry (tasks layer) + built-ins
# ----------------------------------------------------------------------------------------------------------


def _registry():
    try:
        from ..tasks import registry  # type: ignore[attr-defined]
    except ImportError:
        return None
    return registry


def problem_names() -> list[str]:
    reg = _registry()
    names = set(BUILTINS)
    if reg is not None:
        names.update(reg.problem_names())
    return sorted(names)


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
    reg = _registry()
    if reg is not None and name in reg.problem_names():
        return _from_registry(reg, name, dict(options), seed, dtype)
    return BUILTINS[name][0](dict(options), seed, dtype)


def _registry_problem(name: str, options: tuple) -> BilevelProblem:
    """Worker-side factory: rebuilds the named problem from its options (picklable: a name and plain values)."""
    from ..tasks import registry

    return registry.make_problem(name, **dict(options)).problem


def _from_registry(reg, name: str, options: dict[str, Any], seed: int, dtype: str) -> ProblemSetup:
    """Adapts the tasks registry's ``ProblemSpec(problem, source, x0)`` to a ProblemSetup."""
    if "seed" in reg.problem_options(name) and "seed" not in options:
        options = {**options, "seed": seed}
    spec = reg.make_problem(name, **options)
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


def _accepts(fn: Callable, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def describe_problems() -> list[dict[str, str]]:
    rows = [{"name": k, "description": v[1]} for k, v in BUILTINS.items()]
    reg = _registry()
    if reg is not None:
        known = set(BUILTINS)
        rows = [{"name": r["name"], "description": r["description"]} for r in reg.describe_problems()]
        rows += [{"name": k, "description": v[1]} for k, v in BUILTINS.items() if k not in {r["name"] for r in rows}]
    return rows
