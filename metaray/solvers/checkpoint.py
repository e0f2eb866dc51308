"""Checkpointed reverse mode through an inner unroll, and the memory budget that picks its spacing.

The solvers that differentiate through the unroll (rad, maml, metasgd, trad over its window, bda,
bda-pessimistic) compute the gradient of φ(x) = F(x, y_T) for (survey 001 eqs. 11, 15-17)

    y_0 = Ψ_0(x),      y_t = Ψ_t(x, y_{t-1}),   t = 1..T

    dφ/dx = ∂F/∂x + Σ_t B_tᵀ a_t + (∂Ψ_0/∂x)ᵀ a_0,    a_T = ∂F/∂y_T,   a_{t-1} = A_tᵀ a_t,

with A_t = ∂Ψ_t/∂y_{t-1} and B_t = ∂Ψ_t/∂x. Plain reverse mode keeps the graph of all T steps, so memory
grows linearly in T. With ``checkpoint_every = k`` (``reverse(..., every=k)``):

1. run the T steps without a graph, storing only y_0, y_k, y_2k, ... (detached): ⌈T/k⌉ iterates;
2. a_T and ∂F/∂x from F(x, y_T);
3. for each segment (s, e] from the last to the first: take the stored y_s as a fresh leaf, recompute
   y_{s+1}, ..., y_e *with* their graph (``create_graph=True``, so the Hessian terms of ∇_y f are in it: second
   order, as in the full unroll), and one ``torch.autograd.grad(y_e, (y_s, x), grad_outputs=a_e)`` gives
   a_s = (∂y_e/∂y_s)ᵀ a_e and the segment's share Σ_{t=s+1..e} B_tᵀ a_t of dφ/dx; then free that graph;
4. push a_0 through y_0 = Ψ_0(x) (the ``inner_start`` graph, kept from the start: an identity for MAML,
   nothing at all when y_0 is a constant, as at the start of trad's window).

Memory: ⌈T/k⌉ + 1 iterates plus one segment's graph (k steps), O(T/k + k), smallest near k = √(T·|y|/G) for a
step graph of G bytes. Compute: one more forward unroll, without a graph, whatever k is. The result is the
same chain of vector-Jacobian products as the full unroll, grouped by segment, so it agrees to rounding.

Why explicit and not ``torch.utils.checkpoint``: the step itself calls ``torch.autograd.grad(create_graph=True)``
(the inner gradient), which the reentrant variant cannot nest; the non-reentrant variant works through saved-
tensor hooks, which ``torch.func`` transforms refuse and which would hide the segment graphs from the CPU memory
meter (memory.py). Written out, what is stored (the iterates, nothing else) and when each segment's graph is
freed is visible, and one function serves every step rule: ``gd_step`` (rad, maml, trad), Meta-SGD's
per-parameter step and BDA's aggregated step, each passed in as ``step(x, y, t, create_graph=...)`` with the
problem's ``project_inner`` applied inside it.

The budget (``memory_budget_mb``): ``probe`` measures, on the task at hand, one iterate, the graph two
differentiated steps keep, and the outer objective with its gradient (with the meter of memory.py: CUDA
allocator on a GPU, autograd-held bytes on the CPU); ``plan`` predicts the peak of each spacing from them and
keeps the full unroll when it fits, else the spacing of the smallest peak, else refuses before any work with
a message naming what would fit (fewer steps, trad, an implicit solver, first order).
"""
from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from . import memory
from .base import SolverOptions, nonnegative, option, positive
from .core import Params, check_params, check_problem, detached, inner_start, leaves

MiB = 2**20


class Step(Protocol):
    def __call__(self, x: Params, y: Params, t: int, *, create_graph: bool) -> Params:
        """y_t = Ψ_t(x, y_{t-1}) for t = 1..T; differentiable in (x, y) when ``create_graph``, else detached."""
        ...


Objective = Callable[[Params, Params], tuple[Tensor, Any]]  # (x, y_T) -> (F(x, y_T), anything to pass back)


# ----------------------------------------------------------------------------------------------------------
# The reverse pass
# ----------------------------------------------------------------------------------------------------------


