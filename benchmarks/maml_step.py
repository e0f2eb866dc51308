"""One second-order MAML meta-step: metaray's `maml` solver vs learn2learn's MAML, same model, init and data.

Workload (NOTES.md anchor): conv4 (32 channels, BatchNorm), 5-way 1-shot, 15 queries per class, 8 tasks,
5 inner steps, CPU threads as given (default 2). Both sides compute the mean meta-gradient over the 8 tasks
and are timed alternately in one process; the ratio of medians is what to compare (this machine is shared).

    .venv/bin/python benchmarks/maml_step.py [--repeats 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import learn2learn as l2l
import torch
import torch.nn.functional as Fn

import metaray.solvers as S
from metaray.tasks import Conv4, Episode, ModelProblem


def episodes(n_tasks: int, ways=5, shots=1, queries=15, side=28) -> list[Episode]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_tasks):
        xs = torch.randn(ways * shots, 1, side, side, generator=g)
        xq = torch.randn(ways * queries, 1, side, side, generator=g)
        out.append(Episode(xs, torch.arange(ways).repeat_interleave(shots), xq, torch.arange(ways).repeat_interleave(queries)))
    return out


def l2l_step(maml, tasks, steps):
    maml.zero_grad()
    for ep in tasks:
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(Fn.cross_entropy(learner(ep.support_x), ep.support_y))
        (Fn.cross_entropy(learner(ep.query_x), ep.query_y) / len(tasks)).backward()
    return {k: p.grad for k, p in maml.module.named_parameters()}


def metaray_step(solver, problem, x, tasks):
    hgs = [solver.hypergrad(problem, x, t) for t in tasks]  # the task loop: metaray's fastest mode for conv4 on a CPU
    return {k: sum(h.grad[k] for h in hgs) / len(hgs) for k in x}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Conv4(ways=5, hidden=32)
    tasks = episodes(args.tasks)
    problem = ModelProblem(model, "cross_entropy")
    x = problem.initial_params()
    solver = S.make("maml", inner_steps=args.steps, inner_lr=0.4)
    maml = l2l.algorithms.MAML(copy.deepcopy(model), lr=0.4, first_order=False)

    g_ref = l2l_step(maml, tasks, args.steps)
    g = metaray_step(solver, problem, x, tasks)
    err = sum(float((g[k] - g_ref[k]).pow(2).sum()) for k in g) ** 0.5 / sum(float(v.pow(2).sum()) for v in g_ref.values()) ** 0.5

    times = {"metaray": [], "learn2learn": []}
    for _ in range(args.repeats):  # alternate so both see the same machine load
        t = time.perf_counter(); metaray_step(solver, problem, x, tasks); times["metaray"].append(time.perf_counter() - t)
        t = time.perf_counter(); l2l_step(maml, tasks, args.steps); times["learn2learn"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"MAML meta-step: conv4(32, BatchNorm), 5-way 1-shot, 15 queries, {args.tasks} tasks, {args.steps} inner steps, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"  metaray     {med['metaray'] * 1e3:8.1f} ms")
    print(f"  learn2learn {med['learn2learn'] * 1e3:8.1f} ms")
    print(f"  speed ratio (learn2learn time / metaray time): {med['learn2learn'] / med['metaray']:.3f}")
    print(f"  meta-gradients agree to {err:.1e} (global relative norm)")


if __name__ == "__main__":
    main()
