"""Batched task hypergradients: the tasks of one step stacked along a leading dimension and vmapped.

A solver that batches describes one task's hypergradient as a **surrogate**: a function
``surrogate(problem, x, task) -> (s, aux)`` written with ``torch.func`` only (no ``float()``, no ``.item()``, no
data-dependent Python control flow), where s is a scalar whose gradient with respect to x *is* the task's
hypergradient and aux holds what ``HyperGrad`` reports. For second-order MAML s = F(x, y_T(x)); for first-order
methods the surrogate stops the gradient where the method drops a term (FOMAML: y_T enters as
y_T + (Ψ₀(x) − Ψ₀(x).detach()), whose value is y_T and whose Jacobian is ∂Ψ₀/∂x; Reptile: <Ψ₀(x), y₀ − y_T>).
From one surrogate this module makes

- the per-task batch ``vmap(grad(surrogate))(x, tasks)``, unstacked into ``list[HyperGrad]``, equal to the task
  loop (tests/solvers/test_batched.py: float64, 1e-8, MLP and conv4 with BatchNorm);
- the reduced form ``grad(mean ∘ vmap(surrogate))(x)``: the gradient of the task mean in one backward pass,
  without B per-task gradients (``hypergrad_mean``; for the mean rule where per-task results are not needed).

Finiteness is checked after the vmapped computation, on the stacked outputs, in the loop's order (inner steps,
outer loss, hypergradient, final inner loss) and with the loop's messages, the NonFiniteError naming the first
bad task.

Problems opt in (``ModelProblem`` and ``FeatureProblem`` do) with
``batchable(tasks) -> bool`` (same shapes), ``stack_tasks(tasks) -> task`` (tensors stacked along dim 0),
``outer_loss_and_metric_tensors(x, y, task)`` (metrics as tensors) and optionally ``batched() -> problem`` (a
twin safe under vmap: ModelProblem's computes BatchNorm with plain tensor ops, because torch's BatchNorm batching
rule gives wrong second-order gradients in the reduced form, NOTES.md). Any other problem, ragged tasks and
configurations that do not batch (checkpointing) fall back to the loop, said once per solver instance in a
warning. BatchNorm statistics are per task (the batch statistics of that task's support or query set), as in
MAML and the loop.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .core import HyperGrad, NonFiniteError, Params, check_params, check_problem, check_scalar, detached, inner_start, project

Surrogate = Callable[[Any, Params, Any], tuple[Tensor, dict]]
Compute = Callable[[Params, bool], tuple[Params, dict]]  # (x, mean) -> (grad, aux), as ``run`` returns

PROTOCOL = ("batchable", "stack_tasks", "outer_loss_and_metric_tensors")


class BatchFallbackWarning(UserWarning):
    """A batching solver computed a batch as a task loop (the warning says why); shown once per solver."""


# ----------------------------------------------------------------------------------------------------------
# Pieces the solvers' surrogates are written with
# ----------------------------------------------------------------------------------------------------------


def inner_step(problem: Any, x: Params, y: Params, task: Any, lr: float | Params, t: int) -> tuple[Params, Tensor]:
    """``gd_step`` in torch.func: y − lr ⊙ ∇_y f(x, y), projected; and f(x, y) (checked finite later)."""
    g, loss = torch.func.grad_and_value(
        lambda yy: check_scalar(problem.inner_loss(x, yy, task), f"inner_loss at inner step {t}"))(y)
    if isinstance(lr, dict):
        y_next = {k: y[k] - lr[k] * g[k] for k in y}
    else:
        y_next = {k: y[k] - lr * g[k] for k in y}
    return project(problem, x, y_next), loss.detach()


def unroll(problem: Any, x: Params, y: Params, task: Any, steps: range, lr: Callable[[Params], float | Params],
           losses: list[Tensor], *, graph: bool = True) -> Params:
    """Inner steps ``steps`` (their indices name them in messages) from y; with ``graph=False`` each iterate is a
    constant of x (the loop's ``create_graph=False``). Appends each step's inner loss to ``losses``."""
    for t in steps:
        xs = x if graph else detached(x)
        y, loss = inner_step(problem, xs, y, task, lr(xs), t)
        if not graph:
            y = detached(y)
        losses.append(loss)
    return y


def outer_eval(problem: Any, x: Params, y: Params, task: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """F(x, y) with its graph and the problem's metrics as tensors (the batched ``core.outer_eval``)."""
    loss, metrics = problem.outer_loss_and_metric_tensors(x, y, task)
    return check_scalar(loss, "outer_loss"), {k: torch.as_tensor(v).detach() for k, v in (metrics or {}).items()}


def report(problem: Any, x: Params, y: Params, task: Any, outer: tuple[Tensor, dict], losses: list[Tensor]) -> dict:
    """The aux a surrogate returns: F and f at the inner solution y, the problem's metrics and every inner step's
    loss (what ``unrolled.finish`` reports and what the loop checks on the way)."""
    xd, yd = detached(x), detached(y)
    inner = check_scalar(problem.inner_loss(xd, yd, task), "inner_loss").detach().reshape(())
    steps = torch.stack([v.reshape(()) for v in losses]) if losses else torch.zeros(0, dtype=inner.dtype, device=inner.device)
    return {"outer": outer[0].detach().reshape(()), "inner": inner, "steps": steps, "metrics": outer[1]}


def start(problem: Any, x: Params, task: Any) -> Params:
    """y₀ = Ψ₀(x) with its graph (``core.inner_start``)."""
    return inner_start(problem, x, task)


# ----------------------------------------------------------------------------------------------------------
# Stacking and the vmapped computation
# ----------------------------------------------------------------------------------------------------------


def split(task: Any) -> tuple[dict[str, Tensor], Callable[[dict[str, Tensor]], Any]]:
    """The tensors of a stacked task (a dataclass or a dict) and how to put a task back together around them."""
    if dataclasses.is_dataclass(task) and not isinstance(task, type):
        tensors = {f.name: getattr(task, f.name) for f in dataclasses.fields(task) if isinstance(getattr(task, f.name), Tensor)}
        return tensors, lambda t: dataclasses.replace(task, **t)
    if isinstance(task, dict):
        tensors = {k: v for k, v in task.items() if isinstance(v, Tensor)}
        return tensors, lambda t: {**task, **t}
    if isinstance(task, Tensor):
        return {"task": task}, lambda t: t["task"]
    raise TypeError(f"stack_tasks must return a dataclass, a dict or a tensor, got {type(task).__name__}")


def refusal(problem: Any, tasks: Sequence[Any]) -> str | None:
    """Why these tasks cannot be batched on this problem, or None when they can."""
    missing = [m for m in PROTOCOL if not callable(getattr(problem, m, None))]
    if missing:
        return (f"problem {type(problem).__name__} does not declare batchable tasks (it has no "
                f"{', '.join(missing)}; see metaray.solvers.batched)")
    if not problem.batchable(list(tasks)):
        return f"problem {type(problem).__name__} says these {len(tasks)} tasks do not batch (ragged shapes)"
    return None


def run(problem: Any, x: Params, tasks: Sequence[Any], surrogate: Surrogate, *, mean: bool = False):
    """(grad, aux) of the surrogate for every task (stacked along dim 0), or of the task mean with ``mean``."""
    twin = problem.batched() if callable(getattr(problem, "batched", None)) else problem
    tensors, rebuild = split(problem.stack_tasks(list(tasks)))

    def one(xx: Params, t: dict[str, Tensor]) -> tuple[Tensor, dict]:
        return surrogate(twin, xx, rebuild(t))

    if mean:
        def mean_of(xx: Params):
            s, aux = torch.func.vmap(one, in_dims=(None, 0))(xx, tensors)
            return s.mean(), aux

        return torch.func.grad(mean_of, has_aux=True)(x)
    return torch.func.vmap(torch.func.grad(one, has_aux=True), in_dims=(None, 0))(x, tensors)


def _check(grad: Params, aux: dict, tasks: Sequence[Any], per_task: bool) -> None:
    """The loop's finiteness checks, on the stacked outputs, in the loop's order; names the first bad task."""
    ok = torch.isfinite(aux["outer"]) & torch.isfinite(aux["inner"]) & torch.isfinite(aux["steps"]).all(-1)
    grad_ok = [torch.isfinite(g.reshape(g.shape[0], -1) if per_task else g.reshape(1, -1)).all(-1) for g in grad.values()]
    if bool(ok.all()) and all(bool(g.all()) for g in grad_ok):
        return
    steps = aux["steps"].tolist()
    for i, task in enumerate(tasks):
        for t, v in enumerate(steps[i]):
            if not math.isfinite(v):
                raise NonFiniteError(f"inner_loss at inner step {t} is not finite ({v})", where=f"inner_loss at inner step {t}", task=task)
        v = float(aux["outer"][i])
        if not math.isfinite(v):
            raise NonFiniteError(f"outer_loss is not finite ({v})", where="outer_loss", task=task)
        if per_task:
            bad = [k for k, g in zip(grad, grad_ok) if not bool(g[i])]
            if bad:
                raise NonFiniteError(f"hypergradient has non-finite entries in {bad}", where="hypergradient", task=task)
        v = float(aux["inner"][i])
        if not math.isfinite(v):
            raise NonFiniteError(f"inner_loss is not finite ({v})", where="inner_loss", task=task)
    bad = [k for k, g in zip(grad, grad_ok) if not bool(g.all())]
    if bad:  # the reduced form: the mean gradient is what is non-finite
        raise NonFiniteError(f"hypergradient has non-finite entries in {bad}", where="hypergradient", task=list(tasks))


def hypergrads(x: Params, tasks: Sequence[Any], compute: Compute,
               metrics: dict[str, float] | None = None) -> list[HyperGrad]:
    """One HyperGrad per task, in order, from one batched computation; ``metrics`` are the solver's own
    (the same for every task)."""
    grad, aux = compute(x, False)
    _check(grad, aux, tasks, per_task=True)
    outer, inner = aux["outer"].tolist(), aux["inner"].tolist()
    names = list(aux["metrics"])
    values = {k: aux["metrics"][k].reshape(len(tasks), -1)[:, 0].tolist() for k in names}
    out = []
    for i in range(len(tasks)):
        m = {k: float(values[k][i]) for k in names}
        m.update(metrics or {})
        out.append(HyperGrad(grad={k: g[i].clone() for k, g in grad.items()}, outer_loss=float(outer[i]),
                             inner_loss=float(inner[i]), metrics=m))
    return out


def mean_hypergrad(x: Params, tasks: Sequence[Any], compute: Compute,
                   metrics: dict[str, float] | None = None) -> HyperGrad:
    """The mean over tasks in one HyperGrad: grad = the gradient of the task mean (one backward pass, no
    per-task gradients), losses and metrics the task means."""
    grad, aux = compute(x, True)
    _check(grad, aux, tasks, per_task=False)
    m = {k: float(v.to(torch.float64).mean()) for k, v in aux["metrics"].items()}
    m.update(metrics or {})
    return HyperGrad(grad=dict(grad), outer_loss=float(aux["outer"].to(torch.float64).mean()),
                     inner_loss=float(aux["inner"].to(torch.float64).mean()), metrics=m)


# ----------------------------------------------------------------------------------------------------------
# The solver mixin
# ----------------------------------------------------------------------------------------------------------


class Batched:
    """Mixin (before ``Solver`` in the bases) that batches ``hypergrad_batch`` by vmap over tasks.

    A solver provides ``_surrogate(problem, x, tasks) -> (surrogate, solver metrics)`` (the gradient-descent
    family), or overrides ``_batched_compute`` with its own batched computation (the implicit solvers' batched CG); either
    may return a string saying why this configuration does not batch (then the loop runs, with one warning per
    solver instance).
    """

    def _surrogate(self, problem: Any, x: Params, tasks: Sequence[Any]) -> tuple[Surrogate, dict] | str:
        raise NotImplementedError(f"{type(self).__name__} uses batched.Batched without a _surrogate or a _batched_compute")

    def _batched_compute(self, problem: Any, x: Params, tasks: Sequence[Any]) -> tuple[Compute, dict] | str:
        """How to compute these tasks at once: ``compute(x, mean) -> (grad, aux)`` with ``run``'s outputs (aux's
        metrics may hold per-task solver metrics as [B] tensors), and the solver metrics shared by all tasks."""
        plan = self._surrogate(problem, x, tasks)
        if isinstance(plan, str):
            return plan
        surrogate, metrics = plan
        return (lambda xx, mean: run(problem, xx, tasks, surrogate, mean=mean)), metrics

    def _batch_plan(self, problem: Any, x: Params, tasks: Sequence[Any]) -> tuple[Compute, dict] | None:
        why = refusal(problem, tasks)
        plan = self._batched_compute(problem, x, tasks) if why is None else why
        if isinstance(plan, str):
            if not self.__dict__.get("_batch_warned"):
                self.__dict__["_batch_warned"] = True
                warnings.warn(f"{getattr(self, 'name', type(self).__name__)}: computing the batch as a task loop: {plan}",
                              BatchFallbackWarning, stacklevel=3)
            return None
        return plan

    def hypergrad_batch(self, problem: Any, x: Params, tasks: Sequence[Any], states: Sequence[Any] | None = None) -> list[HyperGrad]:
        """Hypergradients of several tasks, in order: one vmapped computation when the problem batches the
        tasks, else the loop. Same results as the loop (to rounding)."""
        if states is not None and len(states) != len(tasks):
            raise ValueError(f"got {len(tasks)} tasks but {len(states)} states")
        if len(tasks) < 2:
            return super().hypergrad_batch(problem, x, tasks, states)  # type: ignore[misc]
        check_problem(problem)
        x = check_params(x, "outer params x")
        plan = self._batch_plan(problem, x, tasks)
        if plan is None:
            return super().hypergrad_batch(problem, x, tasks, states)  # type: ignore[misc]
        return hypergrads(detached(x), tasks, *plan)

    def hypergrad_mean(self, problem: Any, x: Params, tasks: Sequence[Any]) -> HyperGrad:
        """The mean of the tasks' hypergradients, losses and metrics as one HyperGrad, computed without per-task
        gradients where the tasks batch (the reduced form for the mean rule); else the mean of the loop."""
        if not tasks:
            raise ValueError("hypergrad_mean needs at least one task")
        check_problem(problem)
        x = check_params(x, "outer params x")
        plan = self._batch_plan(problem, x, tasks) if len(tasks) > 1 else None
        if plan is not None:
            return mean_hypergrad(detached(x), tasks, *plan)
        hgs = [self.hypergrad(problem, x, t) for t in tasks]  # type: ignore[attr-defined]
        names = [k for k in hgs[0].metrics if all(k in h.metrics for h in hgs)]
        return HyperGrad(grad={k: sum(h.grad[k] for h in hgs) / len(hgs) for k in x},
                         outer_loss=sum(h.outer_loss for h in hgs) / len(hgs),
                         inner_loss=sum(h.inner_loss for h in hgs) / len(hgs),
                         metrics={k: sum(float(h.metrics[k]) for h in hgs) / len(hgs) for k in names})


# ----------------------------------------------------------------------------------------------------------
# The surrogates of the gradient-descent family (maml, rad, trad, metasgd, fomaml, reptile)
# ----------------------------------------------------------------------------------------------------------


def constant_lr(lr: float) -> Callable[[Params], float]:
    return lambda x: lr


def unrolled(steps: int, lr: Callable[[Params], float | Params], window: int | None = None) -> Surrogate:
    """Reverse mode through the last ``window`` of ``steps`` inner steps (all when None): s = F(x, y_T(x)).
    Steps before the window run on constants of x, as in ``unrolled.reverse_hypergrad`` (trad's eq. 20)."""
    window = steps if window is None else min(window, steps)

    def surrogate(problem: Any, x: Params, task: Any) -> tuple[Tensor, dict]:
        losses: list[Tensor] = []
        y = start(problem, x, task)
        if window < steps:
            y = unroll(problem, x, detached(y), task, range(steps - window), lr, losses, graph=False)
        y = unroll(problem, x, y, task, range(steps - window, steps), lr, losses)
        outer = outer_eval(problem, x, y, task)
        return outer[0], report(problem, x, y, task, outer, losses)

    return surrogate


def first_order(steps: int, lr: float) -> Surrogate:
    """FOMAML: s = F(x, y_T + Ψ₀(x) − Ψ₀(x).detach()) with y_T a constant of x, so ds/dx = ∂F/∂x + (∂Ψ₀/∂x)ᵀ ∂F/∂y_T."""

    def surrogate(problem: Any, x: Params, task: Any) -> tuple[Tensor, dict]:
        losses: list[Tensor] = []
        y0 = start(problem, x, task)
        y = unroll(problem, x, detached(y0), task, range(steps), constant_lr(lr), losses, graph=False)
        outer = outer_eval(problem, x, {k: y[k] + (y0[k] - y0[k].detach()) for k in y}, task)
        return outer[0], report(problem, x, y, task, outer, losses)

    return surrogate


def displacement(steps: int, lr: float, scale: float) -> Surrogate:
    """Reptile: s = <Ψ₀(x), scale·(y₀ − y_T)> with the displacement a constant, so ds/dx = (∂Ψ₀/∂x)ᵀ scale·(y₀ − y_T)."""

    def surrogate(problem: Any, x: Params, task: Any) -> tuple[Tensor, dict]:
        losses: list[Tensor] = []
        y0 = start(problem, x, task)
        y = unroll(problem, x, detached(y0), task, range(steps), constant_lr(lr), losses, graph=False)
        s = sum((y0[k] * (scale * (y0[k].detach() - y[k]))).sum() for k in y0)
        outer = outer_eval(problem, detached(x), y, task)
        return s, report(problem, x, y, task, outer, losses)

    return surrogate


def checkpoint_refusal(options: Any) -> str | None:
    if getattr(options, "checkpoint_every", 0) or getattr(options, "memory_budget_mb", None) is not None:
        return "checkpoint_every / memory_budget_mb checkpoint one task's unroll at a time; the batched path keeps it whole"
    return None
