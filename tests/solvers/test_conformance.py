"""The conformance battery: every registered solver against the problem contract.

Parametrized over ``metaray.solvers.names()``, so a solver registered later runs it too. The contract (README
"Writing your own problem", ARCHITECTURE.md) as checked here:

- a problem is any object with ``init_inner``, ``inner_loss`` and ``outer_loss`` (duck typing); ``metrics``
  and ``project_inner`` are optional and looked up;
- ``init_inner`` may return x's own tensors uncopied: the hypergradient equals the one with a copy;
- the gradient has x's keys, shapes and dtype; outer params the losses never read get exact zeros; one that
  only the outer loss reads gets exactly ∂F/∂x;
- float32 and float64 both work and agree;
- ``evaluate(x, task, state)`` reaches the inner solution ``hypergrad(x, task, state)`` reached (same losses);
- a non-scalar or NaN loss, or a non-dict ``init_inner``, fails with an error naming the method;
- unknown and out-of-range options fail with the valid ones named;
- on a small problem where the solver is exact in a limit, the hypergradient matches finite differences of an
  independently computed reference.

A solver that needs more than the three methods declares it in ``Solver.problem_needs``; BUILDERS below makes
such problems. A need the battery does not know fails the battery (it is never a skip).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

import metaray.solvers as S
from metaray.solvers.core import NonFiniteError
from metaray.solvers.learned import OptimizerNet, init_state, init_weights, learned_unroll

D64 = torch.float64
NAMES = S.names()
STATEFUL_VARIANTS = [("ift-cg", {"warm_start": True}), ("ift-neumann", {"warm_start": True}), ("sgld", {"warm_start": True})]


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# Problems, all plain objects (duck typing): no BilevelProblem base class, no project_inner, no metrics
# ----------------------------------------------------------------------------------------------------------

N, M = 4, 3  # inner dimension, dimension of the outer "h"
MU, GAMMA, RHO = 0.5, 0.5, 0.1


class Quadratic:
    """f(x, y) = ½ (w − C h)ᵀ A (w − C h) + μ/2 ‖w − γ w₀‖² − bᵀw,   F(x, y) = ½‖w − t‖² + ¼‖e‖² + ρ/2‖h‖²,
    y₀ = Ψ₀(x) = w₀. x = {w0, h, e, unused}: the inner loss reads w0 too, with a gradient in w0 that is not
    zero at w = w₀ (γ ≠ 1), so an aliased y₀ = x['w0'] that confused ∂f/∂w with df/dw would show; e is read
    only by F, and unused by nobody. H = A + μI has eigenvalues in [1.5, 3.5]."""

    def __init__(self, dtype=D64, alias: bool = True):
        g = _gen(0)
        Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=D64))
        self.A = (Q @ torch.diag(torch.linspace(1.0, 3.0, N, dtype=D64)) @ Q.T).to(dtype)
        self.C = torch.randn(N, M, generator=g, dtype=D64).to(dtype)
        self.t = torch.randn(N, generator=g, dtype=D64).to(dtype)
        self.alias = alias

    def init_inner(self, x, task):
        return {"w": x["w0"] if self.alias else x["w0"].clone()}

    def grad_f(self, x, w, task):  # ∇_w f, written out for the references
        return self.A @ (w - self.C @ x["h"]) + MU * (w - GAMMA * x["w0"]) - task["b"]

    def inner_loss(self, x, y, task):
        r = y["w"] - self.C @ x["h"]
        return 0.5 * r @ (self.A @ r) + 0.5 * MU * ((y["w"] - GAMMA * x["w0"]) ** 2).sum() - task["b"] @ y["w"]

    def outer_loss(self, x, y, task):
        return 0.5 * ((y["w"] - self.t) ** 2).sum() + 0.25 * (x["e"] ** 2).sum() + 0.5 * RHO * (x["h"] ** 2).sum()

    def y_star(self, x, task, lam: float = 0.0):
        """argmin_w f(x, w) (+ λ/2‖w − w₀‖², iMAML's proximal term), by a dense solve."""
        H = self.A + (MU + lam) * torch.eye(N, dtype=self.A.dtype)
        return torch.linalg.solve(H, self.A @ self.C @ x["h"] + (MU * GAMMA + lam) * x["w0"] + task["b"])


def quad_x(dtype=D64) -> dict:
    g = _gen(1)
    return {k: torch.randn(*s, generator=g, dtype=D64).to(dtype) for k, s in (("w0", (N,)), ("h", (M,)), ("e", (2,)), ("unused", (3,)))}


def quad_task(dtype=D64, seed: int = 2) -> dict:
    return {"b": torch.randn(N, generator=_gen(seed), dtype=D64).to(dtype)}


class Ridge:
    """A closed-form head on linear features: X = X_s P, W* = argmin ½‖XW − Y‖² + λ/2‖W‖², λ = exp(log_lam);
    F = ½‖X_q P W − Y_q‖² + ¼‖e‖²."""

    def __init__(self, dtype=D64, alias: bool = True):
        self.dtype, self.alias = dtype, alias

    def ridge_system(self, x, task):
        return task["Xs"] @ x["proj"], task["Ys"], torch.exp(x["log_lam"])

    def init_inner(self, x, task):
        return {"head.weight": torch.zeros(x["proj"].shape[1], task["Ys"].shape[1], dtype=self.dtype)}

    def inner_loss(self, x, y, task):
        X, Y, lam = self.ridge_system(x, task)
        return 0.5 * ((X @ y["head.weight"] - Y) ** 2).sum() + 0.5 * lam * (y["head.weight"] ** 2).sum()

    def outer_loss(self, x, y, task):
        return 0.5 * ((task["Xq"] @ x["proj"] @ y["head.weight"] - task["Yq"]) ** 2).sum() + 0.25 * (x["e"] ** 2).sum()

    def y_star(self, x, task):
        X, Y, lam = self.ridge_system(x, task)
        return {"head.weight": torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=X.dtype), X.T @ Y)}


