"""Implicit hypergradients: IFT by conjugate gradient (HOAG) or Neumann series, and iMAML.

Survey 001 §6, Algorithm 4. If y*(x) is a strict local minimum of f(x, ·), differentiating the optimality
condition ∇_y f(x, y*(x)) = 0 gives (eq. 31)

    dF/dx = ∇_x F − ∇²_xy f · q,      ∇²_yy f · q = ∇_y F,          all at (x, y*)        (1)

which needs only y*, not the path that found it. Metaray evaluates (1) at y_T, the result of ``inner_steps``
gradient steps from ``init_inner(x)`` (or from the previous y_T with ``warm_start``), and solves the linear
system matrix-free: Hessian-vector products and the mixed term ∇²_xy f · q are both vector-Jacobian
products of ∇_y f (by symmetry of H, Hv is the VJP of ∇_y f with respect to y).

- ``ift-cg`` solves the system by conjugate gradient (Pedregosa 2016, HOAG).
- ``ift-neumann`` by the truncated Neumann series H⁻¹ ≈ α Σ_{j<K} (I − αH)^j (Lorraine et al. 2020;
  survey 000 eq. 44).
- ``imaml`` (Rajeswaran et al. 2019; survey 000 eqs. 39-43) applies (1) to the proximal inner problem

      y*(x) = argmin_y  f(x, y) + λ/2 ‖y − Ψ₀(x)‖²,      Ψ₀ = init_inner (the meta-initialization),

  whose Hessian is H + λI and whose mixed term is ∇²_xy f − λ ∂Ψ₀/∂x. With q = (H + λI)⁻¹ ∇_y F,

      dF/dx = ∇_x F − ∇²_xy f · q + (∂Ψ₀/∂x)ᵀ (I + H/λ)⁻¹ ∇_y F,

  which is iMAML's (I + H/λ)⁻¹ ∇_y F (eq. 42) when x is only the initialization (CG's iterates on
  H + λI and on I + H/λ are the same up to the factor λ, so solving either is the same computation).

Batched (``hypergrad_batch`` / ``hypergrad_mean``, solvers/batched.py): ``batched_implicit`` computes (1) for
a batch of tasks at once, every task's system solved by ``linsolve.cg_batched`` / ``neumann_batched`` with its own
step sizes and stopping, so each task gets what its own solve gives (tests/solvers/test_batched.py).

The linear solvers and their diagnostics are in ``linsolve``; residual, steps, ``converged`` and
``indefinite`` (a direction of non-positive curvature was met) go into ``HyperGrad.metrics``. Inner params
the lower level does not depend on are left out of the system (their y* is not determined by f, and they do
not move under the inner steps), so they contribute nothing instead of making H singular.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import batched
from .base import Solver, SolverOptions, nonnegative, option, positive, register
from .core import (
    BilevelProblem,
    DivergedError,
    Params,
    check_finite,
    check_same_keys,
    check_scalar,
    detached,
    full_precision,
    grad_dict,
    inner_start,
    leaves,
    project,
    tadd,
    tnorm,
    tscale,
    vjp_dict,
)
from .linsolve import ON_INDEFINITE, BatchSolveResult, MatVec, SolveResult, bdot, cg, cg_batched, neumann, neumann_batched
from .unrolled import finish, unroll

LinearSolve = Callable[[MatVec, Params, Params | None], SolveResult]  # (matvec, b, initial guess or None)
BatchLinearSolve = Callable[[MatVec, Params], BatchSolveResult]  # stacked (matvec, b), from a zero guess


def implicit_hypergrad(
    problem: BilevelProblem, x: Params, y: Params, task: Any, solve: LinearSolve, q0: Params | None = None
) -> tuple[Params, SolveResult, dict[str, float]]:
    """Eq. (1) at the given inner point y, with the linear system solved by ``solve``.

    Returns (dF/dx, the solve's result, extra metrics: ‖∇_y f(x, y)‖, which (1) assumes is 0, and the number of
    inner params the lower level does not use).
    """
    x, y = leaves(x), leaves(y)
    outer = problem.outer_loss(x, y, task)
    check_finite(outer, "outer_loss", task)
    gx_F = grad_dict(outer, x, retain_graph=True)
    gy_F = grad_dict(outer, y)
    inner = problem.inner_loss(x, y, task)
    check_finite(inner, "inner_loss", task)
    gy_f_all = grad_dict(inner, y, create_graph=True)

    # ∇_y f of an unused inner param is a constant zero (no graph): keep it out of the system.
    active = [k for k in y if gy_f_all[k].requires_grad]
    if not active:
        raise _no_lower_dependence(y)
    gy_f = {k: gy_f_all[k] for k in active}
    y_act = {k: y[k] for k in active}

    def hvp(v: Params) -> Params:
        return detached(vjp_dict(gy_f, y_act, v, retain_graph=True))

    if q0 is not None:
        q0 = {k: q0[k] for k in active}
    result = solve(hvp, {k: gy_F[k] for k in active}, q0)
    mixed = vjp_dict(gy_f, x, result.solution)  # ∇²_xy f · q
    extra = {
        "inner_grad_norm": float(tnorm(detached(gy_f))),
        "unused_inner_params": float(len(y) - len(active)),
    }
    return tadd(gx_F, mixed, -1.0), result, extra


def _no_lower_dependence(y: Params) -> ValueError:
    return ValueError(
        f"inner_loss does not depend on any inner param ({sorted(y)}) to second order: the lower-level "
        "solution is not unique and the implicit hypergradient is undefined"
    )


def batched_implicit(problem: Any, tasks: list, steps: int, lr: float, solve: BatchLinearSolve,
                     lam: float | None = None) -> batched.Compute:
    """Eq. (1) for a batch of tasks at once (``batched.Compute``): the inner steps vmapped over tasks, then one
    autograd graph over the stacked tasks, in which ∇_y Σ_i f_i holds every task's ∇_y f_i (task i's loss
    reads only its own slice), so one VJP of it gives every task's Hessian-vector product H_i v_i and the
    stacked systems H_i q_i = ∇_y F_i are solved together (``linsolve.cg_batched``). With per-task copies of
    x, the mixed term ∇²_xy f_i q_i is per task too; the reduced form (``mean``) shares one x, so the same
    VJP sums the tasks. ``lam``: iMAML's proximal inner problem. Per-task solve metrics go into aux's metrics
    as [B] tensors."""
    twin = problem.batched() if callable(getattr(problem, "batched", None)) else problem
    lower = twin if lam is None else Proximal(twin, lam)  # the inner steps
    system = full_precision(twin) if lam is None else Proximal(full_precision(twin), lam)  # eq. (1)'s f
    tensors, rebuild = batched.split(problem.stack_tasks(tasks))
    n = len(tasks)

    def each(fn: Callable, x_dim: int | None) -> Callable:  # fn(x, y, task) for every task, x shared or per task
        return torch.func.vmap(lambda xx, yy, t: fn(xx, yy, rebuild(t)), in_dims=(x_dim, 0, 0))

    def compute(x: Params, mean: bool) -> tuple[Params, dict]:
        xd = detached(x)

        def adapt(t: dict) -> tuple[Params, torch.Tensor]:  # one task's y_T from init_inner, without a graph
            task, losses = rebuild(t), []
            y0 = detached(batched.start(lower, xd, task))
            y = batched.unroll(lower, xd, y0, task, range(steps), batched.constant_lr(lr), losses, graph=False)
            return y, torch.stack([v.reshape(()) for v in losses]) if losses else y0[next(iter(y0))].new_zeros(0)

        y, step_losses = torch.func.vmap(adapt)(tensors)
        x_dim = None if mean else 0
        with torch.enable_grad():
            xs = leaves(xd) if mean else {k: v.expand(n, *v.shape).clone().requires_grad_() for k, v in xd.items()}
            ys = leaves(y)
            outer, outer_metrics = each(lambda xx, yy, t: batched.outer_eval(twin, xx, yy, t), x_dim)(xs, ys, tensors)
            total = outer.sum()
            gx_F = grad_dict(total, xs, retain_graph=True)
            gy_F = grad_dict(total, ys)
            f = each(lambda xx, yy, t: check_scalar(system.inner_loss(xx, yy, t), "inner_loss").reshape(()), x_dim)(xs, ys, tensors)
            gy_f_all = grad_dict(f.sum(), ys, create_graph=True)
            active = [k for k in ys if gy_f_all[k].requires_grad]  # as in implicit_hypergrad
            if not active:
                raise _no_lower_dependence(ys)
            gy_f, y_act = {k: gy_f_all[k] for k in active}, {k: ys[k] for k in active}
            result = solve(lambda v: detached(vjp_dict(gy_f, y_act, v, retain_graph=True)), {k: gy_F[k] for k in active})
            grad = tadd(gx_F, vjp_dict(gy_f, xs, result.solution), -1.0)
        with torch.no_grad():
            inner = each(lambda xx, yy, t: check_scalar(twin.inner_loss(xx, yy, t), "inner_loss").reshape(()), None)(xd, y, tensors)
            grad_norm = torch.sqrt(bdot(detached(gy_f), detached(gy_f)))
        solver_metrics = {**result.metrics(), "inner_grad_norm": grad_norm,
                          "unused_inner_params": torch.full_like(grad_norm, float(len(ys) - len(active)))}
        aux = {"outer": outer.detach(), "inner": inner, "steps": step_losses,
               "metrics": {**outer_metrics, **solver_metrics}}
        return (tscale(detached(grad), 1.0 / n) if mean else detached(grad)), aux

    return compute


def _pad(q: Params, like: Params) -> Params:
    """The solve's q over all inner keys (zeros for the unused ones), for the warm-start state."""
    return {k: q[k].detach() if k in q else torch.zeros_like(like[k]) for k in like}


