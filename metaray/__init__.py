"""metaray: Ray-distributed gradient-based bi-level optimization (meta-learning and hyperparameter
optimization by hypergradients).

Layers: ``metaray.solvers`` (hypergradient methods), ``metaray.tasks`` (task sources, problems, datasets),
``metaray.cluster`` (Ray actors and pools), ``metaray.platform`` (meta-learner, configs, launch API, CLI).
"""
__version__ = "0.1.0"
