"""The Ray layer: inner-learner actors, worker pools, placement, broadcast, aggregation, faults and metrics.

    >>> from metaray.cluster import WorkerSpec, ClusterConfig, WorkerPool
    >>> spec = WorkerSpec(problem=functools.partial(ModelProblem, mlp([1, 40, 40, 1]), "mse"), solver="maml",
    ...                   solver_options={"inner_steps": 1, "inner_lr": 0.01}, source=SinusoidSource())
    >>> with WorkerPool(spec, ClusterConfig(num_workers=2), run_name="sine") as pool:
    ...     result = pool.step(x, [("train", step, i) for i in range(8)])   # StepResult: grad, losses, ...

``InProcessPool`` has the same interface without Ray. The Grafana dashboard for metaray's metrics is
``grafana_dashboard.json`` in this package (see ``metrics.py`` for the series).
"""
import os

# Zero-copy torch tensors in Ray's object store: Ray reads this when it is imported, so set it first (workers
# get it through their runtime_env). An explicit setting by the user wins.
os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")

from .aggregate import aggregate  # noqa: E402
from .config import AGGREGATIONS, STRATEGIES, ClusterConfig, WorkerSpec  # noqa: E402
from .host_memory import keep_host_memory  # noqa: E402
from .pool import InProcessPool, NonFiniteStepError, PlacementTimeoutError, PoolError, StepResult  # noqa: E402
from .ray_pool import WorkerPool, init_ray  # noqa: E402
from .worker import InnerLearner, owner, task_id  # noqa: E402

DASHBOARD = os.path.join(os.path.dirname(__file__), "grafana_dashboard.json")

__all__ = [
    "AGGREGATIONS",
    "DASHBOARD",
    "STRATEGIES",
    "ClusterConfig",
    "InProcessPool",
    "InnerLearner",
    "NonFiniteStepError",
    "PlacementTimeoutError",
    "PoolError",
    "StepResult",
    "WorkerPool",
    "WorkerSpec",
    "aggregate",
    "init_ray",
    "keep_host_memory",
    "owner",
    "task_id",
]
