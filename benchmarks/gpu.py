"""Task batching on a GPU: metaray batched vs its task loop vs learn2learn's per-task loop, and actors sharing a GPU.

    python benchmarks/gpu.py                       # on a lent GPU machine (CUDA): ≤ 5 minutes
    python benchmarks/gpu.py --device cpu --quick  # CPU smoke mode: tiny sizes, checks the script end to end

Workloads, on synthetic episodes (random images, fixed labels; one generator seed), second-order MAML, 5 inner
steps of 0.4, the mean meta-gradient of one meta-batch:
- conv4: Conv4 (32 channels, BatchNorm without running stats), 5-way 1-shot, 15 queries, 28×28, 32 tasks;
- resnet12: ResNet-12 (64-160-320-640, BatchNorm, LeakyReLU 0.1), 5-way 5-shot, 15 queries, 84×84, 4 tasks
  per meta-batch (its second-order unroll at 84×84 is large; per-task memory is what the table shows).
A bf16 mode (``[run] precision = "bf16"``: the inner loss under autocast) is timed beside them, with its
gradient's difference from the fp32 loop. Each mode is timed after a warm-up (the vmapped first call traces), CUDA-synchronized, median of ``--repeats``:
tasks/s and peak CUDA memory (``torch.cuda.max_memory_allocated``, reset per mode; "–" on a CPU). Then 1, 2 and
4 Ray actors sharing the device (``num_gpus_per_worker = 1/n`` on a GPU), ``tasks_per_batch="auto"``, conv4:
tasks/s over a few outer steps, with ``prefetch="auto"`` (on for GPU actors: the next call's tasks loaded through
pinned memory on a side stream while the call ahead computes), and 1 actor again with prefetching off. Prints one JSON object (``--json PATH`` also writes it).
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as Fn  # noqa: E402
from torch import nn  # noqa: E402

import metaray.solvers as S  # noqa: E402
from metaray.tasks import Conv4, Episode, ModelProblem  # noqa: E402
from metaray.tasks.base import key_generator  # noqa: E402
from metaray.tasks.precision import AutocastInner  # noqa: E402


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout, track_running_stats=False)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout, track_running_stats=False)
        self.c3, self.b3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout, track_running_stats=False)
        self.sc, self.bs = nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout, track_running_stats=False)

    def forward(self, x):
        out = Fn.leaky_relu(self.b1(self.c1(x)), 0.1)
        out = Fn.leaky_relu(self.b2(self.c2(out)), 0.1)
        out = self.b3(self.c3(out)) + self.bs(self.sc(x))
        return Fn.max_pool2d(Fn.leaky_relu(out, 0.1), 2)


class ResNet12(nn.Module):
    """ResNet-12 of the few-shot literature (Oreshkin et al. 2018; Lee et al. 2019), for functional MAML."""

    def __init__(self, ways: int, widths=(64, 160, 320, 640), in_channels: int = 3):
        super().__init__()
        chans = (in_channels,) + tuple(widths)
        self.blocks = nn.Sequential(*[ResBlock(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.classifier = nn.Linear(widths[-1], ways)

    def forward(self, x):
        return self.classifier(self.blocks(x).mean((2, 3)))


@dataclass(frozen=True)
class SyntheticEpisodes:
    """Random-image episodes, deterministic in the task key (a TaskSource for the actors)."""

    ways: int = 5
    shots: int = 1
    queries: int = 15
    side: int = 28
    channels: int = 1

    def sample(self, key):
        g = key_generator(key)
        w, c, s = self.ways, self.channels, self.side
        return Episode(torch.randn(w * self.shots, c, s, s, generator=g), torch.arange(w).repeat_interleave(self.shots),
                       torch.randn(w * self.queries, c, s, s, generator=g), torch.arange(w).repeat_interleave(self.queries))


def workloads(quick: bool) -> dict:
    if quick:
        return {"conv4": dict(model=lambda: Conv4(ways=5, hidden=8, image_size=28), source=SyntheticEpisodes(queries=3), tasks=4),
                "resnet12": dict(model=lambda: ResNet12(5, widths=(4, 4, 8, 8)),
                                 source=SyntheticEpisodes(shots=1, queries=2, side=16, channels=3), tasks=2)}
    return {"conv4": dict(model=lambda: Conv4(ways=5, hidden=32, image_size=28), source=SyntheticEpisodes(), tasks=32),
            "resnet12": dict(model=ResNet12, source=SyntheticEpisodes(shots=5, queries=15, side=84, channels=3), tasks=4)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> dict:
    fn()  # warm-up (tracing, cuDNN autotune, allocator)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"median_s": statistics.median(times), "peak_memory_mb": None if peak is None else peak / 2**20, "grad": out}


def rel(g: list, ref: list) -> float:
    num = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(g, ref))
    return (num / max(sum(float(b.double().pow(2).sum()) for b in ref), 1e-300)) ** 0.5


def single_process(name: str, wl: dict, device, repeats: int) -> dict:
    torch.manual_seed(0)
    model = wl["model"]().to(device)
    tasks = [wl["source"].sample(("train", 0, i)).to(device) for i in range(wl["tasks"])]
    problem = ModelProblem(model, "cross_entropy")
    x = problem.initial_params()
    names = list(x)
    solver = S.make("maml", inner_steps=5, inner_lr=0.4)
    bf16 = AutocastInner(problem, device.type)

    def mean(hgs):
        return [sum(h.grad[k] for h in hgs) / len(hgs) for k in names]

    def listed(hg):  # one call, then its gradient in key order (a comprehension around the call would repeat it)
        return [hg.grad[k] for k in names]

    modes = {"metaray batched (vmap, per task)": lambda: mean(solver.hypergrad_batch(problem, x, tasks)),
             "metaray batched (vmap, mean form)": lambda: listed(solver.hypergrad_mean(problem, x, tasks)),
             "metaray loop": lambda: mean([solver.hypergrad(problem, x, t) for t in tasks]),
             # [run] precision = "bf16": the inner loss under bf16 autocast (its error against fp32 is reported)
             "metaray batched bf16 (vmap, mean form)": lambda: listed(solver.hypergrad_mean(bf16, x, tasks))}
    try:
        import learn2learn as l2l

        maml = l2l.algorithms.MAML(copy.deepcopy(model), lr=0.4, first_order=False)

        def l2l_step():
            maml.zero_grad()
            for ep in tasks:
                learner = maml.clone()
                for _ in range(5):
                    learner.adapt(Fn.cross_entropy(learner(ep.support_x), ep.support_y))
                (Fn.cross_entropy(learner(ep.query_x), ep.query_y) / len(tasks)).backward()
            return [p.grad.clone() for p in maml.module.parameters()]

        modes["learn2learn (per-task loop)"] = l2l_step
        skipped = {}
    except ImportError as e:
        skipped = {"learn2learn (per-task loop)": f"not run: {e}"}
    rows = {}
    for k, f in modes.items():
        try:
            rows[k] = timed(f, device, repeats)
        except Exception as e:  # noqa: BLE001 (out of memory on a big workload is a result, reported)
            skipped[k] = f"not run: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ref = rows.get("metaray loop", {}).get("grad")
    out = {}
    for k, r in rows.items():
        out[k] = {"tasks_per_s": wl["tasks"] / r["median_s"], "median_ms": r["median_s"] * 1e3,
                  "peak_memory_mb": r["peak_memory_mb"], "grad_rel_diff_vs_metaray_loop": rel(r["grad"], ref) if ref else None}
    l2l_rate = out.get("learn2learn (per-task loop)", {}).get("tasks_per_s")
    # the best fp32 mode is what is compared with learn2learn (fp32); bf16 is reported beside it
    best = max((k for k in out if k.startswith("metaray") and "bf16" not in k), key=lambda k: out[k]["tasks_per_s"], default=None)
    return {"tasks": wl["tasks"], "modes": out, "skipped": skipped, "best_metaray": best,
            "best_vs_learn2learn": out[best]["tasks_per_s"] / l2l_rate if (best and l2l_rate) else None}


def actors(wl: dict, device, counts, steps: int) -> dict:
    import ray

    import cloudpickle

    from metaray.cluster import ClusterConfig, WorkerPool, WorkerSpec

    # the actors cannot import this script by name: its classes (the task source, ResNet-12) travel by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    spec = WorkerSpec(problem=functools.partial(ModelProblem, wl["model"](), "cross_entropy"), solver="maml",
                      solver_options={"inner_steps": 5, "inner_lr": 0.4}, source=wl["source"],
                      device="cuda" if device.type == "cuda" else "cpu")
    torch.manual_seed(0)
    x = ModelProblem(wl["model"](), "cross_entropy").initial_params()
    out = {}
    started = not ray.is_initialized()  # inside a process that already runs Ray (a test session), join it
    if started:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        # prefetch "auto" is on for GPU actors (off on a CPU); one actor is also timed with it off
        for n, prefetch in [(n, "auto") for n in counts] + [(1, False)]:
            gpus = 1.0 / n if device.type == "cuda" else 0.0
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // max(n, 1) - (1 if n == 1 else 0)) if device.type == "cuda" else 1
            cfg = ClusterConfig(num_workers=n, num_cpus_per_worker=cpus, num_gpus_per_worker=gpus, metrics=False,
                                tasks_per_batch="auto", prefetch=prefetch)
            name = str(n) if prefetch == "auto" else f"{n}, prefetch off"
            try:
                with WorkerPool(spec, cfg, f"gpu-bench-{n}-{prefetch}") as pool:
                    keys = lambda s: [("train", s, i) for i in range(wl["tasks"])]  # noqa: E731
                    pool.step(x, keys(0))  # warm-up: the "auto" measurement happens here
                    t = time.perf_counter()
                    for s in range(1, steps + 1):
                        pool.step(x, keys(s))
                    out[name] = {"tasks_per_s": steps * wl["tasks"] / (time.perf_counter() - t),
                                 "num_gpus_per_worker": gpus, "prefetch": pool._prefetch[0],
                                 "loaded_ahead": sum(w["prefetch"]["hits"] for w in pool.workers().values())}
            except Exception as e:  # noqa: BLE001
                out[name] = f"not run: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        if started:
            ray.shutdown()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the CPU smoke mode)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-actors", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py: no CUDA device; use --device cpu --quick for the CPU smoke mode")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    repeats = args.repeats or (2 if args.quick else 5)
    t0 = time.perf_counter()
    wls = workloads(args.quick)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "quick": args.quick,
              "torch": torch.__version__, "workloads": {k: single_process(k, wl, device, repeats) for k, wl in wls.items()}}
    if not args.no_actors:
        result["actors_sharing_the_device"] = actors(wls["conv4"], device, (1, 2) if args.quick else (1, 2, 4), 2 if args.quick else 5)
    result["seconds"] = time.perf_counter() - t0
    text = json.dumps(result, indent=1, default=float)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
