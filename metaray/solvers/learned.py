"""Learned optimizers (survey 000 §3.2.2, eqs. 10-14): the outer params x = φ are an optimizer's weights.

For task i the optimizee params θ (the inner params y) follow the learned update rule (eqs. 10-11)

    θ_{t+1} = θ_t + g_t(φ),        [g_t(φ), h_{t+1}] = OPT(∇_θ l(θ_t), h_t; φ)

and φ minimizes the loss along the trajectory, summed over tasks (eqs. 12-13):

    min_φ  Σ_i Σ_{t=1..T} w_t L(θ^i_t(φ))

Two architectures, both coordinate-wise (every scalar of θ is one row of a batch; all rows share φ):

- ``lstm`` (Andrychowicz et al. 2016): a 2-layer LSTM (20 hidden units) reads the preprocessed gradient and
  outputs the update, times 0.1. Preprocessing (their appendix A): ∇ ↦ (log|∇| / p, sign ∇) if |∇| ≥ e^{-p},
  else (−1, e^p ∇), with p = 10, so gradients of any magnitude enter on one scale.
- ``mlp`` (in the spirit of Metz et al. 2019): an MLP per coordinate reads the preprocessed gradient, momentum
  EMAs at a few timescales β (each preprocessed the same way) and the parameter value, and outputs a direction
  d and a log-magnitude m; the update is  s · d · exp(λ m)  with s = ``inner_lr`` and λ = 0.1 (Metz et al.'s
  λ₁ d exp(λ₂ m) form).

The solver ``l2o`` does truncated back-propagation through time: one call unrolls ``inner_steps`` optimizee
steps from the state the previous call left (θ, the optimizer's per-coordinate state, the step counter and the
task itself, all in ``HyperGrad.state``), so a trajectory of ``horizon`` steps is covered in segments, exactly
Andrychowicz et al.'s 5 truncations of 20 steps. The state at a segment start is a constant, so the gradient
is the exact gradient of that segment's meta-loss.

How the meta-objective fits ``BilevelProblem``: the problem's ``inner_loss(x, y, task)`` is the optimizee loss
l(θ) (it ignores x: the learned optimizer appears only in the update rule, not in any loss). The meta-loss is
the weighted mean over the segment's steps t = 1..T of L_t = inner_loss(θ_t) (``meta_objective="inner"``,
Andrychowicz et al.) or L_t = outer_loss(θ_t), a held-out loss (``"outer"``, survey eq. 12's L_out on D_val).
``HyperGrad.outer_loss`` stays the contract's F(x, y_T) at the segment's last iterate; the meta-loss is in
``metrics["meta_loss"]``.

Stability measures (each an option, see ``docs/learned_optimizers.md``): first-order meta-gradient (drop
∂∇l/∂φ, Andrychowicz et al.; also avoids exploding second-order terms), clipping of the meta-gradient's global
norm, log-loss meta-objective (every task on one scale, Wichrowska et al. 2017), the input preprocessing and
output scale above, truncation itself; random scaling of the optimizee (Lv et al. 2017) is a property of the
task sources in ``metaray.tasks.optimizees``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import Solver, SolverOptions, option, positive, register
from .core import (
    BilevelProblem,
    Params,
    check_finite,
    detached,
    flatten,
    grad_dict,
    inner_start,
    leaves,
    project,
    tnorm,
    unflatten,
)
from .unrolled import finish

ARCHS = ("lstm", "mlp")
MLP_MAGNITUDE_SCALE = 0.1  # λ in s · d · exp(λ m): keeps exp(λ m) near 1 at initialization


# ----------------------------------------------------------------------------------------------------------
# The nets: pure functions of (config, weights dict, per-coordinate state)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerNet:
    """The fixed (not learned) part of a learned optimizer; the learned part is the weights dict φ.

    arch:          "lstm" or "mlp"
    output_scale:  s, the multiplier of the net's output (Andrychowicz et al. use 0.1)
    preprocess_p:  p of the log-magnitude/sign gradient preprocessing (paper: 10)
    betas:         momentum EMA rates of the mlp's features (unused by the lstm)
    """

    arch: str = "lstm"
    output_scale: float = 0.1
    preprocess_p: float = 10.0
    betas: tuple[float, ...] = (0.5, 0.9, 0.99)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"learned optimizer arch must be one of {list(ARCHS)}, got {self.arch!r}")
        for name in ("output_scale", "preprocess_p"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if not self.betas or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be a non-empty tuple of EMA rates in [0, 1), got {self.betas!r}")

    @property
    def num_features(self) -> int:
        return 2 if self.arch == "lstm" else 2 + 2 * len(self.betas) + 1


def preprocess(g: Tensor, p: float = 10.0) -> Tensor:
    """Andrychowicz et al. 2016, appendix A: (log|g| / p, sign g) if |g| ≥ e^{-p}, else (−1, e^p g). Shape (..., 2)."""
    big = g.abs() >= math.exp(-p)
    # torch.where evaluates both branches: keep log's argument away from 0 so its gradient stays finite.
    log_mag = torch.log(torch.where(big, g.abs(), torch.ones_like(g))) / p
    first = torch.where(big, log_mag, -torch.ones_like(g))
    second = torch.where(big, torch.sign(g), math.exp(p) * g)
    return torch.stack([first, second], dim=-1)


def init_weights(
    net: OptimizerNet, *, hidden: int = 20, layers: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Params:
    """Fresh weights φ. lstm: ``lstm{l}.w_ih, lstm{l}.w_hh, lstm{l}.b`` per layer and ``out.w, out.b``;
    mlp: ``mlp{l}.w, mlp{l}.b`` per hidden layer and ``out.w, out.b`` (2 outputs: direction, log-magnitude).
    Uniform(±1/√fan_in) like torch's defaults; the output layer starts small so initial steps are gentle."""
    if not isinstance(hidden, int) or hidden < 1 or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"hidden and layers must be ints >= 1, got hidden={hidden!r}, layers={layers!r}")
    g = torch.Generator().manual_seed(seed)

    def uniform(shape: tuple[int, ...], bound: float) -> Tensor:
        return (2 * torch.rand(shape, generator=g, dtype=torch.float64) - 1).mul_(bound).to(dtype)

    w: Params = {}
    fan = net.num_features
    if net.arch == "lstm":
        k = 1 / math.sqrt(hidden)
        for l in range(layers):
            w[f"lstm{l}.w_ih"] = uniform((4 * hidden, fan), k)
            w[f"lstm{l}.w_hh"] = uniform((4 * hidden, hidden), k)
            w[f"lstm{l}.b"] = uniform((4 * hidden,), k)
            fan = hidden
        w["out.w"] = uniform((1, hidden), 0.1 * k)
        w["out.b"] = torch.zeros(1, dtype=dtype)
    else:
        for l in range(layers):
            w[f"mlp{l}.w"] = uniform((hidden, fan), 1 / math.sqrt(fan))
            w[f"mlp{l}.b"] = uniform((hidden,), 1 / math.sqrt(fan))
            fan = hidden
        w["out.w"] = uniform((2, hidden), 0.1 / math.sqrt(hidden))
        w["out.b"] = torch.zeros(2, dtype=dtype)
    return w


