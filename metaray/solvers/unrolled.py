"""Explicit (recurrence-based) hypergradients: RAD, TRAD, FAD and the one-step DARTS approximation.

Survey 001 section 5.1. The inner dynamics are T steps of gradient descent (eq. 11):

    y_0 = Ψ_0(x) = init_inner(x),      y_t = Ψ_t(y_{t-1}; x) = y_{t-1} − s ∇_y f(x, y_{t-1})

and the hypergradient of φ_T(x) = F(x, y_T(x)) is (eqs. 15-17)

    dφ_T/dx = ∂F/∂x + Z_Tᵀ ∂F/∂y_T,    Z_t = A_t Z_{t-1} + B_t,   A_t = ∂Ψ_t/∂y_{t-1},  B_t = ∂Ψ_t/∂x.

RAD evaluates it backwards through the stored trajectory (or through every k-th iterate, recomputing the rest:
``checkpoint_every``, checkpoint.py), FAD forwards (one JVP per outer coordinate),
TRAD keeps only the last M steps (eq. 20), DARTS one step with a finite-difference Hessian (eqs. 21-23).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from . import batched
from .base import Solver, SolverOptions, nonnegative, option, positive, register
from .checkpoint import CheckpointOptions, Checkpointed, Objective, Step, reverse
from .core import (
    BilevelProblem,
    HyperGrad,
    Params,
    check_finite,
    check_grad_finite,
    detached,
    flatten,
    grad_dict,
    inner_start,
    leaves,
    outer_eval,
    project,
    tadd,
    tnorm,
    unflatten,
)


def gd_step(
    problem: BilevelProblem,
    x: Params,
    y: Params,
    task: Any,
    lr: float | Params,
    *,
    create_graph: bool,
    step: int = 0,
) -> Params:
    """One inner step y − lr ⊙ ∇_y f(x, y), then the problem's projection.

    With ``create_graph`` the step stays differentiable in (x, y); without it the result is detached.
    ``lr`` is a float or, for Meta-SGD, a dict of per-parameter step sizes.
    """
    y = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in y.items()}
    loss = problem.inner_loss(x, y, task)
    check_finite(loss, f"inner_loss at inner step {step}", task)
    g = grad_dict(loss, y, create_graph=create_graph)
    if isinstance(lr, dict):
        y_next = {k: y[k] - lr[k] * g[k] for k in y}
    else:
        y_next = {k: y[k] - lr * g[k] for k in y}
    if not create_graph:
        y_next = detached(y_next)
    return project(problem, x, y_next)


def unroll(
    problem: BilevelProblem, x: Params, y: Params, task: Any, steps: int, lr: float | Params, *, create_graph: bool
) -> Params:
    for t in range(steps):
        y = gd_step(problem, x, y, task, lr, create_graph=create_graph, step=t)
    return y


def finish(
    problem: BilevelProblem,
    x: Params,
    y: Params,
    task: Any,
    grad: Params,
    metrics: dict | None = None,
    state: Any = None,
    *,
    outer: tuple[Tensor, dict] | None = None,
) -> HyperGrad:
    """Packages a hypergradient: checks it is finite, reports F and f at y and the problem's metrics.

    ``outer`` is the (F, problem metrics) pair from ``outer_eval`` when the solver already computed it at y,
    which saves a forward pass over the query set.
    """
    check_grad_finite(grad, "hypergradient", task)
    xd, yd = detached(x), detached(y)
    with torch.no_grad():
        if outer is None:
            outer = outer_eval(problem, xd, yd, task)
        inner = check_finite(problem.inner_loss(xd, yd, task), "inner_loss", task)
    m = dict(outer[1])
    m.update(metrics or {})
    return HyperGrad(grad=detached(grad), outer_loss=float(outer[0].detach()), inner_loss=inner, metrics=m, state=state)


def gd_stepper(problem: BilevelProblem, task: Any, lr: float | Callable[[Params], Params], offset: int = 0) -> Step:
    """The inner step of eq. 11 as ``step(x, y, t, create_graph=...)`` for ``checkpoint.reverse``: ``gd_step``
    with step size ``lr`` (a float, or a function of x giving Meta-SGD's per-parameter ω). ``offset`` numbers
    the steps in messages (t = 1 of trad's window is inner step T - M)."""

    def step(x: Params, y: Params, t: int, *, create_graph: bool) -> Params:
        return gd_step(problem, x, y, task, lr(x) if callable(lr) else lr, create_graph=create_graph, step=offset + t - 1)

    return step


def reverse_hypergrad(
    problem: BilevelProblem, x: Params, task: Any, steps: int, lr: float, truncate: int | None = None, *, every: int = 0
) -> tuple[Params, Params, tuple[Tensor, dict]]:
    """Reverse-mode hypergradient through the last ``truncate`` of ``steps`` inner steps (all when None).

    Returns (dF/dx, y_T, (F, problem metrics) at y_T). Steps before the truncation window run without a graph, so y_{T-M} is a constant:
    that is exactly the partial sum of eq. 20 (the B_t of earlier steps and of Ψ_0 are dropped).
    ``every = k > 0`` checkpoints every k-th iterate of the window (checkpoint.py): same gradient, memory O(M/k + k).
    """
    x = leaves(x)
    step, objective, window = reverse_parts(problem, x, task, steps, lr, truncate)
    y = inner_start(problem, x, task)
    if window < steps:
        y = unroll(problem, x, detached(y), task, steps - window, lr, create_graph=False)
    return reverse(step, objective, x, y, window, every, task)


def reverse_parts(
    problem: BilevelProblem, x: Params, task: Any, steps: int, lr: float | Callable[[Params], Params], truncate: int | None = None
) -> tuple[Step, Objective, int]:
    """(step, objective, differentiated steps) of a gradient-descent unroll, for ``checkpoint.reverse``."""
    window = steps if truncate is None else min(truncate, steps)
    return gd_stepper(problem, task, lr, steps - window), (lambda xx, yy: outer_eval(problem, xx, yy, task)), window


@dataclass(frozen=True)
class RADOptions(CheckpointOptions):
    pass


@register
class RAD(batched.Batched, Checkpointed, Solver):
    """Reverse-mode AD through all T inner steps (survey 001 Alg. 3; Franceschi et al. 2017).

    Exact gradient of φ_T(x) = F(x, y_T(x)); memory grows linearly with T, or as O(T/k + k) with
    ``checkpoint_every = k`` (checkpoint.py), or to fit ``memory_budget_mb``.
    """

    name = "rad"
    Options = RADOptions
    paper = "Franceschi et al. 2017, Forward and reverse gradient-based hyperparameter optimization (survey 001 §5.1)"

    def _reverse_parts(self, problem, x, task):
        return reverse_parts(problem, x, task, self.options.inner_steps, self.options.inner_lr)

    def _hypergrad(self, problem, x, task, state):
        o = self.options
        every = self.checkpoint_spacing(problem, x, task)
        grad, y, outer = reverse_hypergrad(problem, x, task, o.inner_steps, o.inner_lr, every=every)
        return finish(problem, x, y, task, grad, {"checkpoint_every": float(every)} if every else None, outer=outer)

    def _surrogate(self, problem, x, tasks):
        o = self.options
        return batched.checkpoint_refusal(o) or (batched.unrolled(o.inner_steps, batched.constant_lr(o.inner_lr)), {})


@dataclass(frozen=True)
class TRADOptions(CheckpointOptions):
    truncate: int = option(1, "back-propagate through only the last M inner steps (M = T equals rad)", positive)


@register
class TRAD(batched.Batched, Checkpointed, Solver):
    """Truncated RAD: back-propagation through the last M of T steps only (survey 001 eq. 20; Shaban et al. 2019).

    ``checkpoint_every`` / ``memory_budget_mb`` checkpoint the differentiated window of M steps."""

    name = "trad"
    Options = TRADOptions
    paper = "Shaban et al. 2019, Truncated back-propagation for bilevel optimization (survey 001 eq. 20)"

    def _reverse_parts(self, problem, x, task):
        o = self.options
        return reverse_parts(problem, x, task, o.inner_steps, o.inner_lr, o.truncate)

    def _hypergrad(self, problem, x, task, state):
        o = self.options
        every = self.checkpoint_spacing(problem, x, task)
        grad, y, outer = reverse_hypergrad(problem, x, task, o.inner_steps, o.inner_lr, truncate=o.truncate, every=every)
        metrics = {"truncate": float(min(o.truncate, o.inner_steps))}
        if every:
            metrics["checkpoint_every"] = float(every)
        return finish(problem, x, y, task, grad, metrics, outer=outer)

    def _surrogate(self, problem, x, tasks):
        o = self.options
        return batched.checkpoint_refusal(o) or (
            batched.unrolled(o.inner_steps, batched.constant_lr(o.inner_lr), o.truncate),
            {"truncate": float(min(o.truncate, o.inner_steps))})


@dataclass(frozen=True)
class FADOptions(SolverOptions):
    max_outer_dim: int = option(
        10_000, "refuse outer params with more scalars than this (FAD costs one forward pass per scalar)", positive
    )


@register
class FAD(Solver):
    """Forward-mode AD (survey 001 Alg. 2): Z_t = A_t Z_{t-1} + B_t carried forward with the inner steps.

    One ``torch.func.jvp`` per outer coordinate, so cost is O(dim x · T) forward passes and memory does not
    grow with T. Use it for low-dimensional outer variables (hyperparameters).
    """

    name = "fad"
    Options = FADOptions
    paper = "Franceschi et al. 2017, Forward and reverse gradient-based hyperparameter optimization (survey 001 Alg. 2)"

    def _hypergrad(self, problem, x, task, state):
        o = self.options
        x = detached(x)
        n = sum(v.numel() for v in x.values())
        if n > o.max_outer_dim:
            raise ValueError(
                f"fad needs one forward pass per outer scalar and x has {n} > max_outer_dim={o.max_outer_dim}; "
                "use rad for high-dimensional outer params, or raise max_outer_dim"
            )

        # y_T and the losses first, without tangents: this also checks every loss is a finite scalar, so a bad
        # problem fails here with a clear message instead of inside torch.func's forward-mode transform.
        y = unroll(problem, x, inner_start(problem, x, task, graph=False), task, o.inner_steps, o.inner_lr, create_graph=False)
        outer = outer_eval(problem, x, y, task)

        def inner_grad(xx: Params, yy: Params) -> Params:
            return torch.func.grad(lambda y_: problem.inner_loss(xx, y_, task))(yy)

        def phi(xx: Params) -> Tensor:
            y = inner_start(problem, xx, task)
            for _ in range(o.inner_steps):
                g = inner_grad(xx, y)
                y = project(problem, xx, tadd(y, g, -o.inner_lr))
            return problem.outer_loss(xx, y, task)

        flat = flatten(x)
        grad_flat = torch.zeros_like(flat)
        for i in range(n):
            e = torch.zeros_like(flat)
            e[i] = 1.0
            _, d = torch.func.jvp(phi, (x,), (unflatten(e, x),))
            grad_flat[i] = d
        return finish(problem, x, y, task, unflatten(grad_flat, x), outer=outer)


@dataclass(frozen=True)
class DARTSOptions(SolverOptions):
    inner_steps: int = option(1, "inner steps T: T-1 plain warm-up steps, then the one differentiated step", positive)
    fd_eps: float = option(0.01, "finite-difference radius ε = fd_eps / ‖∇_y F‖ (DARTS uses 0.01)", positive)


@register
class DARTS(Solver):
    """One-step unrolled hypergradient with a central finite-difference Hessian (survey 001 eqs. 21-23; DARTS).

    With y the inner params after T-1 plain steps (treated as constant in x, as DARTS treats its weights) and
    y₁ = y − s ∇_y f(x, y):

        dF/dx ≈ ∇_x F(x, y₁) − s · [∇_x f(x, y⁺) − ∇_x f(x, y⁻)] / (2ε),   y^± = y ± ε ∇_y F(x, y₁)

    The bracket approximates ∇²_xy f(x, y) ∇_y F(x, y₁) to O(ε²); exact when f is quadratic.
    """

    name = "darts"
    Options = DARTSOptions
    paper = "Liu, Simonyan, Yang 2019, DARTS (survey 001 eqs. 21-23)"

    def _hypergrad(self, problem, x, task, state):
        o = self.options
        x = leaves(x)
        y = unroll(problem, x, inner_start(problem, x, task, graph=False), task, o.inner_steps - 1, o.inner_lr, create_graph=False)
        y1 = leaves(gd_step(problem, x, y, task, o.inner_lr, create_graph=False))
        outer = outer_eval(problem, x, y1, task)
        gx, gy = grad_dict(outer[0], x, retain_graph=True), grad_dict(outer[0], y1)
        eps = o.fd_eps / max(float(tnorm(gy)), 1e-12)

        def grad_x_inner(yy: Params) -> Params:
            loss = problem.inner_loss(x, yy, task)
            check_finite(loss, "inner_loss (finite difference)", task)
            return grad_dict(loss, x)

        g_plus = grad_x_inner(tadd(y, gy, eps))
        g_minus = grad_x_inner(tadd(y, gy, -eps))
        grad = {k: gx[k] - o.inner_lr * (g_plus[k] - g_minus[k]) / (2 * eps) for k in x}
        return finish(problem, x, y1, task, grad, {"fd_eps": eps}, outer=outer)
