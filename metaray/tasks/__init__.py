"""Task sources, problems and datasets. No Ray here: everything runs and is tested without a cluster."""
from .base import SPLITS, TaskKey, TaskSource, check_key, key_generator, key_seed
from .episodes import Episode
from .models import Conv4, mlp
from .problems import ModelProblem
from .sinusoid import SinusoidSource
from .synthetic import QuadraticProblem, QuadraticTask, quadratic_task
from .features import FeatureProblem
from .clusters import GaussianClusterImages
from .toys import (
    LeastSquaresBilevel,
    LeastSquaresTask,
    NonUniqueToyProblem,
    Toy1DProblem,
    Toy1DSource,
    Toy1DTask,
    least_squares_task,
)
from .storage import DatasetError, DatasetWriter, LabelledDataset, data_dir, open_dataset, write_dataset
from .fewshot import FewShotSource, nearest_centroid_accuracy, split_classes
from .glyphs import build_glyphs, load_glyphs
from .hpo import DigitsSource, HyperCleaningProblem, L2RegularizationProblem, digits_split
from .l2l import L2LSource, to_l2l_metadataset
from .registry import ProblemSpec, dataset_names, describe_datasets, make_problem, problem_names
from .optimizees import (
    ClassifierOptimizee,
    ClassifierOptimizeeProblem,
    QuadraticOptimizee,
    QuadraticOptimizeeProblem,
    RandomQuadratics,
    SyntheticClassification,
)

__all__ = [
    "DatasetError",
    "DatasetWriter",
    "DigitsSource",
    "FewShotSource",
    "HyperCleaningProblem",
    "L2LSource",
    "L2RegularizationProblem",
    "LabelledDataset",
    "ProblemSpec",
    "build_glyphs",
    "data_dir",
    "dataset_names",
    "describe_datasets",
    "digits_split",
    "load_glyphs",
    "make_problem",
    "nearest_centroid_accuracy",
    "open_dataset",
    "problem_names",
    "split_classes",
    "to_l2l_metadataset",
    "write_dataset",
    "LeastSquaresBilevel",
    "LeastSquaresTask",
    "NonUniqueToyProblem",
    "Toy1DProblem",
    "Toy1DSource",
    "Toy1DTask",
    "least_squares_task",
    "ClassifierOptimizee",
    "ClassifierOptimizeeProblem",
    "QuadraticOptimizee",
    "QuadraticOptimizeeProblem",
    "RandomQuadratics",
    "SyntheticClassification",
    "SPLITS",
    "Conv4",
    "Episode",
    "FeatureProblem",
    "GaussianClusterImages",
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