class Proximal(BilevelProblem):
    """iMAML's inner problem f(x, y) + λ/2 ‖y − Ψ₀(x)‖² around the problem's own init Ψ₀ = init_inner."""

    def __init__(self, problem: BilevelProblem, lam: float):
        self.problem, self.lam = problem, lam

    def init_inner(self, x: Params, task: Any) -> Params:
        return self.problem.init_inner(x, task)

    def inner_loss(self, x: Params, y: Params, task: Any):
        center = self.problem.init_inner(x, task)
        prox = sum(((y[k] - center[k]) ** 2).sum() for k in y)
        return self.problem.inner_loss(x, y, task) + 0.5 * self.lam * prox

    def outer_loss(self, x: Params, y: Params, task: Any):
        return self.problem.outer_loss(x, y, task)

    def project_inner(self, x: Params, y: Params) -> Params:
        return project(self.problem, x, y)


# ----------------------------------------------------------------------------------------------------------
# IFT solvers
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IFTOptions(SolverOptions):
    inner_steps: int = option(100, "inner gradient steps T to approximate y* (the IFT assumes ∇_y f(y_T) ≈ 0)", nonnegative)
    inner_lr: float = option(0.1, "inner step size", positive)
    warm_start: bool = option(
        False, "start the inner steps (and CG) from the previous outer step's y_T (and q), carried in HyperGrad.state"
    )
    on_indefinite: str = option(
        "stop", "when the Hessian shows pᵀHp <= 0: 'stop' (truncate, flag), 'continue' (flag) or 'raise'", choices=ON_INDEFINITE
    )


