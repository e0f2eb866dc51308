"""Small bilevel problems from the papers, with exact references, for tests and benchmarks (all float64).

1. ``Toy1DProblem`` — the synthetic 1D problem of paper 003 (Kim & Hospedales, section 4.1):

       L_V(λ, θ) = (λ − θ)² + (θ − ½)²,      L_T(λ, θ) = θ³/3 − (1 − λ²) θ,      λ, θ ∈ [0, 1]

   θ*(λ) = √(1 − λ²). The noisy variant (eq. 28) draws ε₁, ε₂ ~ U(−a, a) (a = 0.3) on *every* call of the
   inner loss: L_T = (1/3 + ε₁) θ³ − (1 − λ² + ε₂) θ. The noise comes from the task's ``torch.Generator``
   (``Toy1DSource.sample(key)`` seeds it from the task key), so runs are reproducible. θ is clamped to [0, 1]
   after every inner step (``project_inner``); λ is clamped by the caller's outer loop (``project_outer``).

2. ``NonUniqueToyProblem`` — the BDA toy whose lower level has many solutions (survey 001 §7; Liu et al.
   ICML 2020): x, y₁, y₂ ∈ Rⁿ,

       F(x, y) = ½‖x − y₂‖² + ½‖y₁ − 1‖²,      f(x, y) = ½‖y₁‖² − ⟨x, y₁⟩      (f ignores y₂)

   S(x) = {y₁ = x, y₂ arbitrary}; the optimistic value is φ(x) = ½‖x − 1‖², so x* = y₁* = y₂* = 1. Plain
   unrolled descent on f never moves y₂ from its start 0, so it minimizes ½‖x‖² + ½‖x − 1‖² and stops at ½.
   f is negative near its minimum (f(x, x) = −½‖x‖²): the case where a log of the value function breaks.

3. ``LeastSquaresBilevel`` — the quadratic of paper 004 (Li, Gu & Huang, experiments section): dimension 5,
   10,000 samples, A_o, A_iλ, A_iω ∈ R^{N×5} and λ, ω, ω_λ ∈ R⁵ uniform, b_o = A_o ω_λ + σ_o,
   b_i = A_iλ λ + A_iω ω + σ_i (Gaussian noise of variance 0.1):

       F(λ, ω) = (1/N) ‖A_o ω − b_o‖²,      G(λ, ω) = (1/N) ‖A_iλ λ + A_iω ω − b_i‖²

   The paper writes sums; we use means so that step sizes do not scale with N (the paper's step 2·10⁻⁵ on the
   sum is 0.2 on the mean). Exact inner solution, implicit hypergradient (Proposition 1) and outer optimum
   in closed form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..solvers.core import BilevelProblem, Params
from .base import TaskKey, key_generator

_F64 = torch.float64

# ----------------------------------------------------------------------------------------------------------
# 1. Paper 003's synthetic 1D problem
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Toy1DTask:
    """One instance: ``noise`` = a (0 for the clean problem), θ⁽⁰⁾ and the generator the noise is drawn from."""

    noise: float = 0.0
    theta0: float = 0.5
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.noise, (int, float)) and 0.0 <= self.noise < 1.0 / 3.0):
            raise ValueError(f"noise must be in [0, 1/3) (the θ³ coefficient 1/3 + ε₁ must stay > 0), got {self.noise!r}")
        if not (isinstance(self.theta0, (int, float)) and 0.0 <= self.theta0 <= 1.0):
            raise ValueError(f"theta0 must be in [0, 1], got {self.theta0!r}")
        if self.noise > 0 and self.generator is None:
            self.generator = torch.Generator().manual_seed(0)


@dataclass(frozen=True)
class Toy1DSource:
    """Task source of the 1D problem: ``sample(key)`` gives a task whose noise generator is seeded from the key."""

    noise: float = 0.0
    theta0: float = 0.5
    seed: int = 0

    def sample(self, key: TaskKey) -> Toy1DTask:
        return Toy1DTask(self.noise, self.theta0, key_generator(key, self.seed) if self.noise > 0 else None)


class Toy1DProblem(BilevelProblem):
    """x = {"lam": 0-d tensor}, y = {"theta": 0-d tensor}; θ⁽⁰⁾ = task.theta0, independent of λ."""

    def initial_params(self, lam: float = 0.5) -> Params:
        return {"lam": torch.tensor(float(lam), dtype=_F64)}

    def init_inner(self, x: Params, task: Toy1DTask) -> Params:
        return {"theta": torch.tensor(float(task.theta0), dtype=x["lam"].dtype)}

    def inner_loss(self, x: Params, y: Params, task: Toy1DTask) -> Tensor:
        lam, theta = x["lam"], y["theta"]
        e1 = e2 = 0.0
        if task.noise > 0:  # eq. 28: a fresh draw on every call
            e = (torch.rand(2, generator=task.generator, dtype=_F64) * 2 - 1) * task.noise
            e1, e2 = float(e[0]), float(e[1])
        return (1.0 / 3.0 + e1) * theta**3 - (1.0 - lam**2 + e2) * theta

    def outer_loss(self, x: Params, y: Params, task: Toy1DTask) -> Tensor:
        lam, theta = x["lam"], y["theta"]
        return (lam - theta) ** 2 + (theta - 0.5) ** 2

    def project_inner(self, x: Params, y: Params) -> Params:
        return {"theta": y["theta"].clamp(0.0, 1.0)}

    @staticmethod
    def project_outer(x: Params) -> Params:
        return {"lam": x["lam"].detach().clamp(0.0, 1.0)}

    # ---- exact references -------------------------------------------------------------------------------

    @staticmethod
    def theta_star(lam: Tensor | float) -> Tensor:
        """θ*(λ) = √(1 − λ²), the global inner minimum on [0, 1] of the clean problem."""
        lam = torch.as_tensor(lam, dtype=_F64)
        return torch.sqrt(1.0 - lam**2)

    @classmethod
    def reduced_outer(cls, lam: Tensor | float) -> Tensor:
        """φ(λ) = L_V(λ, θ*(λ)), the clean problem's outer objective."""
        lam = torch.as_tensor(lam, dtype=_F64)
        th = cls.theta_star(lam)
        return (lam - th) ** 2 + (th - 0.5) ** 2

    @classmethod
    def exact_hypergrad(cls, lam: Tensor | float) -> Tensor:
        """dφ/dλ = 2(λ − θ) + [−2(λ − θ) + 2(θ − ½)] · dθ*/dλ with dθ*/dλ = −λ/θ (implicit function theorem)."""
        lam = torch.as_tensor(lam, dtype=_F64)
        th = cls.theta_star(lam)
        return 2 * (lam - th) + (-2 * (lam - th) + 2 * (th - 0.5)) * (-lam / th)