def _num_layers(weights: Params, prefix: str) -> int:
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in weights):
        n += 1
    return n


def check_weights(net: OptimizerNet, weights: Params) -> None:
    """Keys and shapes of φ must be those ``init_weights(net, ...)`` makes, for some hidden size and depth."""
    prefix, per_layer = ("lstm", ("w_ih", "w_hh", "b")) if net.arch == "lstm" else ("mlp", ("w", "b"))
    layers = _num_layers(weights, prefix)
    hint = f"build them with metaray.solvers.learned.init_weights(OptimizerNet(arch={net.arch!r}))"
    if layers == 0:
        raise ValueError(f"learned-optimizer weights for arch={net.arch!r} need keys '{prefix}0.*'; got {sorted(weights)}; {hint}")
    expected = {f"{prefix}{l}.{n}" for l in range(layers) for n in per_layer} | {"out.w", "out.b"}
    if set(weights) != expected:
        raise ValueError(
            f"learned-optimizer weights for arch={net.arch!r} with {layers} layers must have keys {sorted(expected)}; "
            f"missing {sorted(expected - set(weights))}, unexpected {sorted(set(weights) - expected)}; {hint}"
        )
    fan = net.num_features
    for l in range(layers):
        w = weights[f"{prefix}{l}.w_ih" if net.arch == "lstm" else f"{prefix}{l}.w"]
        rows = w.shape[0] // 4 if net.arch == "lstm" else w.shape[0]
        shapes = (
            {"w_ih": (4 * rows, fan), "w_hh": (4 * rows, rows), "b": (4 * rows,)}
            if net.arch == "lstm"
            else {"w": (rows, fan), "b": (rows,)}
        )
        for n, shape in shapes.items():
            key = f"{prefix}{l}.{n}"
            got = tuple(weights[key].shape)
            if got != shape:
                raise ValueError(f"weights[{key!r}] has shape {got}, expected {shape} (arch={net.arch!r})")
        fan = rows
    outs = 1 if net.arch == "lstm" else 2
    for n, shape in (("out.w", (outs, fan)), ("out.b", (outs,))):
        if tuple(weights[n].shape) != shape:
            raise ValueError(f"weights[{n!r}] has shape {tuple(weights[n].shape)}, expected {shape} (arch={net.arch!r})")


