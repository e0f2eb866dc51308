"""A trained learned optimizer as an ordinary ``torch.optim.Optimizer``.

    >>> opt = LearnedOptimizer(model.parameters(), weights, OptimizerNet(arch="lstm", output_scale=0.1))
    >>> loss.backward(); opt.step(); opt.zero_grad()

Both architectures in ``metaray.solvers.learned`` are coordinate-wise, so applying the net to each parameter
tensor separately is exactly what the ``l2o`` solver does to the concatenated optimizee during meta-training.
The per-coordinate state (LSTM h, c or the MLP's EMAs) lives in ``self.state[p]`` as tensors, and
``state_dict()`` also carries the net config and the learned weights, so a saved state dict restores the whole
optimizer. Loading from a file is ``metaray.platform.learned_optimizer.from_file`` (solvers do no I/O).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

from .core import Params, check_params
from .learned import OptimizerNet, check_weights, init_state, update

CHECKPOINT_FORMAT = "metaray.learned_optimizer/1"


def checkpoint(weights: Params, net: OptimizerNet) -> dict[str, Any]:
    """A learned optimizer as plain data (str, floats, tuples, tensors): loadable with ``torch.load(weights_only=True)``."""
    check_weights(net, check_params(weights, "learned-optimizer weights"))
    return {
        "format": CHECKPOINT_FORMAT,
        "net": dataclasses.asdict(net),
        "weights": {k: v.detach().cpu().clone() for k, v in weights.items()},
    }


def from_checkpoint(data: Mapping[str, Any]) -> tuple[Params, OptimizerNet]:
    """(weights, net) from ``checkpoint()``'s dict, with clear errors for anything else."""
    if not isinstance(data, Mapping) or data.get("format") != CHECKPOINT_FORMAT:
        got = data.get("format") if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"not a learned-optimizer checkpoint: expected format {CHECKPOINT_FORMAT!r}, got {got!r}")
    fields = {f.name for f in dataclasses.fields(OptimizerNet)}
    cfg = data.get("net")
    if not isinstance(cfg, Mapping) or set(cfg) - fields:
        raise ValueError(f"learned-optimizer checkpoint has a bad 'net' entry {cfg!r}; valid keys: {sorted(fields)}")
    net = OptimizerNet(**cfg)
    weights = check_params(data.get("weights"), "learned-optimizer weights")
    check_weights(net, weights)
    return weights, net


class LearnedOptimizer(torch.optim.Optimizer):
    """Applies a meta-trained update rule θ ← θ + scale · g_t, [g_t, h_{t+1}] = OPT(∇θ, h_t; φ) to each parameter.

    params:  as for any torch optimizer (iterables of tensors or param-group dicts)
    weights: the learned weights φ (the outer params the ``l2o`` solver trained)
    net:     the fixed config they were trained with (arch, output scale, preprocessing, betas)
    scale:   per-group extra multiplier of the learned update (1 = as meta-trained)
    """

    def __init__(self, params: Iterable[Any], weights: Params, net: OptimizerNet | None = None, *, scale: float = 1.0):
        net = OptimizerNet() if net is None else net
        if not isinstance(net, OptimizerNet):
            raise TypeError(f"net must be a metaray.solvers.learned.OptimizerNet, got {type(net).__name__}")
        weights = check_params(weights, "learned-optimizer weights")
        check_weights(net, weights)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
            raise ValueError(f"scale must be a number > 0, got {scale!r}")
        super().__init__(params, {"scale": float(scale)})
        self.net = net
        self.weights = {k: v.detach().clone() for k, v in weights.items()}
        self._cast: dict[tuple[torch.dtype, torch.device], Params] = {}

    @classmethod
    def from_checkpoint(cls, params: Iterable[Any], data: Mapping[str, Any], *, scale: float = 1.0) -> LearnedOptimizer:
        weights, net = from_checkpoint(data)
        return cls(params, weights, net, scale=scale)

    def _weights_for(self, p: Tensor) -> Params:
        key = (p.dtype, p.device)
        if key not in self._cast:
            self._cast[key] = {k: v.to(dtype=p.dtype, device=p.device) for k, v in self.weights.items()}
        return self._cast[key]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LearnedOptimizer does not support sparse gradients")
                if not p.is_floating_point():
                    raise TypeError(f"LearnedOptimizer needs floating-point params, got {p.dtype}")
                weights = self._weights_for(p)
                state = self.state[p]
                if not state:
                    state.update(init_state(self.net, weights, p.numel(), p.dtype))
                    state["step"] = torch.zeros((), dtype=torch.float64)
                net_state = {k: v.to(p.device) for k, v in state.items() if k != "step"}
                delta, new = update(self.net, weights, p.grad.reshape(-1), p.reshape(-1), net_state)
                p.add_(delta.view_as(p), alpha=group["scale"])
                state.update(new)
                state["step"] += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["learned"] = checkpoint(self.weights, self.net)
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state_dict = dict(state_dict)
        learned = state_dict.pop("learned", None)
        if learned is not None:
            weights, net = from_checkpoint(learned)
            self.net, self.weights, self._cast = net, {k: v.clone() for k, v in weights.items()}, {}
        super().load_state_dict(state_dict)
