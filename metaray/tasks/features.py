"""The meta-feature problem: a shared feature extractor (outer) and a per-task linear head (inner).

Survey 000 §4.4 (eqs. 45-48) and R2D2 (Bertinetto et al. 2019). For a task with support (X_s, y_s) and query
(X_q, y_q), N ways and a backbone φ with e-dimensional features:

    outer x = { backbone params φ,  "head.scale" α,  "head.bias" β,  "head.log_lam" log λ }   (α, β, log λ scalars)
    inner y = { "head.weight": W ∈ R^{e×N} },    y₀ = 0
    logits(X) = α · φ(X) W + β

    inner f:  inner="ridge"          ½ ‖φ(X_s) W − Y_s‖² + λ/2 ‖W‖²       (Y_s one-hot; eq. 46 up to a factor ½,
                                                                            same minimizer, the closed form below)
              inner="cross_entropy"  CE(logits(X_s), y_s) + λ/2 ‖W‖²
    outer F:  outer="cross_entropy"  CE(logits(X_q), y_q)
              outer="mse"            ½ mean ‖logits(X_q) − Y_q‖²

With inner="ridge", W*(x) = φ(X_s)ᵀ (φ(X_s) φ(X_s)ᵀ + λI)⁻¹ Y_s (eq. 48); ``ridge_system`` hands (φ(X_s), Y_s, λ)
to the ``ridge`` solver, which solves it in closed form. Every other solver (ift-cg, BDA, BVFIM, rad, ...)
sees an ordinary BilevelProblem and optimizes the head by gradient steps.

Note: under a softmax cross-entropy outer loss a scalar β shifts every logit equally and cancels, so its
hypergradient is exactly 0 (R2D2 keeps it; it matters for the mse outer loss).
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from ..solvers.core import BilevelProblem, Params
from ..solvers.core import detached as detached_params
from .episodes import Episode
from .problems import _check_no_running_stats, batched_twin, episodes_batch, stack_episodes

HEAD_KEYS = ("head.scale", "head.bias", "head.log_lam")
HEAD_WEIGHT = "head.weight"
INNER_LOSSES = ("ridge", "cross_entropy")
OUTER_LOSSES = ("cross_entropy", "mse")


class FeatureProblem(BilevelProblem):
    """Meta-feature learning over an ``nn.Module`` backbone whose output (flattened) are the features."""

    def __init__(self, backbone: nn.Module, ways: int, *, inner: str = "ridge", outer: str = "cross_entropy"):
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if not (isinstance(ways, int) and not isinstance(ways, bool) and ways >= 2):
            raise ValueError(f"ways must be an int >= 2, got {ways!r}")
        if inner not in INNER_LOSSES:
            raise ValueError(f"inner must be one of {list(INNER_LOSSES)}, got {inner!r}")
        if outer not in OUTER_LOSSES:
            raise ValueError(f"outer must be one of {list(OUTER_LOSSES)}, got {outer!r}")
        _check_no_running_stats(backbone)
        self.backbone, self.ways, self.inner, self.outer = backbone, ways, inner, outer
        self.param_names = [k for k, _ in backbone.named_parameters()]
        clash = [k for k in self.param_names if k in HEAD_KEYS or k == HEAD_WEIGHT]
        if clash:
            raise ValueError(f"backbone parameter names {clash} clash with the head's keys {list(HEAD_KEYS) + [HEAD_WEIGHT]}")
        self.buffers = dict(backbone.named_buffers())

    def initial_params(self, *, scale: float = 1.0, bias: float = 0.0, lam: float = 1.0) -> Params:
        """Outer params: a copy of the backbone's params plus the head hyperparameters α, β and log λ."""
        if not lam > 0:
            raise ValueError(f"the ridge λ must be > 0, got {lam!r}")
        x = {k: v.detach().clone() for k, v in self.backbone.named_parameters()}
        like = next(iter(x.values())) if x else torch.zeros(())
        for key, value in zip(HEAD_KEYS, (scale, bias, float(torch.log(torch.tensor(lam, dtype=torch.float64))))):
            x[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
        return x

    # ---- the parts solvers and later problems share ---------------------------------------------------

    def features(self, x: Params, inputs: Tensor) -> Tensor:
        """φ(inputs) as an [n, e] matrix, with the backbone's params taken from x."""
        missing = [k for k in self.param_names if k not in x]
        if missing:
            raise ValueError(f"outer params are missing backbone params {missing}")
        out = torch.func.functional_call(self.backbone, ({k: x[k] for k in self.param_names}, self.buffers), (inputs,))
        return out.reshape(out.shape[0], -1)

    def lam(self, x: Params) -> Tensor:
        return torch.exp(self._head(x, "head.log_lam"))

    def logits(self, x: Params, y: Params, feats: Tensor) -> Tensor:
        return self._head(x, "head.scale") * feats @ y[HEAD_WEIGHT] + self._head(x, "head.bias")

    def one_hot(self, labels: Tensor, like: Tensor) -> Tensor:
        if labels.dtype not in (torch.int64, torch.int32) or labels.ndim != 1:
            raise TypeError(f"labels must be a 1-D integer tensor of class indices, got {labels.dtype} of shape {tuple(labels.shape)}")
        if not self.__dict__.get("_check_labels", True):  # the batched twin: labels were checked in stack_tasks,
            # and Fn.one_hot reads values (which vmap cannot); the comparison gives the same 0/1 matrix
            return (labels.long().unsqueeze(-1) == torch.arange(self.ways, device=labels.device)).to(like.dtype)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.ways):
            raise ValueError(f"labels must be in [0, {self.ways}) for a {self.ways}-way problem, got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        return Fn.one_hot(labels.long(), self.ways).to(like.dtype)

    def ridge_system(self, x: Params, task: Episode) -> tuple[Tensor, Tensor, Tensor]:
        """(φ(X_s), one-hot Y_s, λ): the ridge problem min_W ½‖φ(X_s) W − Y_s‖² + λ/2‖W‖², differentiable in x."""
        if self.inner != "ridge":
            raise ValueError(
                f"this FeatureProblem's inner loss is {self.inner!r}; the closed-form ridge head needs inner='ridge'"
            )
        X = self.features(x, task.support_x)
        return X, self.one_hot(task.support_y, X), self.lam(x)

    # ---- BilevelProblem -------------------------------------------------------------------------------

    def init_inner(self, x: Params, task: Episode) -> Params:
        with torch.no_grad():
            e = self.features(x, task.support_x).shape[1]
        like = x[self.param_names[0]] if self.param_names else x["head.scale"]
        return {HEAD_WEIGHT: torch.zeros(e, self.ways, dtype=like.dtype, device=like.device)}

    def inner_loss(self, x: Params, y: Params, task: Episode) -> Tensor:
        feats = self.features(x, task.support_x)
        W = y[HEAD_WEIGHT]
        reg = 0.5 * self.lam(x) * (W * W).sum()
        if self.inner == "ridge":
            return 0.5 * ((feats @ W - self.one_hot(task.support_y, feats)) ** 2).sum() + reg
        self.one_hot(task.support_y, feats)  # validates the labels
        return Fn.cross_entropy(self.logits(x, y, feats), task.support_y) + reg

    def outer_loss(self, x: Params, y: Params, task: Episode) -> Tensor:
        feats = self.features(x, task.query_x)
        logits = self.logits(x, y, feats)
        targets = self.one_hot(task.query_y, feats)
        if self.outer == "mse":
            return 0.5 * ((logits - targets) ** 2).sum(-1).mean()
        return Fn.cross_entropy(logits, task.query_y)

    def metrics(self, x: Params, y: Params, task: Episode) -> dict[str, float]:
        with torch.no_grad():
            pred = self.logits(x, y, self.features(x, task.query_x)).argmax(-1)
        return {"accuracy": float((pred == task.query_y).float().mean())}

    def outer_loss_and_metric_tensors(self, x: Params, y: Params, task: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        """The outer loss and the query accuracy as a tensor (what the batched, vmapped path can compute)."""
        loss = self.outer_loss(x, y, task)
        pred = self.logits(detached_params(x), {k: v.detach() for k, v in y.items()}, self.features(detached_params(x), task.query_x)).argmax(-1)
        return loss, {"accuracy": (pred == task.query_y).float().mean()}

    # ---- batching (metaray.solvers.batched) ------------------------------------------------------------

    def batchable(self, tasks) -> bool:
        """Tasks batch when they are Episodes of equal shapes."""
        return episodes_batch(tasks)

    def stack_tasks(self, tasks) -> Episode:
        for t in tasks:  # labels are checked here: the range check reads values, which vmap cannot
            self.one_hot(t.support_y, t.support_x)
            self.one_hot(t.query_y, t.query_x)
        return stack_episodes(tasks)

    def batched(self) -> "FeatureProblem":
        """This problem for vmapped tasks: BatchNorm computed functionally, label ranges checked in stack_tasks."""
        twin = batched_twin(self, ["backbone"])
        twin.__dict__["_check_labels"] = False
        return twin

    def _head(self, x: Params, key: str) -> Tensor:
        if key not in x:
            raise ValueError(
                f"outer params have no {key!r}: FeatureProblem needs {list(HEAD_KEYS)} (use initial_params())"
            )
        v = x[key]
        if v.numel() != 1:
            raise ValueError(f"x[{key!r}] must be a scalar, got shape {tuple(v.shape)}")
        return v.reshape(())

