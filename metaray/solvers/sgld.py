"""HPO-SGLD: hypergradients of the stochastic relaxation by Langevin sampling (paper 003, Kim & Hospedales).

The inner problem becomes the posterior p(y | x) ∝ exp(−E), E = f(x, y)/τ at temperature τ (eqs. 5-6), and
the outer objective its expectation E_p[F(x, y)], estimated by M samples of a Langevin chain (eqs. 7-10):

    y⁽ᵐ⁾ = y⁽ᵐ⁻¹⁾ + (ε/2) ∂_y log p(y⁽ᵐ⁻¹⁾ | x) + √ε z⁽ᵐ⁻¹⁾,      z ~ N(0, κ² I)              (eq. 24)

Parameterization. We take the drift step η = ε/(2τ) as the step size (``inner_lr``), so the chain reads
y⁽ᵐ⁾ = y⁽ᵐ⁻¹⁾ − η ∇_y f + √(2ητ) κ z: the temperature scales only the noise, and τ → 0 is gradient
descent with step η (how paper 003's Table 3 can use τ = 10⁻¹⁰). In these terms (ε/2) A = −η ∇²_yy f and
(ε/2) B = −η ∇²_yx f, with A = ∂²log p/∂y², B = ∂²log p/∂x∂y (eq. 15).

Recursion (eq. 22), with D₀ = dy⁽⁰⁾/dx taken from init_inner's dependence on x (0 when y⁽⁰⁾ does not depend
on x, the identity for MAML-type y⁽⁰⁾ = x), every product a vector-Hessian / vector-Jacobian product:

    g₀ = ∂_y F(x, y⁽⁰⁾) · D₀
    g_m = g_{m−1} + (y⁽ᵐ⁾ − y⁽ᵐ⁻¹⁾)ᵀ ∇²_yy F(x, y⁽ᵐ⁻¹⁾) D₀
                 + (ε/2) ∂_y F(x, y⁽ᵐ⁾) · ( B(x, y⁽ᵐ⁻¹⁾) + A(x, y⁽ᵐ⁻¹⁾) D₀ )
    h = (1/M) Σ_{m=B+1}^{B+M} ( ∂_x F(x, y⁽ᵐ⁾) + g_m )                                             (eq. 25)

with B = ``inner_steps`` − ``samples`` burn-in steps (paper 003 splits its 100 inner iterations into
B = M = 50). The recursion is first order in ε (eqs. 16, 20, 21 drop ε² and ε^1.5): with D₀ = 0 it keeps
only dy⁽ᵐ⁾/dx ≈ Σ_j (ε/2) B_j, without the contraction factors Π(I + ε/2 A_i). It is exact in the
small-step limit (η·m·‖∇²_yy f‖ ≪ 1) and biased once the chain has mixed: at stationarity the average
(25) is the implicit hypergradient with (∇²_yy f)⁻¹ replaced by the scalar η(B + (M+1)/2). Measured on
paper 003's 1D problem (docs/sgld.md): accurate only with ``warm_start``, small τ and
η(B + (M+1)/2) ≈ 1/∇²_yy f. ``project_inner`` is applied to the chain; the recursion ignores it (as the paper does).

Randomness: z is drawn from a ``torch.Generator`` seeded from (``seed``, outer step k). The outer step comes
from the state, so the solver is stateful: ``HyperGrad.state = {"step": k + 1, "y": last sample}``; with
``warm_start`` the next chain starts at the last sample (a y⁽⁰⁾ independent of x, so D₀ = 0).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import Solver, SolverOptions, nonnegative, option, positive, register
from .core import BilevelProblem, Params, check_finite, check_same_keys, detached, grad_dict, inner_start, leaves, project, tzeros_like, vjp_dict
from .unrolled import finish


@dataclass(frozen=True)
class SGLDOptions(SolverOptions):
    inner_steps: int = option(100, "total Langevin steps B + M (burn-in plus samples)", positive)
    inner_lr: float = option(0.1, "drift step η = ε/(2τ): y ← y − η ∇_y f + √(2ητ) κ z", positive)
    samples: int = option(50, "M: Monte-Carlo samples averaged (the last M steps); B = inner_steps − M", positive)
    temperature: float = option(1e-2, "τ: temperature of p(y|x) ∝ exp(−f/τ); sets the noise only", positive)
    noise_scale: float = option(1.0, "κ: z ~ N(0, κ² I)", nonnegative)
    seed: int = option(0, "seed of the Langevin noise (combined with the outer step from the state)", nonnegative)
    warm_start: bool = option(False, "start each chain at the previous outer step's last sample (D₀ = 0)")

    def validate(self) -> None:
        if self.samples > self.inner_steps:
            raise ValueError(
                f"option 'samples' (M = {self.samples}) must be <= 'inner_steps' (B + M = {self.inner_steps})"
            )


@dataclass
class SGLDTrace:
    """The chain and recursion of one call, for tests: y⁽ᵐ⁾ and g_m for m = 0..B+M, and the noise z⁽ᵐ⁻¹⁾."""

    ys: list[Params] = field(default_factory=list)
    gs: list[Params] = field(default_factory=list)
    zs: list[Params] = field(default_factory=list)


def noise_generator(seed: int, step: int) -> torch.Generator:
    digest = hashlib.blake2b(f"sgld/{seed}/{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def langevin_step(problem: BilevelProblem, x: Params, y: Params, grad_f: Params, task: Any, *, lr: float, sigma: float,
                  generator: torch.Generator) -> tuple[Params, Params]:
    """Eq. 24: y' = Π(y − η ∇_y f(x, y) + √(2ητ) κ z), z ~ N(0, I) from ``generator``. Returns (y', z)."""
    z = {k: torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device) for k, v in y.items()}
    y_next = project(problem, x, {k: y[k].detach() - lr * grad_f[k].detach() + sigma * z[k] for k in y})
    return leaves(detached(y_next)), z


def sgld_hypergrad(
    problem: BilevelProblem,
    x: Params,
    task: Any,
    *,
    lr: float,
    temperature: float,
    noise_scale: float,
    burn_in: int,
    samples: int,
    generator: torch.Generator,
    y0: Params | None = None,
    trace: SGLDTrace | None = None,
) -> tuple[Params, Params]:
    """Runs eq. 24 / 22 / 25 in this order for m = 1..B+M (Alg. 1). Returns (h, last sample).

    ``y0`` overrides init_inner (a constant start, D₀ = 0). ``trace``, if given, records the chain.
    """
    x = leaves(x)
    y0_graph = inner_start(problem, x, task) if y0 is None else detached(y0)
    has_d0 = any(v.requires_grad for v in y0_graph.values())  # D₀ ≠ 0: y⁽⁰⁾ depends on x
    sigma = math.sqrt(2.0 * lr * temperature) * noise_scale  # √ε κ with ε = 2ητ

    def d0_vjp(u: Params) -> Params:  # uᵀ D₀, through init_inner's graph
        return vjp_dict(y0_graph, x, u, retain_graph=True) if has_d0 else tzeros_like(x)

    y_prev = leaves(detached(y0_graph))
    outer0 = problem.outer_loss(x, y_prev, task)
    check_finite(outer0, "outer_loss at the chain start", task)
    g = d0_vjp(grad_dict(outer0, y_prev))  # g₀ = ∂_y F(y⁽⁰⁾) · D₀ (paper 003 footnote 5)
    if trace is not None:
        trace.ys.append(detached(y_prev))
        trace.gs.append(detached(g))
    h = tzeros_like(x)
    for m in range(1, burn_in + samples + 1):
        # eq. 24: the Langevin step; keep ∇_y f's graph for the A and B products of eq. 22.
        inner = problem.inner_loss(x, y_prev, task)
        check_finite(inner, f"inner_loss at Langevin step {m}", task)
        gy_f = grad_dict(inner, y_prev, create_graph=True)
        y, z = langevin_step(problem, x, y_prev, gy_f, task, lr=lr, sigma=sigma, generator=generator)

        outer = problem.outer_loss(x, y, task)
        check_finite(outer, f"outer_loss at Langevin step {m}", task)
        gx_F, gy_F = grad_dict(outer, x, retain_graph=True), grad_dict(outer, y)

        # eq. 22, last term: (ε/2) ∂_y F(y⁽ᵐ⁾)·B(y⁽ᵐ⁻¹⁾) = −η ∂_x⟨∇_y f(x, y⁽ᵐ⁻¹⁾), ∂_y F(y⁽ᵐ⁾)⟩, and the A·D₀ part.
        wrt = {**{("x", k): v for k, v in x.items()}, **{("y", k): v for k, v in y_prev.items()}}
        vj = vjp_dict({k: gy_f[k] for k in gy_f}, wrt, gy_F)
        g_next = {k: g[k] - lr * vj[("x", k)] for k in g}
        if has_d0:
            a_term = d0_vjp({k: -lr * vj[("y", k)] for k in y_prev})
            # eq. 22, middle term: (y⁽ᵐ⁾ − y⁽ᵐ⁻¹⁾)ᵀ ∇²_yy F(x, y⁽ᵐ⁻¹⁾) D₀.
            outer_prev = problem.outer_loss(x, y_prev, task)
            gy_F_prev = grad_dict(outer_prev, y_prev, create_graph=True)
            hess_step = vjp_dict(gy_F_prev, y_prev, {k: y[k].detach() - y_prev[k].detach() for k in y})
            mid = d0_vjp(hess_step)
            g_next = {k: g_next[k] + a_term[k] + mid[k] for k in g}
        g = detached(g_next)
        if m > burn_in:  # eq. 25
            h = {k: h[k] + (gx_F[k] + g[k]) / samples for k in h}
        if trace is not None:
            trace.ys.append(detached(y))
            trace.gs.append(g)
            trace.zs.append(z)
        y_prev = y
    return h, detached(y_prev)


@register
class SGLD(Solver):
    """HPO-SGLD (paper 003 Alg. 1): Langevin samples of p(y|x) ∝ exp(−f/τ) and the forward g_m recursion."""

    name = "sgld"
    Options = SGLDOptions
    paper = "Kim, Hospedales, A stochastic approach to bi-level optimization for hyperparameter optimization and meta learning (arXiv 2410.10417; eqs. 22-25, Alg. 1)"
    stateful = True

    def _start(self, problem, x, task, state) -> tuple[int, Params | None]:
        """(outer step k, warm-start sample or None) from the carried state, checked."""
        if state is None:
            return 0, None
        if not (isinstance(state, dict) and isinstance(state.get("step"), int) and not isinstance(state["step"], bool)
                and state["step"] >= 0):
            raise ValueError(f"sgld state must be None or {{'step': int >= 0, 'y': params}} from the previous call, got {state!r}")
        y0 = state.get("y") if self.options.warm_start else None
        if y0 is not None:
            if not isinstance(y0, dict):
                raise ValueError(f"sgld state['y'] must be inner params (dict[str, Tensor]), got {type(y0).__name__}")
            check_same_keys(inner_start(problem, detached(x), task, graph=False), y0, "init_inner(x)", "sgld state['y']")
        return state["step"], y0

    def _adapt(self, problem, x, task, state):
        # The same chain as _hypergrad (same start, same noise), without the g_m recursion: its last sample.
        o = self.options
        step, y0 = self._start(problem, x, task, state)
        y = leaves(inner_start(problem, x, task, graph=False) if y0 is None else detached(y0))
        generator = noise_generator(o.seed, step)
        sigma = math.sqrt(2.0 * o.inner_lr * o.temperature) * o.noise_scale
        for m in range(1, o.inner_steps + 1):
            inner = problem.inner_loss(x, y, task)
            check_finite(inner, f"inner_loss at Langevin step {m}", task)
            y, _ = langevin_step(problem, x, y, grad_dict(inner, y), task, lr=o.inner_lr, sigma=sigma, generator=generator)
        return detached(y)

    def _hypergrad(self, problem, x, task, state):
        o = self.options
        step, y0 = self._start(problem, x, task, state)
        h, y_last = sgld_hypergrad(
            problem, x, task, lr=o.inner_lr, temperature=o.temperature, noise_scale=o.noise_scale,
            burn_in=o.inner_steps - o.samples, samples=o.samples, generator=noise_generator(o.seed, step), y0=y0,
        )
        metrics = {"burn_in": float(o.inner_steps - o.samples), "samples": float(o.samples)}
        return finish(problem, x, y_last, task, h, metrics, state={"step": step + 1, "y": y_last})
