"""Conjugate gradient and Neumann series on Params against dense float64 solves."""
import pytest
import torch

from metaray.solvers.core import flatten, unflatten
from metaray.solvers.linsolve import IndefiniteError, cg, neumann

D64 = torch.float64


def spd(n: int, eig: list[float] | torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D64))
    return Q @ torch.diag(torch.as_tensor(eig, dtype=D64)) @ Q.T


def as_params(v: torch.Tensor) -> dict:
    # Two keys of different shapes, so the solvers' dict arithmetic is exercised.
    return unflatten(v, {"a": torch.zeros(2, 2, dtype=D64), "b": torch.zeros(v.numel() - 4, dtype=D64)})


def operator(A: torch.Tensor):
    like = as_params(torch.zeros(A.shape[0], dtype=D64))
    return lambda v: unflatten(A @ flatten(v), like)


def rhs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=D64)


def test_cg_matches_dense_solve_and_reports_residuals():
    n = 9
    A, b = spd(n, torch.linspace(0.5, 20.0, n)), rhs(n)
    res = cg(operator(A), as_params(b), tol=1e-12, max_steps=50)
    exact = torch.linalg.solve(A, b)
    q = flatten(res.solution)
    assert float((q - exact).norm() / exact.norm()) < 1e-10
    assert res.converged and not res.indefinite
    assert res.steps <= n + 2  # CG is exact in n steps up to rounding
    # the reported residual is the true one, relative to ||b||
    assert res.residual == pytest.approx(float((b - A @ q).norm() / b.norm()), abs=1e-12)
    assert res.residuals[0] == 1.0 and len(res.residuals) == res.steps + 1
    m = res.metrics()
    assert m["converged"] == 1.0 and m["indefinite"] == 0.0 and m["linsolve_steps"] == float(res.steps)


def test_cg_error_falls_with_steps_and_flags_non_convergence():
    n = 30
    A, b = spd(n, torch.logspace(0, 3, n)), rhs(n)
    exact = torch.linalg.solve(A, b)
    errors = []
    for k in (2, 8, 20, 60):
        res = cg(operator(A), as_params(b), tol=1e-12, max_steps=k)
        errors.append(float((flatten(res.solution) - exact).norm() / exact.norm()))
        if k < 20:
            assert not res.converged and res.steps == k and res.residual > 1e-12
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 1e-8


def test_cg_warm_start_from_the_solution_stops_at_once():
    n = 6
    A, b = spd(n, torch.linspace(1, 4, n)), rhs(n)
    exact = torch.linalg.solve(A, b)
    res = cg(operator(A), as_params(b), x0=as_params(exact), tol=1e-10, max_steps=20)
    assert res.converged and res.steps == 1  # only the product that checks the initial residual


def test_cg_detects_indefinite_operator():
    n = 6
    A, b = spd(n, [-2.0, 1.0, 2.0, 3.0, 4.0, 5.0]), rhs(n)
    stopped = cg(operator(A), as_params(b), tol=1e-12, max_steps=50, on_indefinite="stop")
    assert stopped.indefinite and not stopped.converged
    with pytest.raises(IndefiniteError, match="not positive definite"):
        cg(operator(A), as_params(b), tol=1e-12, max_steps=50, on_indefinite="raise")
    # plain CG still solves this nonsingular symmetric system; the flag stays set
    cont = cg(operator(A), as_params(b), tol=1e-12, max_steps=50, on_indefinite="continue")
    assert cont.indefinite and cont.converged
    exact = torch.linalg.solve(A, b)
    assert float((flatten(cont.solution) - exact).norm() / exact.norm()) < 1e-9


def test_neumann_equals_its_dense_partial_sum_and_residual():
    n, alpha, K = 7, 0.2, 12
    A, b = spd(n, torch.linspace(1.0, 6.0, n)), rhs(n)
    res = neumann(operator(A), as_params(b), alpha=alpha, terms=K)
    M = torch.eye(n, dtype=D64) - alpha * A
    partial = alpha * sum(torch.linalg.matrix_power(M, j) @ b for j in range(K))
    assert torch.allclose(flatten(res.solution), partial, rtol=1e-12, atol=1e-14)
    assert res.steps == K and not res.converged
    expected_residual = float((b - A @ partial).norm() / b.norm())
    assert res.residual == pytest.approx(expected_residual, rel=1e-9)
    assert res.residual == pytest.approx(float((torch.linalg.matrix_power(M, K) @ b).norm() / b.norm()), rel=1e-9)


def test_neumann_error_falls_with_terms_and_converges():
    n = 7
    A, b = spd(n, torch.linspace(1.0, 6.0, n)), rhs(n)
    exact = torch.linalg.solve(A, b)
    errors = [
        float((flatten(neumann(operator(A), as_params(b), alpha=0.25, terms=K).solution) - exact).norm() / exact.norm())
        for K in (5, 20, 80, 300)
    ]
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:]))
    assert errors[-1] < 1e-12
    res = neumann(operator(A), as_params(b), alpha=0.25, terms=1000, tol=1e-10)
    assert res.converged and res.steps < 1000  # stopped early at the tolerance


def test_neumann_divergence_and_indefiniteness_are_reported():
    n = 5
    A, b = spd(n, [1.0, 2.0, 3.0, 4.0, 10.0]), rhs(n)
    diverged = neumann(operator(A), as_params(b), alpha=0.5, terms=30, tol=1e-8)  # α·10 = 5 > 2
    assert not diverged.converged and diverged.residual > 1.0
    B = spd(n, [-1.0, 2.0, 3.0, 4.0, 5.0])
    flagged = neumann(operator(B), as_params(b), alpha=0.1, terms=30)
    assert flagged.indefinite
    with pytest.raises(IndefiniteError):
        neumann(operator(B), as_params(b), alpha=0.1, terms=30, on_indefinite="raise")


