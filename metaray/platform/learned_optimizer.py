"""Learned optimizers in one process: meta-train one, save it, load it back as a ``torch.optim.Optimizer``.

    >>> weights, _ = meta_train(solver, source, init_weights(solver.options.net()), 300)   # solver "l2o"
    >>> save("lstm_opt.pt", weights, solver.options.net())
    >>> opt = from_file("lstm_opt.pt", model.parameters())          # a LearnedOptimizer, ready to step

The file holds only tensors and plain Python values (``learned_optim.checkpoint``), so it is read with
``torch.load(weights_only=True)``: loading a file never runs code from it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..solvers.core import HyperGrad, Params
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


def meta_train(
    solver: Any,
    source: Any,
    weights: Params,
    outer_steps: int,
    *,
    lr: float = 0.01,
    on_step: Callable[[int, HyperGrad], None] | None = None,
    validate: Callable[[Params], float] | None = None,
    validate_every: int = 0,
) -> tuple[Params, int]:
    """Meta-trains the optimizer weights φ with Adam by truncated BPTT (solver ``l2o``), in this process.

    Each outer step continues the current optimizee trajectory by ``inner_steps`` learned steps; when it reaches
    ``horizon`` the next step starts a new optimizee, ``source.sample(("train", trajectory, 0))``.
    ``on_step(step, hypergrad)`` is called after each outer step (1-based). Returns (weights, finished
    trajectories). To meta-train across Ray actors instead, run the same solver in a worker pool.

    Model selection: with ``validate`` (weights -> a loss on held-out optimizees, lower is better) and
    ``validate_every = k``, the weights after every k-th step are scored and the best-scoring ones are returned
    (the earliest on a tie; a non-finite score counts as +inf). Truncated BPTT is noisy: measured on the classifier
    optimizees (tests/solvers/test_l2o.py), the held-out loss of the last weights varied 0.0007-0.017 over seeds
    and CPU kernels, that of the weights selected every 20 steps on 16 validation nets < 0.0001-0.013.
    """
    if validate is not None and (not isinstance(validate_every, int) or isinstance(validate_every, bool)
                                 or not 1 <= validate_every <= outer_steps):
        raise ValueError(f"validate_every must be an int in [1, outer_steps={outer_steps}] when validate is given; "
                         f"got {validate_every!r}")
    if validate is None and validate_every:
        raise ValueError("validate_every is set but validate is None: pass validate(weights) -> float to select by it")
    problem = source.problem()
    x = {k: v.detach().clone().requires_grad_(True) for k, v in weights.items()}
    meta_opt = torch.optim.Adam(list(x.values()), lr=lr)
    state, trajectory = None, 0
    best: tuple[float, Params] | None = None
    for step in range(1, outer_steps + 1):
        task = source.sample(("train", trajectory, 0))  # a new optimizee for every trajectory
        hg = solver.hypergrad(problem, {k: v.detach() for k, v in x.items()}, task, state)
        state = hg.state
        if state.done:
            state, trajectory = None, trajectory + 1
        for k, v in x.items():
            v.grad = hg.grad[k]
        meta_opt.step()
        if on_step is not None:
            on_step(step, hg)
        if validate is not None and step % validate_every == 0:
            candidate = {k: v.detach().clone() for k, v in x.items()}
            score = float(validate(candidate))
            if not math.isfinite(score):
                score = math.inf  # a diverged candidate is never selected over a finite one
            if best is None or score < best[0]:
                best = (score, candidate)
    if best is not None:
        return best[1], trajectory
    return {k: v.detach() for k, v in x.items()}, trajectory