def ridge_x(dtype=D64) -> dict:
    g = _gen(3)
    return {
        "proj": (0.5 * torch.randn(5, 3, generator=g, dtype=D64)).to(dtype),
        "log_lam": torch.tensor(0.3, dtype=D64).to(dtype),
        "e": torch.randn(2, generator=g, dtype=D64).to(dtype),
        "unused": torch.randn(3, generator=g, dtype=D64).to(dtype),
    }


def ridge_task(dtype=D64, seed: int = 4) -> dict:
    g = _gen(seed)
    Ys = torch.nn.functional.one_hot(torch.arange(6) % 2, 2).to(D64)
    return {k: v.to(dtype) for k, v in {"Xs": torch.randn(6, 5, generator=g, dtype=D64), "Ys": Ys,
                                          "Xq": torch.randn(4, 5, generator=g, dtype=D64),
                                          "Yq": torch.randn(4, 2, generator=g, dtype=D64)}.items()}


class Optimizee:
    """A learned optimizer's task: θ₀ from the task (independent of the optimizer weights x), f = F = a convex
    quadratic in θ. ``alias``: init_inner hands out the task's own θ₀ tensor, uncopied."""

    def __init__(self, dtype=D64, alias: bool = True):
        self.alias = alias

    def init_inner(self, x, task):
        return {"theta": task["theta0"] if self.alias else task["theta0"].clone()}

    def inner_loss(self, x, y, task):
        th = y["theta"]
        return 0.5 * th @ (task["A"] @ th) - task["b"] @ th

    def outer_loss(self, x, y, task):
        return self.inner_loss(x, y, task)


L2O_NET = dict(arch="lstm", output_scale=0.1)


def optimizee_x(dtype=D64) -> dict:
    return init_weights(OptimizerNet(**L2O_NET), hidden=4, layers=1, seed=0, dtype=dtype)


