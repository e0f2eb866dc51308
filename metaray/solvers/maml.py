"""Initialization-based hypergradients: MAML, first-order MAML, Reptile and Meta-SGD.

Survey 001 section 5.2 (eqs. 24-28). The outer params contain an initialization, y_0 = Ψ_0(x) =
init_inner(x, task), and the inner loop adapts it to the task's support set:

    y_T = Ψ_0(x) − Σ_t s ∇_y f(y_{t-1})                                  (eq. 25)

- MAML differentiates F(y_T) through the whole adaptation, Hessians included (eq. 26).
- FOMAML drops the Hessians: dF/dx ≈ ∂F/∂x + (∂Ψ_0/∂x)ᵀ ∂F/∂y_T        (eq. 27)
- Reptile replaces ∂F/∂y_T by the displacement: g = (∂Ψ_0/∂x)ᵀ (y_0 − y_T)
- Meta-SGD learns a per-parameter step size ω: y_t = y_{t-1} − ω ⊙ ∇_y f(y_{t-1})   (eq. 28, P = diag ω)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import batched
from .base import Solver, SolverOptions, nonnegative, option, positive, register
from .checkpoint import CheckpointOptions, Checkpointed, reverse
from .core import Params, grad_dict, inner_start, leaves, outer_eval, tadd, vjp_dict
from .unrolled import RAD, finish, gd_step, unroll


@dataclass(frozen=True)
class FirstOrderOptions(SolverOptions):
    inner_steps: int = option(1, "adaptation steps T on the support set", nonnegative)
    inner_lr: float = option(0.1, "adaptation step size s", positive)


@dataclass(frozen=True)
class MAMLOptions(FirstOrderOptions, CheckpointOptions):
    """MAML's defaults plus checkpoint_every / memory_budget_mb (checkpoint.py)."""


@register
class MAML(RAD):
    """Second-order MAML (Finn et al. 2017): the exact gradient of F(x, y_T(x)) through the adaptation.

    Computationally this is reverse-mode AD through the inner loop (``rad``); MAML is the special case where
    the inner loop starts at the outer params. Kept as its own name with MAML's conventional defaults.
    ``checkpoint_every`` / ``memory_budget_mb`` bound its memory (checkpoint.py): each recomputed segment
    builds its own double-backward graph, so the gradient stays second order.
    """

    name = "maml"
    Options = MAMLOptions
    paper = "Finn, Abbeel, Levine 2017, Model-agnostic meta-learning (survey 001 eqs. 24-26)"
    # The computation is rad's (inherited): only the name, the defaults and the paper differ.


def first_order_adaptation(problem, x: Params, task: Any, steps: int, lr: float) -> tuple[Params, Params, Params]:
    """Runs the adaptation without a second-order graph. Returns (x as leaves, y_0 = Ψ_0(x) with its graph, y_T)."""
    x = leaves(x)
    y0 = inner_start(problem, x, task)
    y_T = unroll(problem, x, {k: v.detach() for k, v in y0.items()}, task, steps, lr, create_graph=False)
    return x, y0, y_T


@register
class FOMAML(batched.Batched, Solver):
    """First-order MAML (survey 001 eq. 27): dF/dx ≈ ∂F(x, y_T)/∂x + (∂Ψ_0/∂x)ᵀ ∂F(x, y_T)/∂y_T."""

    name = "fomaml"
    Options = FirstOrderOptions
    paper = "Finn, Abbeel, Levine 2017 (first-order approximation; survey 001 eq. 27)"

    def _hypergrad(self, problem, x, task, state):
        o = self.options
        x, y0, y_T = first_order_adaptation(problem, x, task, o.inner_steps, o.inner_lr)
        y_T = leaves(y_T)
        outer = outer_eval(problem, x, y_T, task)
        g_x = grad_dict(outer[0], x, retain_graph=True)
        g_y = grad_dict(outer[0], y_T)
        grad = tadd(g_x, vjp_dict(y0, x, g_y))
        return finish(problem, x, y_T, task, grad, outer=outer)

    def _surrogate(self, problem, x, tasks):
        return batched.first_order(self.options.inner_steps, self.options.inner_lr), {}


@dataclass(frozen=True)
class ReptileOptions(FirstOrderOptions):
    inner_steps: int = option(5, "adaptation steps T (Reptile needs T > 1 to differ from joint training)", positive)
    normalize: bool = option(
        False, "divide the displacement by s·T so the step is on the scale of a gradient (then outer lr ≈ s)"
    )


