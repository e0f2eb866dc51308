"""Ray Tune: the trial's resource bundles, and a real two-trial search (needs ray[tune])."""
import pytest

import metaray
from metaray.platform.tune import bundles

CONFIG = """
name = "tune-test"
[problem]
name = "sinusoid"
shots = 5
queries = 5
[solver]
name = "maml"
[tasks]
meta_batch_size = 2
val_tasks = 4
test_tasks = 4
[cluster]
num_workers = 2
num_cpus_per_worker = 0.5
num_gpus_per_worker = 0.25
[run]
steps = 3
progress = false
plots = false
"""


def test_each_trial_reserves_its_driver_and_inner_learner_actors():
    cfg = metaray.platform.loads_config(CONFIG)
    assert bundles(cfg) == [{"CPU": 1.0}, {"CPU": 0.5, "GPU": 0.25}, {"CPU": 0.5, "GPU": 0.25}]
    assert bundles(cfg.replace(**{"cluster.backend": "inprocess"})) == [{"CPU": 1.0}]


def _have_tune() -> bool:
    try:
        import ray.tune  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _have_tune(), reason="ray[tune] is not installed in this environment (it needs pandas)")
def test_two_trial_search(tmp_path):
    import ray
    from ray import tune

    from metaray.platform.tune import tune_search

    cfg = metaray.platform.loads_config(CONFIG.replace("num_gpus_per_worker = 0.25", "num_gpus_per_worker = 0.0"))
    ray.init(address="local", num_cpus=4)  # never join another cluster on this machine
    try:
        grid = tune_search(cfg, {"outer.lr": tune.grid_search([1e-3, 3e-3])}, storage_path=str(tmp_path))
    finally:
        ray.shutdown()
    assert len(grid) == 2 and not grid.errors
    assert {r.config["outer.lr"] for r in grid} == {1e-3, 3e-3}
