"""The meta-learner: owns the outer variables and the outer loop.

One outer step (survey 001 eq. 1, stochastic over tasks):

    keys  = [("train", t, i) for i < B]               (single-task HPO: ("train", 0, i), the same every step)
    g     = aggregate_i dF_i(x, y_i*(x))/dx            (the pool: actors compute, aggregate in key order)
    g     = g · min(1, c / ‖g‖)                        (optional global-norm clipping)
    x     = optimizer_step(x, g, lr(t))                (torch SGD / Adam / AdamW, lr from the schedule)

A non-finite loss, hypergradient or update is never applied: the step raises ``NonFiniteError`` and the outer
variables stay as they were. The loop is the user's: ``for _ in range(n): learner.step()`` works anywhere;
``metaray.launch`` adds checkpoints, validation and reports around the same calls.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..cluster.reduce import square_sum
from ..solvers.core import NonFiniteError, Params, check_params
from .config import OuterConfig, TasksConfig


# ----------------------------------------------------------------------------------------------------------
# Outer optimizer and schedule
# ----------------------------------------------------------------------------------------------------------


def make_optimizer(outer: OuterConfig, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    params = list(params)
    if outer.optimizer == "sgd":
        return torch.optim.SGD(params, lr=outer.lr, momentum=outer.momentum, nesterov=outer.nesterov, weight_decay=outer.weight_decay)
    cls = torch.optim.Adam if outer.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=outer.lr, betas=tuple(outer.betas), eps=outer.eps, weight_decay=outer.weight_decay)


def learning_rate(outer: OuterConfig, step: int, total_steps: int) -> float:
    """The outer learning rate at (0-based) step ``step``: a pure function of the step, so resume is exact."""
    if outer.warmup_steps and step < outer.warmup_steps:
        return outer.lr * (step + 1) / outer.warmup_steps
    t = step - outer.warmup_steps
    if outer.schedule == "constant":
        return outer.lr
    if outer.schedule == "step":
        return outer.lr * outer.gamma ** (t // outer.decay_every)
    if outer.schedule == "exponential":
        return outer.lr * outer.gamma ** (t / outer.decay_every)
    span = max(total_steps - outer.warmup_steps, 1)  # cosine
    return outer.min_lr + 0.5 * (outer.lr - outer.min_lr) * (1 + math.cos(math.pi * min(t, span) / span))


# ----------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestResult:
    """Mean of a metric over test tasks with its 95% confidence interval (1.96 · sd / √n, as few-shot papers report)."""

    metric: str
    mean: float
    ci95: float
    num_tasks: int
    values: tuple[float, ...] = field(default=(), repr=False)

    def __str__(self) -> str:
        if self.metric == "accuracy":
            return f"{100 * self.mean:.2f}% ± {100 * self.ci95:.2f}% (95% CI, {self.num_tasks} tasks)"
        return f"{self.metric} {self.mean:.4f} ± {self.ci95:.4f} (95% CI, {self.num_tasks} tasks)"

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mean": self.mean, "ci95": self.ci95, "num_tasks": self.num_tasks}


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    v = torch.tensor(list(values), dtype=torch.float64)
    if v.numel() == 0:
        return float("nan"), float("nan")
    if v.numel() == 1:
        return float(v[0]), float("nan")
    return float(v.mean()), float(1.96 * v.std(unbiased=True) / math.sqrt(v.numel()))


def task_value(entry: Any, metric: str) -> float:
    """One task's value of ``metric`` from a pool's per-task entry (a mapping or a HyperGrad-like object)."""
    if isinstance(entry, Mapping):
        if metric in entry:
            return float(entry[metric])
        metrics = entry.get("metrics", {})
    else:
        if metric in ("outer_loss", "inner_loss"):
            return float(getattr(entry, metric))
        metrics = getattr(entry, "metrics", {})
    if metric not in metrics:
        raise KeyError(f"metric {metric!r} not reported by the problem (it reports: {sorted(metrics)})")
    return float(metrics[metric])


# ----------------------------------------------------------------------------------------------------------
# The meta-learner
# ----------------------------------------------------------------------------------------------------------


class MetaLearner:
    """Outer variables + outer optimizer over a worker pool (``metaray.cluster.WorkerPool`` or ``InProcessPool``).

    ``step()`` runs one outer step and returns its metrics row; ``validate()`` and ``test()`` adapt without
    differentiating; ``state_dict()`` / ``load_state_dict()`` cover everything the trajectory depends on.
    """

    def __init__(
        self,
        pool: Any,
        initial_params: Params,
        outer: OuterConfig | None = None,
        tasks: TasksConfig | None = None,
        *,
        total_steps: int = 1,
        metric: str = "outer_loss",
    ):
        x0 = check_params(initial_params, "initial outer params")
        self.pool = pool
        self.outer = outer or OuterConfig()
        self.tasks = tasks or TasksConfig()
        self.total_steps = total_steps
        self.metric = metric
        # Leaf tensors the torch optimizer updates in place; the pool only ever sees detached copies.
        self.params: dict[str, torch.Tensor] = {k: v.detach().clone().requires_grad_(True) for k, v in x0.items()}
        self.optimizer = make_optimizer(self.outer, self.params.values())
        self.step_count = 0

    # ---- the outer variables ----------------------------------------------------------------------------

    @property
    def x(self) -> Params:
        """The current outer params (detached)."""
        return {k: v.detach() for k, v in self.params.items()}

    def train_keys(self, step: int) -> list[tuple[str, int, int]]:
        t = 0 if self.tasks.persistent else step
        return [("train", t, i) for i in range(self.tasks.meta_batch_size)]

    # ---- one outer step -----------------------------------------------------------------------------------

    def step(self) -> dict[str, Any]:
        t = self.step_count
        lr = learning_rate(self.outer, t, self.total_steps)
        keys = self.train_keys(t)
        start = time.perf_counter()
        res = self.pool.step(self.x, keys)
        grad = {k: res.grad[k] for k in self.params}
        for name, value in (("outer_loss", res.outer_loss), ("inner_loss", res.inner_loss)):
            if not math.isfinite(float(value)):
                raise NonFiniteError(f"outer step {t}: the aggregated {name} is {value}; the update was not applied", where=name)
        bad = [k for k, g in grad.items() if not bool(torch.isfinite(g).all())]
        if bad:
            raise NonFiniteError(
                f"outer step {t}: the aggregated hypergradient is not finite in {bad}; the update was not applied",
                where="hypergradient",
            )
        # order-free (cluster/reduce.py): the same bits for any torch thread count, and for a sum over blocks
        grad_norm = math.sqrt(square_sum(list(grad.values())))
        scale = 1.0
        if self.outer.clip_norm is not None and grad_norm > self.outer.clip_norm:
            scale = self.outer.clip_norm / (grad_norm + 1e-12)
        before = {k: p.detach().clone() for k, p in self.params.items()}
        for k, p in self.params.items():
            p.grad = (grad[k] * scale).to(p.dtype)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        bad = [k for k, p in self.params.items() if not bool(torch.isfinite(p).all())]
        if bad:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(before[k])
            raise NonFiniteError(f"outer step {t}: the optimizer produced non-finite params in {bad}; reverted", where="update")
        update_norm = math.sqrt(square_sum([p.detach() - before[k] for k, p in self.params.items()]))
        self.step_count += 1
        row: dict[str, Any] = {
            "step": t + 1,
            "lr": lr,
            "outer_loss": float(res.outer_loss),
            "inner_loss": float(res.inner_loss),
            "grad_norm": grad_norm,
            "clipped": scale < 1.0,
            "update_norm": update_norm,
            "restarts": int(getattr(res, "restarts", 0) or 0),
            "retries": int(getattr(res, "retries", 0) or 0),
            "seconds": time.perf_counter() - start,
        }
        for name, value in (getattr(res, "metrics", None) or {}).items():
            if isinstance(value, (int, float)):
                row[f"train_{name}"] = float(value)
        for w, info in sorted((getattr(res, "per_worker", None) or {}).items()):
            for name in ("tasks", "inner_loss", "seconds", "peak_memory_bytes"):
                if info.get(name) is not None:
                    v = info[name]
                    if name == "tasks":
                        row[f"worker{w}_tasks"] = v if isinstance(v, int) else len(v)
                    elif name == "peak_memory_bytes":  # solvers/memory.py says what is measured on which device
                        row[f"worker{w}_peak_memory_bytes"] = int(v)
                    else:
                        row[f"worker{w}_{name}"] = float(v)
        return row

    # ---- evaluation -------------------------------------------------------------------------------------

    def evaluate_keys(self, keys: Sequence[tuple[str, int, int]], x: Params | None = None, *, chunk: int = 200, progress: bool = False, desc: str = "eval") -> list[Any]:
        """Per-task entries of ``pool.evaluate`` over ``keys``, in key order (chunked, with a progress bar)."""
        x = self.x if x is None else x
        entries: list[Any] = []
        chunks = [keys[i : i + chunk] for i in range(0, len(keys), chunk)]
        bar = _progress(total=len(keys), desc=desc, enabled=progress)
        try:
            for c in chunks:
                res = self.pool.evaluate(x, list(c))
                per_task = list(res.per_task)
                if len(per_task) != len(c):
                    raise RuntimeError(f"pool.evaluate returned {len(per_task)} task entries for {len(c)} keys")
                entries.extend(per_task)
                bar.update(len(c))
        finally:
            bar.close()
        return entries

    def validate(self, num_tasks: int | None = None, x: Params | None = None) -> dict[str, float]:
        """Meta-validation on ('val', 0, i): mean outer loss and headline metric after adaptation."""
        n = self.tasks.val_tasks if num_tasks is None else num_tasks
        if n == 0:
            return {}
        # A fixed validation set ('val', 0, i): points on the curve are comparable across steps.
        entries = self.evaluate_keys([("val", 0, i) for i in range(n)], x)
        out = {"val_outer_loss": mean_ci95([task_value(e, "outer_loss") for e in entries])[0]}
        if self.metric != "outer_loss":
            out[f"val_{self.metric}"] = mean_ci95([task_value(e, self.metric) for e in entries])[0]
        return out

    def test(self, num_tasks: int | None = None, x: Params | None = None, *, progress: bool = False, desc: str = "meta-test") -> TestResult:
        """Final meta-test on ('test', 0, i), i < num_tasks: mean and 95% CI of the headline metric."""
        n = self.tasks.test_tasks if num_tasks is None else num_tasks
        entries = self.evaluate_keys([("test", 0, i) for i in range(n)], x, progress=progress, desc=desc)
        values = [task_value(e, self.metric) for e in entries]
        mean, ci = mean_ci95(values)
        return TestResult(self.metric, mean, ci, len(values), tuple(values))

    # ---- state --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "params": {k: v.detach().clone() for k, v in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        params = state["params"]
        if params.keys() != self.params.keys():
            raise ValueError(f"checkpoint params {sorted(params)} do not match the run's {sorted(self.params)}")
        with torch.no_grad():
            for k, p in self.params.items():
                if params[k].shape != p.shape:
                    raise ValueError(f"checkpoint param {k!r} has shape {tuple(params[k].shape)}, the run's has {tuple(p.shape)}")
                p.copy_(params[k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *a: Any, **k: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, leave=False)
