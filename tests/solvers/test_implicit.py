"""ift-cg, ift-neumann and imaml against dense float64 references (closed-form quadratics, dense Hessians)."""
import dataclasses

import pytest
import torch

import metaray.solvers as S
from metaray.solvers.core import flatten, unflatten
from metaray.solvers.linsolve import IndefiniteError
from metaray.tasks import ModelProblem, QuadraticProblem, mlp, quadratic_task

D64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("init", ["zero", "random"])
@pytest.mark.parametrize("name,opts", [("ift-cg", {"cg_steps": 10}), ("ift-neumann", {"neumann_terms": 300})])
def test_ift_matches_dense_implicit_hypergradient(name, opts, init):
    P = QuadraticProblem(unused_outer=True)
    task = quadratic_task(3, 5, seed=1, init=init, cond=4.0)
    x = P.initial_params(task)
    hg = S.make(name, inner_steps=300, inner_lr=0.2, **opts).hypergrad(P, x, task)
    assert rel(hg.grad["x"], P.implicit_hypergrad(task, x["x"])) < 1e-6
    assert torch.equal(hg.grad["unused"], torch.zeros(2, dtype=D64))  # unused outer param: zero, no crash
    assert hg.metrics["converged"] == 1.0 and hg.metrics["indefinite"] == 0.0
    assert hg.metrics["linsolve_residual"] < 1e-9 and hg.metrics["inner_grad_norm"] < 1e-10


def test_ift_error_falls_as_linear_solver_steps_grow():
    P = QuadraticProblem()
    task = quadratic_task(3, 8, seed=2, cond=10.0)
    x = P.initial_params(task)
    exact = P.implicit_hypergrad(task, x["x"])
    cg_err = [rel(S.make("ift-cg", inner_steps=400, inner_lr=0.15, cg_steps=k).hypergrad(P, x, task).grad["x"], exact)
              for k in (1, 3, 5, 8)]
    assert cg_err[0] > cg_err[1] > cg_err[2] > cg_err[3] and cg_err[3] < 1e-8
    ns = [S.make("ift-neumann", inner_steps=400, inner_lr=0.15, neumann_terms=k).hypergrad(P, x, task) for k in (2, 10, 40, 200)]
    ns_err = [rel(h.grad["x"], exact) for h in ns]
    assert ns_err[0] > ns_err[1] > ns_err[2] > ns_err[3] and ns_err[3] < 1e-8
    residuals = [h.metrics["linsolve_residual"] for h in ns]
    assert residuals == sorted(residuals, reverse=True)


def test_non_convergence_is_flagged():
    P = QuadraticProblem()
    task = quadratic_task(3, 8, seed=2, cond=10.0)
    x = P.initial_params(task)
    hg = S.make("ift-cg", inner_steps=50, inner_lr=0.15, cg_steps=2, cg_tol=1e-10).hypergrad(P, x, task)
    assert hg.metrics["converged"] == 0.0 and hg.metrics["linsolve_steps"] == 2.0
    assert hg.metrics["linsolve_residual"] > 1e-10
    hg = S.make("ift-neumann", inner_steps=50, inner_lr=0.15, neumann_terms=5).hypergrad(P, x, task)
    assert hg.metrics["converged"] == 0.0 and hg.metrics["linsolve_residual"] > 1e-3


def indefinite_task():
    """A quadratic whose lower-level Hessian A has a negative eigenvalue (y* is a saddle point)."""
    task = quadratic_task(3, 5, seed=4)
    eig, Q = torch.linalg.eigh(task.A)
    eig[0] = -1.5
    return dataclasses.replace(task, A=Q @ torch.diag(eig) @ Q.T)


def test_indefinite_hessian_is_detected_and_reported():
    P = QuadraticProblem()
    task = indefinite_task()
    x = P.initial_params(task)
    for name in ("ift-cg", "ift-neumann"):
        hg = S.make(name, inner_steps=0).hypergrad(P, x, task)
        assert hg.metrics["indefinite"] == 1.0 and hg.metrics["converged"] == 0.0
        with pytest.raises(IndefiniteError, match="not positive definite"):
            S.make(name, inner_steps=0, on_indefinite="raise").hypergrad(P, x, task)
    # 'continue': CG still solves the nonsingular system, so eq. (1) holds at y_0 = d (init 'zero'):
    # dF/dx = ρx + Gᵀy + Bᵀ A⁻¹ (W(y − t) + Gx)
    hg = S.make("ift-cg", inner_steps=0, cg_steps=30, on_indefinite="continue").hypergrad(P, x, task)
    y, xx = task.d, x["x"]
    dense = task.rho * xx + task.G.T @ y + task.B.T @ torch.linalg.solve(task.A, task.W @ (y - task.t) + task.G @ xx)
    assert hg.metrics["indefinite"] == 1.0 and hg.metrics["converged"] == 1.0
    assert rel(hg.grad["x"], dense) < 1e-8


