"""The cluster layer without Ray: aggregation rules against NumPy/SciPy references, config validation, and the
in-process pool against a plain loop over the solver."""
from __future__ import annotations

import functools
import json
import re

import numpy as np
import pytest
import scipy.stats
import torch

import metaray.solvers as S
from metaray.cluster import (
    DASHBOARD,
    ClusterConfig,
    InProcessPool,
    NonFiniteStepError,
    WorkerSpec,
    aggregate,
    owner,
    task_id,
)
from metaray.cluster.metrics import SERIES
from metaray.tasks import ModelProblem, QuadraticProblem, SinusoidSource, mlp

from cluster_helpers import PoisonedSource, QuadraticSource


def _grads(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(3, 2, generator=g, dtype=torch.float64), "b": torch.randn(5, generator=g, dtype=torch.float64)}
            for _ in range(n)]


@pytest.mark.parametrize("n", [1, 4, 5])
def test_aggregation_rules_match_numpy_and_scipy(n):
    grads = _grads(n)
    w = np.linspace(0.5, 2.0, n)
    for k in ("a", "b"):
        stack = np.stack([g[k].numpy() for g in grads])
        np.testing.assert_allclose(aggregate(grads, "mean")[k].numpy(), stack.mean(0), rtol=1e-14)
        np.testing.assert_allclose(aggregate(grads, "weighted", list(w))[k].numpy(), np.average(stack, 0, w), rtol=1e-13)
        np.testing.assert_allclose(aggregate(grads, "median")[k].numpy(), np.median(stack, 0), rtol=1e-14)
        np.testing.assert_allclose(aggregate(grads, "trimmed_mean", trim_fraction=0.2)[k].numpy(),
                                   scipy.stats.trim_mean(stack, 0.2, axis=0), rtol=1e-13)


def test_robust_rules_ignore_an_outlier_task():
    grads = _grads(5)
    grads[3] = {k: v + 1e6 for k, v in grads[3].items()}
    clean = _grads(5)
    del clean[3]
    for rule in ("median", "trimmed_mean"):
        out = aggregate(grads, rule, trim_fraction=0.2)
        assert max(float(v.abs().max()) for v in out.values()) < 10  # the 1e6 task did not leak through
    assert float(aggregate(grads, "mean")["a"].abs().max()) > 1e5


def test_aggregate_rejects_bad_input():
    grads = _grads(3)
    with pytest.raises(ValueError, match="one of"):
        aggregate(grads, "mode")
    with pytest.raises(ValueError, match="needs weights"):
        aggregate(grads, "weighted")
    with pytest.raises(ValueError, match="3 task gradients"):
        aggregate(grads, "weighted", [1.0, 2.0])
    with pytest.raises(ValueError, match="not all zero"):
        aggregate(grads, "weighted", [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="only used by"):
        aggregate(grads, "mean", [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="zero task"):
        aggregate([], "mean")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_workers": 0}, "num_workers must be an int >= 1"),
        ({"num_cpus_per_worker": 0}, "num_cpus_per_worker"),
        ({"num_gpus_per_worker": 1.5}, "fraction"),
        ({"strategy": "BALANCED"}, "PACK"),
        ({"aggregation": "mode"}, "trimmed_mean"),
        ({"trim_fraction": 0.5}, r"\[0, 0.5\)"),
        ({"step_timeout_s": 0}, "step_timeout_s"),
        ({"max_restarts": -1}, "max_restarts"),
        ({"placement_timeout_s": float("inf")}, "placement_timeout_s"),
        ({"metrics": "yes"}, "a bool"),
        ({"collective": "mpi"}, "one of .*'gloo', 'nccl', 'object_store'"),
        ({"collective": "nccl"}, "needs a whole GPU per actor.*NCCL refuses two ranks on one GPU"),
        ({"collective": "nccl", "num_gpus_per_worker": 0.5}, "collective='gloo'"),
        ({"collective_timeout_s": 0}, "collective_timeout_s"),
    ],
)
def test_cluster_config_errors_name_the_field_and_what_is_valid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClusterConfig(**kwargs)