def _grads(outputs: list[Tensor], cotangents: list[Tensor] | None, *wrt: Params) -> list[Params]:
    """Σ <cotangent, d output / d w> for each dict of ``wrt``; zeros where an input is unused or constant."""
    flat = [(d, k) for d in wrt for k, v in d.items() if v.requires_grad]
    pairs = [(o, c) for o, c in zip(outputs, cotangents or [None] * len(outputs)) if o.requires_grad]
    got: dict[tuple[int, str], Tensor] = {}
    if flat and pairs:
        gs = torch.autograd.grad([o for o, _ in pairs], [d[k] for d, k in flat],
                                 grad_outputs=[c for _, c in pairs] if cotangents is not None else None, allow_unused=True)
        got = {(id(d), k): g for (d, k), g in zip(flat, gs) if g is not None}
    return [{k: got.get((id(d), k), torch.zeros_like(v)) for k, v in d.items()} for d in wrt]


class _RandomState:
    """The random streams a step may draw from: torch's global generators (dropout; CUDA's where initialized)
    and every ``torch.Generator`` inside the task (a noisy inner loss such as paper 003's, which draws on every
    call). A recomputed segment must replay the draws of the forward pass, or it would differentiate another
    trajectory; so their state is saved at each segment start and restored before the segment is rebuilt."""

    def __init__(self, task: Any):
        self.generators = _generators(task)

    def save(self) -> tuple:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return torch.get_rng_state(), cuda, [g.get_state() for g in self.generators]

    def restore(self, state: tuple) -> None:
        cpu, cuda, own = state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        for g, st in zip(self.generators, own):
            g.set_state(st)


def _generators(obj: Any, depth: int = 0) -> list[torch.Generator]:
    if isinstance(obj, torch.Generator):
        return [obj]
    if depth > 4 or isinstance(obj, (Tensor, str, bytes, int, float)) or obj is None:
        return []
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        children = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    else:
        children = [v for v in getattr(obj, "__dict__", {}).values()]
    found: list[torch.Generator] = []
    for c in children:
        found += [g for g in _generators(c, depth + 1) if all(g is not h for h in found)]
    return found


def reverse(
    step: Step, objective: Objective, x: Params, y0: Params, steps: int, every: int = 0, task: Any = None
) -> tuple[Params, Params, tuple[Tensor, Any]]:
    """dF(x, y_T)/dx through ``steps`` applications of ``step`` from ``y0``; returns (dF/dx, y_T, objective's result).

    ``x`` are leaves that require grad. ``y0`` may carry its graph in x (Ψ_0; it is differentiated through) or
    be constant. ``every = 0`` keeps the whole unroll's graph; ``every = k > 0`` checkpoints every k-th iterate
    (see the module docstring). Both give the same gradient; ``task`` is searched for the random generators a
    checkpointed recomputation must replay (``_RandomState``).
    """
    if every <= 0:
        y = y0
        for t in range(1, steps + 1):
            y = step(x, y, t, create_graph=True)
        out = objective(x, y)
        (gx,) = _grads([out[0]], None, x)
        return gx, y, out

    # 1. Forward without a graph (x detached too, so no step builds anything on x), storing y_s at each segment
    #    start s = 0, k, 2k, ...
    x_const = detached(x)
    starts = list(range(0, steps, every))
    stored: dict[int, Params] = {}
    rng, rng_at = _RandomState(task), {}
    y = detached(y0)
    for t in range(1, steps + 1):
        if (t - 1) % every == 0:
            stored[t - 1], rng_at[t - 1] = memory.hold(y), rng.save()
        y = step(x_const, y, t, create_graph=False)
    y_T = memory.hold(leaves(y))

    # 2. a_T = ∂F/∂y_T and the direct term ∂F/∂x.
    out = objective(x, y_T)
    gx, a = _grads([out[0]], None, x, y_T)
    after = rng.save()  # where the streams stand after the forward pass, as after a full unroll

    # 3. Segments from the last: recompute (s, e] with its graph, pull a_e back to a_s, collect B_tᵀ a_t.
    for s in reversed(starts):
        e = min(s + every, steps)
        y_s = leaves(stored.pop(s))
        rng.restore(rng_at.pop(s))
        y_e = y_s
        for t in range(s + 1, e + 1):
            y_e = step(x, y_e, t, create_graph=True)
        keys = list(y_e)
        a, gx_seg = _grads([y_e[k] for k in keys], [a[k] for k in keys], y_s, x)
        gx = {k: gx[k] + gx_seg[k] for k in gx}
        del y_e  # the segment's graph is freed here, before the next one is built
    rng.restore(after)

    # 4. a_0 through y_0 = Ψ_0(x), where y_0 depends on x.
    keys = [k for k in y0 if y0[k].requires_grad]
    if keys:
        (g0,) = _grads([y0[k] for k in keys], [a[k] for k in keys], x)
        gx = {k: gx[k] + g0[k] for k in gx}
    return gx, y_T, out


