"""metaray: Ray-distributed gradient-based bi-level optimization (meta-learning and hyperparameter
optimization by hypergradients).

Layers: ``metaray.solvers`` (hypergradient methods), ``metaray.tasks`` (task sources, problems, datasets),
``metaray.cluster`` (Ray actors and pools), ``metaray.platform`` (meta-learner, configs, launch API, CLI).

The launch API (``metaray.launch``, ``RunResult``, ``ExperimentConfig``, ``load_config``) is re-exported here
lazily, so ``import metaray.solvers`` or ``metaray.tasks`` never imports Ray.
"""
__version__ = "0.1.0"

_PLATFORM_NAMES = ("ExperimentConfig", "RunResult", "launch", "load_config")
__all__ = list(_PLATFORM_NAMES)


def __getattr__(name: str):
    if name in _PLATFORM_NAMES:
        from . import platform

        return getattr(platform, name)
    raise AttributeError(f"module 'metaray' has no attribute {name!r}")
