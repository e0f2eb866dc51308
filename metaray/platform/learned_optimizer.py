"""Learned-optimizer files: save a meta-trained optimizer, load it back as a ``torch.optim.Optimizer``.

    >>> save("lstm_opt.pt", weights, solver.options.net())          # after meta-training with solver "l2o"
    >>> opt = from_file("lstm_opt.pt", model.parameters())          # a LearnedOptimizer, ready to step

The file holds only tensors and plain Python values (``learned_optim.checkpoint``), so it is read with
``torch.load(weights_only=True)``: loading a file never runs code from it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch

from ..solvers.core import Params
from ..solvers.learned import OptimizerNet
from ..solvers.learned_optim import LearnedOptimizer, checkpoint, from_checkpoint
from .checkpoint import atomic_torch_save
from .integrity import CheckpointError, safe_torch_load


def save(path: str | Path, weights: Params, net: OptimizerNet) -> Path:
    """Writes the learned optimizer (weights φ and its fixed config) atomically; returns the path."""
    path = Path(path)
    atomic_torch_save(checkpoint(weights, net), path)
    return path


def load(path: str | Path) -> tuple[Params, OptimizerNet]:
    """(weights, net) from a file written by ``save``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no learned-optimizer file at {path}")
    try:
        data = safe_torch_load(path)
    except CheckpointError as e:  # a torn, foreign or code-carrying pickle: say which file, not a pickle traceback
        raise ValueError(f"{path} is not a readable learned-optimizer file ({e})") from None
    return from_checkpoint(data)


def from_file(path: str | Path, params: Iterable[Any], *, scale: float = 1.0) -> LearnedOptimizer:
    """A ``LearnedOptimizer`` over ``params`` with the weights saved at ``path``."""
    weights, net = load(path)
    return LearnedOptimizer(params, weights, net, scale=scale)