@register
class Reptile(batched.Batched, Solver):
    """Reptile (Nichol et al. 2018): g = (∂Ψ_0/∂x)ᵀ (y_0 − y_T), the negative displacement of adaptation.

    With an outer SGD step of size ε this is Reptile's x ← x + ε (y_T − x).
    """

    name = "reptile"
    Options = ReptileOptions
    paper = "Nichol, Achiam, Schulman 2018, On first-order meta-learning algorithms (survey 001 §5.2)"

    def _hypergrad(self, problem, x, task, state):
        o = self.options
        x, y0, y_T = first_order_adaptation(problem, x, task, o.inner_steps, o.inner_lr)
        scale = 1.0 / (o.inner_lr * o.inner_steps) if o.normalize else 1.0
        displacement = {k: scale * (y0[k].detach() - y_T[k]) for k in y0}
        return finish(problem, x, y_T, task, vjp_dict(y0, x, displacement))

    def _surrogate(self, problem, x, tasks):
        o = self.options
        return batched.displacement(o.inner_steps, o.inner_lr, 1.0 / (o.inner_lr * o.inner_steps) if o.normalize else 1.0), {}


@dataclass(frozen=True)
class MetaSGDOptions(MAMLOptions):
    lr_prefix: str = option("lr.", "x holds the step size of inner param k under key lr_prefix + k")


def metasgd_lrs(inner_params: Params, value: float, prefix: str = "lr.") -> Params:
    """Initial per-parameter step sizes for Meta-SGD: add these to the outer params."""
    return {prefix + k: torch.full_like(v.detach(), float(value)) for k, v in inner_params.items()}


@register
class MetaSGD(batched.Batched, Checkpointed, Solver):
    """Meta-SGD (Li et al. 2017): learns the init and a per-parameter step size ω together.

        y_t = y_{t-1} − ω ⊙ ∇_y f(y_{t-1}),    x = (init, ω),    dF/dx by reverse mode through the adaptation.

    ``inner_lr`` is the value ``metasgd_lrs`` uses to initialize ω; the learned ω is read from x.
    ``checkpoint_every`` / ``memory_budget_mb`` bound its memory (checkpoint.py).
    """

    name = "metasgd"
    Options = MetaSGDOptions
    problem_needs = ("step_sizes",)
    paper = "Li, Zhou, Chen, Li 2017, Meta-SGD (survey 001 eq. 28)"

    def _hypergrad(self, problem, x, task, state):
        x = leaves(x)
        y0 = inner_start(problem, x, task)
        self._check_rates(x, y0)
        every = self.checkpoint_spacing(problem, x, task)
        grad, y, outer = reverse(self._step(problem, task), self._objective(problem, task), x, y0, self.options.inner_steps, every, task)
        return finish(problem, x, y, task, grad, {"checkpoint_every": float(every)} if every else None, outer=outer)

    def _surrogate(self, problem, x, tasks):
        o = self.options
        why = batched.checkpoint_refusal(o)
        if why:
            return why
        y = inner_start(problem, x, tasks[0], graph=False)  # tasks that batch share y's keys and shapes
        self._check_rates(x, y)
        return batched.unrolled(o.inner_steps, lambda xx: {k: xx[o.lr_prefix + k] for k in y}), {}

    def _adapt(self, problem, x, task, state):
        y = inner_start(problem, x, task, graph=False)
        self._check_rates(x, y)
        step = self._step(problem, task)
        for t in range(1, self.options.inner_steps + 1):
            y = step(x, y, t, create_graph=False)
        return y

    def _reverse_parts(self, problem, x, task):
        self._check_rates(x, inner_start(problem, x, task, graph=False))
        return self._step(problem, task), self._objective(problem, task), self.options.inner_steps

    def _step(self, problem, task: Any):
        """y_t = y_{t-1} − ω ⊙ ∇_y f(y_{t-1}), with ω read from the x the step is given (so it is differentiated)."""
        prefix = self.options.lr_prefix

        def step(x: Params, y: Params, t: int, *, create_graph: bool) -> Params:
            return gd_step(problem, x, y, task, {k: x[prefix + k] for k in y}, create_graph=create_graph, step=t - 1)

        return step

    @staticmethod
    def _objective(problem, task: Any):
        return lambda x, y: outer_eval(problem, x, y, task)

    def _check_rates(self, x: Params, y: Params) -> None:
        o = self.options
        missing = [o.lr_prefix + k for k in y if o.lr_prefix + k not in x]
        if missing:
            raise ValueError(
                f"metasgd needs a learned step size in x for every inner param; missing {missing}. "
                f"Add them with metaray.solvers.metasgd_lrs(y0, {o.inner_lr}, prefix={o.lr_prefix!r})"
            )
        for k in y:
            if x[o.lr_prefix + k].shape != y[k].shape:
                raise ValueError(f"x[{o.lr_prefix + k!r}] has shape {tuple(x[o.lr_prefix + k].shape)}, inner param {k!r} has {tuple(y[k].shape)}")