def test_warm_start_carries_inner_solution_across_calls():
    P = QuadraticProblem()
    task = quadratic_task(3, 6, seed=5, cond=8.0)
    x = P.initial_params(task)
    exact = P.implicit_hypergrad(task, x["x"])
    solver = S.make("ift-cg", inner_steps=10, inner_lr=0.1, warm_start=True)
    assert solver.stateful and not S.make("ift-cg").stateful
    state, errors = None, []
    for _ in range(20):
        hg = solver.hypergrad(P, x, task, state)
        state = hg.state
        errors.append(rel(hg.grad["x"], exact))
    assert errors[0] > 1e-3 and errors[-1] < 1e-6  # 200 inner steps in total, 10 per call
    assert all(e1 > e2 for e1, e2 in zip(errors[:10], errors[1:10]))
    assert S.make("ift-cg", inner_steps=10).hypergrad(P, x, task).state is None
    with pytest.raises(ValueError, match="state"):
        solver.hypergrad(P, x, task, state=[1, 2])
    with pytest.raises(ValueError, match="same keys"):
        solver.hypergrad(P, x, task, state={"y": {"z": torch.zeros(6, dtype=D64)}, "q": None})


class WithUnusedInner(QuadraticProblem):
    """The quadratic problem plus an inner param 'z' that f ignores and F uses."""

    def init_inner(self, x, task):
        return {**super().init_inner(x, task), "z": torch.ones(3, dtype=D64)}

    def outer_loss(self, x, y, task):
        return super().outer_loss(x, y, task) + (y["z"] ** 2).sum()


@pytest.mark.parametrize("name", ["ift-cg", "ift-neumann", "imaml"])
def test_unused_inner_param_is_left_out_of_the_system(name):
    P = WithUnusedInner()
    task = quadratic_task(4, 4, seed=3, init="x")
    x = P.initial_params(task)
    extra = {"ift-neumann": {"neumann_terms": 300}, "ift-cg": {}, "imaml": {"lam": 1.0}}[name]
    hg = S.make(name, inner_steps=200, inner_lr=0.2, **extra).hypergrad(P, x, task)
    # (iMAML's proximal term λ/2‖z − z₀‖² does determine z: z* = z₀, a constant, so it is in its system)
    assert hg.metrics["unused_inner_params"] == (0.0 if name == "imaml" else 1.0)
    assert hg.metrics["converged"] == 1.0
    # z does not depend on x, so the hypergradient is that of the problem without z
    ref = imaml_reference(task, x["x"], 1.0) if name == "imaml" else QuadraticProblem().implicit_hypergrad(task, x["x"])
    assert rel(hg.grad["x"], ref) < 1e-6


def test_inner_loss_without_inner_params_is_a_clear_error():
    class Flat(QuadraticProblem):
        def inner_loss(self, x, y, task):
            return (x["x"] ** 2).sum()

    P = Flat()
    task = quadratic_task(3, 4, seed=0)
    with pytest.raises(ValueError, match="does not depend on any inner param"):
        S.make("ift-cg", inner_steps=1).hypergrad(P, P.initial_params(task), task)


# ---- iMAML ----------------------------------------------------------------------------------------------


def imaml_reference(task, x: torch.Tensor, lam: float) -> torch.Tensor:
    """d/dx F(x, y*(x)) with y*(x) = argmin f(x, y) + λ/2‖y − (Cx + d)‖², by dense solves."""
    m = task.A.shape[0]
    K = task.A + lam * torch.eye(m, dtype=D64)
    y = torch.linalg.solve(K, task.B @ x + task.c + lam * (task.C @ x + task.d))
    J = torch.linalg.solve(K, task.B + lam * task.C)
    return QuadraticProblem().exact_hypergrad(task, x, y, J)


@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_imaml_matches_dense_inverse_formula(lam):
    # Pure iMAML: x is only the initialization (C = I), f and F do not see x otherwise (B = G = 0, ρ = 0).
    # Then dF/dx = (I + A/λ)⁻¹ ∇_y F(y*) exactly.
    base = quadratic_task(5, 5, seed=6, init="x", cond=6.0)
    task = dataclasses.replace(base, B=torch.zeros_like(base.B), G=torch.zeros_like(base.G), rho=0.0)
    P = QuadraticProblem(unused_outer=True)
    x = P.initial_params(task)
    hg = S.make("imaml", lam=lam, inner_steps=400, inner_lr=0.1, cg_steps=10).hypergrad(P, x, task)
    K = task.A + lam * torch.eye(5, dtype=D64)
    y_star = torch.linalg.solve(K, task.c + lam * (x["x"] + task.d))
    grad_F = task.W @ (y_star - task.t)
    dense = torch.linalg.solve(torch.eye(5, dtype=D64) + task.A / lam, grad_F)
    assert rel(hg.grad["x"], dense) < 1e-8
    assert rel(hg.grad["x"], imaml_reference(task, x["x"], lam)) < 1e-8
    assert hg.metrics["converged"] == 1.0 and hg.metrics["lam"] == lam
    assert torch.equal(hg.grad["unused"], torch.zeros(2, dtype=D64))