# ----------------------------------------------------------------------------------------------------------
# The memory model and the budget
# ----------------------------------------------------------------------------------------------------------


class MemoryBudgetError(ValueError):
    """The hypergradient cannot fit the memory budget with any checkpoint spacing; the message says what fits."""


@dataclass(frozen=True)
class StepMemory:
    """What ``probe`` measured (bytes; ``method`` as in memory.py).

    iterate:    one inner iterate y
    step_graph: what one more differentiated step keeps alive (its graph, the iterate it produces)
    fixed:      kept once per unroll whatever T is (inputs the steps save: x, the task's data)
    transient:  a step's peak above what it keeps (temporaries)
    outer:      the peak of F(x, y_T) and its gradient
    outer_dim:  bytes of x (the gradient accumulator)
    """

    iterate: int
    step_graph: int
    fixed: int
    transient: int
    outer: int
    outer_dim: int
    method: str

    def peak(self, steps: int, every: int) -> float:
        """Predicted peak bytes of ``reverse(..., steps, every)``."""
        T, S, G = steps, self.iterate, self.step_graph
        base = self.fixed + self.outer_dim + self.transient
        if every <= 0:
            return base + T * G + self.outer
        k = min(every, max(T, 1))
        stored = (math.ceil(T / k) + 1) * S if T else S
        # the outer graph is gone before the first segment is rebuilt; the adjoint and its successor are 2 S
        return base + stored + max(self.outer, k * G + 2 * S)

    def best_spacing(self, steps: int) -> tuple[int, float]:
        """(k, predicted peak) of the spacing with the smallest peak (the larger k on ties: fewer segments)."""
        if steps <= 0:
            return 1, self.peak(steps, 1)
        k = torch.arange(1, steps + 1, dtype=torch.float64)
        S, G = float(self.iterate), float(self.step_graph)
        stored = (torch.ceil(steps / k) + 1) * S
        peaks = self.fixed + self.outer_dim + self.transient + stored + torch.clamp(k * G + 2 * S, min=float(self.outer))
        best = float(peaks.min())
        k_best = int(torch.nonzero(peaks <= best * (1 + 1e-12)).max()) + 1
        return k_best, float(peaks[k_best - 1])

    def implicit_estimate(self) -> float:
        """An implicit solver (CG / Neumann on y_T): a few Params-sized vectors and one Hessian-vector graph."""
        return self.fixed + self.outer_dim + self.transient + self.outer + self.step_graph + 6 * self.iterate

    def first_order_estimate(self) -> float:
        """No graph through the unroll (fomaml, reptile, darts): one step's transient graph at a time."""
        return self.fixed + self.outer_dim + self.transient + self.outer + self.step_graph + 3 * self.iterate


@dataclass(frozen=True)
class MemoryPlan:
    """The spacing a solver will use and why. ``checkpoint_every = 0`` is the full unroll."""

    checkpoint_every: int
    estimated_peak_bytes: float
    full_unroll_bytes: float
    budget_bytes: float | None
    probe: StepMemory

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "probe": dataclasses.asdict(self.probe)}


# Plan against this fraction of the budget: the model leaves out the allocator's rounding and a few temporaries.
HEADROOM = 0.9


def probe(
    step: Step, objective: Objective, x: Params, y0: Params, device: torch.device | str | None = None, task: Any = None
) -> StepMemory:
    """Measures what ``StepMemory`` holds: two differentiated steps from ``y0`` (as a fresh leaf) and the outer
    objective with its gradient, each under a ``memory.PeakMemory`` meter. Nothing is kept, and the random
    streams (``_RandomState`` of ``task``) are put back, so a probed hypergradient equals an unprobed one."""
    if device is None:
        device = next(iter(x.values())).device
    rng = _RandomState(task)
    before = rng.save()
    try:
        return _probe(step, objective, x, y0, device)
    finally:
        rng.restore(before)