def optimizee_task(dtype=D64, seed: int = 5) -> dict:
    g = _gen(seed)
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=D64))
    A = Q @ torch.diag(torch.linspace(0.5, 2.0, N, dtype=D64)) @ Q.T
    return {k: v.to(dtype) for k, v in {"A": A, "b": torch.randn(N, generator=g, dtype=D64),
                                          "theta0": torch.randn(N, generator=g, dtype=D64)}.items()}


def metasgd_x(dtype=D64) -> dict:
    x = quad_x(dtype)
    x["lr.w"] = torch.full((N,), 0.2, dtype=dtype) + 0.01 * torch.arange(N, dtype=dtype)
    return x


@dataclass
class Build:
    """What the battery builds for a solver: problem factory (dtype, alias), x, task, the key only F reads
    (its exact gradient is known: ½ e), and the key no loss reads (None where x's keys are fixed)."""

    problem: Callable[..., Any]
    x: Callable[..., dict]
    task: Callable[..., dict]
    outer_only: str | None = "e"
    unused: str | None = "unused"


BUILDERS: dict[tuple[str, ...], Build] = {
    (): Build(Quadratic, quad_x, quad_task),
    ("ridge_system",): Build(Ridge, ridge_x, ridge_task),
    ("step_sizes",): Build(Quadratic, metasgd_x, quad_task),
    ("optimizee",): Build(Optimizee, optimizee_x, optimizee_task, outer_only=None, unused=None),
}

# Options for a quick call of each solver on its battery problem (inner_lr · λmax(H) = 0.7 < 2 everywhere).
QUICK: dict[str, dict] = {
    "rad": dict(inner_steps=5, inner_lr=0.2),
    "maml": dict(inner_steps=5, inner_lr=0.2),
    "fad": dict(inner_steps=5, inner_lr=0.2),
    "trad": dict(inner_steps=5, inner_lr=0.2, truncate=2),
    "darts": dict(inner_steps=3, inner_lr=0.2),
    "fomaml": dict(inner_steps=5, inner_lr=0.2),
    "reptile": dict(inner_steps=5, inner_lr=0.2),
    "metasgd": dict(inner_steps=5, inner_lr=0.2),
    "imaml": dict(inner_steps=30, inner_lr=0.2, lam=1.0, cg_steps=10),
    "ift-cg": dict(inner_steps=30, inner_lr=0.2),
    "ift-neumann": dict(inner_steps=30, inner_lr=0.2, neumann_terms=30),
    "ridge": dict(),
    "l2o": dict(inner_steps=5, horizon=5, **{k: v for k, v in L2O_NET.items() if k == "arch"}),
    "bda": dict(inner_steps=10, inner_lr=0.2),
    "bda-pessimistic": dict(inner_steps=10, inner_lr=0.2),
    "bvfim": dict(inner_steps=10, barrier_steps=10),
    "sgld": dict(inner_steps=10, samples=5, inner_lr=0.05),
    "fsla": dict(inner_lr=0.2),
}


def build_for(name: str) -> Build:
    needs = S.get(name).problem_needs
    assert needs in BUILDERS, (
        f"solver {name!r} declares problem_needs={needs!r}, which the conformance battery cannot build: add a "
        f"builder to BUILDERS in {__file__}"
    )
    return BUILDERS[needs]


def quick(name: str, **extra) -> S.Solver:
    return S.make(name, **{**QUICK.get(name, {}), **extra})


def rel(a: dict, b: dict) -> float:
    """One global relative error ‖a − b‖ / ‖b‖ over all keys (NOTES.md: per-tensor errors blow up on zeros)."""
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in b)
    den = sum(float((b[k].double() ** 2).sum()) for k in b)
    return math.sqrt(num) / max(math.sqrt(den), 1e-300)


