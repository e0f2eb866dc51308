"""A Ray Tune search over the outer learning rate and the inner steps (needs `pip install 'ray[tune]'`).

    python examples/tune_search.py
"""
from pathlib import Path

from ray import tune

import metaray
from metaray.platform.tune import tune_search

base = metaray.load_config(Path(__file__).with_name("tune_sinusoid.toml"))
grid = tune_search(
    base,
    {"outer.lr": tune.grid_search([1e-3, 3e-3]), "solver.inner_steps": tune.grid_search([1, 2])},
    metric="val_outer_loss",
    mode="min",
)
best = grid.get_best_result()
print("best:", best.config, best.metrics["val_outer_loss"])
