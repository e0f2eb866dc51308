"""Optimizee families for learned optimizers (solver ``l2o``), as task sources deterministic in the task key.

- ``RandomQuadratics``: f(θ) = ‖W θ − y‖², W ∈ R^{d×d} and y ∈ R^d with i.i.d. N(0, 1) entries
  (Andrychowicz et al. 2016, section 3.1), θ_0 ~ N(0, I).
- ``SyntheticClassification``: a one-hidden-layer sigmoid MLP (as Andrychowicz et al.'s MNIST net) on a random
  Gaussian-clusters classification problem; inner loss = cross entropy on the training points, outer loss =
  cross entropy on held-out points from the same clusters.

A task holds ``batch`` independent instances and its loss is their **sum**, so every coordinate sees exactly the
gradient of its own instance: for coordinate-wise optimizers (the learned ones, SGD, Adam) a batched task is the
same as ``batch`` separate tasks, only faster.

Random scaling (Lv et al. 2017), a stability/generalization measure for meta-training: with
``random_scale = a > 0`` each coordinate gets a factor c = exp(u), u ~ U[−a, a], and the task's loss is
f(c ⊙ θ) started from θ_0 / c: the same problem in badly scaled coordinates, so the learned optimizer cannot
overfit to one gradient scale. Held-out evaluation normally uses a = 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as Fn
from torch import Tensor

from ..solvers.core import BilevelProblem, Params
from .base import TaskKey, key_generator


def _check_positive_ints(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")


def _check_scale(a: float) -> None:
    if not isinstance(a, (int, float)) or isinstance(a, bool) or not 0 <= a <= 10:
        raise ValueError(f"random_scale must be a number in [0, 10] (factors exp(U[-a, a])), got {a!r}")


def _scales(shapes: dict[str, tuple[int, ...]], a: float, g: torch.Generator, dtype: torch.dtype) -> Params:
    return {k: torch.exp(a * (2 * torch.rand(s, generator=g, dtype=torch.float64) - 1)).to(dtype) for k, s in shapes.items()}


# ----------------------------------------------------------------------------------------------------------
# Random quadratics
# ----------------------------------------------------------------------------------------------------------


@dataclass
class QuadraticOptimizee:
    W: Tensor        # (batch, d, d)
    y: Tensor        # (batch, d)
    theta0: Tensor   # (batch, d), unscaled
    scale: Tensor    # (batch, d), c of the random scaling (ones when random_scale = 0)


@dataclass(frozen=True)
class RandomQuadratics:
    dim: int = 10
    batch: int = 1
    random_scale: float = 0.0
    seed: int = 0
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        _check_positive_ints(dim=self.dim, batch=self.batch)
        _check_scale(self.random_scale)

    def sample(self, key: TaskKey) -> QuadraticOptimizee:
        g = key_generator(key, self.seed)
        b, d, dt = self.batch, self.dim, torch.float64
        W = torch.randn(b, d, d, generator=g, dtype=dt)
        y = torch.randn(b, d, generator=g, dtype=dt)
        theta0 = torch.randn(b, d, generator=g, dtype=dt)
        scale = _scales({"theta": (b, d)}, self.random_scale, g, dt)["theta"]
        return QuadraticOptimizee(*(t.to(self.dtype) for t in (W, y, theta0, scale)))

    def problem(self) -> QuadraticOptimizeeProblem:
        return QuadraticOptimizeeProblem()


class QuadraticOptimizeeProblem(BilevelProblem):
    """y = {"theta": (batch, d)}; f = F = Σ_b ‖W_b (c_b ⊙ θ_b) − y_b‖² (the quadratic has no held-out data)."""

    def init_inner(self, x: Params, task: QuadraticOptimizee) -> Params:
        return {"theta": task.theta0 / task.scale}

    def inner_loss(self, x: Params, y: Params, task: QuadraticOptimizee) -> Tensor:
        r = torch.einsum("bij,bj->bi", task.W, task.scale * y["theta"]) - task.y
        return (r * r).sum()

    def outer_loss(self, x: Params, y: Params, task: QuadraticOptimizee) -> Tensor:
        return self.inner_loss(x, y, task)


# ----------------------------------------------------------------------------------------------------------
# A small MLP on synthetic classification
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ClassifierOptimizee:
    x_train: Tensor   # (batch, n_train, inputs)
    y_train: Tensor   # (batch, n_train) class indices
    x_val: Tensor
    y_val: Tensor
    theta0: Params    # w1 (batch, hidden, inputs), b1 (batch, hidden), w2 (batch, classes, hidden), b2 (batch, classes)
    scale: Params = field(default_factory=dict)


@dataclass(frozen=True)
class SyntheticClassification:
    inputs: int = 8
    classes: int = 3
    hidden: int = 16
    n_train: int = 64
    n_val: int = 64
    separation: float = 1.5
    batch: int = 1
    random_scale: float = 0.0
    seed: int = 0
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        _check_positive_ints(
            inputs=self.inputs, hidden=self.hidden, n_train=self.n_train, n_val=self.n_val, batch=self.batch
        )
        if not isinstance(self.classes, int) or self.classes < 2:
            raise ValueError(f"classes must be an int >= 2, got {self.classes!r}")
        if not self.separation > 0:
            raise ValueError(f"separation must be > 0 (std of the class means), got {self.separation!r}")
        _check_scale(self.random_scale)

    def sample(self, key: TaskKey) -> ClassifierOptimizee:
        g = key_generator(key, self.seed)
        b, D, C, H, dt = self.batch, self.inputs, self.classes, self.hidden, torch.float64
        means = self.separation * torch.randn(b, C, D, generator=g, dtype=dt)

        def points(n: int) -> tuple[Tensor, Tensor]:
            labels = torch.randint(0, C, (b, n), generator=g)
            xs = torch.gather(means, 1, labels[..., None].expand(b, n, D)) + torch.randn(b, n, D, generator=g, dtype=dt)
            return xs.to(self.dtype), labels

        x_train, y_train = points(self.n_train)
        x_val, y_val = points(self.n_val)
        theta0 = {
            "w1": (2 * torch.rand(b, H, D, generator=g, dtype=dt) - 1) / D**0.5,
            "b1": torch.zeros(b, H, dtype=dt),
            "w2": (2 * torch.rand(b, C, H, generator=g, dtype=dt) - 1) / H**0.5,
            "b2": torch.zeros(b, C, dtype=dt),
        }
        scale = _scales({k: tuple(v.shape) for k, v in theta0.items()}, self.random_scale, g, dt)
        cast = lambda p: {k: v.to(self.dtype) for k, v in p.items()}  # noqa: E731
        return ClassifierOptimizee(x_train, y_train, x_val, y_val, cast(theta0), cast(scale))

    def problem(self) -> ClassifierOptimizeeProblem:
        return ClassifierOptimizeeProblem()


# An l2o trajectory's state carries its task; run checkpoints are read with torch.load(weights_only=True), so
# allowlist these data-only task classes (tensors and dicts of tensors).
torch.serialization.add_safe_globals([QuadraticOptimizee, ClassifierOptimizee])


class ClassifierOptimizeeProblem(BilevelProblem):
    """y = the MLPs' params (w1, b1, w2, b2), batched; f = Σ_b CE(train), F = Σ_b CE(val); metric: val accuracy."""

    def init_inner(self, x: Params, task: ClassifierOptimizee) -> Params:
        return {k: v / task.scale[k] for k, v in task.theta0.items()}

    @staticmethod
    def logits(y: Params, task: ClassifierOptimizee, inputs: Tensor) -> Tensor:
        p = {k: task.scale[k] * v for k, v in y.items()}
        h = torch.sigmoid(torch.einsum("bhd,bnd->bnh", p["w1"], inputs) + p["b1"][:, None])
        return torch.einsum("bch,bnh->bnc", p["w2"], h) + p["b2"][:, None]

    def _loss(self, y: Params, task: ClassifierOptimizee, inputs: Tensor, labels: Tensor) -> Tensor:
        z = self.logits(y, task, inputs)
        per_net = Fn.cross_entropy(z.reshape(-1, z.shape[-1]), labels.reshape(-1), reduction="none")
        return per_net.view(labels.shape).mean(1).sum()

    def inner_loss(self, x: Params, y: Params, task: ClassifierOptimizee) -> Tensor:
        return self._loss(y, task, task.x_train, task.y_train)

    def outer_loss(self, x: Params, y: Params, task: ClassifierOptimizee) -> Tensor:
        return self._loss(y, task, task.x_val, task.y_val)

    def metrics(self, x: Params, y: Params, task: ClassifierOptimizee) -> dict[str, float]:
        with torch.no_grad():
            pred = self.logits(y, task, task.x_val).argmax(-1)
        return {"val_accuracy": float((pred == task.y_val).float().mean())}
