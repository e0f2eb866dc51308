"""Checkpointed reverse mode (metaray/solvers/checkpoint.py) and the memory budget.

- checkpoint_every = k gives the full unroll's hypergradient (float64, 1e-12 relative) for rad, maml, metasgd,
  trad (over its window), bda and bda-pessimistic, for T up to 200 and k in {1, 3, ⌈√T⌉, T}, with an
  x-dependent project_inner, second order (against finite differences and against first order);
- it bounds the measured peak; memory_budget_mb picks a spacing whose measured peak is under the budget (by the
  platform's meter and by the allocator's events) or refuses, naming what would fit;
- the meter of metaray/solvers/memory.py.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as Fn

import metaray.solvers as S
from metaray.solvers import memory
from metaray.solvers.checkpoint import HEADROOM, MemoryBudgetError, reverse
from metaray.solvers.core import leaves

CHECKPOINTED = ["rad", "maml", "metasgd", "trad", "bda", "bda-pessimistic"]
F64 = torch.float64


def global_rel(g: dict, ref: dict) -> float:
    num = sum(float((g[k] - ref[k]).pow(2).sum()) for k in ref)
    den = sum(float(ref[k].pow(2).sum()) for k in ref)
    return math.sqrt(num / den)


class TinyNet(S.BilevelProblem):
    """A tanh MLP 2-H-1 whose weights are y, started at x's copy of them (y_0 = x: MAML's aliasing start).

    f = support MSE + exp(x.log_wd)/2 ‖y‖²,   F = query MSE + 0.01 ‖x_weights‖²  (F depends on x directly).
    With ``ball``: every inner step ends with y_k ← y_k · r / max(‖y_k‖, r), r = 1 + softplus(x.r), a projection
    that depends on x (so the B_t of the projection is in the hypergradient) and is active on this task.
    """

    KEYS = ("w1", "b1", "w2", "b2")

    def __init__(self, hidden: int = 5, ball: bool = False):
        self.hidden, self.ball = hidden, ball

    def initial_params(self, seed: int = 0) -> dict:
        g = torch.Generator().manual_seed(seed)
        H = self.hidden
        x = {"w1": torch.randn(2, H, generator=g, dtype=F64) * 0.8, "b1": torch.randn(H, generator=g, dtype=F64) * 0.1,
             "w2": torch.randn(H, 1, generator=g, dtype=F64) * 0.8, "b2": torch.zeros(1, dtype=F64),
             "log_wd": torch.tensor(-2.0, dtype=F64)}
        if self.ball:
            x["r"] = torch.tensor(0.2, dtype=F64)
        return x

    @staticmethod
    def task(seed: int = 1, n: int = 8) -> dict:
        g = torch.Generator().manual_seed(seed)
        xs, xq = torch.randn(n, 2, generator=g, dtype=F64), torch.randn(n, 2, generator=g, dtype=F64)
        f = lambda a: torch.sin(2 * a[:, :1]) * a[:, 1:]  # noqa: E731
        return {"xs": xs, "ys": f(xs), "xq": xq, "yq": f(xq)}

    def _net(self, y, inputs):
        return torch.tanh(inputs @ y["w1"] + y["b1"]) @ y["w2"] + y["b2"]

    def init_inner(self, x, task):
        return {k: x[k] for k in self.KEYS}

    def inner_loss(self, x, y, task):
        decay = sum((v**2).sum() for v in y.values())
        return Fn.mse_loss(self._net(y, task["xs"]), task["ys"]) + 0.5 * torch.exp(x["log_wd"]) * decay

    def outer_loss(self, x, y, task):
        return Fn.mse_loss(self._net(y, task["xq"]), task["yq"]) + 0.01 * sum((x[k] ** 2).sum() for k in self.KEYS)


class BallTinyNet(TinyNet):
    def __init__(self, hidden: int = 5):
        super().__init__(hidden, ball=True)

    def project_inner(self, x, y):
        r = 1.0 + Fn.softplus(x["r"])
        return {k: v * (r / torch.maximum(v.norm(), r)) for k, v in y.items()}


def setup(name: str, T: int, ball: bool):
    P = BallTinyNet() if ball else TinyNet()
    x = P.initial_params()
    task = P.task()
    opts = dict(inner_steps=T, inner_lr=0.1)
    if name == "metasgd":
        x.update(S.metasgd_lrs({k: x[k] for k in P.KEYS}, 0.1))
    if name == "trad":
        opts["truncate"] = max(1, (2 * T) // 3)
    if name.startswith("bda"):
        opts.update(rho_schedule="geometric", rho_decay=0.95)
    return P, x, task, opts


@pytest.mark.parametrize("T, ball", [(7, False), (7, True), (200, True)])
@pytest.mark.parametrize("name", CHECKPOINTED)
def test_checkpointed_equals_full_unroll(name, T, ball):
    P, x, task, opts = setup(name, T, ball)
    full = S.make(name, **opts).hypergrad(P, x, task)
    window = opts.get("truncate", T)
    assert sum(float(g.abs().sum()) for g in full.grad.values()) > 0
    for k in sorted({1, 3, math.isqrt(window - 1) + 1, window} | ({window + 4} if T < 10 else set())):
        hg = S.make(name, checkpoint_every=k, **opts).hypergrad(P, x, task)
        err = global_rel(hg.grad, full.grad)
        assert err <= 1e-12, (name, T, k, err)
        assert hg.outer_loss == pytest.approx(full.outer_loss, rel=1e-12, abs=1e-15)
        assert hg.inner_loss == pytest.approx(full.inner_loss, rel=1e-12, abs=1e-15)
        assert hg.metrics["checkpoint_every"] == k


def test_projection_is_active_and_x_dependent_on_the_ball_problem():
    # Otherwise the ball cases above would not exercise project_inner's own Jacobians.
    P, x, task, opts = setup("rad", 7, ball=True)
    g = S.make("rad", checkpoint_every=3, **opts).hypergrad(P, x, task).grad
    assert abs(float(g["r"])) > 1e-4
    unprojected = S.make("rad", **opts).hypergrad(TinyNet(), {k: v for k, v in x.items() if k != "r"}, task).grad
    assert global_rel({k: g[k] for k in unprojected}, unprojected) > 1e-3


def test_checkpointed_maml_is_second_order_and_matches_finite_differences():
    P, x, task, opts = setup("maml", 7, ball=True)
    hg = S.make("maml", checkpoint_every=3, **opts).hypergrad(P, x, task)

    def phi(xx):  # F(x, y_T(x)) by a plain unroll without autograd through it
        y = {k: xx[k].clone() for k in P.KEYS}
        for _ in range(opts["inner_steps"]):
            y = {k: v.detach().requires_grad_(True) for k, v in y.items()}
            g = torch.autograd.grad(P.inner_loss(xx, y, task), list(y.values()))
            y = P.project_inner(xx, {k: v - 0.1 * gk for (k, v), gk in zip(y.items(), g)})
        return float(P.outer_loss(xx, y, task).detach())

    eps = 1e-6
    for key in ("w1", "log_wd", "r"):
        flat = x[key].reshape(-1)
        for i in range(min(flat.numel(), 4)):
            plus = {k: v.clone() for k, v in x.items()}
            minus = {k: v.clone() for k, v in x.items()}
            plus[key].view(-1)[i] += eps
            minus[key].view(-1)[i] -= eps
            fd = (phi(plus) - phi(minus)) / (2 * eps)
            assert hg.grad[key].reshape(-1)[i].item() == pytest.approx(fd, rel=1e-6, abs=1e-8), (key, i)
    first = S.make("fomaml", **opts).hypergrad(P, x, task)
    shared = [k for k in P.KEYS]
    assert global_rel({k: hg.grad[k] for k in shared}, {k: first.grad[k] for k in shared}) > 1e-3


def test_reverse_with_a_constant_start_and_zero_steps():
    # y_0 constant (trad's window start): nothing is pushed through Ψ_0; T = 0: dF/dx = ∂F/∂x + (∂Ψ_0/∂x)ᵀ ∂F/∂y_0.
    P = TinyNet()
    task = P.task()
    x = leaves(P.initial_params())
    objective = lambda xx, yy: (P.outer_loss(xx, yy, task), None)  # noqa: E731

    def step(xx, yy, t, *, create_graph):
        yy = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in yy.items()}
        g = torch.autograd.grad(P.inner_loss(xx, yy, task), list(yy.values()), create_graph=create_graph)
        out = {k: v - 0.1 * gk for (k, v), gk in zip(yy.items(), g)}
        return out if create_graph else {k: v.detach() for k, v in out.items()}

    const = {k: x[k].detach().clone() for k in P.KEYS}
    for T in (0, 5):
        g_full, _, _ = reverse(step, objective, x, const, T, 0)
        g_ckpt, _, _ = reverse(step, objective, x, const, T, 2)
        assert global_rel(g_ckpt, g_full) <= 1e-12
    y0 = {k: x[k].clone() for k in P.KEYS}
    g0, _, _ = reverse(step, objective, x, y0, 0, 3)
    F = P.outer_loss(x, y0, task)
    ref = dict(zip(x, torch.autograd.grad(F, list(x.values()), allow_unused=True)))
    assert all(torch.allclose(g0[k], ref[k] if ref[k] is not None else torch.zeros_like(g0[k]), rtol=1e-13, atol=1e-15) for k in x)


def test_options_are_validated():
    for name in CHECKPOINTED:
        with pytest.raises(ValueError, match="not both"):
            S.make(name, checkpoint_every=3, memory_budget_mb=10.0)
        with pytest.raises(ValueError, match="checkpoint_every"):
            S.make(name, checkpoint_every=-1)
        with pytest.raises(ValueError, match="memory_budget_mb"):
            S.make(name, memory_budget_mb=0.0)
    for name in ("fomaml", "reptile", "imaml", "fad"):  # no unroll to checkpoint: the option is unknown there
        with pytest.raises(ValueError, match="unknown option"):
            S.make(name, checkpoint_every=2)


# ----------------------------------------------------------------------------------------------------------
# Memory: what checkpointing saves, the budget, the meter
# ----------------------------------------------------------------------------------------------------------


def allocator_peak(fn) -> int:
    """Peak bytes newly allocated while fn() runs, from torch.profiler's CPU allocator events (the measure of
    benchmarks/memory_vs_steps.py, read from the events instead of a chrome trace; independent of the meter the
    budget plans with)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, b in events:
        running += b
        peak = max(peak, running)
    return peak


