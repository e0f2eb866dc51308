"""The exact sum of task hypergradients (metaray/cluster/reduce.py): its encoder, tasks at once vs one at a time.

Every linear reduction (mean, weighted) rounds each task's c_i g_i to a shared int64 grid and adds the integers
(reduce.py); one process (``aggregate``), each actor (``slice_kept``) and the block sums (``sum_slice``) run it.
Timed side by side, alternating, on one core, float32 gradients of d params in three tensors, n tasks:

- tasks at once (``reduce.exact_sum``, as built): ``encode_sum`` takes the accumulator chunk by chunk and every
  task inside each chunk, then the chunked ``decode``;
- one task at a time (``encode_into`` per task, as before this benchmark existed): the same arithmetic with
  the tasks outside, so the int64 accumulator goes through memory once per task;
- yardstick, not exact: the float32 sequential sum Σ c_i g_i (what a plain ``+`` would cost).

Both exact modes must give the same bits (checked). Reported: median ms and the speed-up of tasks at once.

    .venv/bin/python benchmarks/exact_sum.py [--quick] [--json OUT.json]
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from common import section_main, table  # noqa: E402  (puts the checkout on sys.path)

from metaray.cluster import reduce  # noqa: E402
from metaray.cluster.host_memory import keep_host_memory  # noqa: E402


def gradients(d: int, n: int) -> list[dict[str, torch.Tensor]]:
    """n float32 gradients of d params in three tensors (a large weight, another, a small bias), their scales
    spread over two decades so the shared exponent is set by some tasks and not others."""
    g = torch.Generator().manual_seed(0)
    shapes = {"w1": (d // 2,), "w2": (d - d // 2 - 1000,), "b": (1000,)}
    return [{k: torch.randn(s, generator=g) * 10.0 ** (i % 3 - 1) for k, s in shapes.items()} for i in range(n)]


def one_at_a_time(grads, coefs):
    exps = reduce.exponents(reduce.max_abs_many(grads), coefs)
    acc = None
    for g, c in zip(grads, coefs):
        acc = reduce.encode_into(acc, g, c, exps)
    return reduce.decode(acc, exps, {k: v.dtype for k, v in grads[0].items()})


def float_sum(grads, coefs):
    return {k: sum((c * g[k] for g, c in zip(grads[1:], coefs[1:])), coefs[0] * grads[0][k]) for k in grads[0]}


def build(quick: bool, img_dir: Path) -> dict:
    keep_host_memory()  # as metaray's pools do: freed gradient-sized buffers are reused, not page-faulted anew
    sizes = [1_000_000] if quick else [1_000_000, 10_000_000, 30_000_000]
    repeats = 3 if quick else 5
    modes = {"tasks at once (exact_sum, as built)": reduce.exact_sum, "one task at a time (encode_into)": one_at_a_time,
             "float32 sequential sum (not exact)": float_sum}
    rows, data, notes = [], {}, []
    for d in sizes:
        for n in (4, 8):
            grads, coefs = gradients(d, n), reduce.coefficients("mean", n, None)
            outs = {name: f(grads, coefs) for name, f in modes.items()}  # warm-up, and the bits compared
            a, b = (outs[m] for m in list(modes)[:2])
            same = all(torch.equal(a[k], b[k]) for k in a)
            if not same:
                notes.append(f"d={d}, n={n}: the two exact modes differ")
            times = {name: [] for name in modes}
            for _ in range(repeats):
                for name, f in modes.items():
                    t0 = time.perf_counter()
                    f(grads, coefs)
                    times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(t) for name, t in times.items()}
            base = med["one task at a time (encode_into)"]
            for name in modes:
                rows.append([f"{d / 1e6:.0f}M", n, name, med[name] * 1e3, base / med[name],
                             "n/a" if name.startswith("float32") else "yes" if same else "NO"])
            data[f"{d}/{n}"] = {"seconds": times, "bit_identical": same}
            del grads, outs, a, b
    return {
        "title": "The exact sum's encoder: tasks at once vs one at a time",
        "intro": (f"One core, float32, d params in three tensors, n tasks, the mean's coefficients; median of {repeats} "
                  "alternating repeats. 'speed-up' is one task at a time / this mode. 'same bits' compares the two "
                  "exact modes."),
        "tables": [table("ms per exact sum (max |g|, encode, decode)",
                         ["params", "tasks", "mode", "ms", "speed-up vs one at a time", "same bits"], rows)],
        "plots": [],
        "notes": notes,
        "data": data,
    }


if __name__ == "__main__":
    section_main(__doc__, build)