def _sine_spec(**kw) -> WorkerSpec:
    torch.manual_seed(0)
    base = dict(problem=functools.partial(ModelProblem, mlp([1, 8, 1]), "mse"), solver="maml",
                solver_options={"inner_steps": 2, "inner_lr": 0.05}, source=SinusoidSource(dtype=torch.float64),
                dtype="float64")
    base.update(kw)
    return WorkerSpec(**base)


def test_worker_spec_errors():
    with pytest.raises(TypeError, match="factory"):
        _sine_spec(problem=QuadraticProblem())
    with pytest.raises(TypeError, match="TaskSource"):
        _sine_spec(source=object())
    with pytest.raises(ValueError, match="float64"):
        _sine_spec(dtype="half")
    with pytest.raises(ValueError, match="num_gpus_per_worker > 0"):
        InProcessPool(_sine_spec(device="cuda"), ClusterConfig(num_gpus_per_worker=0))
    with pytest.raises(ValueError, match="collective='nccl' reduces on the GPUs, but WorkerSpec.device='cpu'"):
        InProcessPool(_sine_spec(device="cpu"), ClusterConfig(num_gpus_per_worker=1, collective="nccl"))
    with pytest.raises(ValueError, match="unknown solver 'mamll'.*did you mean 'maml'"):
        InProcessPool(_sine_spec(solver="mamll"))
    with pytest.raises(ValueError, match="unknown option"):
        InProcessPool(_sine_spec(solver_options={"inner_stepz": 1}))


def test_task_identity_and_ownership():
    assert task_id(("train", 7, 5)) == task_id(("train", 8, 5)) == ("train", 5)
    assert [owner(("train", 3, i), 3) for i in range(6)] == [0, 1, 2, 0, 1, 2]


def test_in_process_pool_equals_a_plain_loop_over_the_solver():
    spec = _sine_spec()
    problem = spec.problem()
    x = problem.initial_params()
    x = {k: v.double() for k, v in x.items()}
    keys = [("train", 0, i) for i in range(4)]
    solver = S.make("maml", inner_steps=2, inner_lr=0.05)
    hgs = [solver.hypergrad(problem, x, SinusoidSource(dtype=torch.float64).sample(k)) for k in keys]
    ref = {k: sum(h.grad[k] for h in hgs) / 4 for k in x}
    with InProcessPool(spec) as pool:
        r = pool.step(x, keys)
        ev = pool.evaluate(x, keys)
    for k in x:
        torch.testing.assert_close(r.grad[k], ref[k], rtol=1e-12, atol=1e-14)
    assert r.outer_loss == pytest.approx(np.mean([h.outer_loss for h in hgs]), rel=1e-12)
    assert [t["key"] for t in r.per_task] == keys
    # evaluate: the same adaptation, no hypergradient
    assert ev.outer_loss == pytest.approx(r.outer_loss, rel=1e-12)
    assert all(float(v.abs().max()) == 0 for v in ev.grad.values())


def test_bad_step_input_is_rejected_before_any_work():
    spec = _sine_spec()
    x = {k: v.double() for k, v in spec.problem().initial_params().items()}
    with InProcessPool(spec) as pool:
        with pytest.raises(ValueError, match="duplicate task keys"):
            pool.step(x, [("train", 0, 1), ("train", 0, 1)])
        with pytest.raises(ValueError, match="split must be one of"):
            pool.step(x, [("dev", 0, 1)])
        with pytest.raises(ValueError, match="at least one task key"):
            pool.step(x, [])
        with pytest.raises(ValueError, match="only used with ClusterConfig.aggregation='weighted'"):
            pool.step(x, [("train", 0, 1)], weights=[1.0])
    with pytest.raises(ValueError, match="stateful"):
        InProcessPool(WorkerSpec(problem=QuadraticProblem, solver="fsla", source=QuadraticSource(), dtype="float64")).step(
            {"x": torch.zeros(3, dtype=torch.float64)}, [("train", 0, 1), ("train", 1, 1)])