# ----------------------------------------------------------------------------------------------------------
# The contract
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_duck_typed_problem_gives_a_full_gradient(name):
    b = build_for(name)
    problem, x, task = b.problem(), b.x(), b.task()
    assert not hasattr(problem, "project_inner") and not hasattr(problem, "metrics")
    hg = quick(name).hypergrad(problem, x, task)
    assert hg.grad.keys() == x.keys()
    for k in x:
        assert hg.grad[k].shape == x[k].shape and hg.grad[k].dtype == x[k].dtype, k
        assert torch.isfinite(hg.grad[k]).all(), k
    assert math.isfinite(hg.outer_loss) and math.isfinite(hg.inner_loss)
    assert sum(float(g.abs().sum()) for g in hg.grad.values()) > 0  # not trivially zero
    ev = quick(name).evaluate(problem, x, task)
    assert all(float(g.abs().max()) == 0.0 for g in ev.grad.values())


def with_projection(cls):
    """The problem class with an explicit identity ``project_inner`` (the optional method, present)."""
    return type(cls.__name__ + "WithProjection", (cls,), {"project_inner": lambda self, x, y: dict(y)})


@pytest.mark.parametrize("name", NAMES)
def test_aliased_inner_start_equals_a_copied_one(name):
    """init_inner returning x's own tensors (MAML's y₀ = x, uncopied) must not change the hypergradient."""
    b = build_for(name)
    x, task = b.x(), b.task()
    problem = with_projection(b.problem)  # this test is about aliasing alone, also where duck typing failed
    aliased = quick(name).hypergrad(problem(alias=True), x, task)
    copied = quick(name).hypergrad(problem(alias=False), x, task)
    assert rel(aliased.grad, copied.grad) < 1e-12, rel(aliased.grad, copied.grad)
    assert aliased.outer_loss == pytest.approx(copied.outer_loss, rel=1e-12)
    before = b.x()
    assert all(torch.equal(x[k], before[k]) for k in x)  # x itself is untouched


@pytest.mark.parametrize("name", NAMES)
def test_unused_outer_params_get_zeros_and_outer_only_ones_the_partial(name):
    b = build_for(name)
    x, task = b.x(), b.task()
    hg = quick(name).hypergrad(b.problem(), x, task)
    if b.unused is not None:
        assert float(hg.grad[b.unused].abs().max()) == 0.0
    if b.outer_only is not None and name != "reptile":  # Reptile's step is the displacement only, by definition
        torch.testing.assert_close(hg.grad[b.outer_only], 0.5 * x[b.outer_only], rtol=1e-10, atol=1e-12)
    if b.unused is None:  # x's keys are fixed by the solver: an extra key is refused by name
        with pytest.raises(ValueError, match="unexpected"):
            quick(name).hypergrad(b.problem(), {**x, "stray": torch.zeros(2, dtype=D64)}, task)


@pytest.mark.parametrize("name", NAMES)
def test_float32_works_and_agrees_with_float64(name):
    b = build_for(name)
    hg64 = quick(name).hypergrad(b.problem(D64), b.x(D64), b.task(D64))
    hg32 = quick(name).hypergrad(b.problem(torch.float32), b.x(torch.float32), b.task(torch.float32))
    assert all(g.dtype == torch.float32 for g in hg32.grad.values())
    assert rel(hg32.grad, hg64.grad) < 1e-4, rel(hg32.grad, hg64.grad)


def _states(solver: S.Solver, problem, x, task) -> list:
    """None, and for a stateful solver the state after two calls (what a run carries)."""
    if not solver.stateful:
        return [None]
    s1 = solver.hypergrad(problem, x, task).state
    s2 = solver.hypergrad(problem, x, task, s1).state
    return [None, s2]


