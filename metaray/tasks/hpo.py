"""Single-task hyperparameter optimization problems on real handwritten digits (scikit-learn's ``load_digits``:
1,797 8×8 images, 10 classes, shipped inside the package, so everything works offline).

The task is an ``Episode`` whose support set is the training data (inner loss) and whose query set is the
validation data (outer loss); ``info`` carries the test set and, for hyper-cleaning, which labels were corrupted.

Data hyper-cleaning (Franceschi et al. 2017; paper 004 section 5.2):

    min_λ  CE(w_λ; D_val)      s.t.  w_λ = argmin_w  (1/N) Σ_j σ(λ_j) CE(w; x_j, ỹ_j) + (μ/2) ‖w‖²

with ỹ the training labels after a fraction ``corruption`` of them were replaced by a different random class,
σ the sigmoid and w a linear classifier. x = {"weight_logits": λ ∈ R^N}, y = {"weight": (10, 64), "bias": (10,)}.
μ > 0 makes the inner problem strongly convex, so the implicit hypergradient is well defined.

Per-parameter L2 regularization (paper 003 eq. 1, R(λ, θ) = Σ_j λ_j θ_j²):

    min_λ  CE(θ*; D_val)      s.t.  θ* = argmin_θ  CE(θ; D_train) + Σ_j exp(ℓ_j) θ_j²

with one log-coefficient ℓ per model parameter: x = {"log_l2.<param name>": same shape as the param}.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from ..solvers.core import BilevelProblem, Params
from .base import TaskKey, check_key
from .episodes import Episode
from .problems import _check_no_running_stats


def _check_fraction(name: str, v: float, *, allow_zero: bool = True) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0 <= v < 1) or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a number in [0, 1), got {v!r}")
    return float(v)


def digits_split(
    *, train: int = 600, val: int = 600, corruption: float = 0.0, seed: int = 0, dtype: torch.dtype = torch.float64
) -> Episode:
    """load_digits split at random into train / val / test (the rest), pixels scaled to [0, 1]; a fraction
    ``corruption`` of the training labels replaced by a uniformly drawn *different* class.

    Returns Episode(train_x, corrupted train_y, val_x, val_y, info={"test_x", "test_y", "clean_y", "corrupted"}).
    """
    from sklearn.datasets import load_digits

    corruption = _check_fraction("corruption", corruption)
    digits = load_digits()
    n = len(digits.target)
    for name, v in (("train", train), ("val", val)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 10:
            raise ValueError(f"{name} must be an int >= 10, got {v!r}")
    if train + val >= n:
        raise ValueError(f"train + val must leave a test set: train={train} + val={val} >= {n} digits")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    X = torch.as_tensor(digits.data, dtype=dtype)[perm] / 16.0
    Y = torch.as_tensor(digits.target, dtype=torch.long)[perm]
    tr, va, te = slice(0, train), slice(train, train + val), slice(train + val, n)
    clean = Y[tr].clone()
    n_bad = int(round(corruption * train))
    bad = torch.randperm(train, generator=g)[:n_bad]
    noisy = clean.clone()
    noisy[bad] = (clean[bad] + torch.randint(1, 10, (n_bad,), generator=g)) % 10  # always a wrong class
    corrupted = torch.zeros(train, dtype=torch.bool)
    corrupted[bad] = True
    return Episode(
        X[tr], noisy, X[va], Y[va],
        info={"test_x": X[te], "test_y": Y[te], "clean_y": clean, "corrupted": corrupted, "corruption": corruption},
    )


@dataclass(frozen=True)
class DigitsSource:
    """The single hyper-cleaning / HPO task as a task source: every key gives the same task (it is one HPO
    problem), so the platform can treat it like any other source."""

    train: int = 600
    val: int = 600
    corruption: float = 0.0
    seed: int = 0
    dtype: torch.dtype = torch.float64
    _task: Episode | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_task", digits_split(train=self.train, val=self.val, corruption=self.corruption, seed=self.seed, dtype=self.dtype))

    def __reduce__(self):  # ship the spec, not the data: the receiver rebuilds the identical split
        return (DigitsSource, (self.train, self.val, self.corruption, self.seed, self.dtype))

    def sample(self, key: TaskKey) -> Episode:
        check_key(key)
        return self._task


def _accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(-1) == y).double().mean())


class HyperCleaningProblem(BilevelProblem):
    """Data hyper-cleaning with per-sample weights σ(λ_j) on a linear softmax classifier (see module docstring)."""

    def __init__(self, num_train: int, features: int = 64, classes: int = 10, inner_l2: float = 1e-3, dtype: torch.dtype = torch.float64):
        if not inner_l2 > 0:
            raise ValueError(f"inner_l2 must be > 0 (it makes the inner problem strongly convex), got {inner_l2!r}")
        self.num_train, self.features, self.classes, self.inner_l2, self.dtype = num_train, features, classes, float(inner_l2), dtype

    def initial_params(self) -> Params:
        """λ = 0: every sample starts with weight σ(0) = 1/2."""
        return {"weight_logits": torch.zeros(self.num_train, dtype=self.dtype)}

    def _check(self, x: Params, task: Episode) -> None:
        if x["weight_logits"].shape != (len(task.support_y),):
            raise ValueError(
                f"weight_logits has shape {tuple(x['weight_logits'].shape)} but the task has {len(task.support_y)} training samples"
            )

    def init_inner(self, x: Params, task: Episode) -> Params:
        self._check(x, task)
        return {"weight": torch.zeros(self.classes, self.features, dtype=self.dtype), "bias": torch.zeros(self.classes, dtype=self.dtype)}

    def logits(self, y: Params, inputs: Tensor) -> Tensor:
        return inputs @ y["weight"].T + y["bias"]

    def inner_loss(self, x: Params, y: Params, task: Episode) -> Tensor:
        per_sample = Fn.cross_entropy(self.logits(y, task.support_x), task.support_y, reduction="none")
        l2 = 0.5 * self.inner_l2 * (y["weight"].pow(2).sum() + y["bias"].pow(2).sum())
        return (torch.sigmoid(x["weight_logits"]) * per_sample).mean() + l2

    def outer_loss(self, x: Params, y: Params, task: Episode) -> Tensor:
        return Fn.cross_entropy(self.logits(y, task.query_x), task.query_y)

    def metrics(self, x: Params, y: Params, task: Episode) -> dict[str, float]:
        with torch.no_grad():
            out = {"val_accuracy": _accuracy(self.logits(y, task.query_x), task.query_y)}
            if "test_x" in task.info:
                out["test_accuracy"] = _accuracy(self.logits(y, task.info["test_x"]), task.info["test_y"])
            bad = task.info.get("corrupted")
            if bad is not None and bad.any() and (~bad).any():
                w = torch.sigmoid(x["weight_logits"])
                out["weight_clean"] = float(w[~bad].mean())
                out["weight_corrupted"] = float(w[bad].mean())
        return out


class L2RegularizationProblem(BilevelProblem):
    """Per-parameter L2 coefficients exp(ℓ) learned on validation loss (paper 003 eq. 1) for any ``nn.Module``.

    y_0 is the module's own initialization (fixed, independent of x), so the hypergradient comes only through
    the regularizer's effect on the trained weights.
    """

    def __init__(self, model: nn.Module, init_log_l2: float = -4.0):
        _check_no_running_stats(model)
        self.model = model
        self.init_log_l2 = float(init_log_l2)
        self.y0 = {k: v.detach().clone() for k, v in model.named_parameters()}
        self.buffers = dict(model.named_buffers())

    def initial_params(self) -> Params:
        return {f"log_l2.{k}": torch.full_like(v, self.init_log_l2) for k, v in self.y0.items()}

    def init_inner(self, x: Params, task: Episode) -> Params:
        missing = [f"log_l2.{k}" for k in self.y0 if f"log_l2.{k}" not in x]
        if missing:
            raise ValueError(f"outer params are missing L2 coefficients {missing}")
        return {k: v.clone() for k, v in self.y0.items()}

    def forward(self, y: Params, inputs: Tensor) -> Tensor:
        return torch.func.functional_call(self.model, (y, self.buffers), (inputs,))

    def inner_loss(self, x: Params, y: Params, task: Episode) -> Tensor:
        reg = sum((torch.exp(x[f"log_l2.{k}"]) * v.pow(2)).sum() for k, v in y.items())
        return Fn.cross_entropy(self.forward(y, task.support_x), task.support_y) + reg

    def outer_loss(self, x: Params, y: Params, task: Episode) -> Tensor:
        return Fn.cross_entropy(self.forward(y, task.query_x), task.query_y)

    def metrics(self, x: Params, y: Params, task: Episode) -> dict[str, float]:
        with torch.no_grad():
            out = {"val_accuracy": _accuracy(self.forward(y, task.query_x), task.query_y)}
            if "test_x" in task.info:
                out["test_accuracy"] = _accuracy(self.forward(y, task.info["test_x"]), task.info["test_y"])
        return out