def _probe(step: Step, objective: Objective, x: Params, y0: Params, device: torch.device | str) -> StepMemory:
    y = leaves(y0)
    with memory.PeakMemory(device) as meter:
        live = [0, 0]
        y1 = step(x, y, 1, create_graph=True)
        live[0] = _current(meter)
        y2 = step(x, y1, 2, create_graph=True)
        live[1] = _current(meter)
        del y1, y2
    step_graph = max(live[1] - live[0], 0)
    fixed = max(live[0] - step_graph, 0)
    transient = max(meter.peak_bytes - live[1], 0)
    y_T = leaves(y0)
    with memory.PeakMemory(device) as outer_meter:
        out = objective(x, y_T)
        _grads([out[0]], None, x, y_T)
        del out
    return StepMemory(
        iterate=memory.params_bytes(y0), step_graph=step_graph, fixed=fixed, transient=transient,
        outer=outer_meter.peak_bytes, outer_dim=memory.params_bytes(x), method=meter.method,
    )


def _current(meter: memory.PeakMemory) -> int:
    if meter.method == memory.CUDA_METHOD:
        return torch.cuda.memory_allocated(meter.device) - meter._base
    return meter._live


def _round_up(v: float, digits: int = 3) -> float:
    """v rounded up to ``digits`` significant digits (a budget that certainly fits, written briefly)."""
    if v <= 0:
        return 0.0
    scale = 10.0 ** (math.floor(math.log10(v)) - digits + 1)
    return math.ceil(v / scale - 1e-9) * scale


def _mib(b: float) -> str:
    return f"{b / MiB:.3g} MiB"


def plan(m: StepMemory, steps: int, budget_bytes: float | None, *, solver: str = "", every: int = 0) -> MemoryPlan:
    """The spacing for ``steps`` differentiated steps: ``every`` when there is no budget; with one, the full
    unroll if it fits, else the spacing of the smallest peak if that fits, else ``MemoryBudgetError``."""
    full = m.peak(steps, 0)
    if budget_bytes is None:
        return MemoryPlan(every, m.peak(steps, every), full, None, m)
    limit = HEADROOM * budget_bytes
    if full <= limit:
        return MemoryPlan(0, full, full, budget_bytes, m)
    k, peak = m.best_spacing(steps)
    if peak <= limit:
        return MemoryPlan(k, peak, full, budget_bytes, m)
    raise MemoryBudgetError(_refusal(m, steps, budget_bytes, solver, k, peak, full))


def max_steps_within(m: StepMemory, limit: float, below: int) -> int:
    """The largest T < ``below`` whose best checkpointed peak is at most ``limit`` (0 if none)."""
    lo, hi = 0, below - 1  # invariant: T = lo fits (T = 0 is the outer objective alone) or lo = 0
    if m.best_spacing(0)[1] > limit:
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if m.best_spacing(mid)[1] <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _refusal(m: StepMemory, steps: int, budget: float, solver: str, k: int, peak: float, full: float) -> str:
    limit = HEADROOM * budget
    t_max = max_steps_within(m, limit, steps)
    who = f"{solver} with " if solver else ""
    fits = []
    if t_max >= 1:
        fits.append(f"fewer inner steps: inner_steps <= {t_max} (memory_budget_mb then picks the spacing)")
        fits.append(f"trad with truncate <= {t_max} (back-propagate through the last inner steps only)")
    else:
        fits.append("fewer inner steps do not help: one differentiated inner step alone does not fit")
    implicit, first = m.implicit_estimate(), m.first_order_estimate()
    fits.append(f"an implicit solver (imaml, ift-cg or ift-neumann: memory flat in T, about {_mib(implicit)}"
                + ("" if implicit <= limit else ", which does not fit either") + ")")
    fits.append(f"first order (fomaml or reptile for a learned initialization, darts for hyperparameters: no graph "
                f"through the unroll, about {_mib(first)}" + ("" if first <= limit else ", which does not fit either") + ")")
    fits.append(f"memory_budget_mb >= {_round_up(peak / HEADROOM / MiB):g}")
    return (
        f"{who}inner_steps={steps} cannot fit memory_budget_mb={budget / MiB:g}: the full unroll needs about "
        f"{_mib(full)} and the best checkpoint spacing (checkpoint_every={k}) about {_mib(peak)}, over "
        f"{HEADROOM:.0%} of the budget (probe, as {m.method}: one differentiated inner step keeps "
        f"{_mib(m.step_graph)}, one inner iterate is {_mib(m.iterate)}, the outer loss and its gradient "
        f"{_mib(m.outer)}). What would fit: " + "; ".join(fits) + "."
    )