@pytest.mark.parametrize("name,extra", [(n, {}) for n in NAMES] + STATEFUL_VARIANTS)
def test_evaluate_reaches_the_inner_solution_hypergrad_reached(name, extra):
    """Validation and meta-test run ``evaluate``: it must adapt with the solver's own inner dynamics and state."""
    b = build_for(name)
    problem, x, task = b.problem(), b.x(), b.task()
    solver = quick(name, **extra)
    for state in _states(solver, problem, x, task):
        hg = solver.hypergrad(problem, x, task, state)
        ev = solver.evaluate(problem, x, task, state)
        assert ev.outer_loss == pytest.approx(hg.outer_loss, rel=1e-10, abs=1e-12), state is None
        assert ev.inner_loss == pytest.approx(hg.inner_loss, rel=1e-10, abs=1e-12), state is None


# ----------------------------------------------------------------------------------------------------------
# Bad problem returns and bad options: clear errors naming what is wrong
# ----------------------------------------------------------------------------------------------------------


class Faulty:
    """Wraps a problem and breaks one method's return: a non-scalar loss, a NaN loss or a non-dict y₀."""

    def __init__(self, problem, method: str, fault: str):
        self.problem, self.method, self.fault = problem, method, fault
        self.calls = 0

    def __getattr__(self, attr):  # ridge_system and friends pass through
        return getattr(self.problem, attr)

    def _break(self, method, value):
        if method != self.method:
            return value
        self.calls += 1
        if self.fault == "nonscalar":
            return value * torch.ones(2, dtype=value.dtype)
        if self.fault == "nan":
            return value * float("nan")
        return list(value.values())  # "nondict"

    def init_inner(self, x, task):
        return self._break("init_inner", self.problem.init_inner(x, task))

    def inner_loss(self, x, y, task):
        return self._break("inner_loss", self.problem.inner_loss(x, y, task))

    def outer_loss(self, x, y, task):
        return self._break("outer_loss", self.problem.outer_loss(x, y, task))


FAULTS = [("inner_loss", "nonscalar"), ("inner_loss", "nan"), ("outer_loss", "nonscalar"), ("outer_loss", "nan"),
          ("init_inner", "nondict")]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("method,fault", FAULTS)
def test_bad_problem_returns_fail_clearly(name, method, fault):
    b = build_for(name)
    faulty = Faulty(b.problem(), method, fault)
    expected = NonFiniteError if fault == "nan" else (TypeError, ValueError)
    try:
        quick(name).hypergrad(faulty, b.x(), b.task())
    except expected as e:
        if fault != "nan":
            assert method in str(e), f"{name}: the error does not name {method}: {e}"
            assert not isinstance(e, NonFiniteError)
        else:
            assert "not finite" in str(e)
        return
    assert faulty.calls == 0, f"{name}: a {fault} {method} was accepted silently"  # the solver never calls it


@pytest.mark.parametrize("name", NAMES)
def test_bad_options_name_the_valid_ones(name):
    with pytest.raises(ValueError, match="valid options:.*inner_steps"):
        S.make(name, inner_stepz=3)
    with pytest.raises(ValueError, match="inner_steps"):
        S.make(name, inner_steps=-1)
    with pytest.raises(ValueError, match="inner_lr"):
        S.make(name, inner_lr=0.0)
    with pytest.raises(ValueError, match="finite"):
        S.make(name, inner_lr=float("nan"))
    with pytest.raises(TypeError, match="inner_steps"):
        S.make(name, inner_steps="5")


# ----------------------------------------------------------------------------------------------------------
# Exact in a limit: finite differences of an independently computed reference
# ----------------------------------------------------------------------------------------------------------

QP = Quadratic()


def unrolled_ref(x, task, steps: int, lr, start=None):
    """w_T of plain gradient descent from w₀ (or a given constant start), ∇f written out (no autograd)."""
    w = x["w0"] if start is None else start
    for _ in range(steps):
        w = w - lr * QP.grad_f(x, w, task)
    return w


def bda_ref(x, task, o, sign: float):
    """Eq. 32 written out: w ← w − (±ρ_t s_u (w − t) + (1 − ρ_t) s_l ∇f)."""
    from metaray.solvers.bda import rho_at

    w = x["w0"]
    for t in range(1, o["inner_steps"] + 1):
        rho = rho_at(t, o.get("rho0", 0.5), o.get("rho_schedule", "inverse"), o.get("rho_decay", 0.9))
        w = w - (sign * rho * o["inner_lr"] * (w - QP.t) + (1 - rho) * o["inner_lr"] * QP.grad_f(x, w, task))
    return w


