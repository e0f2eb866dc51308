"""``[run] precision = "bf16"`` (metaray.tasks.precision): the inner loss really runs in bf16 and comes back fp32,
the outer loss and the implicit solvers' linear system stay fp32 (checked exactly), the batched path keeps the
autocast, the hypergradient's error against fp32 is bounded on the sinusoid MLP, and bad settings are refused
with the reason; end to end through an in-process pool and ``metaray.launch``."""
from __future__ import annotations

import functools
import warnings

import pytest
import torch

import metaray.solvers as S
from metaray.cluster import ClusterConfig, InProcessPool, WorkerSpec
from metaray.platform.config import ConfigError, RunSettings
from metaray.solvers.batched import BatchFallbackWarning
from metaray.tasks import ModelProblem, SinusoidSource, mlp
from metaray.tasks.precision import AutocastInner, check_precision, with_precision


def rel(a: dict, b: dict) -> float:
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in b) ** 0.5 / sum(float(b[k].pow(2).sum()) for k in b) ** 0.5


@pytest.fixture
def setup():
    torch.manual_seed(0)
    P = ModelProblem(mlp([1, 40, 40, 1]), "mse")
    src = SinusoidSource()
    return P, P.initial_params(), [src.sample(("train", 0, i)) for i in range(6)]


def test_the_inner_loss_runs_in_bf16_and_the_outer_loss_in_fp32(setup):
    P, x, tasks = setup
    A = with_precision(P, "bf16", "cpu")
    assert isinstance(A, AutocastInner) and with_precision(P, "fp32", "cpu") is P
    y = P.init_inner(x, tasks[0])
    f32, f16 = P.inner_loss(x, y, tasks[0]), A.inner_loss(x, y, tasks[0])
    assert f16.dtype == torch.float32
    assert 0 < abs(float(f16 - f32)) < 1e-2 * float(f32)  # rounded by bf16, but close
    assert torch.equal(A.outer_loss(x, y, tasks[0]), P.outer_loss(x, y, tasks[0]))
    assert A.batchable(tasks) and A.full_precision is P  # the rest passes through


def test_maml_hypergradient_in_bf16_is_fp32_params_and_close_to_fp32(setup):
    P, x, tasks = setup
    solver = S.make("maml", inner_steps=5, inner_lr=0.01)
    A = AutocastInner(P, "cpu")
    errors = [rel(solver.hypergrad(A, x, t).grad, solver.hypergrad(P, x, t).grad) for t in tasks]
    # bf16 has 8 significant bits: the error is real (> 1e-5) but small on this workload (benchmarks/precision.py)
    assert all(1e-5 < e < 0.05 for e in errors), errors
    assert solver.hypergrad(A, x, tasks[0]).grad["0.weight"].dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error", BatchFallbackWarning)  # vmapped under autocast
        batch = solver.hypergrad_batch(A, x, tasks)
    # the vmapped kernels round differently from the loop's, within the same bound against fp32
    errors = [rel(b.grad, solver.hypergrad(P, x, t).grad) for b, t in zip(batch, tasks)]
    assert all(1e-5 < e < 0.05 for e in errors), errors


class WeightDecayProblem(ModelProblem):
    """f = mse + exp(log_wd)·‖y‖²: the mixed term ∇²_xy f of the IFT is nonzero."""

    def inner_loss(self, x, y, task):
        return super().inner_loss(x, y, task) + torch.exp(x["log_wd"]) * sum((v * v).sum() for v in y.values())


@pytest.mark.parametrize("name", ["imaml", "ift-cg"])
def test_the_implicit_linear_system_stays_fp32(setup, name):
    """With no inner steps y_T = init_inner(x) in both precisions, so a bf16 linear system would be the only
    difference: the hypergradients are identical, loop and batched (a bf16 system fails this)."""
    _, _, tasks = setup
    torch.manual_seed(0)
    P = WeightDecayProblem(mlp([1, 40, 40, 1]), "mse")
    x = dict(P.initial_params(), log_wd=torch.tensor(-3.0))
    solver = S.make(name, inner_steps=0, cg_steps=5)
    A = AutocastInner(P, "cpu")
    for t in tasks[:2]:
        a, b = solver.hypergrad(A, x, t), solver.hypergrad(P, x, t)
        assert all(torch.equal(a.grad[k], b.grad[k]) for k in x)
        assert a.metrics["linsolve_steps"] == b.metrics["linsolve_steps"]
        assert float(a.grad["log_wd"].abs()) > 1e-6  # through the mixed term
    batch, ref = solver.hypergrad_batch(A, x, tasks), solver.hypergrad_batch(P, x, tasks)
    assert max(rel(u.grad, v.grad) for u, v in zip(batch, ref)) < 1e-6


def test_bad_precision_settings_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"precision must be one of \['fp32', 'bf16'\]"):
        check_precision("fp16", "float32")
    with pytest.raises(ValueError, match="needs dtype='float32'"):
        check_precision("bf16", "float64")
    with pytest.raises(ValueError, match="no autocast for device type 'meta'"):
        check_precision("bf16", "float32", "meta")
    spec = dict(problem=functools.partial(ModelProblem, mlp([1, 8, 1]), "mse"), solver="maml", source=SinusoidSource())
    with pytest.raises(ValueError, match="needs dtype='float32'"):
        WorkerSpec(**spec, dtype="float64", precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        WorkerSpec(**spec, precision="half")
    with pytest.raises(ConfigError, match="run.precision = 'bf16' needs run.dtype = 'float32'"):
        RunSettings(precision="bf16", dtype="float64")
    with pytest.raises(ConfigError, match="precision"):
        RunSettings(precision="fp16")


def test_a_pool_with_bf16_workers_steps_close_to_fp32():
    def spec(precision):
        torch.manual_seed(0)
        return WorkerSpec(problem=functools.partial(ModelProblem, mlp([1, 40, 40, 1]), "mse"), solver="maml",
                          solver_options={"inner_steps": 3, "inner_lr": 0.01}, source=SinusoidSource(), precision=precision)

    torch.manual_seed(0)
    x = {k: v.detach() for k, v in mlp([1, 40, 40, 1]).named_parameters()}
    keys = [("train", 0, i) for i in range(4)]
    grads = {}
    for precision in ("fp32", "bf16"):
        with InProcessPool(spec(precision), ClusterConfig(num_workers=1, metrics=False, tasks_per_batch=2)) as pool:
            grads[precision] = pool.step(x, keys).grad
    assert 1e-5 < rel(grads["bf16"], grads["fp32"]) < 0.05
