"""Batched task hypergradients (metaray.solvers.batched): ``hypergrad_batch`` equals the task loop per task, in
float64 to 1e-8 — gradients, outer and inner losses, metrics — on an MLP and on conv4 with BatchNorm; the reduced
form equals the loop's mean; ragged tasks and problems that do not declare batching fall back to the loop with one
warning; non-finite results fail like the loop's, naming the task."""
from __future__ import annotations

import warnings

import pytest
import torch

import metaray.solvers as S
from metaray.solvers.batched import BatchFallbackWarning
from metaray.solvers.core import NonFiniteError
from metaray.tasks import Conv4, Episode, FeatureProblem, ModelProblem, SinusoidSource, mlp

D64 = torch.float64
TOL = 1e-8


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def global_rel(g: dict, ref: dict) -> float:
    """One global relative norm (NOTES.md: per-tensor errors blow up on a conv bias feeding BatchNorm)."""
    num = sum(float((g[k] - ref[k]).pow(2).sum()) for k in ref) ** 0.5
    den = sum(float(ref[k].pow(2).sum()) for k in ref) ** 0.5
    return num / max(den, 1e-300)


class WeightDecayProblem(ModelProblem):
    """ModelProblem plus an outer hyperparameter the inner loss reads: f = mse + exp(log_wd)·‖y‖², so rad and
    trad have a nonzero B_t = ∂Ψ_t/∂x and x has a key the model does not."""

    def inner_loss(self, x, y, task):
        return super().inner_loss(x, y, task) + torch.exp(x["log_wd"]) * sum((v * v).sum() for v in y.values())


def sinusoid(n: int, shots: int = 5):
    src = SinusoidSource(shots=shots, queries=7, dtype=D64)
    return [src.sample(("train", 0, i)) for i in range(n)]


def mlp_problem():
    torch.manual_seed(0)
    P = WeightDecayProblem(mlp([1, 16, 16, 1]).to(D64), "mse")
    return P, dict(P.initial_params(), log_wd=torch.tensor(-3.0, dtype=D64))


def conv_problem(ways: int = 3, side: int = 16, n: int = 3):
    torch.manual_seed(0)
    P = ModelProblem(Conv4(ways=ways, hidden=4, image_size=side).to(D64), "cross_entropy")
    g = torch.Generator().manual_seed(1)
    tasks = [Episode(torch.randn(ways, 1, side, side, generator=g, dtype=D64), torch.arange(ways),
                     torch.randn(2 * ways, 1, side, side, generator=g, dtype=D64), torch.arange(ways).repeat(2))
             for _ in range(n)]
    return P, P.initial_params(), tasks


MLP_SOLVERS = [
    ("maml", dict(inner_steps=3, inner_lr=0.1)),
    ("fomaml", dict(inner_steps=3, inner_lr=0.1)),
    ("reptile", dict(inner_steps=3, inner_lr=0.1, normalize=True)),
    ("metasgd", dict(inner_steps=3)),
    ("rad", dict(inner_steps=3, inner_lr=0.05)),
    ("trad", dict(inner_steps=4, inner_lr=0.05, truncate=2)),
]


def assert_same(batch, loop):
    assert len(batch) == len(loop)
    for b, l in zip(batch, loop):
        assert b.grad.keys() == l.grad.keys()
        assert all(b.grad[k].shape == l.grad[k].shape and b.grad[k].dtype == l.grad[k].dtype for k in l.grad)
        assert global_rel(b.grad, l.grad) < TOL
        assert b.outer_loss == pytest.approx(l.outer_loss, rel=TOL, abs=1e-12)
        assert b.inner_loss == pytest.approx(l.inner_loss, rel=TOL, abs=1e-12)
        assert b.metrics.keys() == l.metrics.keys()
        for k in l.metrics:
            assert b.metrics[k] == pytest.approx(l.metrics[k], rel=TOL, abs=1e-12)
        assert b.state is None and l.state is None


def loop_of(solver, P, x, tasks):
    return [solver.hypergrad(P, x, t) for t in tasks]