def F(x, w):
    return QP.outer_loss(x, {"w": w}, None)


@dataclass
class Exact:
    """An exact-limit case: options, the reference φ(x) whose gradient the solver must give, and a tolerance.
    ``calls`` > 1: call the solver repeatedly at fixed x carrying its state (single-loop / stateful methods)."""

    options: dict
    phi: Callable[[dict, dict], torch.Tensor] | None = None
    tol: float = 1e-7
    calls: int = 1
    expected: Callable[[dict, dict], dict] | None = None  # a closed form instead of finite differences
    extra: dict = field(default_factory=dict)


def _frozen(x, task, steps, lr):
    return unrolled_ref({k: v.detach() for k, v in x.items()}, task, steps, lr).detach()


EXACT: dict[str, Exact] = {
    # φ_T(x) = F(x, w_T(x)): reverse, forward and checkpoint-free second-order MAML are all exact.
    "rad": Exact(dict(inner_steps=6, inner_lr=0.2), lambda x, t: F(x, unrolled_ref(x, t, 6, 0.2))),
    "maml": Exact(dict(inner_steps=6, inner_lr=0.2), lambda x, t: F(x, unrolled_ref(x, t, 6, 0.2))),
    "fad": Exact(dict(inner_steps=6, inner_lr=0.2), lambda x, t: F(x, unrolled_ref(x, t, 6, 0.2))),
    # TRAD: the gradient of F with w_{T−M} frozen at its value (eq. 20's partial sum).
    "trad": Exact(dict(inner_steps=6, inner_lr=0.2, truncate=2),
                  lambda x, t: F(x, unrolled_ref(x, t, 2, 0.2, start=_frozen(XE, t, 4, 0.2)))),
    # DARTS with T = 3: two plain steps (frozen), then one differentiated step; the central difference of ∇_x f
    # is exact for a quadratic f, so DARTS equals the one-step hypergradient up to rounding.
    "darts": Exact(dict(inner_steps=3, inner_lr=0.2, fd_eps=1e-3),
                   lambda x, t: F(x, unrolled_ref(x, t, 1, 0.2, start=_frozen(XE, t, 2, 0.2))), tol=1e-6),
    # FOMAML is exact when no inner step is taken: dF(x, Ψ₀(x))/dx.
    "fomaml": Exact(dict(inner_steps=0, inner_lr=0.2), lambda x, t: F(x, x["w0"])),
    # Reptile with one normalized step: (w₀ − w₁)/s = ∇_w f(x, w₀) on w0, nothing else.
    "reptile": Exact(dict(inner_steps=1, inner_lr=0.2, normalize=True), expected=lambda x, t: {
        "w0": QP.grad_f(x, x["w0"], t), **{k: torch.zeros_like(v) for k, v in x.items() if k != "w0"}}),
    "metasgd": Exact(dict(inner_steps=6), lambda x, t: F(x, unrolled_ref(x, t, 6, x["lr.w"]))),
    # Implicit solvers at a converged inner solution: φ*(x) = F(x, y*(x)) from a dense solve.
    "ift-cg": Exact(dict(inner_steps=200, inner_lr=0.4, cg_steps=N), lambda x, t: F(x, QP.y_star(x, t)), tol=1e-8),
    "ift-neumann": Exact(dict(inner_steps=200, inner_lr=0.4, neumann_terms=300), lambda x, t: F(x, QP.y_star(x, t)), tol=1e-8),
    "imaml": Exact(dict(inner_steps=200, inner_lr=0.3, lam=1.0, cg_steps=N), lambda x, t: F(x, QP.y_star(x, t, lam=1.0)), tol=1e-8),
    "ridge": Exact(dict(), lambda x, t: Ridge().outer_loss(x, Ridge().y_star(x, t), t), tol=1e-8),
    "bda": Exact(dict(inner_steps=8, inner_lr=0.2), lambda x, t: F(x, bda_ref(x, t, dict(inner_steps=8, inner_lr=0.2), 1.0))),
    "bda-pessimistic": Exact(dict(inner_steps=8, inner_lr=0.2),
                             lambda x, t: F(x, bda_ref(x, t, dict(inner_steps=8, inner_lr=0.2), -1.0))),
    # BVFIM's first-order gradient tends to the implicit one as (μ₁, μ₂, θ, τ) → 0 together, given enough barrier
    # steps (measured here: 0.024 at 1e-3, 0.0049 at 1e-4 with 1000 steps; 0.071 at 1e-4 with 300).
    "bvfim": Exact(dict(inner_steps=200, inner_lr=0.2, barrier_steps=1000, barrier_lr=0.2, mu1=1e-4, mu2=1e-4,
                        theta=1e-4, tau=1e-4, decay=0.0), lambda x, t: F(x, QP.y_star(x, t)), tol=0.02),
    # HPO-SGLD with one noiseless Langevin step is the exact one-step hypergradient (F is quadratic in y).
    "sgld": Exact(dict(inner_steps=1, samples=1, inner_lr=0.2, noise_scale=0.0), lambda x, t: F(x, unrolled_ref(x, t, 1, 0.2))),
    # FSLA at fixed x: y, v and d converge to y*, H⁻¹∇_y F and the implicit hypergradient.
    "fsla": Exact(dict(inner_lr=0.4, beta=0.4, eta=1.0), lambda x, t: F(x, QP.y_star(x, t)), tol=1e-8, calls=150),
    # l2o: the truncated-BPTT meta-loss of one segment, built by learned_unroll with φ as plain tensors.
    "l2o": Exact(dict(inner_steps=5, horizon=5, arch="lstm", second_order=True), None, tol=1e-6),
}