class _IFT(batched.Batched, Solver):
    """Shared body of ift-cg and ift-neumann; subclasses provide the linear solve, one system or a batch."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.stateful = self.options.warm_start  # type: ignore[misc]  # per instance: only warm starts carry state

    def _solve(self, matvec: MatVec, b: Params, q0: Params | None) -> SolveResult:
        raise NotImplementedError

    def _solve_batched(self, matvec: MatVec, b: Params) -> BatchSolveResult:
        raise NotImplementedError

    def _batched_compute(self, problem, x, tasks):
        o = self.options
        if o.warm_start:
            return "warm_start carries each task's (y_T, q) between steps; the batched path starts every task fresh"
        return batched_implicit(problem, list(tasks), o.inner_steps, o.inner_lr, self._solve_batched), {}

    def _start(self, problem, x, task, state) -> tuple[Params, Params | None]:
        """The inner start and CG's initial guess: init_inner(x), or the carried (y_T, q) with ``warm_start``."""
        y0 = inner_start(problem, x, task, graph=False)
        if not (self.options.warm_start and state is not None):
            return y0, None
        if not (isinstance(state, dict) and "y" in state and isinstance(state["y"], dict)):
            raise ValueError(
                f"{self.name}: the warm-start state must be the HyperGrad.state of a previous call "
                f"({{'y': inner params, 'q': inner params}}), got {type(state).__name__}"
                + (f" with keys {sorted(state)}" if isinstance(state, dict) else "")
            )
        check_same_keys(y0, state["y"], "init_inner(x)", "warm-start state['y']")
        q0 = state.get("q")
        if q0 is not None:
            if not isinstance(q0, dict):
                raise ValueError(f"{self.name}: warm-start state['q'] must be inner params (a dict) or None, got {type(q0).__name__}")
            check_same_keys(y0, q0, "init_inner(x)", "warm-start state['q']")
        return detached(state["y"]), q0

    def _adapt(self, problem, x, task, state):
        # Evaluation reaches the same y_T as _hypergrad: the warm start included.
        y0, _ = self._start(problem, x, task, state)
        return unroll(problem, x, y0, task, self.options.inner_steps, self.options.inner_lr, create_graph=False)

    def _hypergrad(self, problem, x, task, state):
        o = self.options
        y0, q0 = self._start(problem, x, task, state)
        y = unroll(problem, x, y0, task, o.inner_steps, o.inner_lr, create_graph=False)
        grad, result, extra = implicit_hypergrad(full_precision(problem), x, y, task, self._solve, q0)
        new_state = {"y": detached(y), "q": _pad(result.solution, y)} if o.warm_start else None
        return finish(problem, x, y, task, grad, {**result.metrics(), **extra}, new_state)


