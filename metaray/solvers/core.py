"""The functional bilevel core: params, problems, hypergradient results and small autograd helpers.

A bilevel problem (survey 001 eq. 1):

    min_x  F(x, y*(x))    s.t.   y*(x) ∈ argmin_y f(x, y)

`x` are the outer params, `y` the inner params of one task, both ``dict[str, Tensor]``. A solver turns
(problem, x, task) into the hypergradient dF(x, y*(x))/dx. Nothing here mutates an ``nn.Module``: problems
call their models with ``torch.func.functional_call``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

Params = dict[str, Tensor]


class NonFiniteError(ValueError):
    """A loss or hypergradient that is NaN or infinite. Carries where it happened so callers can report it."""

    def __init__(self, message: str, *, where: str = "", task: Any = None):
        super().__init__(message)
        self.where = where
        self.task = task


class DivergedError(NonFiniteError):
    """An iterative hypergradient method diverged: its result is finite but meaningless, so it is refused
    like a non-finite one (the meta-learner never applies it)."""


class BilevelProblem:
    """One family of bilevel instances. Subclasses implement the three required methods.

    - ``init_inner(x, task) -> y0``: the inner starting point (MAML: a copy of x; meta-features: a fresh head;
      HPO: model weights). It may depend on x differentiably; solvers follow that dependence where their
      method does.
    - ``inner_loss(x, y, task) -> scalar``: the lower level f(x, y), usually on the support / training data.
    - ``outer_loss(x, y, task) -> scalar``: the upper level F(x, y), usually on the query / validation data.
    - ``metrics(x, y, task) -> dict[str, float]`` (optional): extra numbers such as query accuracy.
    - ``project_inner(x, y) -> y`` (optional): projection onto a constrained lower-level feasible set,
      applied after every inner step (must be differentiable where the solver differentiates through it).

    Solvers treat ``task`` as opaque: only the problem reads it.
    """

    def init_inner(self, x: Params, task: Any) -> Params:
        raise NotImplementedError(f"{type(self).__name__} must define init_inner(x, task)")

    def inner_loss(self, x: Params, y: Params, task: Any) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define inner_loss(x, y, task)")

    def outer_loss(self, x: Params, y: Params, task: Any) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define outer_loss(x, y, task)")

    def metrics(self, x: Params, y: Params, task: Any) -> dict[str, float]:
        return {}

    def project_inner(self, x: Params, y: Params) -> Params:
        return y


_REQUIRED = ("init_inner", "inner_loss", "outer_loss")


def check_problem(problem: Any) -> None:
    """Duck-typed problems are fine; they need the three required callables."""
    missing = [m for m in _REQUIRED if not callable(getattr(problem, m, None))]
    if missing:
        raise TypeError(
            f"problem {type(problem).__name__} is not a BilevelProblem: missing {', '.join(missing)} "
            f"(required: {', '.join(_REQUIRED)}; optional: metrics, project_inner)"
        )
    if isinstance(problem, BilevelProblem):
        unimplemented = [m for m in _REQUIRED if getattr(type(problem), m) is getattr(BilevelProblem, m)]
        if unimplemented:
            raise TypeError(f"problem {type(problem).__name__} does not implement {', '.join(unimplemented)}")


@dataclass
class HyperGrad:
    """One task's hypergradient and what came with it.

    grad:       dF/dx, same keys as x (zeros for outer params the losses do not use)
    outer_loss: F(x, y_T) at the inner solution the solver reached
    inner_loss: f(x, y_T)
    metrics:    problem metrics plus solver diagnostics (residuals, convergence flags, ...)
    state:      what a stateful solver carries to the next outer step for this task, else None
    """

    grad: Params
    outer_loss: float
    inner_loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    state: Any = None


def outer_eval(problem: Any, x: Params, y: Params, task: Any) -> tuple[Tensor, dict[str, float]]:
    """F(x, y) (with its graph) and the problem's metrics, from one evaluation where the problem offers
    ``outer_loss_and_metrics`` (a model problem computes query logits once for both), else two calls."""
    joint = getattr(problem, "outer_loss_and_metrics", None)
    if joint is not None:
        loss, metrics = joint(x, y, task)
    else:
        loss = problem.outer_loss(x, y, task)
        with torch.no_grad():
            metrics = problem.metrics(detached(x), detached(y), task) if hasattr(problem, "metrics") else {}
    check_finite(loss, "outer_loss", task)
    return loss, dict(metrics or {})


# ----------------------------------------------------------------------------------------------------------
# Validation of params
# ----------------------------------------------------------------------------------------------------------


def check_params(params: Any, what: str) -> Params:
    """Params must be a non-empty dict of str -> floating tensors."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{what} must be a dict[str, Tensor], got {type(params).__name__}")
    if not params:
        raise ValueError(f"{what} is empty: a bilevel problem needs at least one {what.split()[0]} parameter")
    for k, v in params.items():
        if not isinstance(k, str):
            raise TypeError(f"{what} keys must be str, got {k!r} ({type(k).__name__})")
        if not isinstance(v, Tensor):
            raise TypeError(f"{what}[{k!r}] must be a torch.Tensor, got {type(v).__name__}")
        if not v.is_floating_point():
            raise TypeError(f"{what}[{k!r}] must be a floating-point tensor, got dtype {v.dtype}")
        # A NaN/Inf entry can hide behind finite losses (a -inf bias before a ReLU) and would survive into the
        # outer update, so it is refused here, naming the param.
        if not bool(torch.isfinite(v.detach()).all()):
            raise ValueError(f"{what}[{k!r}] has non-finite entries (NaN or Inf); params must be finite")
    return dict(params)


