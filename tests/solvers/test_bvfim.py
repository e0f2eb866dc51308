"""BVFIM (survey 001 eqs. 33-35): the toy with a non-unique lower level, the first-order gradient against finite
differences of the barrier value function, the barrier's step control where f (and ψ) are negative."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import torch

import metaray.solvers as S
from metaray.solvers.core import BilevelProblem
from metaray.tasks.toys import NonUniqueToyProblem

D = torch.float64
TOY_OPTS = dict(inner_steps=20, barrier_steps=20, inner_lr=0.9, barrier_lr=0.5, decay=1.5)


def test_bvfim_reaches_the_optimum_where_rad_stalls_with_a_negative_value_function():
    problem, solver = NonUniqueToyProblem(10), S.make("bvfim", **TOY_OPTS)
    x, state, psis = problem.initial_params(), None, []
    for _ in range(60):
        hg = solver.hypergrad(problem, x, None, state)
        state = hg.state
        psis.append(hg.metrics["psi"])
        x = {"x": x["x"] - 1.0 * hg.grad["x"]}
    assert state == {"step": 60}
    assert (x["x"] - 1).abs().max() < 1e-2  # measured 1.8e-3
    # F = ½‖x − y2‖² + ½‖y1 − 1‖² at y_T: F < 5e-5 puts every y1, y2 coordinate within 1e-2 of 1 (x is).
    assert hg.outer_loss < 5e-5  # measured 1.2e-6
    # ψ is negative here (f(x, x) = −½‖x‖² ≈ −5): a log of ψ would be NaN; the barrier of ψ − f stays finite.
    assert max(psis[5:]) < -1.0 and all(math.isfinite(p) for p in psis)
    assert 0 < hg.metrics["barrier_gap"] < 1e-2
    # rad on the same toy (its stall at ½ is shown in test_bda.py as well)
    rad = S.make("rad", inner_steps=20, inner_lr=0.9)
    xr = problem.initial_params()
    for _ in range(30):
        xr = {"x": xr["x"] - 0.8 * rad.hypergrad(problem, xr, None).grad["x"]}
    assert (xr["x"] - 0.5).abs().max() < 1e-3


def barrier_value(x: np.ndarray, mu1: float, mu2: float, theta: float, tau: float) -> float:
    """φ_{μ,θ,τ}(x) of eq. 35 on the toy, solved independently: z* in closed form, y by scipy BFGS."""
    z1 = x / (1 + mu1)  # argmin ½‖z1‖² − ⟨x, z1⟩ + μ1/2‖z‖² (z2 = 0)
    psi = 0.5 * z1 @ z1 - x @ z1 + 0.5 * mu1 * z1 @ z1 + mu2
    n = len(x)

    def obj(v):
        y1, y2 = v[:n], v[n:]
        gap = psi - (0.5 * y1 @ y1 - x @ y1)
        if gap <= 0:
            return 1e10
        return 0.5 * (x - y2) @ (x - y2) + 0.5 * (y1 - 1) @ (y1 - 1) + 0.5 * theta * v @ v - tau * math.log(gap)

    res = scipy.optimize.minimize(obj, np.concatenate([z1, np.zeros(n)]), method="Nelder-Mead",
                                  options={"xatol": 1e-12, "fatol": 1e-15, "maxiter": 40000, "maxfev": 40000})
    res = scipy.optimize.minimize(obj, res.x, method="BFGS", options={"gtol": 1e-12})
    return float(res.fun)


def test_first_order_gradient_matches_finite_differences_of_the_barrier_value():
    """Envelope theorem: with z and y converged, g = dφ_{μ,θ,τ}/dx (no Hessians used)."""
    p = dict(mu1=0.5, mu2=0.3, theta=0.4, tau=0.2)
    solver = S.make("bvfim", inner_steps=200, inner_lr=0.6, barrier_steps=400, barrier_lr=0.5, decay=0.0, **p)
    x = np.array([0.7, -0.4])
    hg = solver.hypergrad(NonUniqueToyProblem(2), {"x": torch.tensor(x, dtype=D)}, None)
    h = 1e-4
    fd = [(barrier_value(x + h * e, **p) - barrier_value(x - h * e, **p)) / (2 * h) for e in np.eye(2)]
    assert np.allclose(hg.grad["x"].numpy(), fd, atol=1e-6), (hg.grad["x"], fd)


def test_step_control_keeps_the_barrier_argument_positive():
    """A y-step of 50 would jump far outside {f < ψ}; it is halved instead, and the result is the same point."""
    m = 0.1
    problem, xv = NonUniqueToyProblem(3), torch.tensor([2.0, -1.0, 0.5], dtype=D)
    base = dict(inner_steps=50, inner_lr=0.9, barrier_steps=200, mu1=m, mu2=m, theta=m, tau=m)
    gentle = S.make("bvfim", barrier_lr=0.2, **base).hypergrad(problem, {"x": xv}, None)
    wild = S.make("bvfim", barrier_lr=50.0, **base).hypergrad(problem, {"x": xv}, None)
    # the unguarded first step from y_0 = z_K (closed form z1 = x/(1+μ1), z2 = 0) leaves the feasible set
    z1 = xv / (1 + m)
    psi = 0.5 * z1 @ z1 - xv @ z1 + 0.5 * m * z1 @ z1 + m
    gap0 = psi - (0.5 * z1 @ z1 - xv @ z1)
    g1 = (z1 - 1) + m * z1 + m * (z1 - xv) / gap0  # ∇_{y1} of F + θ/2‖y‖² − τ ln(ψ − f) at y_0
    y1 = z1 - 50.0 * g1
    assert psi - (0.5 * y1 @ y1 - xv @ y1) < 0
    assert wild.metrics["backtracks"] > 0
    assert wild.metrics["barrier_gap"] > 0 and gentle.metrics["barrier_gap"] > 0
    assert all(math.isfinite(v) for v in wild.metrics.values())
    assert torch.allclose(wild.grad["x"], gentle.grad["x"], atol=1e-6)


class HugeInner(BilevelProblem):
    """f = 1e20 + ½‖y‖²: μ₂ = 0.1 vanishes in ψ's rounding, so no y is strictly feasible in floating point."""

    def init_inner(self, x, task):
        return {"y": torch.zeros(2, dtype=D)}

    def inner_loss(self, x, y, task):
        return 1e20 + 0.5 * (y["y"] ** 2).sum() + (x["x"] * y["y"]).sum()

    def outer_loss(self, x, y, task):
        return ((y["y"] - 1) ** 2).sum()


