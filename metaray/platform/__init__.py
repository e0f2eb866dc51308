"""The platform: the meta-learner (outer loop), configs, the launch API, checkpoints, reports and the CLI.

    >>> import metaray
    >>> cfg = metaray.load_config("examples/sinusoid_maml.toml")
    >>> result = metaray.launch(cfg)          # RunResult(run_dir, metrics, test, baseline, ...)
    >>> result.table                          # pyarrow.Table, one row per outer step
"""
from .config import (
    ClusterSettings,
    ConfigError,
    ExperimentConfig,
    OuterConfig,
    ProblemConfig,
    RunSettings,
    SolverConfig,
    TasksConfig,
    load_config,
    loads_config,
)
from .launch import RunResult, evaluate, launch, make_pool, resume
from .learner import MetaLearner, TestResult, learning_rate, make_optimizer, mean_ci95
from .problems import ProblemSetup, build_problem, problem_names

__all__ = [
    "ClusterSettings",
    "ConfigError",
    "ExperimentConfig",
    "MetaLearner",
    "OuterConfig",
    "ProblemConfig",
    "ProblemSetup",
    "RunResult",
    "RunSettings",
    "SolverConfig",
    "TasksConfig",
    "TestResult",
    "build_problem",
    "evaluate",
    "launch",
    "learning_rate",
    "load_config",
    "loads_config",
    "make_optimizer",
    "make_pool",
    "mean_ci95",
    "problem_names",
    "resume",
]