def wide(T: int = 60):
    P = TinyNet(hidden=96)
    return P, P.initial_params(), P.task(n=64), dict(inner_steps=T, inner_lr=0.05)


def metered(solver, P, x, task):
    with memory.PeakMemory("cpu") as meter:
        hg = solver.hypergrad(P, x, task)
    return hg, meter.peak_bytes


def test_checkpointing_bounds_the_measured_peak():
    P, x, task, opts = wide(T=64)
    full, full_peak = metered(S.make("maml", **opts), P, x, task)
    ckpt, ckpt_peak = metered(S.make("maml", checkpoint_every=8, **opts), P, x, task)
    assert global_rel(ckpt.grad, full.grad) <= 1e-12
    assert ckpt_peak < full_peak / 3, (ckpt_peak, full_peak)
    # the model the budget plans with predicts both within 25%
    plan_full = S.make("maml", **opts).memory_plan(P, x, task)
    plan_ckpt = S.make("maml", checkpoint_every=8, **opts).memory_plan(P, x, task)
    assert plan_full.estimated_peak_bytes == pytest.approx(full_peak, rel=0.25)
    assert plan_ckpt.estimated_peak_bytes == pytest.approx(ckpt_peak, rel=0.25)


@pytest.mark.parametrize("name", ["maml", "bda"])
def test_budget_picks_a_spacing_whose_measured_peak_fits(name):
    P, x, task, opts = wide(T=60)
    if name == "bda":
        opts = dict(opts, rho_schedule="geometric")
    full, full_peak = metered(S.make(name, **opts), P, x, task)
    budget_mb = full_peak / 4 / 2**20
    solver = S.make(name, memory_budget_mb=budget_mb, **opts)
    plan = solver.memory_plan(P, x, task)
    assert 1 <= plan.checkpoint_every < 60 and plan.estimated_peak_bytes <= HEADROOM * budget_mb * 2**20
    hg, peak = metered(solver, P, x, task)
    assert hg.metrics["checkpoint_every"] == plan.checkpoint_every
    assert global_rel(hg.grad, full.grad) <= 1e-12
    assert peak <= budget_mb * 2**20, (peak, budget_mb)  # the platform's meter
    assert allocator_peak(lambda: solver.hypergrad(P, x, task)) <= budget_mb * 2**20  # every allocation
    # a budget the full unroll fits in keeps the full unroll (no recomputation)
    roomy = S.make(name, memory_budget_mb=4 * full_peak / 2**20, **opts)
    assert roomy.memory_plan(P, x, task).checkpoint_every == 0
    assert "checkpoint_every" not in roomy.hypergrad(P, x, task).metrics


