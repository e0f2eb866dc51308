"""Peak memory of one hypergradient vs the number of inner steps T: implicit solvers stay flat, RAD grows.

    .venv/bin/python benchmarks/memory_vs_steps.py                 # T = 10, 50, 100 on the CPU
    .venv/bin/python benchmarks/memory_vs_steps.py --device cuda   # on a GPU

Problem: an MLP regressor (1 → H → H → 1, tanh) on one sinusoid task (support/query of 100 points) with
x = {initialization, one log weight decay per tensor}: f = support MSE + Σ_k exp(w_k)/2 ‖y_k‖²,
F = query MSE, y_0 = the initialization. Every solver gets a non-trivial hypergradient here: rad through the
T steps, imaml for the initialization (proximal) and the decays, ift-cg/ift-neumann for the decays.

What is measured: the peak of bytes held by tensors *newly allocated during one ``solver.hypergrad`` call*,
above what was allocated before it (the inputs and the model are not counted).
- CPU: ``torch.profiler`` with ``profile_memory=True`` records one "[memory]" event per allocation (+bytes)
  and free (−bytes) made by PyTorch's CPU allocator; the running sum in time order, maximised, is the peak.
  This sees every tensor (autograd's saved tensors, the inner iterates, temporaries), nothing else
  (Python objects are not counted; they are small here).
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the bytes allocated
  before the call.
RAD keeps every inner step's activations and iterates for the backward pass, so its peak grows linearly in T;
the implicit solvers run the inner loop without a graph and need only y_T plus a few Params-sized vectors.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import torch
import torch.nn.functional as Fn
from torch.profiler import ProfilerActivity, profile

import metaray.solvers as S
from metaray.solvers.core import BilevelProblem, Params
from metaray.tasks import SinusoidSource, mlp

SOLVERS = {
    "rad": {},
    "imaml": {"lam": 1.0, "cg_steps": 10},
    "ift-cg": {"cg_steps": 10},
    "ift-neumann": {"neumann_terms": 10},
}


class WeightDecayInit(BilevelProblem):
    """MLP regression with a learned initialization and learned per-tensor weight decays (see the docstring)."""

    def __init__(self, hidden: int, device: str):
        torch.manual_seed(0)
        self.model = mlp([1, hidden, hidden, 1], activation=torch.nn.Tanh).to(device)
        self.keys = [k for k, _ in self.model.named_parameters()]

    def initial_params(self) -> Params:
        x = {k: v.detach().clone() for k, v in self.model.named_parameters()}
        x.update({"log_wd." + k: torch.tensor(-3.0, device=v.device) for k, v in self.model.named_parameters()})
        return x

    def init_inner(self, x, task):
        return {k: x[k] for k in self.keys}

    def _mse(self, y, inputs, targets):
        return Fn.mse_loss(torch.func.functional_call(self.model, y, (inputs,)), targets)

    def inner_loss(self, x, y, task):
        decay = sum(0.5 * torch.exp(x["log_wd." + k]) * (y[k] ** 2).sum() for k in self.keys)
        return self._mse(y, task.support_x, task.support_y) + decay

    def outer_loss(self, x, y, task):
        return self._mse(y, task.query_x, task.query_y)


def peak_bytes(fn, device: str) -> tuple[int, float]:
    """(peak bytes newly allocated while fn() runs, seconds)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t
    try:  # the allocator events straight from the profiler's results: a chrome trace of T = 1000 is ~1 GB of JSON
        mem = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    except AttributeError:  # an older or newer torch without that accessor: the same events from the trace
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f)["traceEvents"]
        mem = sorted((e["ts"], e["args"]["Bytes"]) for e in events if e.get("name") == "[memory]")
    running = peak = 0
    for _, b in mem:
        running += b
        peak = max(peak, running)
    return peak, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 50, 100], help="inner steps T")
    ap.add_argument("--hidden", type=int, default=256, help="MLP width H")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    P = WeightDecayInit(args.hidden, args.device)
    src = SinusoidSource(shots=100, queries=100)
    task = src.sample(("train", 0, 0)).to(args.device)
    x = P.initial_params()
    n_inner = sum(v.numel() for k, v in x.items() if not k.startswith("log_wd."))
    print(f"device {args.device}; inner params {n_inner:,} ({n_inner * 4 / 2**20:.2f} MiB in float32); "
          f"support/query 100 points; inner_lr 0.01")
    rows = []
    for name, opts in SOLVERS.items():
        for T in args.steps:
            solver = S.make(name, inner_steps=T, inner_lr=0.01, **opts)
            solver.hypergrad(P, x, task)  # warm-up (first-call allocations, lazy inits)
            out = {}
            peak, secs = peak_bytes(lambda: out.setdefault("hg", solver.hypergrad(P, x, task)), args.device)
            hg = out["hg"]
            gnorm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in hg.grad.values()))
            m = hg.metrics
            flags = "" if "converged" not in m else ("conv" if m["converged"] else "not-conv") + (" indef" if m["indefinite"] else "")
            rows.append((name, T, peak, secs, gnorm, m.get("linsolve_residual", float("nan")), flags))

    print(f"\n{'solver':<12} {'T':>4} {'peak MiB':>9} {'x of T=' + str(args.steps[0]):>9} {'seconds':>8} {'|grad|':>9} {'residual':>9}  linsolve")
    first = {}
    for name, T, peak, secs, gnorm, res, flags in rows:
        first.setdefault(name, peak)
        print(f"{name:<12} {T:>4} {peak / 2**20:>9.2f} {peak / max(first[name], 1):>9.2f} {secs:>8.3f} {gnorm:>9.3g} {res:>9.2g}  {flags}")
    print("\nlinsolve: the implicit solvers' flags (conv = residual below tolerance, indef = pᵀHp <= 0 was met; the "
          "inner problem is a non-convex MLP fit stopped after T steps, so neither is guaranteed). Memory is the point here.")


if __name__ == "__main__":
    main()