# ----------------------------------------------------------------------------------------------------------
# What the six solvers share: the two options and the spacing they resolve to
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointOptions(SolverOptions):
    checkpoint_every: int = option(
        0, "keep every k-th inner iterate and recompute each segment in the backward pass (memory O(T/k + k), "
        "one more forward unroll, same gradient); 0 = keep the whole unroll", nonnegative)
    memory_budget_mb: float | None = option(
        None, "MiB for one hypergradient: the checkpoint spacing is picked from a probe of one inner step, and a "
        "budget nothing fits fails naming what would; None = no budget", positive)

    def validate(self) -> None:
        super().validate()
        if self.checkpoint_every and self.memory_budget_mb is not None:
            raise ValueError("set checkpoint_every or memory_budget_mb, not both: checkpoint_every fixes the "
                             "spacing, memory_budget_mb lets metaray pick it")


def _signature(obj: Any, depth: int = 0) -> Any:
    """The shapes, dtypes and devices of the tensors in a task (dataclass, dict, list, tuple): what the memory of
    one hypergradient depends on besides x. Tasks with equal signatures share a plan."""
    if isinstance(obj, Tensor):
        return (tuple(obj.shape), str(obj.dtype), str(obj.device))
    if depth > 4:
        return None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return tuple((f.name, _signature(getattr(obj, f.name), depth + 1)) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return tuple((str(k), _signature(v, depth + 1)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return tuple(_signature(v, depth + 1) for v in obj)
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return type(obj).__name__


class Checkpointed(abc.ABC):
    """Mixin of the solvers that differentiate through their unroll. A solver provides ``_reverse_parts``:
    its step, its objective and the number of differentiated steps; the mixin resolves the spacing."""

    @abc.abstractmethod
    def _reverse_parts(self, problem: Any, x: Params, task: Any) -> tuple[Step, Objective, int]:
        """The hook each solver using this mixin defines (see the class docstring)."""

    def checkpoint_spacing(self, problem: Any, x: Params, task: Any) -> int:
        """``checkpoint_every``, or the spacing ``memory_budget_mb`` allows (probed once per task signature)."""
        if self.options.memory_budget_mb is None:  # type: ignore[attr-defined]
            return self.options.checkpoint_every  # type: ignore[attr-defined]
        return self._plan(problem, x, task).checkpoint_every

    def memory_plan(self, problem: Any, x: Params, task: Any) -> MemoryPlan:
        """The plan for this task: probes one inner step (cheap) and raises ``MemoryBudgetError`` when the budget
        cannot be met. The platform calls it on one training task before a run starts."""
        check_problem(problem)
        return self._plan(problem, check_params(x, "outer params x"), task)

    def _plan(self, problem: Any, x: Params, task: Any) -> MemoryPlan:
        o = self.options  # type: ignore[attr-defined]
        x = leaves(x)
        step, objective, steps = self._reverse_parts(problem, x, task)
        key = (steps, tuple((k, tuple(v.shape), str(v.dtype), str(v.device)) for k, v in x.items()), _signature(task))
        cache = self.__dict__.setdefault("_memory_probes", {})
        if key not in cache:
            rng = _RandomState(task)  # init_inner may draw too: the whole probe leaves the streams as it found them
            before = rng.save()
            try:
                cache[key] = probe(step, objective, x, inner_start(problem, x, task, graph=False))
            finally:
                rng.restore(before)
        budget = None if o.memory_budget_mb is None else o.memory_budget_mb * MiB
        return plan(cache[key], steps, budget, solver=getattr(self, "name", ""), every=o.checkpoint_every)