@pytest.mark.parametrize("name,opts", MLP_SOLVERS, ids=[n for n, _ in MLP_SOLVERS])
def test_batched_equals_the_loop_on_an_mlp(name, opts):
    P, x = mlp_problem()
    if name == "metasgd":
        x = dict(x, **S.metasgd_lrs(P.init_inner(x, None), 0.1))
    tasks = sinusoid(4)
    solver = S.make(name, **opts)
    loop = loop_of(solver, P, x, tasks)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BatchFallbackWarning)  # it must really batch
        batch = solver.hypergrad_batch(P, x, tasks)
        mean = solver.hypergrad_mean(P, x, tasks)
    assert_same(batch, loop)
    assert max(float(v.abs().max()) for v in loop[0].grad.values()) > 1e-6  # a gradient that could be wrong
    ref = {k: sum(h.grad[k] for h in loop) / len(loop) for k in x}
    assert global_rel(mean.grad, ref) < TOL
    assert mean.outer_loss == pytest.approx(sum(h.outer_loss for h in loop) / len(loop), rel=TOL)
    if name in ("rad", "trad"):  # the hyperparameter's gradient flows through B_t only
        assert abs(float(batch[0].grad["log_wd"])) > 1e-8


@pytest.mark.parametrize("name", ["maml", "fomaml"])
def test_batched_equals_the_loop_on_conv4_with_batchnorm(name):
    """Second order through BatchNorm: torch's BatchNorm batching rule gives the reduced form an error of ~4e-2
    (NOTES.md); the batched path computes BatchNorm functionally and must match both forms."""
    P, x, tasks = conv_problem()
    solver = S.make(name, inner_steps=2, inner_lr=0.4)
    loop = loop_of(solver, P, x, tasks)
    assert_same(solver.hypergrad_batch(P, x, tasks), loop)
    ref = {k: sum(h.grad[k] for h in loop) / len(loop) for k in x}
    mean = solver.hypergrad_mean(P, x, tasks)
    assert global_rel(mean.grad, ref) < TOL
    assert mean.metrics["accuracy"] == pytest.approx(sum(h.metrics["accuracy"] for h in loop) / len(loop))


def test_ridge_batched_equals_the_loop_with_a_batchnorm_backbone():
    torch.manual_seed(0)
    backbone = Conv4(ways=3, hidden=4, image_size=16).features
    P = FeatureProblem(backbone.to(D64), ways=3)
    x = P.initial_params(lam=0.5)
    _, _, tasks = conv_problem()
    solver = S.make("ridge")
    loop = loop_of(solver, P, x, tasks)
    assert_same(solver.hypergrad_batch(P, x, tasks), loop)
    assert loop[0].metrics["woodbury"] == 1.0 and "accuracy" in loop[0].metrics


def test_ragged_tasks_and_undeclared_problems_fall_back_to_the_loop_once_warned():
    P, x = mlp_problem()
    tasks = sinusoid(2, shots=5) + sinusoid(1, shots=3)  # ragged: different support sizes
    solver = S.make("maml", inner_steps=2)
    with pytest.warns(BatchFallbackWarning, match="ragged"):
        out = solver.hypergrad_batch(P, x, tasks)
    assert_same(out, loop_of(solver, P, x, tasks))
    with warnings.catch_warnings():
        warnings.simplefilter("error", BatchFallbackWarning)
        solver.hypergrad_batch(P, x, tasks)  # said once per solver instance

    class DuckProblem:  # the three required methods only
        def init_inner(self, x, task):
            return P.init_inner(x, task)

        def inner_loss(self, x, y, task):
            return P.inner_loss(x, y, task)

        def outer_loss(self, x, y, task):
            return P.outer_loss(x, y, task)

    tasks = sinusoid(3)
    with pytest.warns(BatchFallbackWarning, match="does not declare"):
        out = S.make("fomaml").hypergrad_batch(DuckProblem(), x, tasks)
    assert_same(out, loop_of(S.make("fomaml"), DuckProblem(), x, tasks))
    with pytest.warns(BatchFallbackWarning, match="checkpoint"):
        S.make("maml", inner_steps=2, checkpoint_every=1).hypergrad_batch(P, x, tasks)


def test_nonfinite_results_fail_like_the_loop_naming_the_task():
    P, x = mlp_problem()
    tasks = sinusoid(3)
    bad = tasks[1]
    tasks[1] = Episode(bad.support_x, bad.support_y * float("nan"), bad.query_x, bad.query_y)
    solver = S.make("maml", inner_steps=2)
    with pytest.raises(NonFiniteError) as loop_err:
        loop_of(solver, P, x, tasks)
    with pytest.raises(NonFiniteError) as batch_err:
        solver.hypergrad_batch(P, x, tasks)
    assert str(batch_err.value) == str(loop_err.value) == "inner_loss at inner step 0 is not finite (nan)"
    assert batch_err.value.task is tasks[1] and batch_err.value.where == loop_err.value.where


