"""Meta-train a coordinate-wise LSTM optimizer (solver "l2o"), save it, and use it as a torch.optim optimizer.

    .venv/bin/python examples/learned_optimizer.py [--outer-steps 300] [--out /tmp/lstm_optimizer.pt]

1. Meta-training: a plain loop (the meta-learner owns the loop) over optimizee tasks from
   ``SyntheticClassification`` (small sigmoid MLPs on random Gaussian-cluster problems, 8 per task), 40-step
   trajectories in truncations of 20, Adam on the LSTM's weights.
2. The trained optimizer is saved with ``metaray.platform.learned_optimizer.save``.
3. An ordinary ``nn.Module`` (a fresh MLP on a held-out problem of the same family) is trained outside metaray
   with ``from_file(...)``, a ``torch.optim.Optimizer``, next to Adam at several learning rates.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as Fn
from torch import nn

import metaray.solvers as S
from metaray.platform.learned_optimizer import from_file, meta_train, save
from metaray.solvers.learned import init_weights
from metaray.tasks import SyntheticClassification


def train_optimizer(outer_steps: int, seed: int = 0) -> tuple[dict, S.Solver]:
    source = SyntheticClassification(batch=8, seed=seed)
    solver = S.make("l2o", arch="lstm", inner_steps=20, horizon=40, log_loss=True, grad_clip=10.0)
    t0 = time.time()

    def report(step: int, hg) -> None:
        if step % 50 == 0:
            print(f"meta step {step:4d}  meta-loss {hg.metrics['meta_loss']:.4f}  train loss {hg.inner_loss:.4f}  "
                  f"({time.time() - t0:.1f} s)")

    weights, _ = meta_train(solver, source, init_weights(solver.options.net(), seed=seed), outer_steps, on_step=report)
    return weights, solver


def train_module(make_opt, data, val, steps: int) -> tuple[list[float], float]:
    """An ordinary PyTorch training loop on an nn.Module; returns train losses and the final held-out loss."""
    xs, ys = data
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(xs.shape[1], 16), nn.Sigmoid(), nn.Linear(16, int(ys.max()) + 1))
    opt = make_opt(model.parameters())
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = Fn.cross_entropy(model(xs), ys)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(Fn.cross_entropy(model(xs), ys).item())
        return losses, Fn.cross_entropy(model(val[0]), val[1]).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outer-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=40, help="training steps of the ordinary model")
    ap.add_argument("--out", default="/tmp/lstm_optimizer.pt")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny coordinate-wise nets: threads only add overhead

    weights, solver = train_optimizer(args.outer_steps)
    path = save(args.out, weights, solver.options.net())
    print(f"saved the learned optimizer to {path}")

    task = SyntheticClassification(batch=1, seed=0).sample(("test", 0, 0))  # held-out problem
    data, val = (task.x_train[0], task.y_train[0]), (task.x_val[0], task.y_val[0])
    runs = {"learned (LSTM)": lambda p: from_file(path, p)}
    for lr in (0.01, 0.03, 0.1, 0.3):
        runs[f"Adam lr={lr}"] = lambda p, lr=lr: torch.optim.Adam(p, lr=lr)
    print(f"\ntraining an nn.Module for {args.steps} steps on a held-out problem (train cross entropy):")
    marks = [0, 10, 20, args.steps]
    print(f"{'optimizer':>16} " + " ".join(f"{'step ' + str(m):>9}" for m in marks) + "  val loss")
    for name, make_opt in runs.items():
        losses, val_loss = train_module(make_opt, data, val, args.steps)
        print(f"{name:>16} " + " ".join(f"{losses[m]:9.4f}" for m in marks) + f"  {val_loss:8.4f}")


if __name__ == "__main__":
    main()