@dataclass(frozen=True)
class IFTCGOptions(IFTOptions):
    cg_steps: int = option(50, "maximum conjugate-gradient steps (Hessian-vector products)", positive)
    cg_tol: float = option(1e-10, "stop CG once ‖∇_y F − H q‖ <= cg_tol · ‖∇_y F‖", nonnegative)


@register
class IFTCG(_IFT):
    """IFT hypergradient, eq. (1), with H q = ∇_y F solved by conjugate gradient (HOAG; survey 001 Alg. 4)."""

    name = "ift-cg"
    Options = IFTCGOptions
    paper = "Pedregosa 2016, Hyperparameter optimization with approximate gradient (HOAG; survey 001 §6, Alg. 4)"

    def _solve(self, matvec, b, q0):
        o = self.options
        return cg(matvec, b, x0=q0, tol=o.cg_tol, max_steps=o.cg_steps, on_indefinite=o.on_indefinite)

    def _solve_batched(self, matvec, b):
        o = self.options
        return cg_batched(matvec, b, tol=o.cg_tol, max_steps=o.cg_steps, on_indefinite=o.on_indefinite)


@dataclass(frozen=True)
class IFTNeumannOptions(IFTOptions):
    neumann_terms: int = option(50, "number K of Neumann terms (Hessian-vector products)", positive)
    neumann_alpha: float | None = option(
        None, "Neumann step α; the series converges when α·eig(H) ⊂ (0, 2). None: use inner_lr", positive
    )
    neumann_tol: float = option(1e-10, "stop early (and report converged) once the relative residual <= this", nonnegative)


