"""Peak memory of one hypergradient vs the number of inner steps T, for every memory regime: rad and maml (full and checkpointed), trad, imaml, ift-cg, fsla, sgld, bvfim.

    .venv/bin/python benchmarks/memory_horizon.py [--quick] [--json OUT.json] [--img-dir docs/img]

Problem and measurement are those of ``benchmarks/memory_vs_steps.py`` (imported, not copied): an MLP
regressor 1 → H → H → 1 on one sinusoid task (100 support / 100 query points) with a learned initialization
and per-tensor log weight decays; the peak is the bytes newly allocated by tensors during one
``solver.hypergrad`` call (torch.profiler's allocator events on the CPU, ``max_memory_allocated`` on CUDA).
fsla is single loop (one y-step and one v-step per call, no T): its row is the same call at every T.
"checkpoint ⌈√T⌉" rows are rad / maml with ``checkpoint_every = ⌈√T⌉`` (metaray/solvers/checkpoint.py: keep
every k-th inner iterate, recompute each segment in the backward pass). Their comparison table times each
call again without the profiler (median of 3, full and checkpointed alternating) and compares the gradients
(one global relative norm, float32). Each profiled call runs in a fresh subprocess (all rows of one T together
up to T = 200, one row per process above): the profiler's own buffers grow to gigabytes at T = 1000 and the
allocator does not hand them back, so one process measuring everything would need ~20 GB.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import add_common_args, attempt, line_plot, rel_err, table, write_section  # noqa: I001

import metaray.solvers as S
from memory_vs_steps import WeightDecayInit, peak_bytes
from metaray.tasks import SinusoidSource

CHECKPOINTED = ("rad", "maml")  # the rows; every spacing is ⌈√T⌉


def spacing(T: int) -> int:
    return math.isqrt(T - 1) + 1 if T > 0 else 1  # ⌈√T⌉


def solvers(T: int) -> dict[str, tuple[str, dict]]:
    rows = {
        "rad": ("rad", dict(inner_steps=T)),
        "rad (checkpoint ⌈√T⌉)": ("rad", dict(inner_steps=T, checkpoint_every=spacing(T))),
        "maml": ("maml", dict(inner_steps=T)),
        "maml (checkpoint ⌈√T⌉)": ("maml", dict(inner_steps=T, checkpoint_every=spacing(T))),
        "trad (last 5)": ("trad", dict(inner_steps=T, truncate=min(5, T))),
        "imaml (10 CG)": ("imaml", dict(inner_steps=T, lam=1.0, cg_steps=10)),
        "ift-cg (10 CG)": ("ift-cg", dict(inner_steps=T, cg_steps=10)),
        "fsla (1 step/call)": ("fsla", dict(beta=0.01)),
        "sgld (M = T/2)": ("sgld", dict(inner_steps=T, samples=max(1, T // 2), temperature=1e-6)),
        "bvfim (K = T = steps)": ("bvfim", dict(inner_steps=T, barrier_steps=T, barrier_lr=0.01)),
    }
    return rows


def wall(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compare(P, x, task, name: str, T: int, repeats: int = 3) -> dict:
    """Full vs checkpointed ``name`` at T without the profiler: median seconds (alternating) and gradient agreement."""
    full = S.make(name, inner_steps=T, inner_lr=0.01)
    ckpt = S.make(name, inner_steps=T, inner_lr=0.01, checkpoint_every=spacing(T))
    g_full, g_ckpt = full.hypergrad(P, x, task).grad, ckpt.hypergrad(P, x, task).grad  # also the warm-up
    t_full, t_ckpt = [], []
    for _ in range(repeats):
        t_full.append(wall(lambda: full.hypergrad(P, x, task)))
        t_ckpt.append(wall(lambda: ckpt.hypergrad(P, x, task)))
    return {"seconds_full": statistics.median(t_full), "seconds_checkpointed": statistics.median(t_ckpt),
            "grad_rel_err": rel_err(g_ckpt, g_full)}


def problem(H: int, device: str):
    P = WeightDecayInit(H, device)
    task = SinusoidSource(shots=100, queries=100).sample(("train", 0, 0)).to(device)
    return P, P.initial_params(), task


def measure(labels: list[str], T: int, H: int) -> dict[str, tuple]:
    """{label: ((peak bytes, seconds) or None, error or None)} for one T, in this process (the child's work)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    P, x, task = problem(H, device)
    out = {}
    for label in labels:
        name, opts = solvers(T)[label]

        def one():
            # warm-up (first-call allocations) with the same row at a short horizon: what is lazily set up does not
            # depend on T, and a fresh process at T = 1000 would otherwise pay the whole call twice
            S.make(name, inner_lr=0.01, **solvers(min(T, 5))[label][1]).hypergrad(P, x, task)
            solver = S.make(name, inner_lr=0.01, **opts)
            return peak_bytes(lambda: solver.hypergrad(P, x, task), device)
        out[label] = attempt(one)
    return out


def measure_in_child(labels: list[str], T: int, H: int) -> dict[str, tuple]:
    """``measure`` in a fresh Python process (see the module docstring: the profiler's memory)."""
    cmd = [sys.executable, __file__, "--child", json.dumps({"labels": labels, "T": T, "hidden": H, "threads": torch.get_num_threads()})]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {label: (None, f"not run: measuring process failed (exit {r.returncode}): {last}") for label in labels}
    got = json.loads(r.stdout.strip().splitlines()[-1])
    return {label: (tuple(v[0]) if v[0] else None, v[1]) for label, v in got.items()}


def build(quick: bool, img_dir: Path, hidden: int | None = None) -> dict:
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    H = hidden or (64 if quick else 256)
    Ts = [5, 20] if quick else [10, 50, 100, 200, 500, 1000]
    P, x, task = problem(H, device)
    n_inner = sum(v.numel() for k, v in x.items() if not k.startswith("log_wd."))
    peaks: dict[str, list] = {label: [] for label in solvers(Ts[0])}
    secs: dict[str, list] = {label: [] for label in solvers(Ts[0])}
    notes = []
    for T in Ts:
        groups = [list(peaks)] if T <= 200 else [[label] for label in peaks]
        for labels in groups:
            for label, (r, err) in measure_in_child(labels, T, H).items():
                peaks[label].append(r[0] / 2**20 if r else None)
                secs[label].append(r[1] if r else None)
                if err:
                    notes.append(f"{label} at T={T}: {err}")
    cmp_rows, cmp_data = [], {}
    for name in CHECKPOINTED:
        for i, T in enumerate(Ts):
            r, err = attempt(lambda: compare(P, x, task, name, T))
            if err:
                notes.append(f"{name} full vs checkpointed at T={T}: {err}")
                continue
            full_mib, ckpt_mib = peaks[name][i], peaks[f"{name} (checkpoint ⌈√T⌉)"][i]
            r.update(peak_full_mib=full_mib, peak_checkpointed_mib=ckpt_mib, checkpoint_every=spacing(T))
            cmp_data[f"{name} T={T}"] = r
            ratio = (f"1/{full_mib / ckpt_mib:.3g}" if full_mib and ckpt_mib else None)
            cmp_rows.append([name, T, spacing(T), full_mib, ckpt_mib, ratio, r["seconds_full"], r["seconds_checkpointed"],
                             f"{r['seconds_checkpointed'] / r['seconds_full']:.2f}x", r["grad_rel_err"]])
    T_last = Ts[-1]
    for name in CHECKPOINTED:
        r = cmp_data.get(f"{name} T={T_last}")
        if r and r["peak_full_mib"] and r["peak_checkpointed_mib"]:
            mem_ok = r["peak_checkpointed_mib"] <= r["peak_full_mib"] / 8
            time_ok = r["seconds_checkpointed"] <= 1.5 * r["seconds_full"]
            notes.append(
                f"Target at T = {T_last} ({name}, checkpoint_every = {spacing(T_last)}): peak ≤ 1/8 of the full unroll: "
                f"{'met' if mem_ok else 'missed'} (1/{r['peak_full_mib'] / r['peak_checkpointed_mib']:.3g}); time ≤ 1.5x: "
                f"{'met' if time_ok else 'missed'} ({r['seconds_checkpointed'] / r['seconds_full']:.2f}x); same gradient: "
                f"relative difference {r['grad_rel_err']:.2g} (float32).")
    if device == "cpu":
        notes.append("CUDA table (torch.cuda.max_memory_allocated): not run: no GPU in this session; the code path "
                     "is the same script on a CUDA machine.")
    line_plot(img_dir / "memory_horizon.png", {k: (Ts, v) for k, v in peaks.items()}, xlabel="inner steps T",
              ylabel="peak MiB allocated during one hypergrad", title=f"Memory vs horizon (MLP 1-{H}-{H}-1, {device})")
    cols = ["solver"] + [f"T={T}" for T in Ts]
    return {
        "title": "Memory vs horizon",
        "intro": (__doc__.split("\n\n", 2)[2].strip()
                  + f"\n\nDevice {device}; {n_inner:,} inner parameters ({n_inner * 4 / 2**20:.2f} MiB in float32); inner step 0.01. "
                  f"This section took {time.perf_counter() - t0:.1f} s."),
        "tables": [table("Peak MiB newly allocated during one hypergradient", cols, [[k] + v for k, v in peaks.items()]),
                   table("Seconds per hypergradient (same calls, profiler on; shared machine)", cols,
                         [[k] + v for k, v in secs.items()]),
                   table("Checkpointed (checkpoint_every = ⌈√T⌉) vs full unroll: peak MiB (profiler), seconds without "
                         "the profiler (median of 3), gradient difference ‖g_ckpt − g_full‖ / ‖g_full‖",
                         ["solver", "T", "k", "full MiB", "checkpointed MiB", "memory", "full s", "checkpointed s",
                          "time", "grad rel. diff."], cmp_rows)],
        "plots": [{"file": "memory_horizon.png", "caption": "Peak memory vs inner steps, every solver"}],
        "notes": notes,
        "data": {"Ts": Ts, "hidden": H, "peak_mib": peaks, "seconds": secs, "checkpointed_vs_full": cmp_data},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one measuring process
    args = ap.parse_args(argv)
    if args.child:
        job = json.loads(args.child)
        torch.set_num_threads(job["threads"])
        print(json.dumps(measure(job["labels"], job["T"], job["hidden"]), default=float))
        return
    torch.set_num_threads(args.threads)
    write_section(args.json, build(args.quick, Path(args.img_dir), args.hidden))


if __name__ == "__main__":
    main()