def test_infeasible_start_is_a_clear_error_not_nan():
    with pytest.raises(ValueError, match="barrier argument .* is not > 0"):
        S.make("bvfim").hypergrad(HugeInner(), {"x": torch.ones(2, dtype=D)}, None)


def test_schedule_decreases_over_outer_steps_and_state_is_validated():
    solver = S.make("bvfim", mu1=1.0, mu2=2.0, theta=3.0, tau=4.0, decay=1.0, floor=0.01)
    assert solver.schedule(0) == {"mu1": 1.0, "mu2": 2.0, "theta": 3.0, "tau": 4.0}
    assert solver.schedule(3)["tau"] == pytest.approx(1.0)
    assert solver.schedule(10_000)["mu1"] == pytest.approx(0.01)  # floored
    assert S.get("bvfim").stateful
    problem, x = NonUniqueToyProblem(2), {"x": torch.zeros(2, dtype=D)}
    hg = S.make("bvfim", inner_steps=2, barrier_steps=2).hypergrad(problem, x, None, {"step": 4})
    assert hg.state == {"step": 5} and hg.metrics["tau"] == pytest.approx(0.1 * 5**-0.5)
    with pytest.raises(ValueError, match="bvfim state"):
        S.make("bvfim").hypergrad(problem, x, None, {"step": "4"})


def test_options_validated():
    for bad in (dict(mu2=0.0), dict(tau=-1.0), dict(decay=-0.5), dict(floor=0.0), dict(barrier_steps=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            S.make("bvfim", **bad)


def test_unique_lower_level_error_shrinks_with_the_parameters():
    """With a unique lower-level solution BVFIM's first-order gradient approaches the implicit hypergradient as
    (μ, θ, τ) → 0 together (measured relative errors 0.14, 0.046 at 1e-2, 1e-3; 0.015 at 1e-4 with 2000 steps)."""
    from metaray.tasks import QuadraticProblem, quadratic_task

    task, problem = quadratic_task(4, 4, init="zero"), QuadraticProblem()
    x = problem.initial_params(task)
    exact = problem.implicit_hypergrad(task, x["x"])
    errors = []
    for p in (1e-2, 1e-3):
        solver = S.make("bvfim", mu1=p, mu2=p, theta=p, tau=p, inner_steps=300, barrier_steps=500, inner_lr=0.15, barrier_lr=0.15)
        hg = solver.hypergrad(problem, x, task)
        errors.append(float((hg.grad["x"] - exact).norm() / exact.norm()))
    assert errors[1] < 0.4 * errors[0] and errors[1] < 0.06, errors
