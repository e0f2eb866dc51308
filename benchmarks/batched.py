"""Batched task hypergradients (metaray.solvers.batched) against the task loop, side by side in one process.

    .venv/bin/python benchmarks/batched.py [--quick] [--json OUT.json] [--img-dir docs/img]

Workloads (CPU, float32, 2 torch threads, timed alternately, median):
- sinusoid: second-order MAML on 64 sinusoid tasks (Finn et al.), MLP 1-40-40-1, 10 shots / 10 queries,
  5 inner steps of 0.01: ``solver.hypergrad`` per task (the loop) vs ``solver.hypergrad_batch`` (vmapped, per-task
  results) vs ``solver.hypergrad_mean`` (vmapped, the reduced form for the mean rule).
- imaml-sinusoid: iMAML on the same 64 tasks, 10 proximal inner steps of 0.01, λ = 1, 5 CG steps: the loop vs
  the batched CG (every task's system solved at once, each with its own step sizes and stopping) and its mean form.
- conv4: second-order MAML, Conv4 (32 channels, BatchNorm), 5-way 1-shot, 15 queries, 8 tasks, 5 inner steps of
  0.4 (the peers workload): the same three modes. learn2learn and the other peers: see the peers section.
Two more modes: the task loop on task threads (solvers/threads.py, ``[cluster] task_threads``: one task per
thread, one intra-op thread each, as many threads as the torch threads given) and the plain loop with one
intra-op thread (the threads' per-task cost, and their bits). The first vmapped call (tracing) is timed separately. Agreement: global relative norm of the mean gradient of
each mode against the loop's.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import rel_err, table, write_section  # noqa: E402

import torch  # noqa: E402

import metaray.solvers as S  # noqa: E402
from metaray.solvers.threads import TaskThreads  # noqa: E402
from metaray.tasks import Conv4, Episode, ModelProblem, SinusoidSource, mlp  # noqa: E402


def sinusoid(n: int):
    torch.manual_seed(0)
    P = ModelProblem(mlp([1, 40, 40, 1]), "mse")
    src = SinusoidSource()
    return P, P.initial_params(), [src.sample(("train", 0, i)) for i in range(n)], S.make("maml", inner_steps=5, inner_lr=0.01)


def imaml_sinusoid(n: int):
    P, x, tasks, _ = sinusoid(n)
    return P, x, tasks, S.make("imaml", inner_steps=10, inner_lr=0.01, lam=1.0, cg_steps=5)


def conv4(n: int):
    torch.manual_seed(0)
    P = ModelProblem(Conv4(ways=5, hidden=32), "cross_entropy")
    g = torch.Generator().manual_seed(0)
    tasks = [Episode(torch.randn(5, 1, 28, 28, generator=g), torch.arange(5), torch.randn(75, 1, 28, 28, generator=g),
                     torch.arange(5).repeat_interleave(15)) for _ in range(n)]
    return P, P.initial_params(), tasks, S.make("maml", inner_steps=5, inner_lr=0.4)


def measure(setup, n: int, repeats: int) -> dict:
    P, x, tasks, solver = setup(n)

    def mean_of(hgs):
        return {k: sum(h.grad[k] for h in hgs) / len(hgs) for k in x}

    threads = torch.get_num_threads()
    on_threads = TaskThreads(P, threads=threads, intra_op=1)

    def one_thread_loop():
        torch.set_num_threads(1)
        try:
            return mean_of([solver.hypergrad(P, x, t) for t in tasks])
        finally:
            torch.set_num_threads(threads)

    modes = {
        "loop (hypergrad per task)": lambda: mean_of([solver.hypergrad(P, x, t) for t in tasks]),
        "batched (hypergrad_batch)": lambda: mean_of(solver.hypergrad_batch(P, x, tasks)),
        "mean form (hypergrad_mean)": lambda: solver.hypergrad_mean(P, x, tasks).grad,
        f"task threads ({threads} × 1 intra-op thread)": lambda: mean_of(on_threads.hypergrads(solver, x, tasks)),
        "loop, 1 intra-op thread": one_thread_loop,
    }
    first, grads = {}, {}
    for k, f in modes.items():
        t = time.perf_counter()
        grads[k] = f()
        first[k] = time.perf_counter() - t
    times = {k: [] for k in modes}
    for _ in range(repeats):
        for k, f in modes.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    on_threads.close()
    ref = grads["loop (hypergrad per task)"]
    return {"tasks": n, "first_call_s": first, "times": times, "agreement": {k: rel_err(g, ref) for k, g in grads.items()}}


def build(quick: bool) -> dict:
    t0 = time.perf_counter()
    runs = {"sinusoid": measure(sinusoid, 64, 3 if quick else 15),
            "imaml-sinusoid": measure(imaml_sinusoid, 64, 3 if quick else 15),
            "conv4": measure(conv4, 2 if quick else 8, 1 if quick else 5)}
    tables, headline = [], []
    for wl, r in runs.items():
        med = {k: statistics.median(v) for k, v in r["times"].items()}
        loop = med["loop (hypergrad per task)"]
        rows = [[k, v * 1e3, loop / v, r["first_call_s"][k] * 1e3, r["agreement"][k]] for k, v in med.items()]
        what = "iMAML (batched CG)" if wl.startswith("imaml") else "second-order MAML"
        tables.append(table(f"{wl}: {what}, {r['tasks']} tasks, median of {len(r['times'][next(iter(med))])}",
                            ["mode", "median ms", "speed-up vs loop", "first call ms", "mean grad rel. diff vs loop"], rows))
        best = min((k for k in med if k.startswith(("batched", "mean form", "task threads"))), key=med.get)
        headline.append(f"{wl} ({r['tasks']} tasks, CPU): {best} is **{loop / med[best]:.2f}×** the task loop"
                        + (" (target ≥ 5×: " + ("met" if loop / med[best] >= 5 else "missed") + ")" if wl == "sinusoid" else
                           (" — every batching loses here" if loop < med[best] else "")))
    return {"title": "Batched task hypergradients vs the task loop", "intro": __doc__.split("\n\n", 2)[2].strip()
            + f"\n\nThis section took {time.perf_counter() - t0:.0f} s.", "tables": tables, "plots": [], "notes": [],
            "headline": headline, "data": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--img-dir", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    write_section(args.json, build(args.quick))


if __name__ == "__main__":
    main()