def init_state(net: OptimizerNet, weights: Params, n: int, dtype: torch.dtype) -> Params:
    """Per-coordinate optimizer state for n coordinates: lstm (h, c) of shape (layers, n, hidden); mlp EMAs (n, k)."""
    if net.arch == "lstm":
        layers, hidden = _num_layers(weights, "lstm"), weights["lstm0.w_hh"].shape[1]
        return {"h": torch.zeros(layers, n, hidden, dtype=dtype), "c": torch.zeros(layers, n, hidden, dtype=dtype)}
    return {"m": torch.zeros(n, len(net.betas), dtype=dtype)}


def update(net: OptimizerNet, weights: Params, grad: Tensor, param: Tensor, state: Params) -> tuple[Tensor, Params]:
    """One learned step for flat vectors grad, param of n coordinates: returns (g_t, new state), θ_{t+1} = θ_t + g_t."""
    if net.arch == "lstm":
        inp = preprocess(grad, net.preprocess_p)  # (n, 2)
        hs, cs = [], []
        for l in range(state["h"].shape[0]):
            gates = inp @ weights[f"lstm{l}.w_ih"].T + state["h"][l] @ weights[f"lstm{l}.w_hh"].T + weights[f"lstm{l}.b"]
            i, f, gg, o = gates.chunk(4, dim=-1)  # torch.nn.LSTM's gate order
            c = torch.sigmoid(f) * state["c"][l] + torch.sigmoid(i) * torch.tanh(gg)
            h = torch.sigmoid(o) * torch.tanh(c)
            hs.append(h)
            cs.append(c)
            inp = h
        out = inp @ weights["out.w"].T + weights["out.b"]
        return net.output_scale * out[:, 0], {"h": torch.stack(hs), "c": torch.stack(cs)}
    betas = torch.tensor(net.betas, dtype=grad.dtype)
    m = betas * state["m"] + (1 - betas) * grad[:, None]  # EMAs at several timescales, updated before use
    feats = [preprocess(grad, net.preprocess_p)]
    feats += [preprocess(m[:, j], net.preprocess_p) for j in range(m.shape[1])]
    feats.append(param[:, None])
    hidden = torch.cat(feats, dim=-1)
    for l in range(_num_layers(weights, "mlp")):
        hidden = torch.relu(hidden @ weights[f"mlp{l}.w"].T + weights[f"mlp{l}.b"])
    out = hidden @ weights["out.w"].T + weights["out.b"]
    direction, log_mag = out[:, 0], out[:, 1]
    return net.output_scale * direction * torch.exp(MLP_MAGNITUDE_SCALE * log_mag), {"m": m}


# ----------------------------------------------------------------------------------------------------------
# The solver
# ----------------------------------------------------------------------------------------------------------


@dataclass
class L2OState:
    """What one optimizee trajectory carries between truncations (``HyperGrad.state`` of ``l2o``)."""

    y: Params            # θ at the end of the last segment (detached)
    opt: Params          # the learned optimizer's per-coordinate state (detached)
    step: int            # optimizee steps taken so far in this trajectory
    task: Any            # the task the trajectory started on: later segments continue on it
    done: bool = False   # step reached the horizon: the next call starts a new trajectory