# ---- the implicit solvers: batched CG / Neumann, each task's system solved as the loop solves it alone -----

from metaray.solvers.core import DivergedError  # noqa: E402
from metaray.solvers.linsolve import IndefiniteError  # noqa: E402

IMPLICIT = [
    ("ift-cg", dict(inner_steps=30, inner_lr=0.1, cg_steps=12, cg_tol=1e-4)),  # stops at indefinite directions
    ("ift-neumann", dict(inner_steps=30, inner_lr=0.1, neumann_terms=30, neumann_tol=0.3)),
    ("imaml", dict(inner_steps=10, inner_lr=0.1, lam=2.0, cg_steps=8, cg_tol=1e-5)),
]


@pytest.mark.parametrize("name,opts", IMPLICIT, ids=[n for n, _ in IMPLICIT])
def test_batched_implicit_equals_the_loop_on_an_mlp(name, opts):
    P, x = mlp_problem()
    tasks = sinusoid(5)
    solver = S.make(name, **opts)
    loop = loop_of(solver, P, x, tasks)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BatchFallbackWarning)
        batch = solver.hypergrad_batch(P, x, tasks)
        mean = solver.hypergrad_mean(P, x, tasks)
    assert_same(batch, loop)
    # the tasks' solves stopped after different numbers of products: the per-task freezing is exercised
    assert len({h.metrics["linsolve_steps"] for h in loop}) > 1
    assert abs(float(loop[0].grad["log_wd"])) > 1e-6  # the mixed term ∇²_xy f · q, which could be wrong
    ref = {k: sum(h.grad[k] for h in loop) / len(loop) for k in x}
    assert global_rel(mean.grad, ref) < TOL
    assert mean.metrics["linsolve_steps"] == pytest.approx(sum(h.metrics["linsolve_steps"] for h in loop) / len(loop))


@pytest.mark.parametrize("name", ["imaml", "ift-cg"])
def test_batched_implicit_equals_the_loop_on_conv4_with_batchnorm(name):
    P, x, tasks = conv_problem()
    opts = dict(inner_steps=3, inner_lr=0.2, cg_steps=4, on_indefinite="continue")
    solver = S.make(name, **(dict(opts, lam=1.0) if name == "imaml" else opts))
    loop = loop_of(solver, P, x, tasks)
    assert_same(solver.hypergrad_batch(P, x, tasks), loop)
    ref = {k: sum(h.grad[k] for h in loop) / len(loop) for k in x}
    assert global_rel(solver.hypergrad_mean(P, x, tasks).grad, ref) < TOL


def test_batched_implicit_errors_and_fallbacks_are_the_loops():
    P, x = mlp_problem()
    tasks = sinusoid(4)
    # warm starts carry per-task state: the loop runs, said once
    solver = S.make("ift-cg", inner_steps=5, warm_start=True)
    with pytest.warns(BatchFallbackWarning, match="warm_start"):
        out = solver.hypergrad_batch(P, x, tasks)
    assert out[0].state is not None
    # an indefinite Hessian with on_indefinite='raise': the loop's error for the first such task
    solver = S.make("ift-cg", inner_steps=2, inner_lr=0.05, cg_steps=30, on_indefinite="raise")
    with pytest.raises(IndefiniteError) as loop_err:
        loop_of(solver, P, x, tasks)
    with pytest.raises(IndefiniteError) as batch_err:
        solver.hypergrad_batch(P, x, tasks)
    assert str(batch_err.value) == str(loop_err.value)
    # a diverging Neumann series is refused with the loop's message
    solver = S.make("ift-neumann", inner_steps=30, inner_lr=0.1, neumann_alpha=50.0, neumann_terms=10, on_indefinite="continue")
    with pytest.raises(DivergedError) as loop_err:
        loop_of(solver, P, x, tasks)
    with pytest.raises(DivergedError) as batch_err:
        solver.hypergrad_batch(P, x, tasks)
    assert str(batch_err.value) == str(loop_err.value)
