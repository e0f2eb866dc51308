"""``[run] precision = "bf16"`` against fp32: the hypergradient's error, and what it does to training.

    .venv/bin/python benchmarks/precision.py [--quick] [--json OUT.json]

Per workload the same tasks are computed twice, with the fp32 problem and with ``AutocastInner`` (the inner
loss's forward under CPU bf16 autocast, metaray.tasks.precision):
- per-task error: ‖g_bf16 − g_fp32‖ / ‖g_fp32‖ (global norm over all params), median and max over the tasks,
  next to the same error of fp32 against float64 (what fp32 itself costs);
- error of the task mean (what the outer step uses) and its cosine with the fp32 mean;
- as a yardstick, the spread between tasks: the same relative difference between the means of two disjoint
  halves of the fp32 tasks (the noise a stochastic outer step already lives with);
- the time per task of the loop in both precisions (this CPU has no bf16 matrix units: expect bf16 slower here).
Training: second-order MAML on sinusoids (MLP 1-40-40-1, 8 tasks a step, Adam 1e-3) in fp32 and bf16 from the
same init and tasks; the meta-test query loss after adaptation on 64 held-out tasks.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import batched  # noqa: E402
from common import rel_err, section_main, table  # noqa: E402

import torch  # noqa: E402

import metaray.solvers as S  # noqa: E402
from metaray.cluster.worker import move  # noqa: E402
from metaray.tasks import ModelProblem, SinusoidSource, mlp  # noqa: E402
from metaray.tasks.precision import AutocastInner  # noqa: E402


def sinusoid_setup(n: int):
    return batched.sinusoid(n)[:3]  # the batching benchmark's workloads: (problem, x, tasks)


def conv4_setup(n: int):
    return batched.conv4(n)[:3]


def mean_grad(hgs, keys):
    return {k: sum(h.grad[k] for h in hgs) / len(hgs) for k in keys}


def compare(setup, n: int, solver_name: str, opts: dict) -> dict:
    P, x, tasks = setup(n)
    solver = S.make(solver_name, **opts)
    bf16 = AutocastInner(P, "cpu")
    solver.hypergrad(P, x, tasks[0]), solver.hypergrad(bf16, x, tasks[0])  # warm-up: not timed
    t0 = time.perf_counter()
    ref = [solver.hypergrad(P, x, t) for t in tasks]
    t1 = time.perf_counter()
    low = [solver.hypergrad(bf16, x, t) for t in tasks]
    t2 = time.perf_counter()
    per_task = [rel_err(b.grad, r.grad) for b, r in zip(low, ref)]
    P64, x64, tasks64 = setup(n)  # the yardstick: fp32 against float64 on the same tasks
    P64.model.double()
    x64 = {k: v.double() for k, v in x64.items()}
    hi = [solver.hypergrad(P64, x64, move(t, torch.device("cpu"), torch.float64)) for t in tasks64]
    fp32_vs_fp64 = statistics.median(rel_err(r.grad, {k: v.float() for k, v in h.grad.items()}) for r, h in zip(ref, hi))
    m_ref, m_low = mean_grad(ref, x), mean_grad(low, x)
    flat = lambda g: torch.cat([g[k].reshape(-1) for k in x])  # noqa: E731
    cos = float(torch.nn.functional.cosine_similarity(flat(m_low), flat(m_ref), dim=0))
    half = len(ref) // 2
    spread = rel_err(mean_grad(ref[:half], x), mean_grad(ref[half:], x))
    return {"solver": solver_name, "tasks": n, "per_task_median": statistics.median(per_task), "per_task_max": max(per_task),
            "fp32_vs_fp64_median": fp32_vs_fp64,
            "mean_rel": rel_err(m_low, m_ref), "mean_cos": cos, "half_spread": spread,
            "fp32_s_per_task": (t1 - t0) / n, "bf16_s_per_task": (t2 - t1) / n}


def train(precision: str, steps: int) -> float:
    torch.manual_seed(0)
    P = ModelProblem(mlp([1, 40, 40, 1]), "mse")
    problem = AutocastInner(P, "cpu") if precision == "bf16" else P
    x = {k: v.detach().clone().requires_grad_() for k, v in P.initial_params().items()}
    opt = torch.optim.Adam(list(x.values()), lr=1e-3)
    solver = S.make("maml", inner_steps=5, inner_lr=0.01)
    src = SinusoidSource()
    for s in range(steps):
        hgs = [solver.hypergrad(problem, {k: v.detach() for k, v in x.items()}, src.sample(("train", s, i))) for i in range(8)]
        for k, v in x.items():
            v.grad = sum(h.grad[k] for h in hgs) / len(hgs)
        opt.step()
    xd = {k: v.detach() for k, v in x.items()}
    test = [solver.evaluate(P, xd, src.sample(("test", 0, i))) for i in range(64)]  # meta-test in fp32 for both
    return statistics.mean(h.outer_loss for h in test)


def build(quick: bool, img_dir: Path) -> dict:
    t0 = time.perf_counter()
    n_sin, n_conv, steps = (8, 2, 20) if quick else (32, 8, 300)
    runs = {
        "sinusoid MLP, maml (5 steps)": compare(sinusoid_setup, n_sin, "maml", dict(inner_steps=5, inner_lr=0.01)),
        "sinusoid MLP, fomaml (5 steps)": compare(sinusoid_setup, n_sin, "fomaml", dict(inner_steps=5, inner_lr=0.01)),
        "sinusoid MLP, imaml (10 steps, 5 CG)": compare(sinusoid_setup, n_sin, "imaml", dict(inner_steps=10, inner_lr=0.01, cg_steps=5)),
        "conv4+BN 5w1s, maml (5 steps)": compare(conv4_setup, n_conv, "maml", dict(inner_steps=5, inner_lr=0.4)),
    }
    rows = [[k, r["tasks"], r["per_task_median"], r["per_task_max"], r["fp32_vs_fp64_median"], r["mean_rel"], r["mean_cos"], r["half_spread"],
             r["fp32_s_per_task"] * 1e3, r["bf16_s_per_task"] * 1e3] for k, r in runs.items()]
    trained = {p: train(p, steps) for p in ("fp32", "bf16")}
    tables = [
        table("hypergradient in bf16 against fp32 (relative global norm)",
              ["workload", "tasks", "per task, median", "per task, max", "yardstick: fp32 vs fp64, median", "task mean", "cosine of means",
               "fp32 spread between task halves", "fp32 ms/task", "bf16 ms/task"], rows),
        table(f"second-order MAML on sinusoids, {steps} outer steps of 8 tasks: meta-test query MSE (64 tasks)",
              ["precision", "meta-test MSE"], [[p, v] for p, v in trained.items()]),
    ]
    conv = runs["conv4+BN 5w1s, maml (5 steps)"]
    sin = runs["sinusoid MLP, maml (5 steps)"]
    headline = [f"bf16 inner loop (CPU autocast): MAML hypergradient {sin['per_task_median']:.1e} median relative error on "
                f"the sinusoid MLP, {conv['per_task_median']:.2f} on conv4 with BatchNorm; meta-test MSE after training "
                f"{trained['bf16']:.3f} (bf16) vs {trained['fp32']:.3f} (fp32)"]
    return {"title": "bf16 inner loop against fp32", "intro": __doc__.split("\n\n", 2)[2].strip()
            + f"\n\nThis section took {time.perf_counter() - t0:.0f} s.", "tables": tables, "plots": [], "notes": [],
            "headline": headline, "data": {"runs": runs, "trained": trained}}


if __name__ == "__main__":
    section_main(__doc__, build)
