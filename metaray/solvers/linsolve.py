"""Matrix-free linear solvers for implicit hypergradients: conjugate gradient and a truncated Neumann series.

Both solve A q = b for a symmetric operator A given only as a product ``matvec(v) -> A v`` on Params (in
metaray, A is a Hessian and A v a Hessian-vector product), and return the solution with a residual history.

- **Conjugate gradient** (Hestenes & Stiefel 1952; HOAG, iMAML; survey 001 Alg. 4 step 2). Stops once
  ‖b − A q‖ ≤ tol · ‖b‖ or after ``max_steps`` products. CG needs A positive definite: a direction with
  non-positive curvature pᵀ A p ≤ 0 proves A is not, and is reported as ``indefinite``.
- **Truncated Neumann series** (Lorraine et al. 2020; survey 000 eq. 44, survey 001 §6):

      A⁻¹ b ≈ α Σ_{j<K} (I − α A)^j b,

  which converges when the spectrum of α A lies in (0, 2). With p_j = (I − α A)^j b the residual of the
  K-term sum is exactly b − A q_K = p_K, so the residual history costs nothing extra.

Neither solver builds an autograd graph: they are called under ``torch.no_grad`` by the implicit solvers,
whose ``matvec`` differentiates internally.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .core import Params, detached, tadd, tdot, tnorm, tscale, tzeros_like

MatVec = Callable[[Params], Params]

ON_INDEFINITE = ("stop", "continue", "raise")


class IndefiniteError(ArithmeticError):
    """The operator showed a direction of non-positive curvature (pᵀ A p ≤ 0) and ``on_indefinite='raise'``."""


@dataclass
class SolveResult:
    """What a linear solve returns.

    solution:   the approximate q with A q ≈ b
    residuals:  relative residuals ‖b − A q_k‖ / ‖b‖, one per iterate, starting with the initial guess
    steps:      operator products (Hessian-vector products) spent
    converged:  the last relative residual is ≤ tol
    indefinite: a direction p with pᵀ A p ≤ 0 was met (A is not positive definite)
    diverged:   the iteration grew instead of converging (Neumann: a residual above the starting one, which a
                convergent series never shows since ‖(I − αA)^j b‖ ≤ ‖b‖ when α·eig(A) ⊂ (0, 2))
    """

    solution: Params
    residuals: list[float] = field(default_factory=list)
    steps: int = 0
    converged: bool = False
    indefinite: bool = False
    diverged: bool = False

    @property
    def residual(self) -> float:
        return self.residuals[-1] if self.residuals else math.nan

    def metrics(self, prefix: str = "linsolve_") -> dict[str, float]:
        """Floats for ``HyperGrad.metrics``: final relative residual, steps, and the two flags as 0/1."""
        return {
            f"{prefix}residual": self.residual,
            f"{prefix}steps": float(self.steps),
            "converged": float(self.converged),
            "indefinite": float(self.indefinite),
            "diverged": float(self.diverged),
        }


def _check_common(tol: float, max_steps: int, on_indefinite: str) -> None:
    if not (isinstance(tol, (int, float)) and tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite float >= 0, got {tol!r}")
    if not (isinstance(max_steps, int) and not isinstance(max_steps, bool) and max_steps >= 0):
        raise ValueError(f"the number of steps must be an int >= 0, got {max_steps!r}")
    if on_indefinite not in ON_INDEFINITE:
        raise ValueError(f"on_indefinite must be one of {list(ON_INDEFINITE)}, got {on_indefinite!r}")


def _curvature_check(curv: float, step: int, on_indefinite: str) -> bool:
    """True when the direction has non-positive curvature; raises if asked to."""
    if curv > 0:
        return False
    if on_indefinite == "raise":
        raise IndefiniteError(
            f"the linear operator (Hessian) is not positive definite: found pᵀAp = {curv:.3g} <= 0 at step {step}. "
            "The lower-level solution may be a saddle point or not converged; use on_indefinite='stop' or 'continue' "
            "to get a flagged result instead"
        )
    return True


@torch.no_grad()
def cg(
    matvec: MatVec,
    b: Params,
    *,
    x0: Params | None = None,
    tol: float = 1e-10,
    max_steps: int = 100,
    on_indefinite: str = "stop",
) -> SolveResult:
    """Conjugate gradient for A q = b with A symmetric, using only ``matvec``.

    ``on_indefinite``: at a direction with pᵀ A p ≤ 0, 'stop' returns the last iterate (truncated CG, as in
    Newton-CG), 'continue' keeps iterating (plain CG still solves nonsingular indefinite systems unless it
    breaks down on pᵀ A p = 0), 'raise' raises IndefiniteError. The flag is set in every case but 'raise'.
    """
    _check_common(tol, max_steps, on_indefinite)
    b = detached(b)
    b_norm = float(tnorm(b))
    q = tzeros_like(b) if x0 is None else detached(x0)
    if b_norm == 0.0:  # the solution is 0 whatever A is
        return SolveResult(tzeros_like(b), [0.0], 0, True, False)
    r = b if x0 is None else tadd(b, matvec(q), -1.0)
    steps = 0 if x0 is None else 1
    rr = float(tdot(r, r))
    residuals = [math.sqrt(rr) / b_norm]
    p = r
    indefinite = False
    for _ in range(max_steps):
        if residuals[-1] <= tol:
            break
        Ap = matvec(p)
        steps += 1
        curv = float(tdot(p, Ap))
        if _curvature_check(curv, steps, on_indefinite):
            indefinite = True
            if on_indefinite == "stop" or curv == 0.0:  # curv == 0: CG breaks down, nothing to continue with
                break
        alpha = rr / curv
        q = tadd(q, p, alpha)
        r = tadd(r, Ap, -alpha)
        rr_new = float(tdot(r, r))
        residuals.append(math.sqrt(rr_new) / b_norm)
        if not math.isfinite(rr_new):
            break
        p = tadd(r, p, rr_new / rr)
        rr = rr_new
    return SolveResult(q, residuals, steps, residuals[-1] <= tol, indefinite)


@torch.no_grad()
def neumann(
    matvec: MatVec,
    b: Params,
    *,
    alpha: float,
    terms: int,
    tol: float = 0.0,
    on_indefinite: str = "continue",
) -> SolveResult:
    """A⁻¹ b ≈ α Σ_{j<K} (I − α A)^j b with K = ``terms`` (stops early once the residual is ≤ tol).

    Uses K operator products: p_{j+1} = p_j − α A p_j, and the residual after j terms is ‖p_j‖ / ‖b‖.
    The series diverges when α A has an eigenvalue outside (0, 2); ``converged`` is then False and ``diverged``
    True (the residual rose above its start). pᵀ A p ≤ 0
    along the way is flagged as ``indefinite``; 'stop' then returns the partial sum so far.
    """
    _check_common(tol, terms, on_indefinite)
    if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"the Neumann step size alpha must be a finite float > 0, got {alpha!r}")
    b = detached(b)
    b_norm = float(tnorm(b))
    if b_norm == 0.0:
        return SolveResult(tzeros_like(b), [0.0], 0, True, False)
    p = b
    total = tzeros_like(b)  # Σ_{i<j} p_i
    residuals = [1.0]
    indefinite = False
    steps = 0
    for _ in range(terms):
        if residuals[-1] <= tol:
            break
        Ap = matvec(p)
        steps += 1
        if _curvature_check(float(tdot(p, Ap)), steps, on_indefinite):
            indefinite = True
            if on_indefinite == "stop":
                break
        total = tadd(total, p)
        p = tadd(p, Ap, -alpha)
        residuals.append(float(tnorm(p)) / b_norm)
        if not math.isfinite(residuals[-1]):
            break
    # Rounding can lift a flat residual a hair above 1 (an eigenvalue at α·λ ≈ 0 or 2); real divergence grows.
    diverged = max(residuals) > 1.0 + 1e-6 or not math.isfinite(residuals[-1])
    return SolveResult(tscale(total, alpha), residuals, steps, residuals[-1] <= tol, indefinite, diverged)


# ----------------------------------------------------------------------------------------------------------
# Batched: B independent systems A_i q_i = b_i at once (the tasks of a batch, stacked along dim 0)
# ----------------------------------------------------------------------------------------------------------
#
# ``matvec`` takes stacked Params (every tensor [B, ...]) and returns the stacked products A_i v_i. Each system
# runs the same recurrence as the single-system solver above, with its own step sizes, its own stopping test and
# its own flags: a system that has stopped is frozen (its iterate, residual and step count no longer change)
# while the others go on, so each task gets what ``cg`` / ``neumann`` would give it alone (to rounding).


@dataclass
class BatchSolveResult:
    """What a batched solve returns: the stacked solutions and, per system, the fields of ``SolveResult``.

    residuals: [K+1, B] relative residuals by iteration; entries past a system's ``lengths[i]`` are padding
    steps, converged, indefinite, diverged: [B] tensors
    curvature, curvature_step: [B], the first non-positive pᵀAp met and at which product (for 'raise')
    """

    solution: Params
    residuals: torch.Tensor
    lengths: torch.Tensor
    steps: torch.Tensor
    converged: torch.Tensor
    indefinite: torch.Tensor
    diverged: torch.Tensor
    curvature: torch.Tensor
    curvature_step: torch.Tensor

    def task(self, i: int) -> SolveResult:
        """System i's result as the single-system solver reports it."""
        return SolveResult(
            {k: v[i] for k, v in self.solution.items()},
            self.residuals[: int(self.lengths[i]), i].tolist(),
            int(self.steps[i]),
            bool(self.converged[i]),
            bool(self.indefinite[i]),
            bool(self.diverged[i]),
        )

    def metrics(self, prefix: str = "linsolve_") -> dict[str, torch.Tensor]:
        """``SolveResult.metrics`` per system, as [B] tensors."""
        last = self.residuals[-1]  # a stopped system's later rows repeat its last residual
        return {
            f"{prefix}residual": last,
            f"{prefix}steps": self.steps.to(last.dtype),
            "converged": self.converged.to(last.dtype),
            "indefinite": self.indefinite.to(last.dtype),
            "diverged": self.diverged.to(last.dtype),
        }

    def _raise_first_indefinite(self, on_indefinite: str) -> "BatchSolveResult":
        """'raise': the error the task loop raises, for the first system (in task order) that met pᵀAp <= 0."""
        bad = self.indefinite.nonzero().flatten().tolist() if on_indefinite == "raise" else []
        if bad:
            _curvature_check(float(self.curvature[bad[0]]), int(self.curvature_step[bad[0]]), "raise")
        return self


