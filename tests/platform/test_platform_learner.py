"""The meta-learner's outer loop against exact references: closed-form hypergradients of the quadratic bilevel
problem driven through SGD and Adam written out by hand, clipping, and the non-finite guard."""
import math

import pytest
import torch
from platform_pools import LocalPool

from metaray.cluster.config import ClusterConfig, WorkerSpec
from metaray.platform import MetaLearner, OuterConfig, TasksConfig, build_problem
from metaray.solvers import NonFiniteError
from metaray.tasks import QuadraticProblem

T, S = 6, 0.1  # inner steps and step size of the unrolled solver


def quadratic_pool(solver="rad"):
    setup = build_problem("quadratic", {}, seed=3, dtype="float64")
    spec = WorkerSpec(setup.make_problem, solver, {"inner_steps": T, "inner_lr": S}, setup.source, dtype="float64")
    return setup, LocalPool(spec, ClusterConfig(num_workers=1), "learner-test")


def exact_grad(setup, x):
    task = setup.source.sample(("train", 0, 0))
    return QuadraticProblem().unrolled_hypergrad(task, x, T, S)


def test_sgd_follows_the_closed_form_trajectory():
    setup, pool = quadratic_pool()
    tasks = TasksConfig(meta_batch_size=2, persistent=True, val_tasks=0, test_tasks=0)
    learner = MetaLearner(pool, setup.initial_params, OuterConfig(optimizer="sgd", lr=0.2, momentum=0.5), tasks)
    x, buf = setup.initial_params["x"].clone(), None
    for _ in range(5):
        row = learner.step()
        g = exact_grad(setup, x)
        buf = g if buf is None else 0.5 * buf + g  # torch SGD momentum: b = μ b + g, x -= lr b
        x = x - 0.2 * buf
        assert row["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-10)
    assert torch.allclose(learner.x["x"], x, rtol=1e-12, atol=1e-12)
    assert learner.train_keys(7) == [("train", 0, 0), ("train", 0, 1)]  # one persistent task (HPO)


def test_adam_with_warmup_matches_the_update_rule():
    setup, pool = quadratic_pool()
    outer = OuterConfig(optimizer="adam", lr=0.05, betas=(0.8, 0.9), warmup_steps=2)
    learner = MetaLearner(pool, setup.initial_params, outer, TasksConfig(meta_batch_size=1, persistent=True), total_steps=4)
    x = setup.initial_params["x"].clone()
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    for t in range(1, 5):
        lr = 0.05 * min(t / 2, 1.0)
        g = exact_grad(setup, x)
        m, v = 0.8 * m + 0.2 * g, 0.9 * v + 0.1 * g * g
        x = x - lr * (m / (1 - 0.8**t)) / ((v / (1 - 0.9**t)).sqrt() + 1e-8)
        assert learner.step()["lr"] == pytest.approx(lr)
    assert torch.allclose(learner.x["x"], x, rtol=1e-10, atol=1e-12)


def test_clipping_bounds_the_update_to_the_clip_norm():
    setup, pool = quadratic_pool()
    learner = MetaLearner(pool, setup.initial_params, OuterConfig(optimizer="sgd", lr=1.0, clip_norm=1e-3), TasksConfig(meta_batch_size=1))
    g = exact_grad(setup, setup.initial_params["x"])
    row = learner.step()
    assert row["clipped"] and row["update_norm"] == pytest.approx(1e-3, rel=1e-9)
    step = setup.initial_params["x"] - learner.x["x"]
    assert torch.allclose(step / step.norm(), g / g.norm(), atol=1e-12)  # same direction as the hypergradient


def test_a_non_finite_update_is_never_applied():
    setup, pool = quadratic_pool()
    x0 = {"x": 500.0 * setup.initial_params["x"]}
    g = exact_grad(setup, x0["x"])
    assert float(g.abs().max()) > 1.2  # so lr · g overflows float64
    learner = MetaLearner(pool, x0, OuterConfig(optimizer="sgd", lr=1.5e308), TasksConfig(meta_batch_size=1))
    before = learner.x["x"].clone()
    with pytest.raises(NonFiniteError, match="outer step 0: the optimizer produced non-finite params"):
        learner.step()
    assert torch.equal(learner.x["x"], before) and learner.step_count == 0
    # Non-finite outer params are refused before any step, naming the param.
    with pytest.raises(ValueError, match=r"initial outer params\['x'\] has non-finite entries"):
        MetaLearner(pool, {"x": torch.full((3,), float("nan"), dtype=torch.float64)}, OuterConfig(), TasksConfig(meta_batch_size=1))


def test_a_diverged_neumann_hypergradient_is_never_applied():
    """ift-neumann with α·λmax > 2 returns a finite sum off by orders of magnitude: the step must be refused."""
    setup = build_problem("quadratic", {}, seed=3, dtype="float64")
    opts = {"inner_steps": T, "inner_lr": S, "neumann_alpha": 50.0, "neumann_terms": 30}
    pool = LocalPool(WorkerSpec(setup.make_problem, "ift-neumann", opts, setup.source, dtype="float64"),
                     ClusterConfig(num_workers=1), "diverged")
    learner = MetaLearner(pool, setup.initial_params, OuterConfig(optimizer="sgd", lr=0.1), TasksConfig(meta_batch_size=2))
    before = learner.x["x"].clone()
    with pytest.warns(RuntimeWarning, match="retrying once"), pytest.raises(NonFiniteError, match="Neumann series diverges"):
        learner.step()
    assert torch.equal(learner.x["x"], before) and learner.step_count == 0


def test_meta_test_mean_and_ci_over_tasks():
    setup = build_problem("sinusoid", {"shots": 5, "queries": 5}, seed=0, dtype="float64")
    spec = WorkerSpec(setup.make_problem, "maml", {"inner_steps": 1, "inner_lr": 0.01}, setup.source, dtype="float64")
    pool = LocalPool(spec, ClusterConfig(num_workers=1), "t")
    learner = MetaLearner(pool, setup.initial_params, metric=setup.metric)
    res = learner.test(30)
    # Reference: one adaptation step by hand on each test task, MSE on the query set.
    problem, values = setup.make_problem(), []
    for i in range(30):
        ep = setup.source.sample(("test", 0, i))
        ep = type(ep)(*(t.double() for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y)))
        y = {k: v.clone().requires_grad_(True) for k, v in setup.initial_params.items()}
        loss = problem.inner_loss(None, y, ep)
        grads = torch.autograd.grad(loss, list(y.values()))
        y = {k: v.detach() - 0.01 * g for (k, v), g in zip(y.items(), grads)}
        values.append(float(problem.outer_loss(None, y, ep)))
    mean = sum(values) / 30
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 29)
    assert res.num_tasks == 30
    assert res.mean == pytest.approx(mean, rel=1e-9)
    assert res.ci95 == pytest.approx(1.96 * sd / math.sqrt(30), rel=1e-9)


