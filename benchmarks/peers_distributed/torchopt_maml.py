"""TorchOpt's distributed MAML (``torchopt.distributed``, RPC) on metaray's conv4 MAML peer workload.

Launched the way TorchOpt's own distributed few-shot example is (torchrun, one process per worker, RPC
initialised by ``torchopt.distributed.auto_init_rpc``), from the peer environment:

    OMP_NUM_THREADS=1 .venv-bench/bin/torchrun --nnodes 1 --nproc_per_node 2 \
        --master_addr 127.0.0.1 --master_port 29517 \
        benchmarks/peers_distributed/torchopt_maml.py [--tasks 8] [--warmup 3] [--repeats 10] \
        [--partition batch|exclusive] [--single-process]

Workload: exactly ``benchmarks/peers.py``'s "maml" workload, imported from it (``maml_setup`` and ``MAML``):
second-order MAML meta-gradient, metaray's Conv4 (32 channels, BatchNorm without running stats), 5-way 1-shot,
15 queries per class, 28x28 synthetic inputs (seeded generator), 5 inner steps of 0.4 (TorchOpt ``MetaSGD``),
mean query loss over the tasks of a meta-batch (8 by default).

How TorchOpt's distributed mode computes it (as in its example): rank 0 holds the outer net; each step it
wraps a differentiable copy of the net (``torchopt.module_clone(by='copy')``) in an RPC ``RRef`` and calls an
``@todist.parallelize``-decorated inner loop inside a distributed-autograd context. The partitioner splits the
stacked tasks along dim 0 and sends each part to a worker by RPC (rank 0 is a worker too); each worker fetches
the net (``RRef.to_here``), adapts it per task with ``MetaSGD`` and returns its query losses, which the reducer
averages on rank 0; ``todist.autograd.backward`` then runs the second-order backward across the workers and
leaves the meta-gradient in the outer net's ``.grad``. Only the meta-gradient is timed (no outer optimizer
step, so every timed step computes the same thing), as in peers.py.

``--partition batch`` (default): ``dim_partitioner(exclusive=False)``, one RPC per worker carrying its share of
the tasks (4 + 4 for 8 tasks on 2 workers). ``--partition exclusive``: one RPC per task, round robin, as in
TorchOpt's example (``exclusive=True``); the calls then run concurrently on each worker's RPC thread pool.

One torch thread per process. Rank 0 prints one JSON line: median ms/step over ``--repeats`` timed steps after
``--warmup`` steps, and how far the distributed meta-gradient is from the single-process TorchOpt one.
``--single-process`` also times the single-process TorchOpt loop (peers.py's ``torchopt_step``) on rank 0.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as Fn  # noqa: E402

import torchopt  # noqa: E402
import torchopt.distributed as todist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peers  # noqa: E402  (the very workload of peers.py: same model, seed, data)
from peers import MAML, maml_setup  # noqa: E402

# peers.py loads metaray/tasks/models.py by path (the peer env has no metaray) as a fresh, unregistered module on
# every call, so its Conv4 could not be pickled for the RPC that ships the net. Load it once, register it, and
# have peers.py use that one: every process then resolves the class by name.
_models_mod = peers._models()
sys.modules[_models_mod.__name__] = _models_mod
peers._models = lambda: _models_mod

torch.set_num_threads(1)


def _adapt_and_query(original_net, x_spt, y_spt, x_qry, y_qry, n_inner, lr):
    """Per-task query losses of MetaSGD-adapted copies of ``original_net`` (tasks stacked along dim 0)."""
    losses = []
    for xs, ys, xq, yq in zip(x_spt, y_spt, x_qry, y_qry):
        net = torchopt.module_clone(original_net, by="reference", detach_buffers=True)
        inner = torchopt.MetaSGD(net, lr=lr)
        for _ in range(n_inner):
            inner.step(Fn.cross_entropy(net(xs), ys))
        losses.append(Fn.cross_entropy(net(xq), yq))
    return torch.stack(losses)


def _cat_mean(results):
    return torch.cat(list(results)).mean()


def _inner_loop(net_rref, x_spt, y_spt, x_qry, y_qry, n_inner, lr):
    """Runs on a worker (by RPC): fetch the outer net from rank 0, adapt on this worker's tasks."""
    return _adapt_and_query(net_rref.to_here(), x_spt, y_spt, x_qry, y_qry, n_inner, lr)


# The two partitionings of TorchOpt's API: one RPC per worker (a share of the tasks each) or one RPC per task.
inner_loop_batch = todist.parallelize(
    partitioner=todist.dim_partitioner(dim=0, exclusive=False, keepdim=True), reducer=_cat_mean,
)(_inner_loop)


