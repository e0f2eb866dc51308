"""Peak memory of one hypergradient vs the number of inner steps T, for rad, trad, imaml, ift-cg, fsla, sgld, bvfim.

    .venv/bin/python benchmarks/memory_horizon.py [--quick] [--json OUT.json] [--img-dir docs/img]

Problem and measurement are those of ``benchmarks/memory_vs_steps.py`` (imported, not copied): an MLP
regressor 1 → H → H → 1 on one sinusoid task (100 support / 100 query points) with a learned initialization
and per-tensor log weight decays; the peak is the bytes newly allocated by tensors during one
``solver.hypergrad`` call (torch.profiler's allocator events on the CPU, ``max_memory_allocated`` on CUDA).
fsla is single loop (one y-step and one v-step per call, no T): its row is the same call at every T.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import add_common_args, attempt, line_plot, table, write_section  # noqa: I001

import metaray.solvers as S
from memory_vs_steps import WeightDecayInit, peak_bytes
from metaray.tasks import SinusoidSource


def solvers(T: int) -> dict[str, tuple[str, dict]]:
    return {
        "rad": ("rad", dict(inner_steps=T)),
        "trad (last 5)": ("trad", dict(inner_steps=T, truncate=min(5, T))),
        "imaml (10 CG)": ("imaml", dict(inner_steps=T, lam=1.0, cg_steps=10)),
        "ift-cg (10 CG)": ("ift-cg", dict(inner_steps=T, cg_steps=10)),
        "fsla (1 step/call)": ("fsla", dict(beta=0.01)),
        "sgld (M = T/2)": ("sgld", dict(inner_steps=T, samples=max(1, T // 2), temperature=1e-6)),
        "bvfim (K = T = steps)": ("bvfim", dict(inner_steps=T, barrier_steps=T, barrier_lr=0.01)),
    }


def build(quick: bool, img_dir: Path, hidden: int | None = None) -> dict:
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    H = hidden or (64 if quick else 256)
    Ts = [5, 20] if quick else [10, 50, 100, 200]
    P = WeightDecayInit(H, device)
    task = SinusoidSource(shots=100, queries=100).sample(("train", 0, 0)).to(device)
    x = P.initial_params()
    n_inner = sum(v.numel() for k, v in x.items() if not k.startswith("log_wd."))
    peaks: dict[str, list] = {}
    secs: dict[str, list] = {}
    notes = []
    for T in Ts:
        for label, (name, opts) in solvers(T).items():
            def one():
                solver = S.make(name, inner_lr=0.01, **opts)
                solver.hypergrad(P, x, task)  # warm-up: first-call allocations
                return peak_bytes(lambda: solver.hypergrad(P, x, task), device)
            r, err = attempt(one)
            peaks.setdefault(label, []).append(r[0] / 2**20 if r else None)
            secs.setdefault(label, []).append(r[1] if r else None)
            if err:
                notes.append(f"{label} at T={T}: {err}")
    line_plot(img_dir / "memory_horizon.png", {k: (Ts, v) for k, v in peaks.items()}, xlabel="inner steps T",
              ylabel="peak MiB allocated during one hypergrad", title=f"Memory vs horizon (MLP 1-{H}-{H}-1, {device})")
    return {
        "title": "Memory vs horizon",
        "intro": (__doc__.split("\n\n", 2)[2].strip()
                  + f"\n\nDevice {device}; {n_inner:,} inner parameters ({n_inner * 4 / 2**20:.2f} MiB in float32); inner step 0.01. "
                  f"This section took {time.perf_counter() - t0:.1f} s."),
        "tables": [table("Peak MiB newly allocated during one hypergradient", ["solver"] + [f"T={T}" for T in Ts],
                         [[k] + v for k, v in peaks.items()]),
                   table("Seconds per hypergradient (same calls, profiler on; shared machine)", ["solver"] + [f"T={T}" for T in Ts],
                         [[k] + v for k, v in secs.items()])],
        "plots": [{"file": "memory_horizon.png", "caption": "Peak memory vs inner steps"}],
        "notes": notes,
        "data": {"Ts": Ts, "hidden": H, "peak_mib": peaks, "seconds": secs},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--hidden", type=int, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    write_section(args.json, build(args.quick, Path(args.img_dir), args.hidden))


if __name__ == "__main__":
    main()