@register
class IFTNeumann(_IFT):
    """IFT hypergradient, eq. (1), with H⁻¹ ∇_y F ≈ α Σ_{j<K} (I − αH)^j ∇_y F (Lorraine et al. 2020).

    Warm starts apply to the inner steps only: the series always starts from 0.
    """

    name = "ift-neumann"
    Options = IFTNeumannOptions
    paper = "Lorraine, Vicol, Duvenaud 2020, Optimizing millions of hyperparameters by implicit differentiation (survey 001 §6)"

    def _alpha(self) -> float:
        o = self.options
        return o.inner_lr if o.neumann_alpha is None else o.neumann_alpha

    def _solve(self, matvec, b, q0):
        o = self.options
        result = neumann(matvec, b, alpha=self._alpha(), terms=o.neumann_terms, tol=o.neumann_tol, on_indefinite=o.on_indefinite)
        self._refuse_divergence(result)
        return result

    def _solve_batched(self, matvec, b):
        o = self.options
        result = neumann_batched(matvec, b, alpha=self._alpha(), terms=o.neumann_terms, tol=o.neumann_tol,
                                 on_indefinite=o.on_indefinite)
        for i in result.diverged.nonzero().flatten().tolist():  # the loop's error, for the first task it refuses
            self._refuse_divergence(result.task(i))
        return result

    def _refuse_divergence(self, result: SolveResult) -> None:
        o, alpha = self.options, self._alpha()
        if result.diverged and not (result.indefinite and o.on_indefinite == "stop"):
            # A diverging series returns a finite sum that can be off by orders of magnitude: refuse it. (With
            # on_indefinite='stop', a truncated series at negative curvature is returned, flagged, by design.)
            r = result.residuals
            growth = r[-1] / r[-2] if len(r) > 1 and r[-2] > 0 and math.isfinite(r[-1]) else float("inf")
            lam = (1.0 + growth) / alpha  # |1 − α λmax| ≈ the growth factor per term
            raise DivergedError(
                f"ift-neumann: the Neumann series diverges (relative residual {r[-1]:.3g} after {result.steps} "
                f"terms, growing ×{growth:.3g} per term), so α·λmax(∇²_yy f) > 2 with α = {alpha:g} "
                f"(λmax ≈ {lam:.3g}) or the Hessian is indefinite; set neumann_alpha below {2.0 / lam:.3g}, "
                "or use ift-cg",
                where="neumann",
            )


# ----------------------------------------------------------------------------------------------------------
# iMAML
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IMAMLOptions(SolverOptions):
    inner_steps: int = option(10, "gradient steps T on the proximal inner problem f + λ/2‖y − x‖²", nonnegative)
    inner_lr: float = option(0.1, "inner step size", positive)
    lam: float = option(1.0, "proximal strength λ (larger: y* stays closer to the initialization)", positive)
    cg_steps: int = option(5, "maximum conjugate-gradient steps (iMAML uses 5)", positive)
    cg_tol: float = option(1e-10, "stop CG once the relative residual <= cg_tol", nonnegative)
    on_indefinite: str = option(
        "stop", "when H + λI shows pᵀ(H + λI)p <= 0: 'stop' (truncate, flag), 'continue' (flag) or 'raise'", choices=ON_INDEFINITE
    )


@register
class IMAML(batched.Batched, Solver):
    """Implicit MAML: (I + H/λ)⁻¹ ∇_y F at the proximal inner solution, by CG with Hessian-vector products.

    The outer params are the initialization: Ψ₀(x) = init_inner(x) (for ModelProblem, the model's params).
    """

    name = "imaml"
    Options = IMAMLOptions
    paper = "Rajeswaran, Finn, Kakade, Levine 2019, Meta-learning with implicit gradients (survey 000 eqs. 39-43)"

    def _adapt(self, problem, x, task, state):
        o = self.options  # evaluation adapts on the same proximal inner problem as training
        return unroll(Proximal(problem, o.lam), x, inner_start(problem, x, task, graph=False), task, o.inner_steps, o.inner_lr, create_graph=False)

    def _hypergrad(self, problem, x, task, state):
        o = self.options
        y = self._adapt(problem, x, task, state)

        def solve(matvec, b, q0):
            return cg(matvec, b, tol=o.cg_tol, max_steps=o.cg_steps, on_indefinite=o.on_indefinite)

        grad, result, extra = implicit_hypergrad(Proximal(full_precision(problem), o.lam), x, y, task, solve)
        return finish(problem, x, y, task, grad, {**result.metrics(), **extra, "lam": o.lam})

    def _batched_compute(self, problem, x, tasks):
        o = self.options

        def solve(matvec, b):
            return cg_batched(matvec, b, tol=o.cg_tol, max_steps=o.cg_steps, on_indefinite=o.on_indefinite)

        return batched_implicit(problem, list(tasks), o.inner_steps, o.inner_lr, solve, lam=o.lam), {"lam": o.lam}
