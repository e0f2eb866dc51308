"""Bilevel problems over an ``nn.Module``: the MAML-family setting where the outer params are the model's
initialization and each task adapts a copy of it on its support set."""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from ..solvers.core import BilevelProblem, Params
from .episodes import Episode
from .models import functional_batch_norm


EPISODE_TENSORS = ("support_x", "support_y", "query_x", "query_y")


def episodes_batch(tasks: Sequence[Any]) -> bool:
    """Whether tasks are Episodes with equal shapes, dtypes and devices (so they stack along a new dim 0)."""
    if not tasks or not all(isinstance(t, Episode) for t in tasks):
        return False
    sig = [[(tuple(getattr(t, f).shape), getattr(t, f).dtype, getattr(t, f).device) for f in EPISODE_TENSORS] for t in tasks]
    return all(s == sig[0] for s in sig)


def stack_episodes(tasks: Sequence[Episode]) -> Episode:
    """One Episode whose tensors have the tasks along a new leading dimension (``info`` is dropped)."""
    return Episode(*(torch.stack([getattr(t, f) for t in tasks]) for f in EPISODE_TENSORS), info={})


def batched_twin(problem: Any, modules: Sequence[str]) -> Any:
    """A shallow copy of ``problem`` whose named modules compute BatchNorm functionally (models.py): the
    problem to call under ``torch.func.vmap``. Cached on the problem, rebuilt if its modules moved."""
    key = tuple((name, str(p.device), p.dtype) for name in modules for p in list(getattr(problem, name).parameters())[:1])
    cached = problem.__dict__.get("_batched_twin")
    if cached is not None and cached[0] == key:
        return cached[1]
    twin = copy.copy(problem)
    twin.__dict__.pop("_batched_twin", None)
    for name in modules:
        setattr(twin, name, functional_batch_norm(getattr(problem, name)))
    problem.__dict__["_batched_twin"] = (key, twin)
    return twin

def mse(out: Tensor, target: Tensor) -> Tensor:
    """Mean squared error. Written out rather than ``F.mse_loss``, whose backward produces ZeroTensors that
    forward-over-reverse AD (``torch.func.jvp`` of a gradient, as in ``fad``) cannot use; and strict about
    shapes, where ``F.mse_loss`` only warns before broadcasting (n, 1) against (n,) into wrong numbers."""
    if out.shape != target.shape:
        raise ValueError(f"mse: model output has shape {tuple(out.shape)}, targets have {tuple(target.shape)}")
    return (out - target).square().mean()


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": mse,
    "cross_entropy": Fn.cross_entropy,
}


def _check_no_running_stats(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            raise ValueError(
                f"module {name!r} is a BatchNorm with track_running_stats=True: it would update its running "
                "statistics in place during every inner step. Build it with track_running_stats=False."
            )


class ModelProblem(BilevelProblem):
    """Meta-initialization of a model (MAML, FOMAML, Reptile, Meta-SGD, and rad/trad on the same setting).

    outer x = model params (``initial_params()``), y_0 = x restricted to the model's keys, f = loss on the
    support set, F = loss on the query set. Extra outer keys (e.g. Meta-SGD's ``lr.*``) are ignored here.
    """

    def __init__(self, model: nn.Module, loss: str = "cross_entropy"):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid: {sorted(LOSSES)}")
        _check_no_running_stats(model)
        self.model = model
        self.loss_name = loss
        self.loss = LOSSES[loss]
        self.param_names = [k for k, _ in model.named_parameters()]
        self._shapes = {k: tuple(v.shape) for k, v in model.named_parameters()}
        self.buffers = dict(model.named_buffers())
        # functional_call's weight-tying bookkeeping costs ~2% of a MAML step on conv4; skip it when nothing is tied.
        tied = len(list(model.named_parameters(remove_duplicate=False))) != len(self.param_names)
        self._tie_weights = tied

    def initial_params(self) -> Params:
        return {k: v.detach().clone() for k, v in self.model.named_parameters()}

    def forward(self, params: Params, inputs: Tensor) -> Tensor:
        return torch.func.functional_call(self.model, (params, self.buffers), (inputs,), tie_weights=self._tie_weights)

    def init_inner(self, x: Params, task: Episode) -> Params:
        missing = [k for k in self.param_names if k not in x]
        if missing:
            raise ValueError(f"outer params are missing model params {missing}")
        self._check_like_model(x)
        return {k: x[k] for k in self.param_names}

    def _check_like_model(self, x: Params) -> None:
        """x's model params must have the model's shapes and one common dtype; otherwise torch fails deep inside
        functional_call ('mat1 and mat2 shapes cannot be multiplied') without naming the param."""
        for k in self.param_names:
            if tuple(x[k].shape) != self._shapes[k]:
                raise ValueError(f"outer param {k!r} has shape {tuple(x[k].shape)}, the model's has {self._shapes[k]}")
        dtypes = [x[k].dtype for k in self.param_names]
        common = max(set(dtypes), key=dtypes.count)
        odd = [k for k in self.param_names if x[k].dtype != common]
        if odd:
            raise TypeError(f"outer params {odd} have dtype {x[odd[0]].dtype}, the other model params {common}; "
                            "all must share one dtype")

    def inner_loss(self, x: Params, y: Params, task: Episode) -> Tensor:
        return self.loss(self.forward(y, task.support_x), task.support_y)

    def outer_loss(self, x: Params, y: Params, task: Episode) -> Tensor:
        return self.loss(self.forward(y, task.query_x), task.query_y)

    def metrics(self, x: Params, y: Params, task: Episode) -> dict[str, float]:
        with torch.no_grad():
            return self.outer_loss_and_metrics(x, y, task)[1]

    def outer_loss_and_metrics(self, x: Params, y: Params, task: Episode) -> tuple[Tensor, dict[str, float]]:
        """Query loss and accuracy from one forward pass (solvers use this to avoid a second one)."""
        loss, metrics = self.outer_loss_and_metric_tensors(x, y, task)
        return loss, {k: float(v) for k, v in metrics.items()}

    def outer_loss_and_metric_tensors(self, x: Params, y: Params, task: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        """``outer_loss_and_metrics`` with the metrics as tensors: what the batched (vmapped) path can compute."""
        out = self.forward(y, task.query_x)
        loss = self.loss(out, task.query_y)
        if self.loss_name != "cross_entropy":
            return loss, {}
        return loss, {"accuracy": (out.detach().argmax(-1) == task.query_y).float().mean()}

    # ---- batching (metaray.solvers.batched) ------------------------------------------------------------

    def batchable(self, tasks: Sequence[Any]) -> bool:
        """Tasks batch when they are Episodes of equal shapes (same ways, shots, queries, input size)."""
        return episodes_batch(tasks)

    def stack_tasks(self, tasks: Sequence[Episode]) -> Episode:
        return stack_episodes(tasks)

    def batched(self) -> "ModelProblem":
        """This problem for vmapped tasks: BatchNorm computed with plain tensor ops (per-task batch statistics,
        as in the loop), because torch's BatchNorm batching rule is wrong in second order (NOTES.md)."""
        return batched_twin(self, ["model"])
