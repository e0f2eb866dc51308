"""FSLA: the fully single-loop algorithm (paper 004, Li, Gu & Huang 2022: eq. 10 and Algorithm 1).

No inner loop and no Hessian inverse: one step on y, one step on the state v ≈ (∇²_yy f)⁻¹ ∇_y F (a
Neumann-like recursion, eqs. 8-9), the hypergradient from v, and a STORM momentum d with its
variance-reduction correction (Alg. 1 line 9). One call = one outer iteration k → k+1, at x = x_{k+1}
(the caller already applied x_{k+1} = x_k − α_k d_k: the outer update belongs to the meta-learner):

    y_{k+1} = y_k − τ_{k+1} ∇_y f(x_{k+1}, y_k)                                        (Alg. 1 line 6)
    v_{k+1} = β_{k+1} ∇_y F(x_{k+1}, y_k) + (I − β_{k+1} ∇²_yy f(x_{k+1}, y_k)) v_k      (line 7)
    ĝ_{k+1}(ξ) = ∇_x F(x_{k+1}, y_{k+1}; ξ) − ∇²_xy f(x_{k+1}, y_{k+1}; ξ) v_{k+1}      (line 8)
    d_{k+1} = ĝ_{k+1}(ξ_{k+1}) + (1 − η_{k+1}) (d_k − ĝ_k(ξ_{k+1}))                      (line 9)

v's terms are evaluated at y_k, as in Algorithm 1 (eq. 10 uses y_{k+1}; both fit the analysis). That lets
one ∇_y f(x_{k+1}, y_k) graph serve both the y-step and the Hessian-vector product. ĝ_k(ξ_{k+1})
re-evaluates the previous iterate (x_k, y_k, v_k) on the new sample ξ_{k+1} = ``task``. The first call
(state None) starts from y_0 = init_inner(x), v_0 = 0 and sets d_1 = ĝ_1 (no previous estimate).

Step sizes: constant (``schedule="constant"``, fine for deterministic problems) or, as in Theorem 5 with
α_k = δ/√k, all three proportional to 1/√(k+1) (``schedule="inv_sqrt"``: τ_k = inner_lr/√(k+1), β_k =
beta/√(k+1), η_k = eta/√(k+1)). With η = 1 the momentum is off: d_{k+1} = ĝ_{k+1}.

State (``HyperGrad.state``, carry it to the next call for the same task stream):
``{"step": k+1, "x": x_{k+1}, "y": y_{k+1}, "v": v_{k+1}, "d": d_{k+1}}``, all detached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .base import Solver, SolverOptions, option, positive, register, unit_interval
from .core import (
    BilevelProblem,
    Params,
    check_finite,
    check_same_keys,
    detached,
    grad_dict,
    inner_start,
    leaves,
    project,
    tnorm,
    tzeros_like,
    vjp_dict,
)
from .unrolled import finish


@dataclass(frozen=True)
class FSLAOptions(SolverOptions):
    inner_steps: int = option(1, "inner steps per outer step (FSLA is single-loop: must be 1)", positive)
    inner_lr: float = option(0.1, "τ: step size of the y update", positive)
    beta: float = option(0.1, "β: step size of the v update (one Neumann step per outer step)", positive)
    eta: float = option(0.5, "η in (0, 1]: momentum correction weight (1 = no momentum, d = ĝ)", unit_interval)
    schedule: str = option("constant", "step sizes constant, or ∝ 1/√(k+1) as in Theorem 5", choices=("constant", "inv_sqrt"))

    def validate(self) -> None:
        if self.inner_steps != 1:
            raise ValueError(f"option 'inner_steps' must be 1 for fsla (a fully single-loop method), got {self.inner_steps}")


def fsla_hypergrad_estimate(problem: BilevelProblem, x: Params, y: Params, v: Params, task: Any) -> Params:
    """ĝ(x, y, v; ξ) = ∇_x F(x, y) − ∇²_xy f(x, y) v  (Alg. 1 line 8), a Jacobian-vector product, no inverse."""
    x, y = leaves(x), leaves(y)
    outer = problem.outer_loss(x, y, task)
    check_finite(outer, "outer_loss", task)
    gx = grad_dict(outer, x)
    inner = problem.inner_loss(x, y, task)
    check_finite(inner, "inner_loss", task)
    gy = grad_dict(inner, y, create_graph=True)
    cross = vjp_dict(gy, x, v)  # ∂_x ⟨∇_y f(x, y), v⟩ = ∇²_xy f · v
    return {k: gx[k] - cross[k] for k in x}


@register
class FSLA(Solver):
    """Fully single-loop bilevel optimization with a tracked Neumann state v and STORM momentum (paper 004)."""

    name = "fsla"
    Options = FSLAOptions
    paper = "Li, Gu, Huang 2022, A fully single loop algorithm for bilevel optimization without Hessian inverse (AAAI; eq. 10, Alg. 1)"
    stateful = True

    def _start(self, problem, xd: Params, task: Any, state: Any):
        """(k, y_k, v_k, (x_k, d_k) or None) from the carried state, checked; a fresh start when state is None."""
        if state is None:
            y = inner_start(problem, xd, task, graph=False)
            return 0, y, tzeros_like(y), None
        if not isinstance(state, dict):
            raise ValueError(f"fsla state must be None or the dict a previous call returned, got {type(state).__name__}")
        missing = [key for key in ("step", "x", "y", "v", "d") if key not in state]
        if missing:
            raise ValueError(f"fsla state must be None or the state returned by the previous call; missing {missing}")
        k = state["step"]
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"fsla state['step'] must be an int >= 0 (the outer iterations done), got {k!r}")
        for key in ("x", "y", "v", "d"):
            if not isinstance(state[key], dict):
                raise ValueError(f"fsla state[{key!r}] must be params (dict[str, Tensor]), got {type(state[key]).__name__}")
        check_same_keys(xd, state["x"], "outer params x", "fsla state['x']")
        check_same_keys(xd, state["d"], "outer params x", "fsla state['d']")
        check_same_keys(state["y"], state["v"], "fsla state['y']", "fsla state['v']")
        return k, state["y"], state["v"], (state["x"], state["d"])

    def _tau(self, k: int) -> float:
        return self.options.inner_lr / math.sqrt(k + 1) if self.options.schedule == "inv_sqrt" else self.options.inner_lr

    def _adapt(self, problem, x, task, state):
        # The inner iterate a call would reach: y_{k+1} = y_k − τ_{k+1} ∇_y f(x, y_k) from the tracked y_k (line 6).
        k, y, _, _ = self._start(problem, x, task, state)
        yl = leaves(y)
        inner = problem.inner_loss(x, yl, task)
        check_finite(inner, f"inner_loss at outer step {k}", task)
        gf = grad_dict(inner, yl)
        return detached(project(problem, x, {kk: yl[kk] - self._tau(k) * gf[kk] for kk in yl}))

    def _hypergrad(self, problem, x, task, state):
        o = self.options
        xd = detached(x)
        k, y, v, prev = self._start(problem, xd, task, state)
        scale = 1.0 / math.sqrt(k + 1) if o.schedule == "inv_sqrt" else 1.0
        tau, beta, eta = self._tau(k), o.beta * scale, o.eta * scale

        # Lines 6-7, both at (x_{k+1}, y_k): one gradient graph gives the y-step and the Hessian-vector product.
        xl, yl = leaves(xd), leaves(y)
        inner = problem.inner_loss(xl, yl, task)
        check_finite(inner, f"inner_loss at outer step {k}", task)
        gf = grad_dict(inner, yl, create_graph=True)
        hv = vjp_dict(gf, yl, v)  # ∇²_yy f · v
        outer = problem.outer_loss(xl, yl, task)
        check_finite(outer, f"outer_loss at outer step {k}", task)
        gF = grad_dict(outer, yl)
        y_new = detached(project(problem, xd, {kk: yl[kk] - tau * gf[kk] for kk in yl}))
        v_new = {kk: beta * gF[kk] + v[kk] - beta * hv[kk] for kk in v}
        v_new = detached(v_new)

        # Lines 8-9: the new estimate, and the momentum with its correction on the same sample.
        g_new = fsla_hypergrad_estimate(problem, xd, y_new, v_new, task)
        if prev is None:
            d = g_new
        else:
            g_old = fsla_hypergrad_estimate(problem, prev[0], y, v, task)
            d = {kk: g_new[kk] + (1.0 - eta) * (prev[1][kk] - g_old[kk]) for kk in g_new}
        d = detached(d)
        metrics = {"v_norm": float(tnorm(v_new)), "y_step_norm": float(tau * tnorm(gf).detach()), "fsla_step": float(k + 1)}
        # x is cloned: a caller that updates its outer params in place must not change the stored x_{k+1}.
        new_state = {"step": k + 1, "x": {kk: t.clone() for kk, t in xd.items()}, "y": y_new, "v": v_new, "d": d}
        return finish(problem, xd, y_new, task, d, metrics, state=new_state)
