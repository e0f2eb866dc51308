"""Solver base class, validated options and the registry.

Each solver declares its options as a frozen dataclass (like Ray's ``ScalingConfig``): typed fields with a
default, a one-line doc and a check. ``make(name, **options)`` validates them and names what is valid.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch

from .core import BilevelProblem, HyperGrad, Params, check_params, check_problem, inner_start

# ----------------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------------

Check = Callable[[Any], bool]

positive: tuple[Check, str] = (lambda v: v > 0, "> 0")
nonnegative: tuple[Check, str] = (lambda v: v >= 0, ">= 0")
unit_interval: tuple[Check, str] = (lambda v: 0 < v <= 1, "in (0, 1]")


def option(default: Any, doc: str, check: tuple[Check, str] | None = None, choices: Sequence[Any] | None = None):
    """A solver option: default, documentation, and an optional range check or set of choices."""
    return dataclasses.field(default=default, metadata={"doc": doc, "check": check, "choices": choices})


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        return isinstance(value, (tuple, list))
    return True


@dataclass(frozen=True)
class SolverOptions:
    """Options every solver accepts. Subclasses add their own fields."""

    inner_steps: int = option(5, "number of inner (lower-level) steps T", nonnegative)
    inner_lr: float = option(0.1, "inner step size", positive)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            ann = hints[f.name]
            if not _type_ok(value, ann):
                raise TypeError(
                    f"option {f.name!r} must be {getattr(ann, '__name__', ann)}, got {value!r} ({type(value).__name__})"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"option {f.name!r} must be finite, got {value!r}")
            check = f.metadata.get("check")
            if check is not None and value is not None and not check[0](value):
                raise ValueError(f"option {f.name!r} must be {check[1]}, got {value!r}")
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ValueError(f"option {f.name!r} must be one of {list(choices)}, got {value!r}")
            if isinstance(value, int) and not isinstance(value, bool) and ann is float:
                object.__setattr__(self, f.name, float(value))
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; override in subclasses."""

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            check = f.metadata.get("check")
            choices = f.metadata.get("choices")
            rows.append(
                {
                    "name": f.name,
                    "type": getattr(hints[f.name], "__name__", str(hints[f.name])),
                    "default": f.default,
                    "doc": f.metadata.get("doc", ""),
                    "valid": check[1] if check else (f"one of {list(choices)}" if choices else ""),
                }
            )
        return rows


# ----------------------------------------------------------------------------------------------------------
# Solver
# ----------------------------------------------------------------------------------------------------------


class Solver:
    """Turns (problem, x, task) into a hypergradient. Subclasses implement ``_hypergrad``.

    Class attributes: ``name`` (registry key), ``Options`` (a SolverOptions subclass), ``paper`` (citation),
    ``stateful`` (whether ``HyperGrad.state`` must be carried to the next outer step) and ``problem_needs``:
    what a problem must offer beyond the three required methods ("ridge_system": the features, targets and λ
    of a closed-form head; "step_sizes": x holds a learned step size per inner param; "optimizee": x are a
    learned optimizer's weights and init_inner gives the optimizee's start). The conformance battery
    (tests/solvers/test_conformance.py) builds its problems from this declaration.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[SolverOptions]] = SolverOptions
    paper: ClassVar[str] = ""
    stateful: ClassVar[bool] = False
    problem_needs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **options: Any) -> None:
        valid = [f.name for f in dataclasses.fields(self.Options)]
        unknown = [k for k in options if k not in valid]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, valid, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(
                f"unknown option(s) for solver {self.name!r}: {', '.join(hints)}; valid options: {', '.join(valid)}"
            )
        self.options = self.Options(**options)

    def __repr__(self) -> str:
        opts = ", ".join(f"{f.name}={getattr(self.options, f.name)!r}" for f in dataclasses.fields(self.options))
        return f"{type(self).__name__}({opts})"

    def hypergrad(self, problem: BilevelProblem, x: Params, task: Any, state: Any = None) -> HyperGrad:
        """dF(x, y*(x))/dx for one task (see the solver's docstring for the approximation it makes)."""
        check_problem(problem)
        x = check_params(x, "outer params x")
        result = self._hypergrad(problem, x, task, state)
        # The contract: same keys as x, same shapes. Solvers build grads via grad_dict so this always holds;
        # the check guards subclasses written outside metaray.
        if result.grad.keys() != x.keys():
            raise RuntimeError(f"solver {self.name!r} returned gradient keys {sorted(result.grad)} for x keys {sorted(x)}")
        return result

    def hypergrad_batch(
        self, problem: BilevelProblem, x: Params, tasks: Sequence[Any], states: Sequence[Any] | None = None
    ) -> list[HyperGrad]:
        """Hypergradients of several tasks, in order. The default loops over tasks."""
        if states is None:
            states = [None] * len(tasks)
        if len(states) != len(tasks):
            raise ValueError(f"got {len(tasks)} tasks but {len(states)} states")
        return [self.hypergrad(problem, x, t, s) for t, s in zip(tasks, states)]

    def evaluate(self, problem: BilevelProblem, x: Params, task: Any, state: Any = None) -> HyperGrad:
        """Adapt to one task without differentiating (meta-validation / meta-test): the losses and metrics at
        the inner solution this solver reaches, with zero ``grad``. The default runs ``inner_steps`` plain
        gradient steps from ``init_inner``; solvers with other inner dynamics override ``_adapt``.
        """
        check_problem(problem)
        x = check_params(x, "outer params x")
        from .unrolled import finish  # local import: unrolled builds on this module

        with torch.enable_grad():
            y = self._adapt(problem, {k: v.detach() for k, v in x.items()}, task, state)
        return finish(problem, x, y, task, {k: torch.zeros_like(v) for k, v in x.items()})

    def _adapt(self, problem: BilevelProblem, x: Params, task: Any, state: Any) -> Params:
        from .unrolled import unroll

        y0 = inner_start(problem, x, task, graph=False)
        return unroll(problem, x, y0, task, self.options.inner_steps, self.options.inner_lr, create_graph=False)

    def _hypergrad(self, problem: BilevelProblem, x: Params, task: Any, state: Any) -> HyperGrad:
        raise NotImplementedError


_REGISTRY: dict[str, type[Solver]] = {}


def register(cls: type[Solver]) -> type[Solver]:
    """Class decorator: adds a solver under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no registry name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"solver name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    """Registry names of all solvers, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[Solver]:
    if not isinstance(name, str):
        raise TypeError(f"solver name must be a str, got {type(name).__name__}")
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown solver {name!r}{hint}; valid solvers: {', '.join(names())}")
    return _REGISTRY[name]


def make(name: str, **options: Any) -> Solver:
    """A solver by registry name, with validated options."""
    return get(name)(**options)