def test_budget_nothing_fits_is_refused_naming_what_would():
    P, x, task, opts = wide(T=400)
    _, step_peak = metered(S.make("maml", inner_steps=1, inner_lr=0.05), P, x, task)
    budget_mb = 3 * step_peak / 2**20  # a few steps' graphs: 400 steps fit with no spacing
    solver = S.make("maml", memory_budget_mb=budget_mb, **opts)
    with pytest.raises(MemoryBudgetError) as err:
        solver.memory_plan(P, x, task)
    msg = str(err.value)
    for part in ("maml with inner_steps=400", "inner_steps <=", "trad with truncate <=", "imaml", "ift-cg",
                 "first order", "fomaml", "memory_budget_mb >="):
        assert part in msg, (part, msg)
    with pytest.raises(MemoryBudgetError):  # the hypergradient itself refuses too, before unrolling
        solver.hypergrad(P, x, task)
    # what the message says fits does fit
    t_max = int(msg.split("inner_steps <= ")[1].split(" ")[0])
    assert 1 <= t_max < 400
    fitting = S.make("maml", memory_budget_mb=budget_mb, inner_steps=t_max, inner_lr=0.05)
    _, peak = metered(fitting, P, x, task)
    assert peak <= budget_mb * 2**20
    with pytest.raises(MemoryBudgetError, match="fewer inner steps do not help"):
        S.make("maml", memory_budget_mb=step_peak / 8 / 2**20, **opts).memory_plan(P, x, task)


