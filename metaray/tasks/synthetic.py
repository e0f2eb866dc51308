"""Synthetic bilevel problems with known hypergradients, for tests and accuracy benchmarks.

Quadratic bilevel problem (all float64):

    f(x, y) = ½ yᵀ A y − yᵀ (B x + c)                          A symmetric positive definite
    F(x, y) = ½ (y − t)ᵀ W (y − t) + ½ ρ ‖x‖² + yᵀ G x
    y_0     = C x + d                                          (C = 0: HPO-style start; C = I: MAML-style)

Gradient descent with step s gives y_t = M y_{t-1} + s (B x + c), M = I − sA, so

    y_T = M^T y_0 + Σ_{j<T} M^j s (B x + c),     dy_T/dx = J_T = M^T C + Σ_{j<T} M^j s B
    dF(x, y_T)/dx = ρ x + Gᵀ y_T + J_Tᵀ (W (y_T − t) + G x)          (exact for every T)

and as T → ∞, y* = A⁻¹ (B x + c), J = A⁻¹ B (the implicit hypergradient).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..solvers.core import BilevelProblem, Params


@dataclass
class QuadraticTask:
    A: Tensor
    B: Tensor
    c: Tensor
    W: Tensor
    t: Tensor
    G: Tensor
    C: Tensor
    d: Tensor
    rho: float

    @property
    def dims(self) -> tuple[int, int]:
        return self.B.shape[1], self.B.shape[0]


def quadratic_task(
    n: int = 3, m: int = 4, *, seed: int = 0, init: str = "zero", cond: float = 5.0, rho: float = 0.1, coupling: bool = True
) -> QuadraticTask:
    """A random well-conditioned instance: eigenvalues of A in [1, cond]; init 'zero' (C = 0), 'x' (C = I, needs
    n = m) or 'random' (C random)."""
    g = torch.Generator().manual_seed(seed)
    d64 = torch.float64
    Q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=d64))
    eig = torch.linspace(1.0, cond, m, dtype=d64)
    A = Q @ torch.diag(eig) @ Q.T
    B = torch.randn(m, n, generator=g, dtype=d64)
    c = torch.randn(m, generator=g, dtype=d64)
    Wr = torch.randn(m, m, generator=g, dtype=d64)
    W = Wr @ Wr.T / m + torch.eye(m, dtype=d64)
    t = torch.randn(m, generator=g, dtype=d64)
    G = 0.3 * torch.randn(m, n, generator=g, dtype=d64) if coupling else torch.zeros(m, n, dtype=d64)
    if init == "zero":
        C = torch.zeros(m, n, dtype=d64)
    elif init == "x":
        if n != m:
            raise ValueError("init='x' needs n == m")
        C = torch.eye(m, dtype=d64)
    elif init == "random":
        C = torch.randn(m, n, generator=g, dtype=d64)
    else:
        raise ValueError(f"init must be 'zero', 'x' or 'random', got {init!r}")
    d = 0.1 * torch.randn(m, generator=g, dtype=d64)
    return QuadraticTask(A, B, c, W, t, G, C, d, rho)


class QuadraticProblem(BilevelProblem):
    """The quadratic bilevel problem above, with x = {"x": R^n} (plus an optional unused key) and y = {"y": R^m}."""

    def __init__(self, unused_outer: bool = False):
        self.unused_outer = unused_outer

    def initial_params(self, task: QuadraticTask, seed: int = 1) -> Params:
        n, _ = task.dims
        x = {"x": torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)}
        if self.unused_outer:
            x["unused"] = torch.ones(2, dtype=torch.float64)
        return x

    def init_inner(self, x: Params, task: QuadraticTask) -> Params:
        return {"y": task.C @ x["x"] + task.d}

    def inner_loss(self, x: Params, y: Params, task: QuadraticTask) -> Tensor:
        yy = y["y"]
        return 0.5 * yy @ task.A @ yy - yy @ (task.B @ x["x"] + task.c)

    def outer_loss(self, x: Params, y: Params, task: QuadraticTask) -> Tensor:
        yy, xx = y["y"], x["x"]
        r = yy - task.t
        return 0.5 * r @ task.W @ r + 0.5 * task.rho * xx @ xx + yy @ task.G @ xx

    # ---- exact references -------------------------------------------------------------------------------

    def unrolled_solution(self, task: QuadraticTask, x: Tensor, steps: int, lr: float) -> tuple[Tensor, Tensor]:
        """(y_T, J_T = dy_T/dx) of T gradient steps, by the closed form."""
        m = task.A.shape[0]
        M = torch.eye(m, dtype=task.A.dtype) - lr * task.A
        y = task.C @ x + task.d
        J = task.C.clone()
        for _ in range(steps):
            y = M @ y + lr * (task.B @ x + task.c)
            J = M @ J + lr * task.B
        return y, J

    def exact_hypergrad(self, task: QuadraticTask, x: Tensor, y: Tensor, J: Tensor) -> Tensor:
        gy = task.W @ (y - task.t) + task.G @ x
        return task.rho * x + task.G.T @ y + J.T @ gy

    def unrolled_hypergrad(self, task: QuadraticTask, x: Tensor, steps: int, lr: float) -> Tensor:
        y, J = self.unrolled_solution(task, x, steps, lr)
        return self.exact_hypergrad(task, x, y, J)

    def implicit_hypergrad(self, task: QuadraticTask, x: Tensor) -> Tensor:
        y = torch.linalg.solve(task.A, task.B @ x + task.c)
        J = torch.linalg.solve(task.A, task.B)
        return self.exact_hypergrad(task, x, y, J)
