"""The papers' small problems: closed forms checked against autograd / finite differences, noise reproducible."""
from __future__ import annotations

import pytest
import torch

from metaray.tasks import (
    LeastSquaresBilevel,
    NonUniqueToyProblem,
    Toy1DProblem,
    Toy1DSource,
    Toy1DTask,
    least_squares_task,
)

D = torch.float64


# ---- paper 003's 1D problem ---------------------------------------------------------------------------------


def test_1d_theta_star_is_the_inner_minimum_and_hypergradient_matches_finite_differences():
    P, task = Toy1DProblem(), Toy1DTask()
    for lam in (0.1, 0.5, 0.75, 0.9):
        x = P.initial_params(lam)
        th = P.theta_star(lam).clone().requires_grad_(True)
        (g,) = torch.autograd.grad(P.inner_loss(x, {"theta": th}, task), th)
        assert abs(float(g)) < 1e-14  # ∂L_T/∂θ = θ² − (1 − λ²) = 0
        grid = torch.linspace(0.0, 1.0, 100_001, dtype=D)
        assert float(P.inner_loss(x, {"theta": grid}, task).min()) >= float(P.inner_loss(x, {"theta": th.detach()}, task)) - 1e-12
        h = 1e-6
        fd = (P.reduced_outer(lam + h) - P.reduced_outer(lam - h)) / (2 * h)
        assert float(P.exact_hypergrad(lam)) == pytest.approx(float(fd), abs=1e-8)


def test_1d_noise_is_fresh_on_every_call_bounded_and_reproducible():
    P = Toy1DProblem()
    x, y = P.initial_params(0.0), {"theta": torch.tensor(1.0, dtype=D)}
    src = Toy1DSource(noise=0.3, seed=4)

    def draws(task, n=2000):
        return torch.stack([P.inner_loss(x, y, task) for _ in range(n)])

    a, b = draws(src.sample(("train", 3, 0))), draws(src.sample(("train", 3, 0)))
    assert torch.equal(a, b)  # same key → same sequence
    assert not torch.equal(a, draws(src.sample(("train", 4, 0))))
    assert a.unique().numel() == a.numel()  # a new ε on every call
    # at θ = 1, λ = 0: L_T = (1/3 + ε₁) − (1 + ε₂) = −2/3 + ε₁ − ε₂ with ε₁ − ε₂ ∈ [−0.6, 0.6], mean 0
    assert float(a.min()) >= -2 / 3 - 0.6 and float(a.max()) <= -2 / 3 + 0.6
    assert float(a.min()) < -2 / 3 - 0.45 and float(a.max()) > -2 / 3 + 0.45
    assert float(a.mean()) == pytest.approx(-2 / 3, abs=0.02)
    clean = P.inner_loss(x, y, Toy1DTask())
    assert float(clean) == pytest.approx(-2 / 3, abs=1e-15)


def test_1d_projections_and_validation():
    P = Toy1DProblem()
    assert float(P.project_inner({}, {"theta": torch.tensor(1.7, dtype=D)})["theta"]) == 1.0
    assert float(P.project_outer({"lam": torch.tensor(-0.2, dtype=D)})["lam"]) == 0.0
    with pytest.raises(ValueError, match="noise"):
        Toy1DTask(noise=0.4)
    with pytest.raises(ValueError, match="theta0"):
        Toy1DTask(theta0=2.0)


# ---- BDA toy ----------------------------------------------------------------------------------------------


def test_non_unique_toy_losses_and_optimistic_value():
    P = NonUniqueToyProblem(4)
    x = {"x": torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=D)}
    y0 = P.init_inner(x)
    assert set(y0) == {"y1", "y2"} and all(float(v.abs().sum()) == 0 for v in y0.values())
    # every y with y1 = x solves the lower level, whatever y2 is; f is negative there
    for y2 in (torch.zeros(4, dtype=D), torch.randn(4, dtype=D)):
        y = {"y1": x["x"].clone().requires_grad_(True), "y2": y2}
        (g,) = torch.autograd.grad(P.inner_loss(x, y), y["y1"])
        assert float(g.abs().max()) == 0.0
        assert float(P.inner_loss(x, y).detach()) == pytest.approx(-0.5 * float(x["x"] @ x["x"]))
    # min over S(x) of F is at y2 = x: ½‖x − 1‖²
    best = P.outer_loss(x, {"y1": x["x"], "y2": x["x"]})
    assert float(best) == pytest.approx(float(P.optimistic_value(x["x"])))
    with pytest.raises(ValueError, match="n must be"):
        NonUniqueToyProblem(0)


# ---- paper 004's least-squares problem ----------------------------------------------------------------------


def test_least_squares_data_and_exact_references():
    task = least_squares_task(dim=5, samples=10_000, seed=1)
    assert task.A_o.shape == task.A_il.shape == task.A_iw.shape == (10_000, 5)
    assert float(task.A_o.min()) >= 0 and float(task.A_o.max()) <= 1  # uniform
    # noise variance 0.1 around the generating points
    r = task.b_o - task.A_o @ task.info["w_lam"]
    assert float(r.var()) == pytest.approx(0.1, rel=0.05)
    P = LeastSquaresBilevel()
    lam = torch.tensor([0.2, -0.4, 0.9, 0.0, 0.3], dtype=D)
    w, J = P.inner_solution(task, lam)
    wl = w.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(P.inner_loss({"lam": lam}, {"w": wl}, task), wl)
    assert float(g.abs().max()) < 1e-12
    # hypergradient vs central finite differences of f(λ) = F(ω_λ) (f is quadratic: FD is exact up to rounding)
    f = lambda l: P.outer_loss({"lam": l}, {"w": P.inner_solution(task, l)[0]}, task)  # noqa: E731
    h = 1e-4
    fd = torch.stack([(f(lam + h * e) - f(lam - h * e)) / (2 * h) for e in torch.eye(5, dtype=D)])
    assert torch.allclose(P.exact_hypergrad(task, lam), fd, atol=1e-8)
    lam_star = P.outer_optimum(task)
    assert float(P.exact_hypergrad(task, lam_star).norm()) < 1e-10


def test_least_squares_minibatch():
    task = least_squares_task(dim=3, samples=100, seed=2)
    b = task.minibatch(torch.Generator().manual_seed(0), 10)
    assert b.A_o.shape == (10, 3) and b.b_i.shape == (10,)
    with pytest.raises(ValueError, match="minibatch size"):
        task.minibatch(torch.Generator(), 101)
