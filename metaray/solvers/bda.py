"""Bi-level Descent Aggregation: BDA and its pessimistic variant.

Survey 001 eq. 32 (Liu et al., ICML 2020) and section 9. When the lower level has many solutions, descending
f alone picks an arbitrary one; BDA descends an aggregation of both levels so the inner dynamics move toward
the lower-level solution that is best for the upper level:

    y_t = y_{t-1} − [ ρ_t s_u ∇_y F(x, y_{t-1}) + (1 − ρ_t) s_l ∇_y f(x, y_{t-1}) ],     t = 1..T     (eq. 32)

with ρ_t ∈ (0, 1] decreasing to 0, s_u / s_l the upper / lower step sizes (``upper_lr`` / ``inner_lr``; the
ICML paper keeps them separate) and y_0 = init_inner(x). The hypergradient is reverse mode through the whole
trajectory, dF(x, y_T(x))/dx. The pessimistic variant (section 9) ascends F within the lower-level
solutions: the +ρ_t s_u ∇_y F term becomes −ρ_t s_u ∇_y F.

Schedule of ρ_t (``rho_schedule``):
    "inverse"     ρ_t = ρ_0 / t                 (the ICML paper's μ/(t+1)-type decay; Σρ_t diverges, Σρ_t² converges)
    "geometric"   ρ_t = ρ_0 · γ^(t−1)           (γ = ``rho_decay`` in (0, 1])
    "constant"    ρ_t = ρ_0                     (for tests / ablations; not convergent in theory)
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Solver, option, positive, register, unit_interval
from .checkpoint import CheckpointOptions, Checkpointed, Step, reverse
from .core import BilevelProblem, Params, check_finite, grad_dict, inner_start, leaves, project
from .unrolled import finish

SCHEDULES = ("inverse", "geometric", "constant")


def rho_at(t: int, rho0: float, schedule: str, decay: float) -> float:
    """ρ_t for t = 1, 2, ... (see the module docstring)."""
    if schedule == "inverse":
        return rho0 / t
    if schedule == "geometric":
        return rho0 * decay ** (t - 1)
    return rho0


@dataclass(frozen=True)
class BDAOptions(CheckpointOptions):
    inner_steps: int = option(50, "inner steps T of the aggregated dynamics", positive)
    inner_lr: float = option(0.1, "lower-level step size s_l (on ∇_y f)", positive)
    upper_lr: float | None = option(None, "upper-level step size s_u (on ∇_y F); None = inner_lr", positive)
    rho0: float = option(0.5, "aggregation weight ρ_0 of the upper level at t = 1", unit_interval)
    rho_schedule: str = option("inverse", "how ρ_t decreases: inverse (ρ_0/t), geometric (ρ_0 γ^(t-1)), constant", choices=SCHEDULES)
    rho_decay: float = option(0.9, "γ of the geometric schedule", unit_interval)


def bda_stepper(problem: BilevelProblem, task, o: BDAOptions, *, sign: float = 1.0) -> Step:
    """The aggregated step t of eq. 32 (then the problem's projection) as ``step(x, y, t, create_graph=...)``."""
    s_u = o.inner_lr if o.upper_lr is None else o.upper_lr

    def step(x: Params, y: Params, t: int, *, create_graph: bool) -> Params:
        y = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in y.items()}
        F = problem.outer_loss(x, y, task)
        f = problem.inner_loss(x, y, task)
        check_finite(F, f"outer_loss at inner step {t}", task)
        check_finite(f, f"inner_loss at inner step {t}", task)
        gF = grad_dict(F, y, create_graph=create_graph, retain_graph=True)
        gf = grad_dict(f, y, create_graph=create_graph)
        rho = rho_at(t, o.rho0, o.rho_schedule, o.rho_decay)
        y = {k: y[k] - (sign * rho * s_u * gF[k] + (1.0 - rho) * o.inner_lr * gf[k]) for k in y}
        if not create_graph:
            y = {k: v.detach() for k, v in y.items()}
        return project(problem, x, y)

    return step


def bda_unroll(
    problem: BilevelProblem, x: Params, task, o: BDAOptions, *, sign: float = 1.0, create_graph: bool = True
) -> Params:
    """T aggregated steps of eq. 32 from init_inner(x), differentiable in x when ``create_graph``."""
    step = bda_stepper(problem, task, o, sign=sign)
    y = inner_start(problem, x, task, graph=create_graph)
    for t in range(1, o.inner_steps + 1):
        y = step(x, y, t, create_graph=create_graph)
    return y


def _outer_objective(problem: BilevelProblem, task):
    def objective(x: Params, y: Params):
        F = problem.outer_loss(x, y, task)
        check_finite(F, "outer_loss", task)
        return F, None

    return objective


class _BDABase(Checkpointed, Solver):
    """Reverse mode through the aggregated dynamics; ``checkpoint_every`` / ``memory_budget_mb`` bound its
    memory (checkpoint.py)."""

    Options = BDAOptions
    sign = 1.0

    def _adapt(self, problem, x, task, state):
        # Evaluation follows the solver's own aggregated dynamics (eq. 32), not plain descent on f.
        return bda_unroll(problem, x, task, self.options, sign=self.sign, create_graph=False)

    def _reverse_parts(self, problem, x, task):
        return bda_stepper(problem, task, self.options, sign=self.sign), _outer_objective(problem, task), self.options.inner_steps

    def _hypergrad(self, problem, x, task, state):
        o = self.options
        x = leaves(x)
        every = self.checkpoint_spacing(problem, x, task)
        step, objective, steps = self._reverse_parts(problem, x, task)
        grad, y, _ = reverse(step, objective, x, inner_start(problem, x, task), steps, every, task)
        metrics = {"rho_T": rho_at(o.inner_steps, o.rho0, o.rho_schedule, o.rho_decay)}
        if every:
            metrics["checkpoint_every"] = float(every)
        return finish(problem, x, y, task, grad, metrics)


@register
class BDA(_BDABase):
    """Optimistic BDA: reverse mode through the aggregated dynamics of survey 001 eq. 32."""

    name = "bda"
    paper = "Liu, Mu, Yuan, Zeng, Zhang 2020, A generic first-order algorithmic framework for bi-level programming beyond lower-level singleton (survey 001 eq. 32)"


@register
class PessimisticBDA(_BDABase):
    """Pessimistic BDA (survey 001 section 9): the upper-level term of eq. 32 enters with a minus sign."""

    name = "bda-pessimistic"
    paper = "Liu et al. 2021, survey 001 section 9 (pessimistic aggregation −ρ_t ∂F/∂y + (1 − ρ_t) ∂f/∂y)"
    sign = -1.0
