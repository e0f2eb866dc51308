"""FSLA (paper 004) on the paper's least-squares bilevel problem: d = 5, N = 10,000."""
from __future__ import annotations

import pytest
import torch

import metaray.solvers as S
from metaray.tasks.toys import LeastSquaresBilevel, least_squares_task

PROBLEM = LeastSquaresBilevel()
TASK = least_squares_task(dim=5, samples=10_000, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_hypergradient_error_falls_below_1e_3_at_fixed_x():
    """Paper 004 Fig. 1 setting: x fixed, one y-step and one v-step per call; error vs Proposition 1."""
    solver = S.make("fsla", inner_lr=0.5, beta=0.5, eta=0.5)
    x = PROBLEM.initial_params(TASK, 0.5)
    exact = PROBLEM.exact_hypergrad(TASK, x["lam"])
    state, errors = None, []
    for _ in range(120):
        hg = solver.hypergrad(PROBLEM, x, TASK, state)
        state = hg.state
        errors.append(float((hg.grad["lam"] - exact).norm()))
    assert float(exact.norm()) > 0.5
    assert errors[59] < 1e-3  # measured 2.6e-4 at 50 calls, 5.6e-6 at 100
    assert errors[-1] < 1e-5
    assert all(b < a for a, b in zip(errors[20::20], errors[40::20]))  # keeps falling
    assert state["step"] == 120 and set(state) == {"step", "x", "y", "v", "d"}


def f_value(lam: torch.Tensor) -> float:
    w, _ = PROBLEM.inner_solution(TASK, lam)
    return float(PROBLEM.outer_loss({"lam": lam}, {"w": w}, TASK))


def test_outer_variable_converges_with_one_inner_step_per_outer_step():
    """x ← x − α d with one FSLA call per outer step tracks exact gradient descent on f(λ) = F(λ, ω_λ).

    The outer problem is very ill-conditioned (eigenvalues of ∇²f from 7e-8 to 2.3, λ* has entries ~400), so
    'converges' is measured as ‖∇f‖ → 0 and agreement with exact-hypergradient descent at the same step."""
    alpha, steps = 0.3, 300
    solver = S.make("fsla", inner_lr=0.5, beta=0.5, eta=0.5)
    x = PROBLEM.initial_params(TASK, 0.5)
    x_gd = x["lam"].clone()
    g0 = float(PROBLEM.exact_hypergrad(TASK, x_gd).norm())
    # f is quadratic: ∇f(λ) = Q λ + c exactly (checked against exact_hypergrad), which makes the reference cheap.
    zero = torch.zeros(5, dtype=torch.float64)
    c = PROBLEM.exact_hypergrad(TASK, zero)
    Q = torch.stack([PROBLEM.exact_hypergrad(TASK, e) - c for e in torch.eye(5, dtype=torch.float64)], dim=1)
    assert torch.allclose(Q @ x_gd + c, PROBLEM.exact_hypergrad(TASK, x_gd), atol=1e-10)
    state = None
    for _ in range(steps):
        hg = solver.hypergrad(PROBLEM, x, TASK, state)
        state = hg.state
        x = {"lam": x["lam"] - alpha * hg.grad["lam"]}
        x_gd = x_gd - alpha * (Q @ x_gd + c)
    g_end = float(PROBLEM.exact_hypergrad(TASK, x["lam"]).norm())
    assert g_end < 0.02 * g0
    assert abs(f_value(x["lam"]) - f_value(x_gd)) < 1e-3 * f_value(x_gd)
    assert float((x["lam"] - x_gd).norm()) < 0.05
    assert f_value(x["lam"]) < f_value(PROBLEM.initial_params(TASK, 0.5)["lam"]) - 0.05


def dense_step(task, x, y, v, x_prev, d_prev, tau, beta, eta):
    """Algorithm 1 lines 6-9 for the least-squares problem, written out with matrices (no autograd)."""
    n = task.A_o.shape[0]
    Hyy = 2.0 / n * task.A_iw.T @ task.A_iw  # ∇²_yy G
    Hxy = 2.0 / n * task.A_il.T @ task.A_iw  # ∇²_xy G  [x, y]
    grad_y_G = lambda xx, yy: 2.0 / n * task.A_iw.T @ (task.A_il @ xx + task.A_iw @ yy - task.b_i)  # noqa: E731
    grad_y_F = lambda yy: 2.0 / n * task.A_o.T @ (task.A_o @ yy - task.b_o)  # noqa: E731
    y_new = y - tau * grad_y_G(x, y)
    v_new = beta * grad_y_F(y) + v - beta * Hyy @ v  # at y_k, as in Algorithm 1
    g_new = -Hxy @ v_new  # ∇_x F = 0
    if d_prev is None:
        return y_new, v_new, g_new
    g_old = -Hxy @ v
    return y_new, v_new, g_new + (1 - eta) * (d_prev - g_old)


@pytest.mark.parametrize("schedule", ["constant", "inv_sqrt"])
def test_stochastic_steps_match_algorithm_1_written_out(schedule):
    """Three steps on fresh minibatches ξ_k (so the momentum correction ĝ_k(ξ_{k+1}) matters)."""
    solver = S.make("fsla", inner_lr=0.3, beta=0.2, eta=0.4, schedule=schedule)
    gen = torch.Generator().manual_seed(5)
    x = {"lam": torch.rand(5, generator=gen, dtype=torch.float64)}
    y = torch.zeros(5, dtype=torch.float64)
    v = torch.zeros(5, dtype=torch.float64)
    state, d = None, None
    for k in range(3):
        batch = TASK.minibatch(gen, 64)
        hg = solver.hypergrad(PROBLEM, x, batch, state)
        s = (k + 1) ** -0.5 if schedule == "inv_sqrt" else 1.0
        y, v, d = dense_step(batch, x["lam"], y, v, None if state is None else state["x"]["lam"], d, 0.3 * s, 0.2 * s, 0.4 * s)
        assert torch.allclose(hg.grad["lam"], d, rtol=1e-12, atol=1e-14), k
        assert torch.allclose(hg.state["y"]["w"], y, rtol=1e-12) and torch.allclose(hg.state["v"]["w"], v, rtol=1e-12)
        state = hg.state
        x = {"lam": x["lam"] - 0.1 * hg.grad["lam"]}


def test_options_and_state_validated():
    with pytest.raises(ValueError, match="inner_steps"):
        S.make("fsla", inner_steps=5)
    with pytest.raises(ValueError, match="eta"):
        S.make("fsla", eta=1.5)
    with pytest.raises(ValueError, match="schedule"):
        S.make("fsla", schedule="linear")
    with pytest.raises(ValueError, match="fsla state"):
        S.make("fsla").hypergrad(PROBLEM, PROBLEM.initial_params(TASK), TASK, state={"step": 1})
    assert S.get("fsla").stateful


class CoupledProblem:
    """A non-quadratic problem where Algorithm 1's correction term can tell (x_k, y_k) from (x_{k+1}, y_{k+1}):
    ∇_x F ≠ 0 and depends on y and ξ, and ∇²_xy f = diag((2 + ξ) y) depends on y and ξ (the least-squares
    problem above has ∇_x F = 0 and a constant ∇²_xy f, so it cannot). Duck-typed: no base class, no project_inner.

        f(x, y; ξ) = ½‖y − ξ‖² + Σ (1 + ξ/2) x y² + ⅛ Σ y⁴,      F(x, y; ξ) = ½‖y − 1‖² + Σ (1 + ξ/3) sin(x) y + 0.05‖x‖²
    """

    def init_inner(self, x, task):
        return {"y": torch.zeros_like(x["x"])}

    def inner_loss(self, x, y, task):
        w = y["y"]
        return 0.5 * ((w - task) ** 2).sum() + ((1 + 0.5 * task) * x["x"] * w**2).sum() + 0.125 * (w**4).sum()

    def outer_loss(self, x, y, task):
        w = y["y"]
        return 0.5 * ((w - 1.0) ** 2).sum() + ((1 + task / 3) * torch.sin(x["x"]) * w).sum() + 0.05 * (x["x"] ** 2).sum()


def algorithm_1_reference(xs, tasks, tau, beta, eta):
    """Paper 004 Algorithm 1 written out with dense derivatives (torch.func.hessian / jacrev), no solver code."""
    P = CoupledProblem()

    def f(x, y, xi):
        return P.inner_loss({"x": x}, {"y": y}, xi)

    def F(x, y, xi):
        return P.outer_loss({"x": x}, {"y": y}, xi)

    grad_y_f = torch.func.grad(f, argnums=1)
    hess_yy = torch.func.hessian(f, argnums=1)
    hess_xy = torch.func.jacrev(grad_y_f, argnums=0)  # [i, j] = ∂²f / ∂y_i ∂x_j

    def g_hat(x, y, v, xi):  # line 8: ∇_x F − ∇²_xy f v
        return torch.func.grad(F, argnums=0)(x, y, xi) - hess_xy(x, y, xi).T @ v

    y = torch.zeros_like(xs[0])
    v = torch.zeros_like(xs[0])
    ds, x_prev, d = [], None, None
    for k, (x, xi) in enumerate(zip(xs, tasks)):
        y_new = y - tau * grad_y_f(x, y, xi)                                                    # line 6
        v_new = beta * torch.func.grad(F, argnums=1)(x, y, xi) + v - beta * hess_yy(x, y, xi) @ v  # line 7
        g_new = g_hat(x, y_new, v_new, xi)
        d = g_new if k == 0 else g_new + (1 - eta) * (d - g_hat(x_prev, y, v, xi))              # line 9
        ds.append(d)
        x_prev, y, v = x, y_new, v_new
    return ds


def test_algorithm_1_on_a_problem_whose_correction_term_sees_the_iterates():
    gen = torch.Generator().manual_seed(11)
    n, steps = 3, 6
    tasks = [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(steps)]
    solver = S.make("fsla", inner_lr=0.3, beta=0.25, eta=0.4)
    x = {"x": 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)}
    xs, got, state = [], [], None
    for xi in tasks:
        xs.append(x["x"].clone())
        hg = solver.hypergrad(CoupledProblem(), x, xi, state)
        got.append(hg.grad["x"])
        state = hg.state
        x = {"x": x["x"] - 0.2 * hg.grad["x"]}  # the outer update the meta-learner applies between calls
    ref = algorithm_1_reference(xs, tasks, 0.3, 0.25, 0.4)
    for k in range(steps):
        assert torch.allclose(got[k], ref[k], rtol=1e-12, atol=1e-14), k
    # the correction term matters here: dropping it (η = 1) gives a different d from the second step on
    plain = algorithm_1_reference(xs, tasks, 0.3, 0.25, 1.0)
    assert float((plain[2] - ref[2]).norm()) > 1e-3


def test_corrupted_state_is_refused_with_what_is_wrong():
    solver, x, P = S.make("fsla"), {"x": torch.ones(3, dtype=torch.float64)}, CoupledProblem()
    task = torch.zeros(3, dtype=torch.float64)
    good = solver.hypergrad(P, x, task).state
    cases = [
        ({**good, "step": -3}, "int >= 0"),
        ({**good, "step": True}, "int >= 0"),
        ({k: v for k, v in good.items() if k != "v"}, "missing \\['v'\\]"),
        ({**good, "y": torch.zeros(3)}, "state\\['y'\\] must be params"),
        ({**good, "d": {"z": torch.zeros(3)}}, "fsla state\\['d'\\] must have the same keys"),
        ({**good, "v": {"y": torch.zeros(5, dtype=torch.float64)}}, "shape"),
        ([1, 2], "must be None or the dict"),
    ]
    for state, message in cases:
        with pytest.raises(ValueError, match=message):
            solver.hypergrad(P, x, task, state)
        with pytest.raises(ValueError, match=message):
            solver.evaluate(P, x, task, state)