def test_zero_right_hand_side_gives_zero_solution():
    A = spd(4, [1.0, 2.0, 3.0, 4.0])
    for res in (cg(operator(A), as_params(torch.zeros(4, dtype=D64))),
                neumann(operator(A), as_params(torch.zeros(4, dtype=D64)), alpha=0.1, terms=5)):
        assert res.converged and float(flatten(res.solution).abs().max()) == 0.0


def test_bad_arguments_raise_clear_errors():
    A, b = spd(4, [1.0, 2.0, 3.0, 4.0]), as_params(rhs(4))
    with pytest.raises(ValueError, match="on_indefinite"):
        cg(operator(A), b, on_indefinite="ignore")
    with pytest.raises(ValueError, match="tol"):
        cg(operator(A), b, tol=-1.0)
    with pytest.raises(ValueError, match="steps"):
        cg(operator(A), b, max_steps=-3)
    with pytest.raises(ValueError, match="alpha"):
        neumann(operator(A), b, alpha=0.0, terms=3)


# ---- batched: B systems at once, each exactly as the single-system solver runs it -----------------------

from metaray.solvers.linsolve import cg_batched, neumann_batched  # noqa: E402


def batch_operator(As: list[torch.Tensor]):
    """Stacked products A_i v_i for stacked Params v (keys as in as_params)."""
    like = as_params(torch.zeros(As[0].shape[0], dtype=D64))

    def matvec(v):
        flat = torch.cat([v[k].reshape(len(As), -1) for k in like], 1)
        out = torch.stack([A @ f for A, f in zip(As, flat)])
        return {k: t.reshape(len(As), *like[k].shape) for k, t in zip(like, out.split([t.numel() for t in like.values()], 1))}

    return matvec


def stacked(vs: list[torch.Tensor]) -> dict:
    ps = [as_params(v) for v in vs]
    return {k: torch.stack([p[k] for p in ps]) for k in ps[0]}


def assert_same_result(batch, i, single):
    one = batch.task(i)
    # to rounding: the batched dot products sum in another order (1.5e-11 on the κ = 1e4 system)
    ref = flatten(single.solution)
    assert float((flatten(one.solution) - ref).norm()) <= 1e-9 * max(float(ref.norm()), 1e-300)
    assert (one.steps, one.converged, one.indefinite, one.diverged) == (single.steps, single.converged, single.indefinite, single.diverged)
    assert len(one.residuals) == len(single.residuals)
    assert one.residuals == pytest.approx(single.residuals, rel=1e-8, abs=1e-14)
    for k, v in single.metrics().items():
        assert float(batch.metrics()[k][i]) == pytest.approx(v, rel=1e-8, abs=1e-14)


def systems():
    """Four systems that stop at different steps: two distinct eigenvalues (CG converges in 2 steps), κ = 100, a
    zero right-hand side, and an indefinite matrix."""
    n = 9
    As = [spd(n, [1.0] * 4 + [3.0] * 5), spd(n, torch.logspace(0, 2, n), seed=3),
          spd(n, torch.linspace(1.0, 3.0, n), seed=4), spd(n, torch.linspace(-1.0, 5.0, n), seed=5)]
    bs = [rhs(n), rhs(n, 2), torch.zeros(n, dtype=D64), rhs(n, 3)]
    return As, bs


@pytest.mark.parametrize("on_indefinite", ["stop", "continue"])
@pytest.mark.parametrize("guess", [False, True])
def test_batched_cg_runs_each_system_as_cg_does(on_indefinite, guess):
    As, bs = systems()
    x0s = [rhs(9, 7 + i) * 0.1 for i in range(4)] if guess else None
    kw = dict(tol=1e-9, max_steps=6, on_indefinite=on_indefinite)
    batch = cg_batched(batch_operator(As), stacked(bs), x0=stacked(x0s) if guess else None, **kw)
    singles = [cg(operator(A), as_params(b), x0=as_params(x0s[i]) if guess else None, **kw) for i, (A, b) in enumerate(zip(As, bs))]
    for i, single in enumerate(singles):
        assert_same_result(batch, i, single)
    # the systems really stopped at different points, so the per-system freezing is what is being tested
    assert len({s.steps for s in singles}) >= 3 and singles[3].indefinite and singles[0].converged


def test_batched_cg_raise_names_the_first_indefinite_system_like_the_loop():
    As, bs = systems()
    As[1] = spd(9, torch.linspace(-2.0, 1.0, 9), seed=6)  # two indefinite systems: the loop raises on system 1
    with pytest.raises(IndefiniteError) as loop:
        for A, b in zip(As, bs):
            cg(operator(A), as_params(b), max_steps=20, on_indefinite="raise")
    with pytest.raises(IndefiniteError) as err:
        cg_batched(batch_operator(As), stacked(bs), max_steps=20, on_indefinite="raise")
    assert str(err.value) == str(loop.value)


@pytest.mark.parametrize("alpha,tol", [(0.4, 1e-6), (0.9, 0.0)])
def test_batched_neumann_runs_each_system_as_neumann_does(alpha, tol):
    As, bs = systems()  # alpha = 0.9 diverges on the badly conditioned system
    batch = neumann_batched(batch_operator(As), stacked(bs), alpha=alpha, terms=25, tol=tol)
    singles = [neumann(operator(A), as_params(b), alpha=alpha, terms=25, tol=tol) for A, b in zip(As, bs)]
    for i, single in enumerate(singles):
        assert_same_result(batch, i, single)
    assert singles[1].diverged and singles[2].converged