def test_meter_counts_saved_tensors_until_their_graph_is_freed():
    w = torch.randn(256, 256, dtype=F64, requires_grad=True)
    with memory.PeakMemory("cpu") as meter:
        h = torch.tanh(torch.randn(64, 256, dtype=F64) @ w)
        live = meter._live
        h.sum().backward()
        assert meter._live == 0  # the graph was freed by backward
        del h
    # tanh saves its output, mm its left input (w's gradient needs it; the input's is not wanted): 2 · 128 KiB
    assert live == meter.peak_bytes == 2 * 64 * 256 * 8
    with memory.PeakMemory("cpu") as meter:  # a retained graph that is never back-propagated is freed with its output
        for _ in range(3):
            h = torch.tanh(torch.randn(64, 256, dtype=F64) @ w).sum()
            torch.autograd.grad(h, w, retain_graph=True)
            del h
        assert meter._live == 0 and not meter._held
    with memory.PeakMemory("cpu") as meter:  # held iterates count until they are freed
        kept = memory.hold({"a": torch.zeros(1000, dtype=F64)})
        assert meter._live == 8000
        del kept
        assert meter._live == 0


def test_measure_falls_back_where_torch_func_refuses_the_hooks():
    from metaray.tasks import QuadraticProblem, quadratic_task

    P = QuadraticProblem()
    task = quadratic_task(3, 3, seed=0)
    x = P.initial_params(task)
    hg, peak, method = memory.measure(lambda: S.make("fad", inner_steps=3).hypergrad(P, x, task), "cpu")
    assert peak is None and method == memory.CPU_METHOD and hg.grad["x"].shape == (3,)
    hg, peak, _ = memory.measure(lambda: S.make("rad", inner_steps=3).hypergrad(P, x, task), "cpu")
    assert peak is not None and peak > 0


def test_recomputed_segments_replay_the_draws_of_a_noisy_inner_loss():
    # Paper 003's noisy toy draws fresh noise from the task's generator on every inner-loss call: a recomputed
    # segment must see the forward pass's draws (and leave the generator where a full unroll leaves it).
    from metaray.tasks.toys import Toy1DProblem, Toy1DSource

    P, src = Toy1DProblem(), Toy1DSource(noise=0.3)
    x = P.initial_params(0.4)
    ref_task = src.sample(("train", 0, 0))
    full = S.make("rad", inner_steps=40, inner_lr=0.1).hypergrad(P, x, ref_task)
    for opts in ({"checkpoint_every": 6}, {"memory_budget_mb": 6e-4}, {"memory_budget_mb": 100.0}):
        task = src.sample(("train", 0, 0))
        hg = S.make("rad", inner_steps=40, inner_lr=0.1, **opts).hypergrad(P, x, task)
        assert (hg.metrics.get("checkpoint_every", 0) > 0) == (opts.get("memory_budget_mb") != 100.0)  # 100 MiB: full
        assert float(hg.grad["lam"]) == pytest.approx(float(full.grad["lam"]), rel=1e-12), opts
        assert hg.inner_loss == full.inner_loss  # finish() drew the same noise after the unroll
        assert torch.equal(task.generator.get_state(), ref_task.generator.get_state())
    # without the replay the gradient would differ: a second draw of the same steps is other noise
    assert S.make("rad", inner_steps=40, inner_lr=0.1).hypergrad(P, x, ref_task).grad["lam"] != full.grad["lam"]
