"""Digits HPO problems: the corrupted split, hyper-cleaning checked against a dense implicit-function reference and
finite differences of the exact reduced objective, and per-parameter L2 regularization."""
import math
import pickle

import numpy as np
import pytest
import torch

import metaray.solvers as S
from metaray.solvers.core import flatten
from metaray.tasks.hpo import DigitsSource, HyperCleaningProblem, L2RegularizationProblem, digits_split
from metaray.tasks.models import mlp


def test_digits_split_and_corruption():
    ep = digits_split(train=300, val=200, corruption=0.4, seed=1)
    assert ep.support_x.shape == (300, 64) and ep.query_x.shape == (200, 64) and ep.info["test_x"].shape == (1297, 64)
    assert ep.support_x.dtype == torch.float64 and 0 <= float(ep.support_x.min()) and float(ep.support_x.max()) <= 1
    bad = ep.info["corrupted"]
    assert int(bad.sum()) == 120  # exactly 40 % of the training labels
    assert bool((ep.support_y[bad] != ep.info["clean_y"][bad]).all())  # a corrupted label is always wrong
    assert torch.equal(ep.support_y[~bad], ep.info["clean_y"][~bad])
    # the three sets partition the 1,797 digits: no image is in two of them
    allx = torch.cat([ep.support_x, ep.query_x, ep.info["test_x"]])
    assert len(torch.unique(allx, dim=0)) == len(torch.unique(torch.tensor(__import__("sklearn.datasets", fromlist=["x"]).load_digits().data), dim=0))
    again = digits_split(train=300, val=200, corruption=0.4, seed=1)
    assert torch.equal(again.support_y, ep.support_y) and torch.equal(again.query_x, ep.query_x)
    assert not torch.equal(digits_split(train=300, val=200, corruption=0.4, seed=2).support_y, ep.support_y)
    src = DigitsSource(train=300, val=200, corruption=0.4, seed=1)
    assert torch.equal(src.sample(("train", 5, 3)).support_y, ep.support_y)
    blob = pickle.dumps(src)
    assert len(blob) < 1000  # a worker gets the spec and rebuilds the same split
    assert torch.equal(pickle.loads(blob).sample(("val", 0, 0)).support_x, ep.support_x)
    for bad_rate in (1.0, -0.1, "0.5"):
        with pytest.raises(ValueError, match=r"corruption must be a number in \[0, 1\)"):
            digits_split(corruption=bad_rate)
    with pytest.raises(ValueError, match="must leave a test set"):
        digits_split(train=1000, val=797)


def solve_inner(problem, x, task, y0, iters=30):
    """Newton's method on the strongly convex inner problem: converges to machine precision."""
    keys = list(y0)
    shapes = {k: y0[k].shape for k in keys}

    def unflat(v):
        out, i = {}, 0
        for k in keys:
            n = math.prod(shapes[k])
            out[k] = v[i : i + n].view(shapes[k])
            i += n
        return out

    f = lambda v: problem.inner_loss(x, unflat(v), task)
    v = flatten(y0).detach()
    for _ in range(iters):
        g = torch.func.grad(f)(v)
        if float(g.norm()) < 1e-13:
            break
        v = v - torch.linalg.solve(torch.func.hessian(f)(v), g)
    return unflat(v), f, unflat


