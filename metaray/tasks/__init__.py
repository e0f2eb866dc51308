"""Task sources, problems and datasets. No Ray here: everything runs and is tested without a cluster."""
from .base import SPLITS, TaskKey, TaskSource, check_key, key_generator, key_seed
from .episodes import Episode
from .models import Conv4, mlp
from .problems import ModelProblem
from .sinusoid import SinusoidSource
from .synthetic import QuadraticProblem, QuadraticTask, quadratic_task
from .optimizees import (
    ClassifierOptimizee,
    ClassifierOptimizeeProblem,
    QuadraticOptimizee,
    QuadraticOptimizeeProblem,
    RandomQuadratics,
    SyntheticClassification,
)

__all__ = [
    "ClassifierOptimizee",
    "ClassifierOptimizeeProblem",
    "QuadraticOptimizee",
    "QuadraticOptimizeeProblem",
    "RandomQuadratics",
    "SyntheticClassification",
    "SPLITS",
    "Conv4",
    "Episode",
    "ModelProblem",
    "QuadraticProblem",
    "QuadraticTask",
    "SinusoidSource",
    "TaskKey",
    "TaskSource",
    "check_key",
    "key_generator",
    "key_seed",
    "mlp",
    "quadratic_task",
]