def test_non_finite_task_is_retried_once_then_the_step_fails_without_touching_state():
    spec = WorkerSpec(problem=QuadraticProblem, solver="fsla", solver_options={"inner_lr": 0.1}, dtype="float64",
                      source=PoisonedSource(QuadraticSource(), bad=((1, 2),)))
    x = {"x": torch.ones(3, dtype=torch.float64)}
    keys = lambda s: [("train", s, i) for i in range(3)]  # noqa: E731
    with InProcessPool(spec) as pool:
        pool.step(x, keys(0))
        before = pool.state_dict()["tasks"]
        with pytest.warns(RuntimeWarning, match=r"non-finite result for task \('train', 1, 2\).*retrying once"):
            with pytest.raises(NonFiniteStepError, match=r"again after a retry: step abandoned"):
                pool.step(x, keys(1))
        after = pool.state_dict()["tasks"]
    assert before.keys() == after.keys()
    for tid in before:
        for name in ("y", "v", "d"):
            for k in before[tid][name]:
                assert torch.equal(before[tid][name][k], after[tid][name][k])


def test_grafana_dashboard_plots_metarays_series():
    with open(DASHBOARD) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = set()
    for e in exprs:
        used |= set(re.findall(r"ray_(metaray_[a-z_]+?)(?:_total|_bucket|_sum|_count)?\b", e))
    assert used <= set(SERIES), used - set(SERIES)
    assert used == set(SERIES), set(SERIES) - used  # every exported series has a panel
    assert dash["title"] and dash["uid"]


def test_weighted_step_matches_numpy_average_of_task_gradients():
    spec = _sine_spec()
    x = {k: v.double() for k, v in spec.problem().initial_params().items()}
    keys = [("train", 3, i) for i in range(3)]
    w = [1.0, 2.0, 5.0]
    with InProcessPool(spec) as plain:
        singles = [plain.step(x, [k]).grad for k in keys]
    with InProcessPool(spec, ClusterConfig(aggregation="weighted")) as pool:
        r = pool.step(x, keys, weights=w)
        with pytest.raises(ValueError, match="needs weights"):
            pool.step(x, keys)
    for k in x:
        ref = np.average(np.stack([g[k].numpy() for g in singles]), axis=0, weights=w)
        np.testing.assert_allclose(r.grad[k].numpy(), ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("rule", ["mean", "median"])
def test_a_workers_own_block_stays_on_it_and_a_lost_one_restarts_the_round(rule):
    """The object-store reduction (collective.py) leaves the block a worker combines itself on that worker:
    ``slice_kept(own=r)`` answers None for block r, and ``sum_slice`` / ``robust_slice`` read it from the
    worker. The result is the bits of the blocks passed explicitly, and the aggregate of the task gradients; a
    fresh process (restarted between the two calls) holds no such block and answers None, which the driver
    takes as a round to run again."""
    from metaray.cluster.reduce import blocks, coefficients, exponents
    from metaray.cluster.worker import InnerLearner

    spec = _sine_spec()
    x = {k: v.double() for k, v in spec.problem().initial_params().items()}
    learner = InnerLearner(spec, set_threads=False)
    keys = [("train", 0, i) for i in range(3)]
    on = learner.set_x(x, x_id=0)  # one step's x: the kept gradients stay until another x arrives
    outs = [learner.run(on, k, keep=True) for k in keys]
    grads = [learner.run(on, k)["grad"] for k in keys]  # the same tasks, gradients returned
    d = sum(v.numel() for v in x.values())
    linear = rule == "mean"
    coefs = coefficients(rule, 3, None) if linear else None
    exps = exponents([o["grad_maxabs"] for o in outs], coefs) if linear else None
    ranks = 2
    starts = [a for a, _ in blocks(d, ranks)]

    def combine(worker, r, parts):
        return worker.sum_slice(exps, starts[r], *parts) if linear else worker.robust_slice(rule, 0.0, *parts)

    for r in range(ranks):
        _, *every = learner.slice_kept(keys, ranks, coefs, exps)  # every block answered, none left here
        status, *mine = learner.slice_kept(keys, ranks, coefs, exps, own=r)
        assert not status["missing"] and mine[r] is None and all(m is not None for i, m in enumerate(mine) if i != r)
        kept = combine(learner, r, [None])
        assert torch.equal(kept, combine(learner, r, [every[r]]))
        assert combine(InnerLearner(spec, set_threads=False), r, [None]) is None  # a restarted process
    want = aggregate(grads, rule, None)
    got = torch.cat([combine(learner, r, [learner.slice_kept(keys, ranks, coefs, exps)[1 + r]]) for r in range(ranks)])
    assert torch.equal(got, torch.cat([want[k].reshape(-1) for k in x]))