# ----------------------------------------------------------------------------------------------------------
# 2. BDA toy with a non-unique lower level
# ----------------------------------------------------------------------------------------------------------


class NonUniqueToyProblem(BilevelProblem):
    """x = {"x": Rⁿ}, y = {"y1": Rⁿ, "y2": Rⁿ}; y starts at 0, independent of x. The task is ignored."""

    def __init__(self, n: int = 10):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        self.n = n

    def initial_params(self) -> Params:
        return {"x": torch.zeros(self.n, dtype=_F64)}

    def init_inner(self, x: Params, task=None) -> Params:
        z = torch.zeros(self.n, dtype=x["x"].dtype)
        return {"y1": z, "y2": z.clone()}

    def inner_loss(self, x: Params, y: Params, task=None) -> Tensor:
        return 0.5 * (y["y1"] ** 2).sum() - (x["x"] * y["y1"]).sum()

    def outer_loss(self, x: Params, y: Params, task=None) -> Tensor:
        return 0.5 * ((x["x"] - y["y2"]) ** 2).sum() + 0.5 * ((y["y1"] - 1.0) ** 2).sum()

    @staticmethod
    def optimistic_value(x: Tensor) -> Tensor:
        """φ(x) = min over S(x) of F = ½‖x − 1‖²."""
        return 0.5 * ((x - 1.0) ** 2).sum()