def test_hyper_cleaning_losses_and_implicit_hypergradient():
    task = digits_split(train=80, val=80, corruption=0.5, seed=0)
    problem = HyperCleaningProblem(80, inner_l2=1e-2)
    lam = 0.5 * torch.randn(80, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = {"weight_logits": lam}
    y0 = problem.init_inner(x, task)
    assert {k: tuple(v.shape) for k, v in y0.items()} == {"weight": (10, 64), "bias": (10,)}
    # the losses, by hand
    W = torch.randn(10, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.1
    b = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.1
    logits = task.support_x @ W.T + b
    ce = torch.logsumexp(logits, 1) - logits[torch.arange(80), task.support_y]
    by_hand = (torch.sigmoid(lam) * ce).mean() + 0.5e-2 * (W.pow(2).sum() + b.pow(2).sum())
    assert torch.allclose(problem.inner_loss(x, {"weight": W, "bias": b}, task), by_hand, rtol=1e-13)
    vlog = task.query_x @ W.T + b
    val_ce = (torch.logsumexp(vlog, 1) - vlog[torch.arange(80), task.query_y]).mean()
    assert torch.allclose(problem.outer_loss(x, {"weight": W, "bias": b}, task), val_ce, rtol=1e-13)

    # implicit hypergradient, dense: dφ/dλ = −∂²f/∂λ∂y · H⁻¹ ∇_y F at y*(λ)
    y_star, f_flat, unflat = solve_inner(problem, x, task, y0)
    v_star = flatten(y_star)
    H = torch.func.hessian(f_flat)(v_star)
    gF = torch.func.grad(lambda v: problem.outer_loss(x, unflat(v), task))(v_star)
    w = torch.linalg.solve(H, gF)
    mixed = lambda l: torch.func.grad(lambda v: problem.inner_loss({"weight_logits": l}, unflat(v), task))(v_star) @ w
    hypergrad = -torch.func.grad(mixed)(lam)

    # ... against central finite differences of the exact reduced objective φ(λ) = F(y*(λ))
    def phi(l):
        ys, _, _ = solve_inner(problem, {"weight_logits": l}, task, y_star)
        return float(problem.outer_loss(x, ys, task))

    eps = 1e-3
    for j in (0, 17, 55):
        e = torch.zeros(80, dtype=torch.float64)
        e[j] = eps
        fd = (phi(lam + e) - phi(lam - e)) / (2 * eps)
        assert abs(fd - float(hypergrad[j])) <= 1e-6 * float(hypergrad.abs().max()) + 1e-9, (j, fd, float(hypergrad[j]))

    # the hypergradient finds the corrupted samples: raising their weight raises the validation loss
    bad = task.info["corrupted"]
    score = hypergrad.numpy()
    auc = np.mean(score[bad.numpy()][:, None] > score[~bad.numpy()][None, :])
    assert auc > 0.85, auc
    m = problem.metrics(x, y_star, task)
    assert set(m) == {"val_accuracy", "test_accuracy", "weight_clean", "weight_corrupted"}
    assert 0.5 < m["test_accuracy"] < 0.95


def test_hyper_cleaning_shape_and_option_errors():
    task = digits_split(train=50, val=50, corruption=0.2)
    with pytest.raises(ValueError, match="weight_logits has shape \\(40,\\) but the task has 50 training samples"):
        HyperCleaningProblem(40).init_inner({"weight_logits": torch.zeros(40, dtype=torch.float64)}, task)
    with pytest.raises(ValueError, match="inner_l2 must be > 0"):
        HyperCleaningProblem(50, inner_l2=0.0)


def test_l2_regularization_problem():
    torch.manual_seed(0)
    model = mlp([64, 8, 10]).double()
    problem = L2RegularizationProblem(model, init_log_l2=-3.0)
    task = digits_split(train=60, val=60, seed=3)
    x = problem.initial_params()
    assert {k: v.shape for k, v in x.items()} == {f"log_l2.{k}": v.shape for k, v in model.named_parameters()}
    assert all(bool((v == -3.0).all()) for v in x.values())
    y0 = problem.init_inner(x, task)
    assert all(torch.equal(y0[k], v) for k, v in model.named_parameters())
    # inner loss = CE(train) + Σ exp(ℓ) θ², by hand
    h = torch.relu(task.support_x @ y0["0.weight"].T + y0["0.bias"])
    out = h @ y0["2.weight"].T + y0["2.bias"]
    ce = (torch.logsumexp(out, 1) - out[torch.arange(60), task.support_y]).mean()
    reg = math.exp(-3.0) * sum(float(v.pow(2).sum()) for v in y0.values())
    assert abs(float(problem.inner_loss(x, y0, task)) - (float(ce) + reg)) < 1e-12
    # rad's hypergradient equals central finite differences of the unrolled objective F(y_T(ℓ)) (T = 5 steps)
    solver = S.make("rad", inner_steps=5, inner_lr=0.5)
    hg = solver.hypergrad(problem, x, task)
    direction = {k: torch.randn(v.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i, (k, v) in enumerate(x.items())}

    def unrolled(xx):
        y = problem.init_inner(xx, task)
        for _ in range(5):
            yl = {k: v.detach().requires_grad_() for k, v in y.items()}
            g = torch.autograd.grad(problem.inner_loss(xx, yl, task), list(yl.values()))
            y = {k: v.detach() - 0.5 * gk for (k, v), gk in zip(yl.items(), g)}
        return float(problem.outer_loss(xx, y, task))

    eps = 1e-5
    plus = unrolled({k: v + eps * direction[k] for k, v in x.items()})
    minus = unrolled({k: v - eps * direction[k] for k, v in x.items()})
    fd = (plus - minus) / (2 * eps)
    analytic = sum(float((hg.grad[k] * direction[k]).sum()) for k in x)
    assert abs(fd - analytic) < 1e-7 * max(1.0, abs(analytic)), (fd, analytic)
    with pytest.raises(ValueError, match="missing L2 coefficients"):
        problem.init_inner({}, task)