def test_imaml_general_coupling_and_cg_error_falls():
    # x also enters f (Bx) and F (ρ, G): the extra terms of the general formula must be right too.
    P = QuadraticProblem()
    task = quadratic_task(6, 6, seed=7, init="random", cond=20.0)
    x = P.initial_params(task)
    exact = imaml_reference(task, x["x"], 1.0)
    errors = [rel(S.make("imaml", lam=1.0, inner_steps=600, inner_lr=0.08, cg_steps=k).hypergrad(P, x, task).grad["x"], exact)
              for k in (1, 2, 4, 8)]
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 1e-8


def test_imaml_on_an_mlp_matches_dense_hessian_solve():
    torch.manual_seed(0)
    net = mlp([2, 6, 1], activation=torch.nn.Tanh).double()
    P = ModelProblem(net, loss="mse")
    g = torch.Generator().manual_seed(1)
    from metaray.tasks import Episode

    task = Episode(torch.randn(10, 2, generator=g, dtype=D64), torch.randn(10, 1, generator=g, dtype=D64),
                   torch.randn(10, 2, generator=g, dtype=D64), torch.randn(10, 1, generator=g, dtype=D64))
    x = P.initial_params()
    lam, T, lr = 2.0, 300, 0.1
    hg = S.make("imaml", lam=lam, inner_steps=T, inner_lr=lr, cg_steps=60, cg_tol=1e-13).hypergrad(P, x, task)
    # reference: the same proximal inner iterate, then (I + H/λ)⁻¹ ∇F with H from the dense Hessian
    from metaray.solvers.implicit import Proximal
    from metaray.solvers.unrolled import unroll

    y = unroll(Proximal(P, lam), x, {k: v.clone() for k, v in x.items()}, task, T, lr, create_graph=False)
    flat_y = flatten(y)
    H = torch.autograd.functional.hessian(lambda v: P.inner_loss(x, unflatten(v, y), task), flat_y)
    grad_F = torch.autograd.grad(P.outer_loss(x, unflatten(flat_y.requires_grad_(), y), task), flat_y)[0]
    dense = torch.linalg.solve(torch.eye(H.shape[0], dtype=D64) + H / lam, grad_F)
    assert rel(flatten(hg.grad), dense) < 1e-8
    assert hg.metrics["converged"] == 1.0 and hg.metrics["indefinite"] == 0.0


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="cg_steps"):
        S.make("ift-cg", cg_steps=0)
    with pytest.raises(ValueError, match="on_indefinite"):
        S.make("ift-neumann", on_indefinite="ignore")
    with pytest.raises(ValueError, match="neumann_alpha"):
        S.make("ift-neumann", neumann_alpha=-0.1)
    with pytest.raises(ValueError, match="lam"):
        S.make("imaml", lam=0.0)
    with pytest.raises(TypeError, match="warm_start"):
        S.make("ift-cg", warm_start=1)
    with pytest.raises(ValueError, match="valid options"):
        S.make("imaml", warm_start=True)


def test_diverging_neumann_series_is_refused_not_returned():
    """α·λmax > 2: the partial sums grow without bound, so the 'hypergradient' is finite but meaningless."""
    P = QuadraticProblem()
    task = quadratic_task(3, 6, seed=5, cond=8.0)
    x = P.initial_params(task)
    lam_max = float(torch.linalg.eigvalsh(task.A).max())
    alpha = 3.0 / lam_max
    with pytest.raises(S.DivergedError, match=r"diverges .* neumann_alpha below") as err:
        S.make("ift-neumann", inner_steps=20, neumann_alpha=alpha, neumann_terms=40).hypergrad(P, x, task)
    assert isinstance(err.value, S.NonFiniteError)  # so the pool and meta-learner refuse it like a NaN
    # the message's estimate of λmax comes from the growth rate |1 − α λmax| per term
    suggested = float(str(err.value).split("neumann_alpha below ")[1].split(",")[0])
    assert suggested == pytest.approx(2.0 / lam_max, rel=1e-3)
    ok = S.make("ift-neumann", inner_steps=200, neumann_alpha=0.9 * suggested, neumann_terms=400).hypergrad(P, x, task)
    assert rel(ok.grad["x"], P.implicit_hypergrad(task, x["x"])) < 1e-4


def test_corrupted_warm_start_states_are_refused_by_name():
    P = QuadraticProblem()
    task = quadratic_task(3, 6, seed=5, cond=8.0)
    x = P.initial_params(task)
    for name in ("ift-cg", "ift-neumann"):
        solver = S.make(name, inner_steps=5, warm_start=True)
        good = solver.hypergrad(P, x, task).state
        for state, message in [
            ({"q": good["q"]}, "warm-start state must be"),
            ({"y": [1.0], "q": None}, "warm-start state must be"),
            ({"y": good["y"], "q": {"wrong": torch.zeros(6, dtype=D64)}}, r"state\['q'\] must have the same keys"),
            ({"y": good["y"], "q": torch.zeros(6, dtype=D64)}, r"state\['q'\] must be inner params"),
            ({"y": {k: v[:2] for k, v in good["y"].items()}, "q": None}, "shape"),
        ]:
            with pytest.raises(ValueError, match=message):
                solver.hypergrad(P, x, task, state)
            with pytest.raises(ValueError, match=message):
                solver.evaluate(P, x, task, state)
