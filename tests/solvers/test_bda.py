"""BDA and pessimistic BDA (survey 001 eq. 32, section 9) on the toy whose lower level has many solutions."""
from __future__ import annotations

import pytest
import torch

import metaray.solvers as S
from metaray.solvers.bda import bda_unroll, rho_at
from metaray.tasks.toys import NonUniqueToyProblem

D = torch.float64
BDA_OPTS = dict(inner_steps=50, inner_lr=0.5, upper_lr=1.0, rho0=0.9)


def outer_loop(name: str, steps: int, lr: float, **options):
    problem, solver = NonUniqueToyProblem(10), S.make(name, **options)
    x = problem.initial_params()
    for _ in range(steps):
        x = {"x": x["x"] - lr * solver.hypergrad(problem, x, None).grad["x"]}
    return problem, solver, x


def test_bda_reaches_the_optimum_where_rad_stalls_at_one_half():
    problem, solver, x = outer_loop("bda", steps=25, lr=0.8, **BDA_OPTS)
    y = bda_unroll(problem, x, None, solver.options, create_graph=False)
    assert (x["x"] - 1).abs().max() < 1e-2
    assert (y["y1"] - 1).abs().max() < 1e-2 and (y["y2"] - 1).abs().max() < 1e-2
    # rad descends f only: y2 never leaves 0, so it minimizes ½‖x‖² + ½‖x − 1‖² and stops at ½.
    _, _, x_rad = outer_loop("rad", steps=25, lr=0.8, inner_steps=50, inner_lr=0.5)
    assert (x_rad["x"] - 0.5).abs().max() < 1e-3
    assert NonUniqueToyProblem.optimistic_value(x_rad["x"]) > 1.2  # ½·10·¼ = 1.25, far from the optimum 0


def closed_form(x: float, o, sign: float) -> tuple[float, float, float, float]:
    """Per coordinate the toy's dynamics are scalar and affine in x: y_t = a_t + b_t x. Returns (y1, dy1/dx, y2, dy2/dx)."""
    s_u = o.inner_lr if o.upper_lr is None else o.upper_lr
    a1 = b1 = a2 = b2 = 0.0
    for t in range(1, o.inner_steps + 1):
        r = rho_at(t, o.rho0, o.rho_schedule, o.rho_decay)
        # y1 ← y1 − ±ρ s_u (y1 − 1) − (1 − ρ) s_l (y1 − x);  y2 ← y2 − ±ρ s_u (y2 − x)
        c1 = 1 - sign * r * s_u - (1 - r) * o.inner_lr
        a1, b1 = c1 * a1 + sign * r * s_u, c1 * b1 + (1 - r) * o.inner_lr
        c2 = 1 - sign * r * s_u
        a2, b2 = c2 * a2, c2 * b2 + sign * r * s_u
    return a1 + b1 * x, b1, a2 + b2 * x, b2


@pytest.mark.parametrize("name,sign", [("bda", 1.0), ("bda-pessimistic", -1.0)])
@pytest.mark.parametrize("schedule", ["inverse", "geometric", "constant"])
def test_hypergradient_is_exact_through_the_aggregated_dynamics(name, sign, schedule):
    solver = S.make(name, inner_steps=12, inner_lr=0.4, upper_lr=0.7, rho0=0.6, rho_schedule=schedule, rho_decay=0.8)
    problem = NonUniqueToyProblem(3)
    xs = torch.tensor([0.3, -1.2, 2.0], dtype=D)
    hg = solver.hypergrad(problem, {"x": xs}, None)
    for i, xv in enumerate(xs.tolist()):
        y1, d1, y2, d2 = closed_form(xv, solver.options, sign)
        # dF/dx = (x − y2)(1 − dy2/dx) + (y1 − 1) dy1/dx
        expected = (xv - y2) * (1 - d2) + (y1 - 1) * d1
        assert hg.grad["x"][i].item() == pytest.approx(expected, rel=1e-12, abs=1e-13)
    assert hg.metrics["rho_T"] == pytest.approx(rho_at(12, 0.6, schedule, 0.8))


def test_pessimistic_pushes_y2_away_from_x():
    """Pessimistic BDA ascends F over the lower-level solutions: y2 moves away from x, the optimistic one toward it."""
    problem, x = NonUniqueToyProblem(2), {"x": torch.ones(2, dtype=D)}
    opt = S.make("bda", **BDA_OPTS).options
    pes = S.make("bda-pessimistic", **BDA_OPTS).options
    y_opt = bda_unroll(problem, x, None, opt, create_graph=False)
    y_pes = bda_unroll(problem, x, None, pes, sign=-1.0, create_graph=False)
    assert (y_opt["y2"] - 1).abs().max() < 1e-2
    assert (y_pes["y2"] - 1).abs().min() > 1.0
    # both still solve the lower level in y1 (up to the vanishing ρ_t pull)
    assert (y_opt["y1"] - 1).abs().max() < 5e-2 and (y_pes["y1"] - 1).abs().max() < 5e-2


def test_rho_schedules():
    assert [rho_at(t, 0.5, "inverse", 0.9) for t in (1, 2, 5)] == [0.5, 0.25, 0.1]
    assert rho_at(3, 0.5, "geometric", 0.5) == pytest.approx(0.125)
    assert rho_at(7, 0.5, "constant", 0.5) == 0.5


def test_options_validated():
    with pytest.raises(ValueError, match="rho0"):
        S.make("bda", rho0=1.5)
    with pytest.raises(ValueError, match="rho_schedule"):
        S.make("bda", rho_schedule="linear")
    with pytest.raises(ValueError, match="upper_lr"):
        S.make("bda-pessimistic", upper_lr=-0.1)
    with pytest.raises(ValueError, match="rho_decay"):
        S.make("bda", rho_decay=0.0)
    assert S.make("bda", upper_lr=None).options.upper_lr is None
