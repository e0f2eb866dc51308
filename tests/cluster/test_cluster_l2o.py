"""Meta-training a learned optimizer (solver ``l2o``) through the Ray worker pool: each actor unrolls its own
optimizee trajectories (stateful: a trajectory continues across outer steps on the actor that holds its state)
and returns the hypergradient for the shared optimizer weights. The outer trajectory equals the in-process pool's
for 1 and 2 actors, and meta-training lowers the optimizees' loss."""
from __future__ import annotations

import pytest
import ray
import torch

import metaray.solvers as S
from metaray.cluster import ClusterConfig, InProcessPool, WorkerPool, WorkerSpec
from metaray.solvers.learned import init_weights
from metaray.tasks import QuadraticOptimizeeProblem, RandomQuadratics

D = torch.float64
OPTIONS = {"arch": "lstm", "inner_steps": 5, "horizon": 10, "log_loss": True}
SPEC = WorkerSpec(problem=QuadraticOptimizeeProblem, solver="l2o", solver_options=OPTIONS,
                  source=RandomQuadratics(dim=6, batch=4, seed=0, dtype=D), dtype="float64")


@pytest.fixture(scope="module")
def ray_two_cpus():
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never join another cluster on this machine
    yield
    ray.shutdown()


def x0() -> dict:
    return init_weights(S.make("l2o", **OPTIONS).options.net(), hidden=8, layers=1, seed=0, dtype=D)


def meta_train(pool, steps: int, tasks: int = 4) -> tuple[dict, list[float]]:
    """Adam on φ; task key ('train', s, i): task slot i starts a new optimizee whenever its trajectory ends."""
    x = {k: v.clone().requires_grad_(True) for k, v in x0().items()}
    opt = torch.optim.Adam(list(x.values()), lr=0.01)
    meta_losses = []
    for s in range(steps):
        r = pool.step({k: v.detach() for k, v in x.items()}, [("train", s, i) for i in range(tasks)])
        for k, v in x.items():
            v.grad = r.grad[k].clone()
        opt.step()
        meta_losses.append(sum(t["meta_loss"] for t in r.per_task) / tasks)
    return {k: v.detach() for k, v in x.items()}, meta_losses


def test_l2o_meta_training_through_ray_actors_matches_in_process(ray_two_cpus):
    with InProcessPool(SPEC) as p:
        ref, ref_losses = meta_train(p, 6)
        states = p.state_dict()["tasks"]
    assert sorted(states) == [("train", i) for i in range(4)]  # one live trajectory per task slot
    moved = sum(float((ref[k] - v).norm()) for k, v in x0().items())
    assert moved > 1e-3  # training moved φ, so the equality below means something
    for n in (1, 2):
        cfg = ClusterConfig(num_workers=n, num_cpus_per_worker=0.5, metrics=False)
        with WorkerPool(SPEC, cfg, f"l2o-{n}") as pool:
            x, losses = meta_train(pool, 6)
        for k in ref:
            torch.testing.assert_close(x[k], ref[k], rtol=1e-9, atol=1e-12)
        assert losses == pytest.approx(ref_losses, rel=1e-9)


@pytest.mark.slow
def test_l2o_meta_training_on_two_actors_lowers_the_meta_loss(ray_two_cpus):
    cfg = ClusterConfig(num_workers=2, num_cpus_per_worker=0.5, metrics=False)
    with WorkerPool(SPEC, cfg, "l2o-train") as pool:
        _, losses = meta_train(pool, 120)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first - 1.0, (first, last)  # log-loss units: the optimizees end e-fold lower, and more