def check_inner_params(params: Any, what: str) -> Params:
    """Inner params returned by a problem (``init_inner``, ``project_inner``): a non-empty dict[str, Tensor] of
    floating tensors. Checked where the problem returns them, so a wrong return type fails with the method's
    name instead of deep inside torch."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{what} must return the inner params as a dict[str, Tensor], got {type(params).__name__}")
    if not params:
        raise ValueError(f"{what} returned no inner params (an empty dict); the lower level needs at least one")
    for k, v in params.items():
        if not isinstance(k, str) or not isinstance(v, Tensor) or not v.is_floating_point():
            got = type(v).__name__ if not isinstance(v, Tensor) else f"a {v.dtype} tensor"
            raise TypeError(f"{what} must return dict[str, floating-point Tensor]; entry {k!r} is {got}")
    return dict(params)


def inner_start(problem: Any, x: Params, task: Any, *, graph: bool = True) -> Params:
    """y_0 = Ψ_0(x) = ``init_inner(x, task)``, checked, and never the same tensor object as an entry of x.

    The contract lets ``init_inner`` return x's own tensors (MAML's y_0 = x). Differentiating the first
    inner step with respect to such a tensor would differentiate with respect to x itself, so ∇_y f(x, y_0)
    would become the total derivative of f(x, x). A ``clone`` gives y_0 its own node in the graph (the
    identity Jacobian ∂y_0/∂x is kept), which makes ∇_y f the partial derivative it must be. With
    ``graph=False`` the start is detached (a constant of x), which also breaks the alias.
    """
    y0 = check_inner_params(problem.init_inner(x, task), "init_inner(x, task)")
    if not graph:
        return detached(y0)
    x_ids = {id(v) for v in x.values()}
    return {k: v.clone() if id(v) in x_ids else v for k, v in y0.items()}


def full_precision(problem: Any) -> Any:
    """The problem with mixed precision switched off (``[run] precision``, metaray.tasks.precision): reduced
    precision is for the inner steps, so the implicit solvers build their linear system (eq. 31) on this one."""
    return getattr(problem, "full_precision", problem)


def project(problem: Any, x: Params, y: Params) -> Params:
    """The problem's ``project_inner(x, y)`` where it has one (the method is optional), else y."""
    fn = getattr(problem, "project_inner", None)
    if fn is None:
        return y
    out = check_inner_params(fn(x, y), "project_inner(x, y)")
    if out.keys() != y.keys():
        raise ValueError(f"project_inner(x, y) must return the keys of y {sorted(y)}, got {sorted(out)}")
    return out


def check_same_keys(a: Params, b: Params, what_a: str, what_b: str) -> None:
    if a.keys() != b.keys():
        missing = sorted(set(a) - set(b))
        extra = sorted(set(b) - set(a))
        raise ValueError(
            f"{what_b} must have the same keys as {what_a}: missing {missing}, unexpected {extra}"
        )
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"{what_b}[{k!r}] has shape {tuple(b[k].shape)}, {what_a}[{k!r}] has {tuple(a[k].shape)}")


