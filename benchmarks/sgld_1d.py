"""HPO-SGLD vs RAD / IFT-CG / IFT-Neumann on paper 003's synthetic 1D problem (clean and noisy eq. 28).

    .venv/bin/python benchmarks/sgld_1d.py                 # full table (several minutes on 2 cores)
    .venv/bin/python benchmarks/sgld_1d.py --quick         # 1 seed, fewer outer steps

Every method gets the same budget of 100 inner iterations per outer step (sgld: B + M = 100) and the same
outer loop: λ ← clamp(λ − lr · h, 0, 1) from λ₀ = 0.5, one task per outer step from ``Toy1DSource``
(the noisy variant draws ε₁, ε₂ ~ U(−0.3, 0.3) on every inner-loss call, from a generator seeded by the task
key and the run's seed). The reference λ* is a fine line search of φ(λ) = L_V(λ, √(1 − λ²)).
Reported: |λ_K − λ*| at the last outer step, and |λ̄ − λ*| for λ̄ the mean of the last quarter of the
outer iterates (what a noisy run settles around), mean ± std over seeds. Writes markdown to stdout.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metaray.solvers as S  # noqa: E402
from metaray.tasks.toys import Toy1DProblem, Toy1DSource  # noqa: E402

PROBLEM = Toy1DProblem()


def lambda_star() -> float:
    """Fine line search of φ on [0, 1]: a grid of 10⁶ points, then a golden-section refinement."""
    grid = torch.linspace(0.0, 0.999999, 1_000_001, dtype=torch.float64)
    i = int(PROBLEM.reduced_outer(grid).argmin())
    a, b = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, len(grid) - 1)])
    r = (5**0.5 - 1) / 2
    for _ in range(100):
        c, d = b - r * (b - a), a + r * (b - a)
        if PROBLEM.reduced_outer(c) < PROBLEM.reduced_outer(d):
            b = d
        else:
            a = c
    return (a + b) / 2


# (label, solver name, options). Every entry spends 100 inner iterations per outer step except where noted.
METHODS: list[tuple[str, str, dict]] = [
    ("rad (s = 0.1)", "rad", dict(inner_steps=100, inner_lr=0.1)),
    ("rad (s = 0.01)", "rad", dict(inner_steps=100, inner_lr=0.01)),
    ("ift-cg (s = 0.1)", "ift-cg", dict(inner_steps=100, inner_lr=0.1)),
    ("ift-neumann (s = 0.1)", "ift-neumann", dict(inner_steps=100, inner_lr=0.1)),
    ("sgld η=0.01 τ=1 cold (naive: ε=0.02)", "sgld", dict(inner_steps=100, samples=50, inner_lr=0.01, temperature=1.0)),
    ("sgld η=0.01 τ=1e-2 cold", "sgld", dict(inner_steps=100, samples=50, inner_lr=0.01, temperature=1e-2)),
    ("sgld η=0.1 τ=1e-2 cold", "sgld", dict(inner_steps=100, samples=50, inner_lr=0.1, temperature=1e-2)),
    ("sgld η=0.01 τ=1e-2 warm", "sgld", dict(inner_steps=100, samples=50, inner_lr=0.01, temperature=1e-2, warm_start=True)),
    ("sgld η=0.01 τ=1e-5 warm", "sgld", dict(inner_steps=100, samples=50, inner_lr=0.01, temperature=1e-5, warm_start=True)),
    ("sgld η=0.01 τ=1e-10 warm", "sgld", dict(inner_steps=100, samples=50, inner_lr=0.01, temperature=1e-10, warm_start=True)),
    ("sgld η=0.005 τ=1e-10 warm (scale ½)", "sgld", dict(inner_steps=100, samples=50, inner_lr=0.005, temperature=1e-10, warm_start=True)),
    ("sgld η=0.02 τ=1e-10 warm (scale 2)", "sgld", dict(inner_steps=100, samples=50, inner_lr=0.02, temperature=1e-10, warm_start=True)),
    ("sgld η=0.1 B=0 M=14 τ=1e-5 warm (14 steps)", "sgld", dict(inner_steps=14, samples=14, inner_lr=0.1, temperature=1e-5, warm_start=True)),
]


def run(name: str, options: dict, noise: float, seed: int, outer_steps: int, outer_lr: float) -> list[float]:
    opts = dict(options)
    if name == "sgld":
        opts["seed"] = seed
    solver = S.make(name, **opts)
    source = Toy1DSource(noise=noise, theta0=0.5, seed=seed)
    x, state, lams = PROBLEM.initial_params(0.5), None, []
    for k in range(outer_steps):
        hg = solver.hypergrad(PROBLEM, x, source.sample(("train", k, 0)), state)
        state = hg.state
        x = PROBLEM.project_outer({"lam": x["lam"] - outer_lr * hg.grad["lam"]})
        lams.append(float(x["lam"]))
    return lams


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1e}"
    return f"{statistics.mean(values):.1e} ± {statistics.stdev(values):.0e}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--outer-steps", type=int, default=60)
    ap.add_argument("--outer-lr", type=float, default=0.05)
    ap.add_argument("--quick", action="store_true", help="1 seed, 30 outer steps")
    ap.add_argument("--only", default="", help="run only methods whose label contains this string")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.outer_steps = 1, 30
    torch.set_num_threads(1)
    lam_star = lambda_star()
    print(f"λ* = {lam_star:.6f}, θ* = {float(PROBLEM.theta_star(lam_star)):.6f} (line search); "
          f"{args.outer_steps} outer steps of lr {args.outer_lr} from λ₀ = 0.5; {args.seeds} seed(s)\n")
    print("| method | clean: final λ (\\|λ−λ*\\|) | noisy: final λ (\\|λ−λ*\\|) | noisy: \\|λ̄−λ*\\| (mean of last quarter) | s/run |")
    print("|---|---|---|---|---|")
    for label, name, options in METHODS:
        if args.only and args.only not in label:
            continue
        cells, t0, runs = [], time.perf_counter(), 0
        for noise in (0.0, 0.3):
            finals, errs, avg_errs = [], [], []
            for seed in range(args.seeds):
                lams = run(name, options, noise, seed, args.outer_steps, args.outer_lr)
                runs += 1
                tail = lams[-max(1, len(lams) // 4):]
                finals.append(lams[-1])
                errs.append(abs(lams[-1] - lam_star))
                avg_errs.append(abs(statistics.mean(tail) - lam_star))
            cells.append(f"{statistics.mean(finals):.4f} ({fmt(errs)})")
            if noise > 0:
                cells.append(fmt(avg_errs))
        print(f"| {label} | " + " | ".join(cells) + f" | {(time.perf_counter() - t0) / runs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
