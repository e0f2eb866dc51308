"""Hypergradient accuracy of every registered solver against exact references on synthetic problems.

    .venv/bin/python benchmarks/accuracy.py [--quick] [--json OUT.json] [--img-dir docs/img]

References (all float64, closed forms — never the code under test):
- Quadratic bilevel problem with a unique lower level (``metaray.tasks.QuadraticProblem``):
  ``implicit_hypergrad`` (the T → ∞ hypergradient, A⁻¹ solves) and ``unrolled_hypergrad`` (exact
  derivative of T gradient steps). iMAML's reference is the implicit hypergradient of the proximal problem
  (A + λI, B + λC, c + λd), also a closed form.
- Paper 003's 1D problem (``Toy1DProblem.exact_hypergrad``, implicit function theorem on θ*(λ) = √(1 − λ²)).
- The BDA toy with a non-unique lower level (``NonUniqueToyProblem``): the gradient of the optimistic value
  φ(x) = ½‖x − 1‖², i.e. x − 1, evaluated at x = ½ (where rad's hypergradient is exactly 0 and stalls).
Error = ‖g − g_ref‖ / ‖g_ref‖.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from common import attempt, line_plot, rel_err, section_main, table  # noqa: I001

import metaray.solvers as S
from metaray.tasks import NonUniqueToyProblem, QuadraticProblem, Toy1DProblem, Toy1DTask, quadratic_task

D = torch.float64


def sweep(values, fn):
    """[(v, fn(v) or None)]; a failing point is recorded as None (and its error kept for the notes)."""
    out, errors = [], []
    for v in values:
        r, err = attempt(lambda: fn(v))
        out.append(r)
        if err:
            errors.append(f"{v}: {err}")
    return out, errors


# ---- quadratic problem -----------------------------------------------------------------------------------


def quadratic(quick: bool) -> dict:
    P = QuadraticProblem()
    task = quadratic_task(5, 8, seed=0, init="zero", cond=10.0)
    task_x = quadratic_task(6, 6, seed=1, init="x", cond=10.0)  # MAML-style start y₀ = x + d (for maml/imaml)
    x, xm = P.initial_params(task), P.initial_params(task_x)
    lr = 0.09  # < 2/λ_max(A) = 0.2; contraction 1 − lr·λ_min = 0.91 per step
    implicit, implicit_m = P.implicit_hypergrad(task, x["x"]), P.implicit_hypergrad(task_x, xm["x"])
    Ts = [1, 3, 10, 30, 100] if quick else [1, 2, 5, 10, 20, 50, 100, 200, 400]
    notes: list[str] = []

    def err(name, opts, t=task, xx=x, ref=implicit):
        return rel_err(S.make(name, **opts).hypergrad(P, xx, t).grad["x"], ref)

    vs_T = {
        "rad": lambda T: err("rad", dict(inner_steps=T, inner_lr=lr)),
        "fad": lambda T: err("fad", dict(inner_steps=T, inner_lr=lr)),
        "trad (last 1 step)": lambda T: err("trad", dict(inner_steps=T, inner_lr=lr, truncate=1)),
        "trad (last 10 steps)": lambda T: err("trad", dict(inner_steps=T, inner_lr=lr, truncate=10)) if T >= 10 else None,
        "darts": lambda T: err("darts", dict(inner_steps=T, inner_lr=lr)),
        "ift-cg (50 CG)": lambda T: err("ift-cg", dict(inner_steps=T, inner_lr=lr, cg_steps=50)),
        "ift-neumann (50 terms)": lambda T: err("ift-neumann", dict(inner_steps=T, inner_lr=lr, neumann_terms=50)),
        "bda (ρ₀=0.5)": lambda T: err("bda", dict(inner_steps=T, inner_lr=lr)),
        "maml (y₀ = x)": lambda T: err("maml", dict(inner_steps=T, inner_lr=lr), task_x, xm, implicit_m),
        "fomaml (y₀ = x)": lambda T: err("fomaml", dict(inner_steps=T, inner_lr=lr), task_x, xm, implicit_m),
    }
    curves = {}
    for label, fn in vs_T.items():
        curves[label], errs = sweep(Ts, fn)
        notes += [f"{label} T={e}" for e in errs]
    # rad / maml against the exact derivative of the T-step unroll: machine precision at every T
    unroll_exact = []
    for T in Ts:
        g = S.make("rad", inner_steps=T, inner_lr=lr).hypergrad(P, x, task).grad["x"]
        gm = S.make("maml", inner_steps=T, inner_lr=lr).hypergrad(P, xm, task_x).grad["x"]
        unroll_exact.append(max(rel_err(g, P.unrolled_hypergrad(task, x["x"], T, lr)),
                                rel_err(gm, P.unrolled_hypergrad(task_x, xm["x"], T, lr))))

    # iMAML: proximal problem's implicit hypergradient as the reference
    lam = 1.0
    prox = dataclasses.replace(task_x, A=task_x.A + lam * torch.eye(6, dtype=D), B=task_x.B + lam * task_x.C,
                               c=task_x.c + lam * task_x.d)
    imaml_ref = P.implicit_hypergrad(prox, xm["x"])
    curves["imaml (λ=1, 20 CG)"], errs = sweep(Ts, lambda T: err("imaml", dict(inner_steps=T, inner_lr=lr, lam=lam, cg_steps=20),
                                                                     task_x, xm, imaml_ref))
    notes += errs

    # error vs CG steps / Neumann terms at a converged inner solution
    Ks = [1, 2, 4, 8] if quick else [1, 2, 3, 4, 6, 8, 12, 16]
    T_conv = 300
    vs_K = {
        "ift-cg": lambda K: err("ift-cg", dict(inner_steps=T_conv, inner_lr=lr, cg_steps=K, cg_tol=0.0)),
        "ift-neumann": lambda K: err("ift-neumann", dict(inner_steps=T_conv, inner_lr=lr, neumann_terms=K, neumann_tol=0.0)),
        "imaml (vs proximal ref)": lambda K: err("imaml", dict(inner_steps=T_conv, inner_lr=lr, lam=lam, cg_steps=K, cg_tol=0.0),
                                                 task_x, xm, imaml_ref),
    }
    k_curves = {}
    for label, fn in vs_K.items():
        k_curves[label], errs = sweep(Ks, fn)
        notes += [f"{label} K={e}" for e in errs]

    # FSLA: single loop, error of its estimate at fixed x vs the number of calls (each = 1 y-step + 1 v-step)
    calls = [1, 10, 30, 100] if quick else [1, 3, 10, 30, 100, 300, 1000]
    fsla = S.make("fsla", inner_lr=lr, beta=lr, eta=1.0)
    state, fsla_err, k = None, [], 0
    for c in calls:
        while k < c:
            hg = fsla.hypergrad(P, x, task, state)
            state, k = hg.state, k + 1
        fsla_err.append(rel_err(hg.grad["x"], implicit))

    # BVFIM: first-order value-function method; error vs its regularization parameters (μ, θ, τ) → 0 together
    ps = [1e-1, 1e-2] if quick else [1e-1, 3e-2, 1e-2, 3e-3, 1e-3]
    bv, errs = sweep(ps, lambda p: rel_err(S.make("bvfim", mu1=p, mu2=p, theta=p, tau=p, inner_steps=300, barrier_steps=500,
                                                   inner_lr=0.09, barrier_lr=0.09).hypergrad(P, x, task).grad["x"], implicit))
    notes += [f"bvfim p={e}" for e in errs]
    return dict(Ts=Ts, curves=curves, unroll_exact=unroll_exact, Ks=Ks, k_curves=k_curves, T_conv=T_conv, calls=calls,
                fsla=fsla_err, bvfim_ps=ps, bvfim=bv, notes=notes, lr=lr)


# ---- paper 003's 1D problem ----------------------------------------------------------------------------


def toy1d(quick: bool) -> dict:
    P, lam = Toy1DProblem(), 0.5
    x = P.initial_params(lam)
    ref = P.exact_hypergrad(lam)
    th_star = float(P.theta_star(lam))
    cold, warm = Toy1DTask(theta0=0.5), Toy1DTask(theta0=th_star)  # warm: the chain starts at θ*(λ)
    Ts = [1, 3, 10, 30, 100] if quick else [1, 2, 5, 10, 20, 50, 100, 200]
    curves = {}
    for label, name, opts in [("rad (s=0.1)", "rad", {}), ("ift-cg (s=0.1)", "ift-cg", {}), ("ift-neumann (s=0.1)", "ift-neumann", {})]:
        curves[label], _ = sweep(Ts, lambda T: rel_err(S.make(name, inner_steps=T, inner_lr=0.1, **opts).hypergrad(P, x, cold).grad["lam"], ref))
    # SGLD: error vs the number of samples M (no burn-in, chain started at θ*), tiny temperature, η = 0.01.
    Ms = [5, 20, 80] if quick else [5, 10, 20, 40, 80, 150, 300]
    sgld, _ = sweep(Ms, lambda M: rel_err(S.make("sgld", inner_steps=M, samples=M, inner_lr=0.01, temperature=1e-10)
                                          .hypergrad(P, x, warm).grad["lam"], ref))
    h = 2 * th_star  # ∇²_θθ L_T at θ*
    return dict(lam=lam, ref=float(ref), Ts=Ts, curves=curves, Ms=Ms, sgld=sgld, best_M=2 / (0.01 * h) - 1)


# ---- BDA toy ---------------------------------------------------------------------------------------------


def bda_toy(quick: bool) -> dict:
    P = NonUniqueToyProblem(10)
    x = {"x": torch.full((10,), 0.5, dtype=D)}
    ref = x["x"] - 1.0  # ∇φ(x), φ = optimistic value ½‖x − 1‖²
    Ts = [5, 20, 80] if quick else [5, 10, 20, 50, 100, 200, 400]
    curves = {}
    for label, name, opts in [
        ("bda (ρ₀=0.9, s_l=0.5, s_u=1)", "bda", dict(inner_lr=0.5, upper_lr=1.0, rho0=0.9)),
        ("rad (s=0.5)", "rad", dict(inner_lr=0.5)),
        ("ift-cg (s=0.5)", "ift-cg", dict(inner_lr=0.5)),
        ("bvfim (barrier steps = T)", "bvfim", dict(inner_lr=0.5, barrier_lr=0.5)),
    ]:
        def one(T, name=name, opts=opts):
            extra = dict(barrier_steps=T) if name == "bvfim" else {}
            return rel_err(S.make(name, inner_steps=T, **opts, **extra).hypergrad(P, x, None).grad["x"], ref)
        curves[label], _ = sweep(Ts, one)
    return dict(Ts=Ts, curves=curves)


# ---- page ------------------------------------------------------------------------------------------------

NOT_APPLICABLE = {
    "reptile": "its update (x − y_T)/(T·s) is a first-order meta-direction, not an estimate of dF/dx",
    "metasgd": "needs per-parameter step sizes in x (a MAML variant; equals maml's derivative for fixed steps)",
    "ridge": "closed-form ridge head: its problem class (linear head on features) has no counterpart here; exact by construction, tested in tests/solvers/test_ridge.py",
    "l2o": "a learned optimizer trained by truncated BPTT: its meta-gradient is of the optimizee loss, not a bilevel hypergradient",
    "bda-pessimistic": "targets the pessimistic value (max over lower-level solutions), a different quantity",
    "sgld": "run on paper 003's 1D problem (below), its own setting",
}


def build(quick: bool, img_dir: Path) -> dict:
    t0 = time.perf_counter()
    q, qerr = attempt(lambda: quadratic(quick))
    t1d, terr = attempt(lambda: toy1d(quick))
    bt, berr = attempt(lambda: bda_toy(quick))
    tables, plots, notes = [], [], []
    if q:
        line_plot(img_dir / "accuracy_quadratic_T.png", {k: (q["Ts"], v) for k, v in q["curves"].items()},
                  xlabel="inner steps T", ylabel="relative error vs implicit hypergradient",
                  title=f"Quadratic (unique lower level), inner step {q['lr']}")
        line_plot(img_dir / "accuracy_quadratic_K.png", {k: (q["Ks"], v) for k, v in q["k_curves"].items()},
                  xlabel="CG steps / Neumann terms K", ylabel="relative error",
                  title=f"Quadratic, inner solution converged (T = {q['T_conv']})")
        plots += [{"file": "accuracy_quadratic_T.png", "caption": "Error vs inner steps on the quadratic problem"},
                  {"file": "accuracy_quadratic_K.png", "caption": "Error vs CG steps / Neumann terms"}]
        cols = ["solver"] + [f"T={T}" for T in q["Ts"]]
        rows = [[k] + v for k, v in q["curves"].items()]
        rows.append(["rad, maml vs exact T-step unroll"] + q["unroll_exact"])
        tables.append(table("Quadratic problem: relative error vs the implicit hypergradient (last row: vs the exact "
                            "derivative of the T-step unroll)", cols, rows))
        tables.append(table(f"Quadratic problem, T = {q['T_conv']} inner steps: relative error vs CG steps / Neumann terms K",
                            ["solver"] + [f"K={K}" for K in q["Ks"]], [[k] + v for k, v in q["k_curves"].items()]))
        tables.append(table("Quadratic problem: FSLA's estimate at fixed x vs calls (1 y-step + 1 v-step each, τ = β = 0.09, no momentum)",
                            ["calls"] + [str(c) for c in q["calls"]], [["fsla"] + q["fsla"]]))
        tables.append(table("Quadratic problem: BVFIM (300 value-function steps, 500 barrier steps) vs μ₁ = μ₂ = θ = τ = p",
                            ["p"] + [f"{p:g}" for p in q["bvfim_ps"]], [["bvfim"] + q["bvfim"]]))
        notes += q["notes"]
    else:
        notes.append(f"quadratic: {qerr}")
    if t1d:
        line_plot(img_dir / "accuracy_toy1d.png",
                  {**{k: (t1d["Ts"], v) for k, v in t1d["curves"].items()}, "sgld (x = samples M, η=0.01)": (t1d["Ms"], t1d["sgld"])},
                  xlabel="inner steps T (sgld: samples M)", ylabel="relative error",
                  title=f"Paper 003 1D problem at λ = {t1d['lam']}")
        plots.append({"file": "accuracy_toy1d.png", "caption": "Paper 003 1D problem"})
        tables.append(table(f"Paper 003 1D problem at λ = {t1d['lam']} (exact dφ/dλ = {t1d['ref']:.6f}); θ⁽⁰⁾ = ½",
                            ["solver"] + [f"T={T}" for T in t1d["Ts"]], [[k] + v for k, v in t1d["curves"].items()]))
        tables.append(table("Paper 003 1D problem: sgld (τ = 1e-10, η = 0.01, B = 0, chain started at θ*) vs samples M. "
                            f"Its recursion replaces (∇²L_T)⁻¹ by η(M+1)/2, so the error is smallest near M ≈ {t1d['best_M']:.0f} "
                            "and grows on both sides (see docs/sgld.md)",
                            ["M"] + [str(m) for m in t1d["Ms"]], [["sgld"] + t1d["sgld"]]))
    else:
        notes.append(f"toy1d: {terr}")
    if bt:
        line_plot(img_dir / "accuracy_bda_toy.png", {k: (bt["Ts"], v) for k, v in bt["curves"].items()},
                  xlabel="inner steps T", ylabel="relative error vs ∇φ (optimistic)", title="BDA toy (non-unique lower level), x = ½")
        plots.append({"file": "accuracy_bda_toy.png", "caption": "BDA toy"})
        tables.append(table("BDA toy (n = 10), x = ½: relative error vs the optimistic-value gradient x − 1 (rad and ift "
                            "follow only f, so they see φ_rad(x) = ½‖x‖² + ½‖x − 1‖², whose gradient is 0 here: error 1)",
                            ["solver"] + [f"T={T}" for T in bt["Ts"]], [[k] + v for k, v in bt["curves"].items()]))
    else:
        notes.append(f"bda toy: {berr}")
    covered = {"rad", "fad", "trad", "darts", "ift-cg", "ift-neumann", "bda", "maml", "fomaml", "imaml", "fsla", "bvfim"}
    rows = [[n, NOT_APPLICABLE.get(n, "see the tables")] for n in S.names() if n not in covered]
    tables.append(table("Registered solvers without a row above, and why", ["solver", "reason"], rows))
    return {
        "title": "Hypergradient accuracy against exact references",
        "intro": (__doc__.split("\n\n", 2)[2].strip() + f"\n\nThis section took {time.perf_counter() - t0:.1f} s."),
        "tables": tables, "plots": plots, "notes": notes,
        "data": {"quadratic": q, "toy1d": t1d, "bda_toy": bt},
    }


def main(argv: list[str] | None = None) -> None:
    section_main(__doc__, build, argv)


if __name__ == "__main__":
    main()