def l2o_meta_loss(phi, task):
    o = S.make("l2o", **EXACT["l2o"].options).options
    net = o.net()
    y0 = {"theta": task["theta0"]}
    with torch.enable_grad():
        return learned_unroll(Optimizee(), net, phi, y0, init_state(net, phi, N, D64), task, 5, options=o)[2].detach()


XE = quad_x()


def finite_differences(phi, x: dict, task, h: float = 1e-5) -> dict:
    grad = {}
    for k, v in x.items():
        g = torch.zeros_like(v).reshape(-1)
        for i in range(v.numel()):
            plus = {kk: vv.clone() for kk, vv in x.items()}
            minus = {kk: vv.clone() for kk, vv in x.items()}
            plus[k].reshape(-1)[i] += h
            minus[k].reshape(-1)[i] -= h
            g[i] = (phi(plus, task) - phi(minus, task)) / (2 * h)
        grad[k] = g.reshape(v.shape)
    return grad


@pytest.mark.parametrize("name", NAMES)
def test_exact_in_its_limit_against_finite_differences(name):
    assert name in EXACT, f"solver {name!r} has no exact-limit case in the conformance battery: add one to EXACT"
    case, b = EXACT[name], build_for(name)
    problem, task = b.problem(), b.task()
    x = XE if b.x is quad_x else b.x()
    solver = S.make(name, **case.options)
    state = None
    for _ in range(case.calls):
        hg = solver.hypergrad(problem, x, task, state)
        state = hg.state
    if case.expected is not None:
        ref = case.expected(x, task)
    else:
        phi = case.phi if case.phi is not None else l2o_meta_loss
        with torch.no_grad():
            ref = finite_differences(lambda xx, tt: phi(xx, tt), x, task)
    err = rel(hg.grad, ref)
    assert err < case.tol, f"{name}: relative error {err:.3e} against the reference (tolerance {case.tol:.0e})"
