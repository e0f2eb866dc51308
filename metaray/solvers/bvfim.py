"""BVFIM: the bi-level value-function-based interior-point method (survey 001 eqs. 33-35; Liu et al. 2021).

The optimistic problem min_{y ∈ S(x)} F(x, y) is relaxed to F(x, y) subject to f(x, y) ≤ ψ_μ(x), with the
regularized lower-level value function (eq. 34)

    z_K ≈ argmin_z f(x, z) + μ₁/2 ‖z‖²                       (K steps of gradient descent from init_inner(x))
    ψ(x) = f(x, z_K) + μ₁/2 ‖z_K‖² + μ₂

and the constraint is replaced by a log barrier (eq. 35):

    y_T ≈ argmin_y F(x, y) + θ/2 ‖y‖² − τ ln(ψ(x) − f(x, y))   (T steps from y_0 = z_K)

The outer gradient of φ_{μ,θ,τ}(x) is first order (envelope theorem, ∇_x ψ = ∇_x f(x, z*)); no Hessians:

    g(x) = ∇_x F(x, y_T) − τ (∇_x f(x, z_K) − ∇_x f(x, y_T)) / (ψ(x) − f(x, y_T))

The barrier. ψ itself may be negative (f can be negative); only the gap ψ − f(x, y) must stay positive.
y_0 = z_K is strictly feasible (gap = μ₁/2‖z_K‖² + μ₂ ≥ μ₂ > 0) and every y-step is step-controlled: a
step whose gap would be ≤ 0 (or whose barrier objective is not finite or does not decrease) is halved, up
to ``max_backtracks`` times; if no step is accepted the y-loop stops where it is. The gap is therefore
positive at every evaluated point, never NaN. Metrics report ``barrier_gap`` (final ψ − f), ``psi``,
``backtracks`` and ``stalled_steps``; a start that is not strictly feasible (only possible when rounding
swallows μ₂, e.g. |f| ≫ μ₂) raises a ValueError that says so. After an accepted step the step size grows ×2
again (up to ``barrier_lr``), so about one halving per y-step in ``backtracks`` is normal.

Accuracy. With a unique lower-level solution g approaches the implicit hypergradient as (μ, θ, τ) → 0
together (on a 4-d quadratic: relative error 0.14, 0.046, 0.015 at 1e-2, 1e-3, 1e-4); τ ≪ μ makes the
barrier problem ill-conditioned and T steps then fall short. Hence one schedule factor for all four.

Schedule (μ₁, μ₂, θ, τ) → 0 over outer steps k = 0, 1, ...:  p_k = p_0 · (k + 1)^(−``decay``) for each of the
four, floored at ``floor`` · p_0. The solver needs k, so it is stateful: ``HyperGrad.state`` is
``{"step": k + 1}`` and a caller passes it back at the next outer step (state None means k = 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Solver, SolverOptions, nonnegative, option, positive, register, unit_interval
from .core import check_finite, check_scalar, detached, grad_dict, inner_start, leaves, project, tadd, tdot
from .unrolled import finish, unroll


@dataclass(frozen=True)
class BVFIMOptions(SolverOptions):
    inner_steps: int = option(50, "steps K on z for the value function ψ (eq. 34)", positive)
    inner_lr: float = option(0.1, "step size on z", positive)
    barrier_steps: int = option(50, "steps T on y for the barrier problem (eq. 35)", positive)
    barrier_lr: float = option(0.1, "initial step size on y (halved while a step is infeasible)", positive)
    mu1: float = option(0.1, "μ₁: weight of the ‖z‖² regularizer in ψ at outer step 0", positive)
    mu2: float = option(0.1, "μ₂: slack added to ψ at outer step 0", positive)
    theta: float = option(0.1, "θ: weight of the ‖y‖² regularizer at outer step 0", positive)
    tau: float = option(0.1, "τ: barrier weight at outer step 0", positive)
    decay: float = option(0.5, "(μ₁, μ₂, θ, τ)_k = value · (k+1)^(−decay)", nonnegative)
    floor: float = option(1e-3, "lower bound of the schedule as a fraction of the initial values", unit_interval)
    max_backtracks: int = option(30, "step halvings tried before a y-step is given up", positive)


@register
class BVFIM(Solver):
    """Value-function interior point with a log barrier (survey 001 eqs. 33-35); Hessian-free."""

    name = "bvfim"
    Options = BVFIMOptions
    paper = "Liu, Liu, Yuan, Zeng, Zhang 2021, A value-function-based interior-point method for non-convex bi-level optimization (survey 001 eqs. 33-35)"
    stateful = True

    def schedule(self, step: int) -> dict[str, float]:
        """(μ₁, μ₂, θ, τ) at outer step k."""
        o = self.options
        factor = max((step + 1) ** (-o.decay), o.floor)
        return {"mu1": o.mu1 * factor, "mu2": o.mu2 * factor, "theta": o.theta * factor, "tau": o.tau * factor}

    def _step_of(self, state) -> int:
        """The outer step k carried in the state (0 for a first call)."""
        step = 0 if state is None else state.get("step", 0) if isinstance(state, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"bvfim state must be None or {{'step': int >= 0}} (returned by the previous call), got {state!r}")
        return step

    def _solve_inner(self, problem, xd, task, p: dict[str, float]):
        """z_K of eq. 34, ψ, then y_T of eq. 35 by step-controlled descent. Returns (y_T, z_K, gap, metrics)."""
        o = self.options

        # eq. 34: K gradient steps on f(x, z) + μ₁/2‖z‖², then the regularized value function ψ.
        reg_problem = _Regularized(problem, p["mu1"])
        z = unroll(reg_problem, xd, inner_start(problem, xd, task, graph=False), task, o.inner_steps, o.inner_lr, create_graph=False)
        with torch.no_grad():
            psi = float(problem.inner_loss(xd, z, task)) + 0.5 * p["mu1"] * float(tdot(z, z)) + p["mu2"]
        if not math.isfinite(psi):
            raise ValueError(f"bvfim: the value function ψ is not finite ({psi}); the inner loss diverged in the z-loop")

        def gap_at(y) -> float:
            with torch.no_grad():
                return psi - float(check_scalar(problem.inner_loss(xd, y, task), "inner_loss"))

        def barrier_obj(y) -> torch.Tensor:  # eq. 35's objective at fixed x (gap > 0 checked by the caller)
            outer = check_scalar(problem.outer_loss(xd, y, task), "outer_loss")
            return outer + 0.5 * p["theta"] * tdot(y, y) - p["tau"] * torch.log(psi - problem.inner_loss(xd, y, task))

        y = z
        gap = gap_at(y)
        if not gap > 0:
            raise ValueError(
                f"bvfim: the barrier argument ψ − f(x, y_0) = {gap:.3e} is not > 0 at the start y_0 = z_K "
                f"(it should be ≥ μ₂ = {p['mu2']:.3e}); f is too large for μ₂ in floating point: raise mu2 or rescale the inner loss"
            )

        # eq. 35: T step-controlled descent steps on the barrier objective from the feasible start.
        lr, backtracks, stalled = o.barrier_lr, 0, 0
        for t in range(o.barrier_steps):
            yl = leaves(y)
            obj = barrier_obj(yl)
            cur = check_finite(obj, f"bvfim barrier objective at y-step {t}", task)
            g = grad_dict(obj, yl)
            accepted = False
            for _ in range(o.max_backtracks):
                cand = detached(project(problem, xd, tadd(y, g, -lr)))
                cgap = gap_at(cand)
                if cgap > 0:
                    with torch.no_grad():
                        val = float(barrier_obj(cand))
                    if math.isfinite(val) and val <= cur:
                        y, gap, accepted = cand, cgap, True
                        break
                lr *= 0.5
                backtracks += 1
            if not accepted:
                stalled += 1
                lr = o.barrier_lr
            else:
                lr = min(2.0 * lr, o.barrier_lr)  # let the step recover after a backtrack
        metrics = {"barrier_gap": gap, "psi": psi, "backtracks": float(backtracks), "stalled_steps": float(stalled), **p}
        return y, z, gap, metrics

    def _adapt(self, problem, x, task, state):
        # Evaluation reaches the barrier problem's y_T at the schedule's current (μ₁, μ₂, θ, τ), as training does.
        return self._solve_inner(problem, detached(x), task, self.schedule(self._step_of(state)))[0]

    def _hypergrad(self, problem, x, task, state):
        step = self._step_of(state)
        p = self.schedule(step)
        y, z, gap, metrics = self._solve_inner(problem, detached(x), task, p)

        # First-order outer gradient (envelope theorem for ψ; y_T, z_K are constants).
        xl = leaves(x)
        outer = problem.outer_loss(xl, y, task)
        check_finite(outer, "outer_loss", task)
        gx_F = grad_dict(outer, xl)
        gx_fz = grad_dict(problem.inner_loss(xl, z, task), xl)
        gx_fy = grad_dict(problem.inner_loss(xl, y, task), xl)
        grad = {k: gx_F[k] - p["tau"] * (gx_fz[k] - gx_fy[k]) / gap for k in xl}
        return finish(problem, xl, y, task, grad, metrics, state={"step": step + 1})


class _Regularized:
    """The z-subproblem of eq. 34: f(x, z) + μ₁/2‖z‖² (a BilevelProblem view for ``unroll``)."""

    def __init__(self, problem, mu1: float):
        self.problem, self.mu1 = problem, mu1

    def inner_loss(self, x, y, task):
        return self.problem.inner_loss(x, y, task) + 0.5 * self.mu1 * tdot(y, y)

    def project_inner(self, x, y):
        return project(self.problem, x, y)
