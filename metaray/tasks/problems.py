"""Bilevel problems over an ``nn.Module``: the MAML-family setting where the outer params are the model's
initialization and each task adapts a copy of it on its support set."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from ..solvers.core import BilevelProblem, Params
from .episodes import Episode

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
        out = self.forward(y, task.query_x)
        loss = self.loss(out, task.query_y)
        if self.loss_name != "cross_entropy":
            return loss, {}
        return loss, {"accuracy": float((out.detach().argmax(-1) == task.query_y).float().mean())}