# Run checkpoints hold each task's solver state and are read with torch.load(weights_only=True): allowlist this
# data-only class (tensors, ints, bools and the task) so a checkpointed trajectory resumes.
torch.serialization.add_safe_globals([L2OState])


@dataclass(frozen=True)
class L2OOptions(SolverOptions):
    inner_steps: int = option(20, "optimizee steps per truncation: one hypergrad call unrolls this many", positive)
    inner_lr: float = option(0.1, "output scale s of the learned update (Andrychowicz et al.: 0.1)", positive)
    horizon: int = option(100, "optimizee steps per trajectory, covered in segments of inner_steps", positive)
    arch: str = option("lstm", "learned-optimizer architecture: coordinate-wise LSTM or per-parameter MLP", choices=ARCHS)
    preprocess_p: float = option(10.0, "p of the gradient preprocessing (log|g|/p, sign g)", positive)
    betas: tuple = option((0.5, 0.9, 0.99), "momentum EMA rates fed to the mlp (ignored by the lstm)")
    meta_objective: str = option(
        "inner", "loss summed along the trajectory: the optimizee's inner_loss or the problem's outer_loss",
        choices=("inner", "outer"),
    )
    weighting: str = option(
        "uniform", "trajectory weights w_t: uniform (paper), increasing (w_t = t) or last (final step only)",
        choices=("uniform", "increasing", "last"),
    )
    log_loss: bool = option(False, "use log L_t (scale-free across tasks; Wichrowska et al. 2017); needs L_t > 0")
    second_order: bool = option(
        False, "differentiate through ∇l(θ_t) too (False drops ∂∇l/∂φ as Andrychowicz et al. do)"
    )
    grad_clip: float | None = option(None, "clip the meta-gradient's global norm to this value (None: off)", positive)

    def validate(self) -> None:
        if not isinstance(self.betas, (tuple, list)):
            raise TypeError(f"option 'betas' must be a tuple of numbers in [0, 1), got {type(self.betas).__name__} {self.betas!r}")
        if not self.betas or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"option 'betas' must be a non-empty tuple of numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def net(self) -> OptimizerNet:
        return OptimizerNet(self.arch, self.inner_lr, self.preprocess_p, self.betas)


@register
class L2O(Solver):
    """Learning to learn by gradient descent by gradient descent (Andrychowicz et al. 2016), truncated BPTT.

    x: the optimizer weights φ (``init_weights``); ``problem.init_inner(x, task)`` gives θ_0 (it should not
    depend on x), ``problem.inner_loss`` the optimizee loss. Each call continues the trajectory in ``state``
    (or starts one on ``task`` when state is None or the previous trajectory reached ``horizon``), unrolls
    min(inner_steps, horizon − step) learned steps and returns d(meta-loss of the segment)/dφ.
    ``HyperGrad.state.done`` says whether the trajectory is finished (the next call starts a new one).
    """

    name = "l2o"
    Options = L2OOptions
    problem_needs = ("optimizee",)
    paper = "Andrychowicz et al. 2016, Learning to learn by gradient descent by gradient descent (survey 000 eqs. 10-14)"
    stateful = True

    def _hypergrad(self, problem, x, task, state):
        o = self.options
        net = o.net()
        check_weights(net, x)
        if state is not None and not isinstance(state, L2OState):
            raise TypeError(f"l2o state must be the L2OState a previous call returned, or None; got {type(state).__name__}")
        phi = leaves(x)
        if state is None or state.step >= o.horizon:
            y = inner_start(problem, detached(x), task, graph=False)
            y = detached(_check_optimizee(y, phi))
            opt = init_state(net, phi, flatten(y).numel(), flatten(y).dtype)
            start = 0
        else:
            task, y, opt, start = state.task, state.y, state.opt, state.step
        steps = min(o.inner_steps, o.horizon - start)
        y, opt, meta, losses = learned_unroll(problem, net, phi, y, opt, task, steps, start=start, options=o)
        grad = grad_dict(meta, phi)
        norm = float(tnorm(grad))
        if o.grad_clip is not None and norm > o.grad_clip:
            grad = {k: g * (o.grad_clip / norm) for k, g in grad.items()}
        new_state = L2OState(detached(y), detached(opt), start + steps, task, done=start + steps >= o.horizon)
        metrics = {
            "meta_loss": float(meta.detach()),
            "trajectory_step": float(start + steps),
            "segment_first_loss": losses[0],
            "meta_grad_norm": norm,
        }
        return finish(problem, x, y, task, grad, metrics, state=new_state)

    def _adapt(self, problem, x, task, state):
        """For ``evaluate`` (meta-validation / meta-test): a fresh trajectory of ``horizon`` learned steps."""
        net = self.options.net()
        check_weights(net, x)
        y = detached(_check_optimizee(inner_start(problem, x, task, graph=False), x))
        opt = init_state(net, x, flatten(y).numel(), flatten(y).dtype)
        y, *_ = learned_unroll(problem, net, detached(x), y, opt, task, self.options.horizon, options=self.options)
        return detached(y)


