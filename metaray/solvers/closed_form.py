"""Closed-form inner problems: the ridge-regression head of R2D2.

Survey 000 §4.4, eqs. 46-48 (Bertinetto et al. 2019). The inner problem of a meta-feature task is ridge
regression of one-hot support labels Y ∈ R^{n×N} on support features X = φ(X_s) ∈ R^{n×e}:

    W*(x) = argmin_W ½‖X W − Y‖² + λ/2 ‖W‖²
          = Xᵀ (X Xᵀ + λ I_n)⁻¹ Y        Woodbury form: an n×n solve, cheap when n < e     (eq. 48)
          = (Xᵀ X + λ I_e)⁻¹ Xᵀ Y        primal form:   an e×e solve, cheap when e ≤ n

and the outer loss is F(x, W*(x)) on the query logits α φ(X_q) W* + β. α, β and λ = exp(log λ) are outer
params (λ > 0 by construction). The hypergradient is exact: plain autograd through the linear solve.

The problem must provide ``ridge_system(x, task) -> (X, Y, λ)`` (differentiable in x) and name its head
``head.weight`` in the inner params; ``metaray.tasks.FeatureProblem`` does both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import batched
from .base import Solver, SolverOptions, nonnegative, option, register
from .core import check_finite, grad_dict, leaves
from .unrolled import finish

RIDGE_FORMS = ("auto", "woodbury", "primal")


def ridge_solve(X: Tensor, Y: Tensor, lam: Tensor, form: str = "auto") -> tuple[Tensor, bool]:
    """W = argmin ½‖XW − Y‖² + λ/2‖W‖² and whether the Woodbury (n×n) form was used.

    ``form='auto'`` picks Woodbury when n < e. Both forms are the same matrix in exact arithmetic.
    """
    if form not in RIDGE_FORMS:
        raise ValueError(f"ridge form must be one of {list(RIDGE_FORMS)}, got {form!r}")
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"ridge needs X [n, e] and Y [n, N] with the same n, got {tuple(X.shape)} and {tuple(Y.shape)}")
    n, e = X.shape
    woodbury = n < e if form == "auto" else form == "woodbury"
    if woodbury:
        K = X @ X.T + lam * torch.eye(n, dtype=X.dtype, device=X.device)
        return X.T @ torch.linalg.solve(K, Y), True
    K = X.T @ X + lam * torch.eye(e, dtype=X.dtype, device=X.device)
    return torch.linalg.solve(K, X.T @ Y), False


@dataclass(frozen=True)
class RidgeOptions(SolverOptions):
    inner_steps: int = option(0, "unused: the head is solved in closed form (kept for a uniform config)", nonnegative)
    form: str = option("auto", "'woodbury' (n×n solve), 'primal' (e×e solve) or 'auto' (Woodbury when n < e)", choices=RIDGE_FORMS)


@register
class Ridge(batched.Batched, Solver):
    """R2D2's differentiable ridge-regression head (survey 000 eqs. 46-48): exact hypergradient by autograd."""

    name = "ridge"
    Options = RidgeOptions
    problem_needs = ("ridge_system",)
    paper = "Bertinetto, Henriques, Torr, Vedaldi 2019, Meta-learning with differentiable closed-form solvers (survey 000 §4.4)"

    def _head(self, problem, x, task) -> tuple[dict, bool, Tensor]:
        """The closed-form head W*(x) as inner params, whether Woodbury was used, and λ."""
        system = getattr(problem, "ridge_system", None)
        if not callable(system):
            raise TypeError(
                f"ridge needs a problem with ridge_system(x, task) -> (features, one-hot targets, λ), such as "
                f"metaray.tasks.FeatureProblem(inner='ridge'); {type(problem).__name__} has none"
            )
        out = system(x, task)
        if not (isinstance(out, tuple) and len(out) == 3 and all(isinstance(t, Tensor) for t in out)):
            raise TypeError("ridge_system(x, task) must return a tuple of three tensors (features X [n, e], one-hot "
                            f"targets Y [n, N], λ scalar), got {type(out).__name__}")
        X, Y, lam = out
        if lam.numel() != 1:
            raise ValueError(f"the ridge λ must be a scalar tensor (one λ for the whole head), got shape {tuple(lam.shape)}")
        if not bool(torch.isfinite(lam)) or not bool(lam > 0):
            raise ValueError(f"the ridge λ must be finite and > 0, got {float(lam)}")
        lam = lam.reshape(())
        W, woodbury = ridge_solve(X, Y, lam, self.options.form)
        return {"head.weight": W}, woodbury, lam

    def _adapt(self, problem, x, task, state):
        return self._head(problem, x, task)[0]  # evaluation uses the same closed-form head

    def _hypergrad(self, problem, x, task, state):
        x = leaves(x)
        y, woodbury, lam = self._head(problem, x, task)
        outer = problem.outer_loss(x, y, task)
        check_finite(outer, "outer_loss", task)
        metrics = {"woodbury": float(woodbury), "lam": float(lam.detach())}
        return finish(problem, x, y, task, grad_dict(outer, x), metrics)

    def _surrogate(self, problem, x, tasks):
        # λ depends on x only: checked (and the form decided) once, on the first task, outside the vmapped part
        _, woodbury, lam = self._head(problem, x, tasks[0])
        form = self.options.form

        def surrogate(p, xx, task):
            X, Y, lam_ = p.ridge_system(xx, task)
            y = {"head.weight": ridge_solve(X, Y, lam_.reshape(()), form)[0]}
            outer = batched.outer_eval(p, xx, y, task)
            return outer[0], batched.report(p, xx, y, task, outer, [])

        return surrogate, {"woodbury": float(woodbury), "lam": float(lam.detach())}