def _inner_loop_task(net_rref, x_spt, y_spt, x_qry, y_qry, n_inner, lr):
    """The same as ``_inner_loop`` (parallelize renames and re-registers the function it wraps, so each needs
    its own)."""
    return _adapt_and_query(net_rref.to_here(), x_spt, y_spt, x_qry, y_qry, n_inner, lr)


inner_loop_exclusive = todist.parallelize(
    partitioner=todist.dim_partitioner(dim=0, exclusive=True, keepdim=True), reducer=_cat_mean,
)(_inner_loop_task)


def _stack(tasks):
    return [torch.stack([t[i] for t in tasks]) for i in range(4)]


def distributed_step(net, stacked, inner_loop):
    for p in net.parameters():
        p.grad = None
    # as in TorchOpt's example: parameters sent by RPC would be detached, so ship a CloneBackward copy
    net_rref = todist.rpc.RRef(torchopt.module_clone(net, by="copy"))
    with todist.autograd.context() as ctx:
        loss = inner_loop(net_rref, *stacked, MAML["steps"], MAML["lr"])
        todist.autograd.backward(ctx, loss)
    return [p.grad.detach().clone() for p in net.parameters()]


def single_process_step(net, tasks):
    """peers.py's single-process TorchOpt MetaSGD loop (mean over tasks), for the time and the gradient check."""
    inner = torchopt.MetaSGD(net, lr=MAML["lr"])
    net_state = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
    opt_state = torchopt.extract_state_dict(inner, by="reference")
    for p in net.parameters():
        p.grad = None
    for xs, ys, xq, yq in tasks:
        for _ in range(MAML["steps"]):
            inner.step(Fn.cross_entropy(net(xs), ys))
        (Fn.cross_entropy(net(xq), yq) / len(tasks)).backward()
        torchopt.recover_state_dict(net, net_state)
        torchopt.recover_state_dict(inner, opt_state)
    return [p.grad.detach().clone() for p in net.parameters()]


def _timed(fn, warmup, repeats):
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, times


def _rel(g, ref):
    num = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(g, ref))
    den = sum(float(b.double().pow(2).sum()) for b in ref)
    return (num / max(den, 1e-300)) ** 0.5


@todist.rank_zero_only
def driver(args):
    model, tasks = maml_setup(args.tasks)
    stacked = _stack(tasks)
    inner_loop = inner_loop_batch if args.partition == "batch" else inner_loop_exclusive
    t0 = time.perf_counter()
    g_dist, times = _timed(lambda: distributed_step(model, stacked, inner_loop), args.warmup, args.repeats)
    wall = time.perf_counter() - t0
    out = {
        "impl": "torchopt.distributed (RPC, torchrun)", "partition": args.partition,
        "workers": todist.get_world_size(), "threads_per_process": torch.get_num_threads(),
        "workload": {"model": "metaray Conv4(ways=5, hidden=32), BatchNorm(track_running_stats=False)",
                     "ways": 5, "shots": 1, "queries_per_class": 15, "image": [1, 28, 28], "tasks": args.tasks,
                     "inner_steps": MAML["steps"], "inner_lr": MAML["lr"], "order": "second",
                     "source": "benchmarks/peers.py maml_setup / MAML"},
        "warmup": args.warmup, "repeats": args.repeats,
        "median_ms": statistics.median(times) * 1e3, "times_ms": [round(t * 1e3, 2) for t in times],
        "wall_s_incl_warmup": round(wall, 2),
        "torch": torch.__version__, "torchopt": torchopt.__version__,
    }
    g_ref = single_process_step(model, tasks)
    out["grad_rel_diff_vs_single_process"] = _rel(g_dist, g_ref)
    out["grad_norm"] = sum(float(g.double().pow(2).sum()) for g in g_dist) ** 0.5
    if args.single_process:
        _, t_single = _timed(lambda: single_process_step(model, tasks), args.warmup, args.repeats)
        out["single_process_median_ms"] = statistics.median(t_single) * 1e3
        out["single_process_times_ms"] = [round(t * 1e3, 2) for t in t_single]
    if args.grads_out:  # to compare with metaray's meta-gradient on the same tasks
        torch.save([g.double() for g in g_dist], args.grads_out)
    print(json.dumps(out), flush=True)


@todist.auto_init_rpc()
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--partition", choices=["batch", "exclusive"], default="batch")
    ap.add_argument("--single-process", action="store_true", help="also time the single-process TorchOpt loop")
    ap.add_argument("--grads-out", default=None, help="torch.save the distributed meta-gradient (list, float64) here")
    args = ap.parse_args()
    driver(args)  # rank 0 drives; the other ranks only serve RPCs until rpc.shutdown (registered at exit)


if __name__ == "__main__":
    main()