@pytest.mark.parametrize("outer", [
    OuterConfig(optimizer="adam", lr=1e-3),
    OuterConfig(optimizer="adamw", lr=1e-3, weight_decay=0.1),
    OuterConfig(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
], ids=["adam", "adamw", "sgd-nesterov"])
def test_every_outer_optimizer_updates_blocks_to_the_bits_of_the_whole(outer):
    """What a sharded outer update on the actors (issue #17, not built) would rest on: every outer optimizer
    metaray offers is elementwise, so W optimizers, each over its block x[a:b] of the flat outer vector (the
    reduce-scatter's blocks, ``reduce.blocks``), give the bits of one optimizer over the whole, for any W."""
    from metaray.cluster.reduce import blocks
    from metaray.platform.learner import make_optimizer

    g = torch.Generator().manual_seed(0)
    d = 100_003
    x0 = torch.randn(d, generator=g)
    grads = [torch.randn(d, generator=g) * 10.0 ** (i - 1) for i in range(3)]

    def run(cuts):
        parts = [x0[a:b].clone().requires_grad_(True) for a, b in cuts]
        opts = [make_optimizer(outer, [p]) for p in parts]  # one optimizer (and its state) per block
        for grad in grads:
            for p, opt, (a, b) in zip(parts, opts, cuts):
                p.grad = grad[a:b].clone()
                opt.step()
        return torch.cat([p.detach() for p in parts])

    whole = run([(0, d)])
    assert not torch.equal(whole, x0)
    for w in (2, 3, 7):
        assert torch.equal(run(blocks(d, w)), whole), w
