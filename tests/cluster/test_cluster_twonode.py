"""Two Ray nodes on this machine (ray.cluster_utils.Cluster): STRICT_SPREAD puts one inner learner on each
node, and training there gives the in-process numbers."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from metaray.cluster import ClusterConfig, InProcessPool, WorkerPool, WorkerSpec
from metaray.tasks import ModelProblem, SinusoidSource, mlp

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(HERE)}}, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.parametrize("strategy", ["STRICT_SPREAD", pytest.param("SPREAD", marks=pytest.mark.slow)])
def test_spread_places_one_actor_per_node_and_trains(two_nodes, strategy):
    torch.manual_seed(0)
    model = mlp([1, 40, 40, 1])
    spec = WorkerSpec(problem=functools.partial(ModelProblem, model, "mse"), solver="maml",
                      solver_options={"inner_steps": 1, "inner_lr": 0.01}, source=SinusoidSource(dtype=torch.float64),
                      dtype="float64")
    x0 = {k: v.detach().double() for k, v in model.named_parameters()}

    def train(pool):
        x = dict(x0)
        for s in range(3):
            r = pool.step(x, [("train", s, i) for i in range(4)])
            x = {k: x[k] - 0.01 * r.grad[k] for k in x}
        return x, r

    with WorkerPool(spec, ClusterConfig(num_workers=2, strategy=strategy, metrics=False), f"two-{strategy}") as pool:
        nodes = {info["node_id"] for info in pool.worker_info.values()}
        assert nodes == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        x, last = train(pool)
        # x's way to both nodes alone (the benchmarks' probe): every actor got all of x's elements
        assert 0 < pool.broadcast(x) < 60
        with pytest.raises(TypeError, match="must be a torch.Tensor"):
            pool.broadcast({"w": [1.0, 2.0]})
    with InProcessPool(spec) as ref_pool:
        ref, _ = train(ref_pool)
    assert len(nodes) == 2  # one actor on each node
    assert sorted(last.per_worker) == [0, 1]
    for k in x:
        torch.testing.assert_close(x[k], ref[k], rtol=1e-6, atol=1e-12)
    assert max(float((x[k] - x0[k]).abs().max()) for k in x) > 1e-4  # it trained
