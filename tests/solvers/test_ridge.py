"""The ridge head (R2D2) and the meta-feature problem: closed form, finite differences, a dense IFT reference,
and meta-training a conv net on Gaussian-cluster images."""
import pytest
import torch
from torch import nn

import metaray.solvers as S
from metaray.solvers.closed_form import ridge_solve
from metaray.solvers.core import flatten, unflatten
from metaray.solvers.implicit import implicit_hypergrad
from metaray.solvers.linsolve import SolveResult
from metaray.tasks import Episode, FeatureProblem, GaussianClusterImages, QuadraticProblem, quadratic_task
from metaray.tasks.models import conv_block

D64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def small_case(n_per_class: int, feature_dim: int, ways: int = 3, outer: str = "cross_entropy", seed: int = 0):
    """A tanh-MLP backbone in float64 and an episode with n_per_class support examples per class."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(5, feature_dim), nn.Tanh()).double()
    P = FeatureProblem(backbone, ways, outer=outer)
    g = torch.Generator().manual_seed(seed + 1)
    ys = torch.arange(ways).repeat_interleave(n_per_class)
    yq = torch.arange(ways).repeat_interleave(4)
    task = Episode(torch.randn(len(ys), 5, generator=g, dtype=D64), ys, torch.randn(len(yq), 5, generator=g, dtype=D64), yq)
    x = P.initial_params(scale=1.3, bias=0.2, lam=0.7)
    return P, x, task


def dense_solve(matvec, b, q0=None):
    """A dense reference for the implicit system: builds the matrix column by column and solves."""
    flat_b = flatten(b)
    cols = [flatten(matvec(unflatten(torch.eye(flat_b.numel(), dtype=D64)[i], b))) for i in range(flat_b.numel())]
    solution = torch.linalg.solve(torch.stack(cols, 1), flat_b)
    return SolveResult(unflatten(solution, b), [0.0], len(cols), True, False)


def test_ridge_solve_forms_agree_and_solve_the_normal_equations():
    g = torch.Generator().manual_seed(0)
    for n, e in ((4, 9), (12, 5)):
        X, Y, lam = torch.randn(n, e, generator=g, dtype=D64), torch.randn(n, 3, generator=g, dtype=D64), torch.tensor(0.3, dtype=D64)
        Wp, wp = ridge_solve(X, Y, lam, "primal")
        Ww, ww = ridge_solve(X, Y, lam, "woodbury")
        Wa, wa = ridge_solve(X, Y, lam)
        assert not wp and ww and wa == (n < e)
        assert rel(Wp, Ww) < 1e-12 and rel(Wa, Wp) < 1e-12
        # stationarity of ½‖XW − Y‖² + λ/2‖W‖²
        assert float((X.T @ (X @ Wp - Y) + lam * Wp).abs().max()) < 1e-12


@pytest.mark.parametrize("n_per_class,feature_dim", [(2, 10), (5, 4)], ids=["woodbury", "primal"])
def test_ridge_hypergradient_matches_finite_differences_and_dense_ift(n_per_class, feature_dim):
    P, x, task = small_case(n_per_class, feature_dim)
    n = 3 * n_per_class
    hg = S.make("ridge").hypergrad(P, {**x, "unused": torch.ones(3, dtype=D64)}, task)
    assert torch.equal(hg.grad.pop("unused"), torch.zeros(3, dtype=D64))  # an outer param no loss reads: zeros
    assert hg.metrics["woodbury"] == float(n < feature_dim)
    # both forced forms give the same hypergradient
    other = S.make("ridge", form="primal" if n < feature_dim else "woodbury").hypergrad(P, x, task)
    assert rel(flatten(other.grad), flatten(hg.grad)) < 1e-10
    # central finite differences along a random direction over all outer params
    g = torch.Generator().manual_seed(5)
    v = {k: torch.randn(t.shape, generator=g, dtype=D64) for k, t in x.items()}
    h = 1e-5
    plus = S.make("ridge").hypergrad(P, {k: x[k] + h * v[k] for k in x}, task).outer_loss
    minus = S.make("ridge").hypergrad(P, {k: x[k] - h * v[k] for k in x}, task).outer_loss
    fd = (plus - minus) / (2 * h)
    directional = float(sum((hg.grad[k] * v[k]).sum() for k in x))
    assert directional == pytest.approx(fd, rel=1e-6)
    # an independent reference: the implicit function theorem with a dense solve at the exact W*
    Xs, Ys, lam = P.ridge_system(x, task)
    W_star = torch.linalg.solve(Xs.T @ Xs + lam * torch.eye(feature_dim, dtype=D64), Xs.T @ Ys).detach()
    ref, _, _ = implicit_hypergrad(P, x, {"head.weight": W_star}, task, dense_solve)
    assert rel(flatten(hg.grad), flatten(ref)) < 1e-9
    # the ridge λ and the scale get real gradients; a scalar bias cancels in the softmax
    assert abs(float(hg.grad["head.log_lam"])) > 1e-6 and abs(float(hg.grad["head.scale"])) > 1e-6
    assert abs(float(hg.grad["head.bias"])) < 1e-12


def test_ridge_bias_gradient_under_mse_and_agreement_with_ift_cg():
    P, x, task = small_case(2, 10, outer="mse")
    hg = S.make("ridge").hypergrad(P, x, task)
    h = 1e-6
    fd = (S.make("ridge").hypergrad(P, {**x, "head.bias": x["head.bias"] + h}, task).outer_loss
          - S.make("ridge").hypergrad(P, {**x, "head.bias": x["head.bias"] - h}, task).outer_loss) / (2 * h)
    assert float(hg.grad["head.bias"]) == pytest.approx(fd, rel=1e-6) and abs(fd) > 1e-3
    # the generic IFT solver on the same FeatureProblem, started at the closed-form W* (warm-start state)
    Xs, Ys, lam = P.ridge_system(x, task)
    W, _ = ridge_solve(Xs, Ys, lam)
    ift = S.make("ift-cg", inner_steps=0, cg_steps=100, cg_tol=1e-13, warm_start=True)
    hg_ift = ift.hypergrad(P, x, task, state={"y": {"head.weight": W.detach()}})
    assert hg_ift.metrics["converged"] == 1.0
    assert rel(flatten(hg_ift.grad), flatten(hg.grad)) < 1e-8


def test_feature_problem_is_a_generic_bilevel_problem():
    # inner='cross_entropy': a logistic head trained by gradient steps, differentiated by rad
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(5, 6), nn.Tanh()).double()
    P = FeatureProblem(backbone, 3, inner="cross_entropy")
    _, _, task = small_case(2, 6)
    x = P.initial_params()
    y0 = P.init_inner(x, task)
    assert list(y0) == ["head.weight"] and y0["head.weight"].shape == (6, 3) and not y0["head.weight"].any()
    assert P.features(x, task.query_x).shape == (12, 6)
    hg = S.make("rad", inner_steps=5, inner_lr=0.5).hypergrad(P, x, task)
    h = 1e-6
    k = "0.weight"
    e = torch.zeros_like(x[k])
    e[1, 2] = 1.0
    fd = (S.make("rad", inner_steps=5, inner_lr=0.5).hypergrad(P, {**x, k: x[k] + h * e}, task).outer_loss
          - S.make("rad", inner_steps=5, inner_lr=0.5).hypergrad(P, {**x, k: x[k] - h * e}, task).outer_loss) / (2 * h)
    assert float(hg.grad[k][1, 2]) == pytest.approx(fd, rel=1e-5)
    assert 0.0 <= hg.metrics["accuracy"] <= 1.0


def test_bad_input_is_reported_clearly():
    P, x, task = small_case(2, 4)
    with pytest.raises(ValueError, match="form"):
        S.make("ridge", form="cholesky")
    with pytest.raises(TypeError, match="ridge_system"):
        qp = QuadraticProblem()
        qt = quadratic_task(3, 4)
        S.make("ridge").hypergrad(qp, qp.initial_params(qt), qt)
    logistic = FeatureProblem(P.backbone, 3, inner="cross_entropy")
    with pytest.raises(ValueError, match="inner='ridge'"):
        S.make("ridge").hypergrad(logistic, x, task)
    with pytest.raises(ValueError, match="head.log_lam"):
        S.make("ridge").hypergrad(P, {k: v for k, v in x.items() if k != "head.log_lam"}, task)
    bad = Episode(task.support_x, task.support_y + 5, task.query_x, task.query_y)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        S.make("ridge").hypergrad(P, x, bad)
    with pytest.raises(ValueError, match="ways"):
        FeatureProblem(P.backbone, 1)
    with pytest.raises(ValueError, match="inner"):
        FeatureProblem(P.backbone, 3, inner="svm")
    with pytest.raises(ValueError, match="track_running_stats"):
        FeatureProblem(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), 3)


def test_cluster_images_are_deterministic_in_the_key():
    src = GaussianClusterImages(ways=4, shots=2, queries=3, size=10)
    a, b, c = src.sample(("train", 3, 1)), src.sample(("train", 3, 1)), src.sample(("test", 3, 1))
    assert a.support_x.shape == (8, 1, 10, 10) and a.query_x.shape == (12, 1, 10, 10)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)
    assert not torch.equal(a.support_x, c.support_x)
    assert a.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="ways"):
        GaussianClusterImages(ways=1)


# ---- meta-training ----------------------------------------------------------------------------------------


def meta_train(steps: int, batch: int = 4, lr: float = 3e-3, seed: int = 0):
    """Meta-trains a 2-block conv net with the ridge head; returns (test accuracy before, after)."""
    # These convolutions are tiny: with 2 intra-op threads on a shared 2-core machine the run took 84 s
    # instead of 2.7 s on one thread (same numbers), so pin one thread for the duration.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _meta_train(steps, batch, lr, seed)
    finally:
        torch.set_num_threads(threads)


def _meta_train(steps: int, batch: int, lr: float, seed: int):
    torch.manual_seed(seed)
    src = GaussianClusterImages(ways=5, shots=1, queries=5, size=12)
    net = nn.Sequential(conv_block(1, 16), conv_block(16, 16), nn.Flatten())
    P = FeatureProblem(net, 5)
    solver = S.make("ridge")

    def evaluate(params, n=50):
        return sum(solver.hypergrad(P, params, src.sample(("test", 0, i))).metrics["accuracy"] for i in range(n)) / n

    x = P.initial_params()
    before = evaluate(x)
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    opt = torch.optim.Adam(list(leaves.values()), lr=lr)
    for step in range(steps):
        current = {k: v.detach() for k, v in leaves.items()}
        hgs = solver.hypergrad_batch(P, current, [src.sample(("train", step, i)) for i in range(batch)])
        for k, v in leaves.items():
            v.grad = sum(h.grad[k] for h in hgs) / batch
        opt.step()
    return before, evaluate({k: v.detach() for k, v in leaves.items()})


def test_meta_training_with_ridge_beats_the_untrained_backbone():
    before, after = meta_train(steps=60)
    assert after > before + 0.25, (before, after)


@pytest.mark.slow
def test_meta_training_with_ridge_long_run():
    before, after = meta_train(steps=300)
    assert after > 0.9 and after > before + 0.45, (before, after)


class VectorLambda:
    """A duck-typed ridge problem whose ridge_system returns one λ per feature (not what R2D2 defines)."""

    def __init__(self, lam):
        self.lam = lam

    def ridge_system(self, x, task):
        return task @ x["p"], torch.eye(4, 2, dtype=D64), self.lam

    def init_inner(self, x, task):
        return {"head.weight": torch.zeros(3, 2, dtype=D64)}

    def inner_loss(self, x, y, task):
        return ((task @ x["p"] @ y["head.weight"]) ** 2).sum()

    def outer_loss(self, x, y, task):
        return ((task @ x["p"] @ y["head.weight"] - 1.0) ** 2).sum()


def test_lambda_must_be_one_positive_scalar_and_inner_steps_nonnegative():
    x, task = {"p": torch.ones(5, 3, dtype=D64)}, torch.eye(4, 5, dtype=D64)
    with pytest.raises(ValueError, match=r"λ must be a scalar tensor .* got shape \(3,\)"):
        S.make("ridge").hypergrad(VectorLambda(torch.ones(3, dtype=D64)), x, task)
    with pytest.raises(ValueError, match="finite and > 0"):
        S.make("ridge").hypergrad(VectorLambda(torch.tensor(float("nan"), dtype=D64)), x, task)
    with pytest.raises(TypeError, match="tuple of three tensors"):
        S.make("ridge").hypergrad(VectorLambda(1.0), x, task)
    assert S.make("ridge").hypergrad(VectorLambda(torch.tensor([0.5], dtype=D64)), x, task).metrics["lam"] == 0.5
    with pytest.raises(ValueError, match="inner_steps"):
        S.make("ridge", inner_steps=-1)
