"""MAML family: closed forms on quadratics, the learn2learn cross-check on a conv net with BatchNorm, and
meta-training sinusoid regression (Finn et al. 2017) against a no-meta-learning baseline."""
import copy

import learn2learn as l2l
import pytest
import torch
import torch.nn.functional as Fn

import metaray.solvers as S
from metaray.tasks import Conv4, Episode, ModelProblem, QuadraticProblem, SinusoidSource, mlp, quadratic_task


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def global_rel(g: dict, ref: dict) -> float:
    """One global relative norm (NOTES.md: a per-tensor one blows up on conv biases feeding BatchNorm)."""
    num = sum(float((g[k] - ref[k]).pow(2).sum()) for k in ref) ** 0.5
    den = sum(float(ref[k].pow(2).sum()) for k in ref) ** 0.5
    return num / den


def test_fomaml_matches_first_order_formula():
    P = QuadraticProblem()
    task = quadratic_task(4, 4, seed=7, init="random")
    x = P.initial_params(task)
    T, s = 5, 0.1
    y_T, _ = P.unrolled_solution(task, x["x"], T, s)
    gy = task.W @ (y_T - task.t) + task.G @ x["x"]
    # eq. 27: ∂F/∂x + (∂Ψ0/∂x)ᵀ ∂F/∂y_T with Ψ0(x) = Cx + d
    exact = task.rho * x["x"] + task.G.T @ y_T + task.C.T @ gy
    hg = S.make("fomaml", inner_steps=T, inner_lr=s).hypergrad(P, x, task)
    assert rel(hg.grad["x"], exact) < 1e-10
    full = S.make("maml", inner_steps=T, inner_lr=s).hypergrad(P, x, task)
    assert rel(full.grad["x"], exact) > 1e-2  # second-order terms matter here


@pytest.mark.parametrize("normalize", [False, True])
def test_reptile_is_the_displacement(normalize):
    P = QuadraticProblem()
    task = quadratic_task(4, 4, seed=8, init="x")
    x = P.initial_params(task)
    T, s = 4, 0.2
    y_T, _ = P.unrolled_solution(task, x["x"], T, s)
    y0 = x["x"] + task.d
    expected = (y0 - y_T) / ((s * T) if normalize else 1.0)
    hg = S.make("reptile", inner_steps=T, inner_lr=s, normalize=normalize).hypergrad(P, x, task)
    assert rel(hg.grad["x"], expected) < 1e-12


def test_metasgd_with_uniform_rates_equals_maml_and_learns_rates():
    P = QuadraticProblem()
    task = quadratic_task(4, 4, seed=9, init="x")
    x = P.initial_params(task)
    T, s = 3, 0.1
    xs = dict(x, **S.metasgd_lrs(P.init_inner(x, task), s))
    hg = S.make("metasgd", inner_steps=T).hypergrad(P, xs, task)
    maml = S.make("maml", inner_steps=T, inner_lr=s).hypergrad(P, x, task)
    assert rel(hg.grad["x"], maml.grad["x"]) < 1e-12
    assert float(hg.grad["lr.y"].norm()) > 0
    with pytest.raises(ValueError, match="metasgd_lrs"):
        S.make("metasgd").hypergrad(P, x, task)


# ---------------------------------------------------------------------------------------------------------
# Peer cross-check: learn2learn's MAML on a conv net with BatchNorm
# ---------------------------------------------------------------------------------------------------------


def conv_episode(seed: int, ways=5, shots=1, queries=3, side=28) -> Episode:
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(ways * shots, 1, side, side, generator=g, dtype=torch.float64)
    xq = torch.randn(ways * queries, 1, side, side, generator=g, dtype=torch.float64)
    return Episode(xs, torch.arange(ways).repeat_interleave(shots), xq, torch.arange(ways).repeat_interleave(queries))


def l2l_meta_gradient(model, episodes, steps, lr, first_order):
    maml = l2l.algorithms.MAML(copy.deepcopy(model), lr=lr, first_order=first_order)
    maml.zero_grad()
    for ep in episodes:
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(Fn.cross_entropy(learner(ep.support_x), ep.support_y))
        (Fn.cross_entropy(learner(ep.query_x), ep.query_y) / len(episodes)).backward()
    return {k: p.grad.detach().clone() for k, p in maml.module.named_parameters()}


@pytest.mark.parametrize("name,first_order", [("maml", False), ("fomaml", True)])
def test_meta_gradient_equals_learn2learn_on_conv_with_batchnorm(name, first_order):
    torch.manual_seed(0)
    model = Conv4(ways=5, hidden=8).double()
    problem = ModelProblem(model, "cross_entropy")
    episodes = [conv_episode(s) for s in range(2)]
    steps, lr = 3, 0.4
    ref = l2l_meta_gradient(model, episodes, steps, lr, first_order)
    solver = S.make(name, inner_steps=steps, inner_lr=lr)
    x = problem.initial_params()
    hgs = solver.hypergrad_batch(problem, x, episodes)
    grad = {k: sum(h.grad[k] for h in hgs) / len(hgs) for k in x}
    assert global_rel(grad, ref) < 1e-5
    # and the functional solver never touched the module
    assert all(torch.equal(p, x[k]) for k, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------------------
# Meta-training sinusoid regression
# ---------------------------------------------------------------------------------------------------------


def post_adaptation_mse(solver, problem, x, source, n_tasks=100) -> float:
    return sum(solver.evaluate(problem, x, source.sample(("test", 0, i))).outer_loss for i in range(n_tasks)) / n_tasks


def meta_train(solver, problem, source, x0, steps=500, meta_batch=10, lr=3e-3):
    """A plain Adam outer loop over the mean task hypergradient (the platform's meta-learner does the same)."""
    x = {k: v.clone().requires_grad_(True) for k, v in x0.items()}
    opt = torch.optim.Adam(x.values(), lr=lr)
    for step in range(steps):
        tasks = [source.sample(("train", step, i)) for i in range(meta_batch)]
        hgs = solver.hypergrad_batch(problem, {k: v.detach() for k, v in x.items()}, tasks)
        for k, v in x.items():
            v.grad = sum(h.grad[k] for h in hgs) / len(hgs)
        opt.step()
    return {k: v.detach() for k, v in x.items()}


def test_maml_sinusoid_beats_no_meta_learning_baselines():
    """Finn et al. 2017 §5.1: K = 10, one adaptation step in training, 10 at test. Baselines with the same
    test-time adaptation: the random init, and joint pre-training on all tasks (MAML with zero inner steps)."""
    torch.manual_seed(0)
    problem = ModelProblem(mlp([1, 40, 40, 1]), "mse")
    source = SinusoidSource(shots=10, queries=10, seed=0)
    x0 = problem.initial_params()
    x_maml = meta_train(S.make("maml", inner_steps=1, inner_lr=0.02), problem, source, x0)
    x_joint = meta_train(S.make("maml", inner_steps=0, inner_lr=0.02), problem, source, x0)
    eval_solver = S.make("maml", inner_steps=10, inner_lr=0.02)
    maml, joint, random_init = (post_adaptation_mse(eval_solver, problem, x, source) for x in (x_maml, x_joint, x0))
    print(f"sinusoid post-adaptation query MSE: maml {maml:.3f}, joint pre-training {joint:.3f}, random init {random_init:.3f}")
    assert maml < 0.6 * joint
    assert maml < 0.3 * random_init