def check_scalar(value: Any, what: str) -> Tensor:
    """A loss must be a one-element tensor: anything else fails here, naming the method that returned it."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must return a scalar torch.Tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(f"{what} must return a scalar, got a tensor of shape {tuple(value.shape)}")
    return value


def check_finite(value: Tensor, what: str, task: Any = None) -> float:
    """Returns the float value of a scalar loss, raising NonFiniteError if it is NaN/Inf."""
    v = float(check_scalar(value, what).detach())
    if not math.isfinite(v):
        raise NonFiniteError(f"{what} is not finite ({v})", where=what, task=task)
    return v


def check_grad_finite(grad: Params, what: str, task: Any = None) -> None:
    bad = [k for k, g in grad.items() if not bool(torch.isfinite(g).all())]
    if bad:
        raise NonFiniteError(f"{what} has non-finite entries in {bad}", where=what, task=task)


# ----------------------------------------------------------------------------------------------------------
# Autograd helpers (dict-of-tensors versions of torch.autograd.grad)
# ----------------------------------------------------------------------------------------------------------


def leaves(params: Params) -> Params:
    """Fresh leaf tensors that require grad: the differentiation variables of one hypergradient."""
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


def detached(params: Params) -> Params:
    return {k: v.detach() for k, v in params.items()}


def grad_dict(
    output: Tensor,
    wrt: Params,
    *,
    create_graph: bool = False,
    grad_output: Tensor | None = None,
    retain_graph: bool | None = None,
) -> Params:
    """d output / d wrt as a dict. Inputs the output does not depend on get zeros, never None.

    Tensors in ``wrt`` that do not require grad (constants) also get zeros.
    """
    keys = [k for k, v in wrt.items() if v.requires_grad]
    out: Params = {}
    if keys and output.requires_grad:
        grads = torch.autograd.grad(
            output,
            [wrt[k] for k in keys],
            grad_outputs=grad_output,
            create_graph=create_graph,
            retain_graph=retain_graph,
            allow_unused=True,
        )
        out = {k: g for k, g in zip(keys, grads) if g is not None}
    return {k: out[k] if k in out else torch.zeros_like(v) for k, v in wrt.items()}


def vjp_dict(
    outputs: Params, wrt: Params, cotangents: Params, *, create_graph: bool = False, retain_graph: bool | None = None
) -> Params:
    """Σ_k <cotangent_k, d outputs_k / d wrt>, as a dict over wrt. Unused inputs get zeros."""
    pairs = [(outputs[k], cotangents[k]) for k in outputs if outputs[k].requires_grad]
    keys = [k for k, v in wrt.items() if v.requires_grad]
    out: Params = {}
    if pairs and keys:
        grads = torch.autograd.grad(
            [o for o, _ in pairs],
            [wrt[k] for k in keys],
            grad_outputs=[c for _, c in pairs],
            create_graph=create_graph,
            retain_graph=retain_graph,
            allow_unused=True,
        )
        out = {k: g for k, g in zip(keys, grads) if g is not None}
    return {k: out[k] if k in out else torch.zeros_like(v) for k, v in wrt.items()}


# Small tree arithmetic on Params, so solver code reads like the equations.


def tmap(fn: Callable[..., Tensor], *trees: Params) -> Params:
    return {k: fn(*(t[k] for t in trees)) for k in trees[0]}


def tadd(a: Params, b: Params, alpha: float | Tensor = 1.0) -> Params:
    return {k: a[k] + alpha * b[k] for k in a}


def tscale(a: Params, s: float | Tensor) -> Params:
    return {k: s * v for k, v in a.items()}


def tdot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def tnorm(a: Params) -> Tensor:
    return torch.sqrt(tdot(a, a))


def tzeros_like(a: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def flatten(params: Params) -> Tensor:
    return torch.cat([v.reshape(-1) for v in params.values()]) if params else torch.zeros(0)


def unflatten(vec: Tensor, like: Params) -> Params:
    out, i = {}, 0
    for k, v in like.items():
        n = v.numel()
        out[k] = vec[i : i + n].view_as(v)
        i += n
    return out