def bdot(a: Params, b: Params) -> torch.Tensor:
    """Per-system inner products <a_i, b_i>: a [B] tensor."""
    return sum((a[k] * b[k]).reshape(a[k].shape[0], -1).sum(1) for k in a)  # type: ignore[return-value]


def _bcast(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B] tensor shaped to broadcast against a stacked [B, ...] tensor."""
    return s.reshape(-1, *([1] * (like.dim() - 1)))


def _where(mask: torch.Tensor, new: Params, old: Params) -> Params:
    """new for the systems in ``mask``, old for the frozen ones (a select, so a frozen NaN never leaks)."""
    return {k: torch.where(_bcast(mask, old[k]), new[k], old[k]) for k in old}


def _baxpy(a: Params, b: Params, s: torch.Tensor) -> Params:
    """a_i + s_i b_i per system."""
    return {k: a[k] + _bcast(s, a[k]) * b[k] for k in a}


class _History:
    """Per-system residual histories as one [K+1, B] tensor (entries are appended only for running systems)."""

    def __init__(self, first: torch.Tensor):
        self.rows, self.lengths = [first], torch.ones_like(first, dtype=torch.long)
        self.last = first

    def append(self, values: torch.Tensor, mask: torch.Tensor) -> None:
        # A system's k-th residual sits in row k: a frozen system gets padding (its last value) in later rows.
        self.last = torch.where(mask, values, self.last)
        self.rows.append(self.last)
        self.lengths = self.lengths + mask.long()

    def stacked(self) -> torch.Tensor:
        return torch.stack(self.rows)


class _Curvature:
    """Per-system pᵀAp <= 0 bookkeeping: the ``indefinite`` flags, and the first such value and product count
    of each system (what the loop's 'raise' reports)."""

    def __init__(self, like: torch.Tensor):
        self.flag = torch.zeros_like(like, dtype=torch.bool)
        self.value, self.step = torch.zeros_like(like), torch.zeros_like(like, dtype=torch.long)

    def check(self, live: torch.Tensor, curv: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The running systems whose direction has non-positive curvature now."""
        bad = live & (curv <= 0)
        first = bad & ~self.flag
        self.value, self.step = torch.where(first, curv, self.value), torch.where(first, steps, self.step)
        self.flag = self.flag | bad
        return bad


def _batch_setup(b: Params) -> tuple[Params, torch.Tensor, torch.Tensor, torch.Tensor]:
    """b detached, ‖b_i‖, which b_i are 0 (solved by 0 at once), and ‖b_i‖ with 1 for those (safe to divide)."""
    b = detached(b)
    b_norm = torch.sqrt(bdot(b, b))
    zero = b_norm == 0
    return b, b_norm, zero, torch.where(zero, torch.ones_like(b_norm), b_norm)


def _finish(solution: Params, history: _History, steps: torch.Tensor, tol: float, curvature: _Curvature,
            diverged: torch.Tensor, on_indefinite: str) -> BatchSolveResult:
    result = BatchSolveResult(solution, history.stacked(), history.lengths, steps, history.last <= tol, curvature.flag,
                              diverged, curvature.value, curvature.step)
    return result._raise_first_indefinite(on_indefinite)


@torch.no_grad()
def cg_batched(
    matvec: MatVec,
    b: Params,
    *,
    x0: Params | None = None,
    tol: float = 1e-10,
    max_steps: int = 100,
    on_indefinite: str = "stop",
) -> BatchSolveResult:
    """``cg`` for B systems at once; ``matvec`` maps stacked directions to stacked products. 'raise' stops the
    systems that meet pᵀAp <= 0 like 'stop' does and raises once all have stopped, for the first such system in
    task order: the error the task loop would raise."""
    _check_common(tol, max_steps, on_indefinite)
    b, b_norm, zero, safe_norm = _batch_setup(b)
    q = tzeros_like(b) if x0 is None else detached(x0)
    r = b if x0 is None else _baxpy(b, matvec(q), -torch.ones_like(b_norm))
    steps = torch.full_like(b_norm, 0 if x0 is None else 1, dtype=torch.long)
    rr = bdot(r, r)
    history = _History(torch.where(zero, torch.zeros_like(b_norm), torch.sqrt(rr) / safe_norm))
    if x0 is not None:  # b = 0: the solution is 0 whatever A is and the guess is dropped, as in ``cg``
        q, steps = _where(~zero, q, tzeros_like(b)), torch.where(zero, torch.zeros_like(steps), steps)
    p = r
    curvature = _Curvature(b_norm)
    live = ~zero & (history.last > tol)
    for _ in range(max_steps):
        if not bool(live.any()):
            break
        Ap = matvec(p)
        steps = steps + live.long()
        curv = bdot(p, Ap)
        bad = curvature.check(live, curv, steps)
        move = live & ~(bad & ((on_indefinite != "continue") | (curv == 0)))  # curv == 0: CG breaks down
        alpha = torch.where(move, rr / torch.where(move, curv, torch.ones_like(curv)), torch.zeros_like(rr))
        q = _where(move, _baxpy(q, p, alpha), q)
        r = _where(move, _baxpy(r, Ap, -alpha), r)
        rr_new = torch.where(move, bdot(r, r), rr)
        history.append(torch.sqrt(rr_new) / safe_norm, move)
        finite = torch.isfinite(rr_new)
        beta = torch.where(move & finite, rr_new / torch.where(rr == 0, torch.ones_like(rr), rr), torch.zeros_like(rr))
        p = _where(move & finite, _baxpy(r, p, beta), p)
        rr = rr_new
        live = move & finite & (history.last > tol)
    return _finish(q, history, steps, tol, curvature, torch.zeros_like(curvature.flag), on_indefinite)


@torch.no_grad()
def neumann_batched(
    matvec: MatVec,
    b: Params,
    *,
    alpha: float,
    terms: int,
    tol: float = 0.0,
    on_indefinite: str = "continue",
) -> BatchSolveResult:
    """``neumann`` for B systems at once (the same per-system stopping, flags and divergence test; 'raise' as in
    ``cg_batched``)."""
    _check_common(tol, terms, on_indefinite)
    if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"the Neumann step size alpha must be a finite float > 0, got {alpha!r}")
    b, b_norm, zero, safe_norm = _batch_setup(b)
    p, total = b, tzeros_like(b)
    history = _History(torch.where(zero, torch.zeros_like(b_norm), torch.ones_like(b_norm)))
    steps = torch.zeros_like(b_norm, dtype=torch.long)
    curvature = _Curvature(b_norm)
    live = ~zero & (history.last > tol)
    for _ in range(terms):
        if not bool(live.any()):
            break
        Ap = matvec(p)
        steps = steps + live.long()
        bad = curvature.check(live, bdot(p, Ap), steps)
        move = live & ~(bad & (on_indefinite != "continue"))
        total = _where(move, {k: total[k] + p[k] for k in p}, total)
        p = _where(move, {k: p[k] - alpha * Ap[k] for k in p}, p)
        history.append(torch.sqrt(bdot(p, p)) / safe_norm, move)
        live = move & torch.isfinite(history.last) & (history.last > tol)
    # as in ``neumann``: a residual above the start (padding rows repeat a system's last value, adding none)
    peak = history.stacked().nan_to_num(nan=math.inf).amax(0)
    diverged = (peak > 1.0 + 1e-6) | ~torch.isfinite(history.last)
    return _finish(tscale(total, alpha), history, steps, tol, curvature, diverged, on_indefinite)