# ----------------------------------------------------------------------------------------------------------
# 3. Paper 004's least-squares bilevel problem
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LeastSquaresTask:
    A_o: Tensor
    b_o: Tensor
    A_il: Tensor
    A_iw: Tensor
    b_i: Tensor
    info: dict = field(default_factory=dict)

    def rows(self, index: Tensor) -> "LeastSquaresTask":
        """A minibatch ξ: the same rows of the outer and inner data (for stochastic single-loop runs)."""
        return LeastSquaresTask(self.A_o[index], self.b_o[index], self.A_il[index], self.A_iw[index], self.b_i[index], self.info)

    def minibatch(self, generator: torch.Generator, size: int) -> "LeastSquaresTask":
        n = self.A_o.shape[0]
        if not (isinstance(size, int) and 1 <= size <= n):
            raise ValueError(f"minibatch size must be an int in [1, {n}], got {size!r}")
        return self.rows(torch.randperm(n, generator=generator)[:size])


def least_squares_task(dim: int = 5, samples: int = 10_000, *, seed: int = 0, noise_var: float = 0.1) -> LeastSquaresTask:
    """Paper 004's synthetic data: uniform matrices and points, Gaussian noise of variance ``noise_var``."""
    if dim < 1 or samples < dim:
        raise ValueError(f"need dim >= 1 and samples >= dim, got dim={dim}, samples={samples}")
    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g, dtype=_F64)  # noqa: E731
    A_o, A_il, A_iw = u(samples, dim), u(samples, dim), u(samples, dim)
    lam, w, w_lam = u(dim), u(dim), u(dim)
    std = math.sqrt(noise_var)
    b_o = A_o @ w_lam + std * torch.randn(samples, generator=g, dtype=_F64)
    b_i = A_il @ lam + A_iw @ w + std * torch.randn(samples, generator=g, dtype=_F64)
    return LeastSquaresTask(A_o, b_o, A_il, A_iw, b_i, {"lam": lam, "w": w, "w_lam": w_lam})


class LeastSquaresBilevel(BilevelProblem):
    """x = {"lam": R^d}, y = {"w": R^d}; ω starts at 0. The outer loss has no direct λ term."""

    def initial_params(self, task: LeastSquaresTask, value: float = 0.0) -> Params:
        return {"lam": torch.full((task.A_il.shape[1],), float(value), dtype=_F64)}

    def init_inner(self, x: Params, task: LeastSquaresTask) -> Params:
        return {"w": torch.zeros(task.A_iw.shape[1], dtype=x["lam"].dtype)}

    def inner_loss(self, x: Params, y: Params, task: LeastSquaresTask) -> Tensor:
        r = task.A_il @ x["lam"] + task.A_iw @ y["w"] - task.b_i
        return (r @ r) / r.shape[0]

    def outer_loss(self, x: Params, y: Params, task: LeastSquaresTask) -> Tensor:
        r = task.A_o @ y["w"] - task.b_o
        return (r @ r) / r.shape[0]

    # ---- exact references -------------------------------------------------------------------------------

    @staticmethod
    def inner_solution(task: LeastSquaresTask, lam: Tensor) -> tuple[Tensor, Tensor]:
        """(ω_λ, dω_λ/dλ): ω_λ = (A_iωᵀA_iω)⁻¹ A_iωᵀ (b_i − A_iλ λ), affine in λ."""
        H = task.A_iw.T @ task.A_iw
        w = torch.linalg.solve(H, task.A_iw.T @ (task.b_i - task.A_il @ lam))
        J = -torch.linalg.solve(H, task.A_iw.T @ task.A_il)
        return w, J

    @classmethod
    def exact_hypergrad(cls, task: LeastSquaresTask, lam: Tensor) -> Tensor:
        """∇f(λ) = (dω_λ/dλ)ᵀ ∂_ω F(ω_λ) (paper 004 Proposition 1; F has no direct λ term)."""
        w, J = cls.inner_solution(task, lam)
        n = task.A_o.shape[0]
        return J.T @ (2.0 / n * task.A_o.T @ (task.A_o @ w - task.b_o))

    @classmethod
    def outer_optimum(cls, task: LeastSquaresTask) -> Tensor:
        """λ* = argmin ‖A_o (ω₀ + J λ) − b_o‖², a linear least-squares problem since ω_λ is affine in λ."""
        lam0 = torch.zeros(task.A_il.shape[1], dtype=_F64)
        w0, J = cls.inner_solution(task, lam0)
        return torch.linalg.lstsq(task.A_o @ J, (task.b_o - task.A_o @ w0).unsqueeze(1)).solution.squeeze(1)