def _check_optimizee(y: Params, phi: Params) -> Params:
    if not isinstance(y, dict) or not y:
        raise TypeError("problem.init_inner must return the optimizee params as a non-empty dict[str, Tensor]")
    dt = next(iter(phi.values())).dtype
    bad = {k: v.dtype for k, v in y.items() if v.dtype != dt}
    if bad:
        raise TypeError(f"optimizee params have dtypes {bad} but the learned-optimizer weights are {dt}: use one dtype")
    return y


def learned_unroll(
    problem: BilevelProblem,
    net: OptimizerNet,
    phi: Params,
    y: Params,
    opt: Params,
    task: Any,
    steps: int,
    *,
    start: int = 0,
    options: L2OOptions | None = None,
) -> tuple[Params, Params, Tensor, list[float]]:
    """Unrolls ``steps`` learned updates from (θ, state) and builds the segment's meta-loss.

    Returns (θ_T, state_T, meta-loss as a differentiable scalar, [inner loss at θ_0, ..., θ_T]). With φ plain
    tensors (no grad) this is simply the learned optimizer at work.
    """
    o = options or L2OOptions()
    y = {k: v.detach().requires_grad_(True) for k, v in y.items()}
    loss = problem.inner_loss(phi, y, task)
    tracking = torch.is_grad_enabled() and any(v.requires_grad for v in phi.values())
    terms, weights, losses = [], [], [check_finite(loss, f"inner_loss at optimizee step {start}", task)]
    for t in range(steps):
        differentiable = o.second_order and torch.is_grad_enabled()
        g = grad_dict(loss, y, create_graph=differentiable, retain_graph=True)
        if not differentiable:
            g = detached(g)  # Andrychowicz et al.: the gradient input is a constant of φ
        delta, opt = update(net, phi, flatten(g), flatten(y), opt)
        y = {k: v + d for (k, v), d in zip(y.items(), unflatten(delta, y).values())}
        y = project(problem, phi, y)
        if not tracking:  # φ is a constant (evaluation, a trained optimizer at work): no graph to keep
            y = {k: v.detach().requires_grad_(True) for k, v in y.items()}
        step = start + t + 1
        loss = problem.inner_loss(phi, y, task)
        losses.append(check_finite(loss, f"inner_loss at optimizee step {step}", task))
        term = loss if o.meta_objective == "inner" else problem.outer_loss(phi, y, task)
        if o.meta_objective == "outer":
            check_finite(term, f"outer_loss at optimizee step {step}", task)
        w = {"uniform": 1.0, "increasing": float(step), "last": 1.0 if t == steps - 1 else 0.0}[o.weighting]
        if w == 0.0:
            continue
        if o.log_loss:
            if float(term.detach()) <= 0:
                raise ValueError(
                    f"log_loss=True needs a positive meta-loss term, got {float(term.detach())} at optimizee step {step}; "
                    "use log_loss=False for losses that can reach 0 or below"
                )
            term = torch.log(term)
        terms.append(w * term)
        weights.append(w)
    meta = torch.stack(terms).sum() / sum(weights) if terms else torch.zeros((), dtype=loss.dtype)
    return y, opt, meta, losses
