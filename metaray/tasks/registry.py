"""Problems and datasets users pick by name.

    >>> from metaray.tasks import registry
    >>> registry.problem_names()
    >>> spec = registry.make_problem("fewshot-maml", ways=5, shots=1)
    >>> spec.problem, spec.source, spec.x0            # BilevelProblem, TaskSource, initial outer params
    >>> registry.describe_datasets()                   # rows for `metaray datasets`

``make_problem`` validates its options (an unknown name or option raises ``ValueError`` naming the valid ones).
Other modules add problems with ``register_problem``.
"""
from __future__ import annotations

import difflib
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..solvers.core import BilevelProblem, Params
from .base import TaskKey, check_key


@dataclass
class ProblemSpec:
    """What ``make_problem`` returns: the problem, where its tasks come from, and the starting outer params."""

    name: str
    problem: BilevelProblem
    source: Any  # a TaskSource: sample(key) -> task
    x0: Params
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FixedSource:
    """The source of a single-task problem: every key gives the same task."""

    task: Any

    def sample(self, key: TaskKey) -> Any:
        check_key(key)
        return self.task


@dataclass(frozen=True)
class _Entry:
    name: str
    description: str
    factory: Callable[..., ProblemSpec]


_PROBLEMS: dict[str, _Entry] = {}


def register_problem(name: str, description: str) -> Callable[[Callable[..., ProblemSpec]], Callable[..., ProblemSpec]]:
    """Decorator: registers ``factory(**options) -> ProblemSpec`` under ``name``. Options are its keyword
    parameters (with defaults), validated by ``make_problem``."""

    def deco(factory: Callable[..., ProblemSpec]) -> Callable[..., ProblemSpec]:
        if name in _PROBLEMS and _PROBLEMS[name].factory is not factory:
            raise ValueError(f"problem {name!r} is already registered")
        _PROBLEMS[name] = _Entry(name, description, factory)
        return factory

    return deco


def problem_names() -> list[str]:
    return sorted(_PROBLEMS)


def problem_options(name: str) -> dict[str, Any]:
    """{option: default} of a registered problem."""
    entry = _get(name)
    return {p.name: p.default for p in inspect.signature(entry.factory).parameters.values()}


def describe_problems() -> list[dict[str, Any]]:
    return [{"name": n, "description": _PROBLEMS[n].description, "options": problem_options(n)} for n in problem_names()]


def _get(name: str) -> _Entry:
    if name not in _PROBLEMS:
        close = difflib.get_close_matches(str(name), list(_PROBLEMS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown problem {name!r}{hint}; valid: {problem_names()}")
    return _PROBLEMS[name]


def make_problem(name: str, **options: Any) -> ProblemSpec:
    """The named problem with validated options: a ``ProblemSpec(name, problem, source, x0, ...)``."""
    entry = _get(name)
    valid = problem_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for problem {name!r}; valid: {sorted(valid)}")
    for k, v in options.items():
        d = valid[k]
        if isinstance(d, bool):
            ok = isinstance(v, bool)
        elif isinstance(d, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif isinstance(d, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        elif isinstance(d, str):
            ok = isinstance(v, (str, os.PathLike))
        else:
            ok = True
        if not ok:
            raise TypeError(f"option {k!r} of problem {name!r} must be {type(d).__name__}, got {v!r} ({type(v).__name__})")
    spec = entry.factory(**options)
    spec.options = {**valid, **options}
    spec.description = spec.description or entry.description
    return spec


def _seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):  # model init from a seed, leaving the caller's RNG alone
        torch.manual_seed(seed)
        return build()


def _positive(name: str, v: int) -> None:
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v!r}")


# ----------------------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------------------


def _fewshot_source(dataset: str, ways: int, shots: int, queries: int, seed: int, classes: int):
    from .fewshot import FewShotSource

    for n, v in (("ways", ways), ("shots", shots), ("queries", queries)):
        _positive(n, v)
    if dataset == "glyphs":
        from .glyphs import load_glyphs

        ds = load_glyphs(classes=classes)
    else:
        from .storage import open_dataset

        ds = open_dataset(os.fspath(dataset))
    return FewShotSource(ds, ways=ways, shots=shots, queries=queries, seed=seed)


@register_problem(
    "fewshot-maml",
    "few-shot classification, meta-learned initialization of a Conv4 (MAML, FOMAML, Reptile, Meta-SGD, rad/trad); "
    "dataset = 'glyphs' (offline) or the path of a metaray Parquet dataset",
)
def _fewshot_maml(dataset: str = "glyphs", ways: int = 5, shots: int = 1, queries: int = 15, hidden: int = 32,
                  seed: int = 0, classes: int = 1600) -> ProblemSpec:
    from .models import Conv4
    from .problems import ModelProblem

    source = _fewshot_source(dataset, ways, shots, queries, seed, classes)
    c, h, _ = source.dataset.shape
    model = _seeded(seed, lambda: Conv4(ways, in_channels=c, hidden=hidden, image_size=h))
    problem = ModelProblem(model, "cross_entropy")
    return ProblemSpec("fewshot-maml", problem, source, problem.initial_params())


@register_problem(
    "fewshot-features",
    "few-shot classification, meta-learned Conv4 feature extractor + per-task linear head (ridge, BDA, BVFIM); "
    "inner = 'ridge' or 'cross_entropy'",
)
def _fewshot_features(dataset: str = "glyphs", ways: int = 5, shots: int = 1, queries: int = 15, hidden: int = 32,
                      seed: int = 0, classes: int = 1600, inner: str = "ridge") -> ProblemSpec:
    from .features import FeatureProblem  # the meta-feature problem (ridge / BDA / BVFIM heads)
    from .models import Conv4

    source = _fewshot_source(dataset, ways, shots, queries, seed, classes)
    c, h, _ = source.dataset.shape
    backbone = _seeded(seed, lambda: Conv4(ways, in_channels=c, hidden=hidden, image_size=h).features)
    problem = FeatureProblem(backbone, ways, inner=inner)
    return ProblemSpec("fewshot-features", problem, source, problem.initial_params())


@register_problem("sinusoid", "sinusoid regression (Finn et al. 2017), MLP 1-40-40-1 meta-initialization, MSE")
def _sinusoid(shots: int = 10, queries: int = 10, hidden: int = 40, seed: int = 0) -> ProblemSpec:
    from .models import mlp
    from .problems import ModelProblem
    from .sinusoid import SinusoidSource

    _positive("hidden", hidden)
    source = SinusoidSource(shots=shots, queries=queries, seed=seed)
    problem = ModelProblem(_seeded(seed, lambda: mlp([1, hidden, hidden, 1])), "mse")
    return ProblemSpec("sinusoid", problem, source, problem.initial_params())


@register_problem(
    "hyper-cleaning",
    "data hyper-cleaning on scikit-learn's handwritten digits: per-sample weights σ(λ) learned so a linear "
    "classifier trained on corrupted labels does well on clean validation data (single task)",
)
def _hyper_cleaning(corruption: float = 0.5, train: int = 600, val: int = 600, inner_l2: float = 1e-3, seed: int = 0) -> ProblemSpec:
    from .hpo import DigitsSource, HyperCleaningProblem

    source = DigitsSource(train=train, val=val, corruption=corruption, seed=seed)
    problem = HyperCleaningProblem(train, inner_l2=inner_l2)
    return ProblemSpec("hyper-cleaning", problem, source, problem.initial_params())


@register_problem(
    "l2-regularization",
    "per-parameter L2 regularization (paper 003 eq. 1): log-coefficients of an MLP trained on scikit-learn's "
    "digits, tuned on validation loss (single task)",
)
def _l2_regularization(hidden: int = 32, train: int = 200, val: int = 600, init_log_l2: float = -4.0, seed: int = 0) -> ProblemSpec:
    from .hpo import DigitsSource, L2RegularizationProblem
    from .models import mlp

    _positive("hidden", hidden)
    source = DigitsSource(train=train, val=val, corruption=0.0, seed=seed)
    model = _seeded(seed, lambda: mlp([64, hidden, 10]).double())
    problem = L2RegularizationProblem(model, init_log_l2=init_log_l2)
    return ProblemSpec("l2-regularization", problem, source, problem.initial_params())


@register_problem("quadratic", "synthetic quadratic bilevel problem with closed-form unrolled and implicit hypergradients")
def _quadratic(n: int = 3, m: int = 4, seed: int = 0, init: str = "zero") -> ProblemSpec:
    from .synthetic import QuadraticProblem, quadratic_task

    task = quadratic_task(n, m, seed=seed, init=init)
    problem = QuadraticProblem()
    return ProblemSpec("quadratic", problem, FixedSource(task), problem.initial_params(task))


@register_problem("toy1d", "paper 003's 1D problem, clean (noise = 0) or noisy (noise = 0.3, eq. 28); θ*(λ) = √(1 − λ²)")
def _toy1d(noise: float = 0.0, lam: float = 0.5, seed: int = 0) -> ProblemSpec:
    from .toys import Toy1DProblem, Toy1DSource

    problem = Toy1DProblem()
    return ProblemSpec("toy1d", problem, Toy1DSource(noise=noise, seed=seed), problem.initial_params(lam))


@register_problem("bda-toy", "the BDA toy whose lower level has many solutions (survey 001 §7); optimum x = y = 1")
def _bda_toy(n: int = 10) -> ProblemSpec:
    from .toys import NonUniqueToyProblem

    problem = NonUniqueToyProblem(n)
    return ProblemSpec("bda-toy", problem, FixedSource(None), {"x": torch.zeros(n, dtype=torch.float64)})


@register_problem("least-squares", "paper 004's synthetic bilevel least-squares problem (FSLA's quadratic experiment)")
def _least_squares(dim: int = 5, samples: int = 10_000, noise_var: float = 0.1, seed: int = 0) -> ProblemSpec:
    from .toys import LeastSquaresBilevel, least_squares_task

    task = least_squares_task(dim, samples, seed=seed, noise_var=noise_var)
    problem = LeastSquaresBilevel()
    return ProblemSpec("least-squares", problem, FixedSource(task), problem.initial_params(task))


# ----------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------

_CONVERTIBLE = [
    ("omniglot", 1623, 32460, "Omniglot (Lake et al. 2015): convert a local torchvision copy with metaray.tasks.convert.from_omniglot"),
    ("cifar-fs", 100, 60000, "CIFAR-100 with the CIFAR-FS split (64/16/20): metaray.tasks.convert.from_cifar100(scheme='cifar-fs')"),
    ("fc100", 100, 60000, "CIFAR-100 with the FC100 superclass split (60/20/20): metaray.tasks.convert.from_cifar100(scheme='fc100')"),
    ("mini-imagenet", 100, 60000, "mini-ImageNet: convert learn2learn's pickles with metaray.tasks.convert.from_mini_imagenet"),
    ("tiered-imagenet", 608, 779165, "tiered-ImageNet: convert learn2learn's pickles with metaray.tasks.convert.from_tiered_imagenet"),
]


def dataset_names() -> list[str]:
    return [row["name"] for row in describe_datasets()]


def describe_datasets(include_local: bool = True) -> list[dict[str, Any]]:
    """Rows {name, classes, samples, source, offline} for ``metaray datasets``: the built-in offline datasets,
    the ones metaray converts from a local copy, and (include_local) metaray Parquet files under ``data_dir()``."""
    import pyarrow.parquet as pq

    from .glyphs import glyphs_path
    from .storage import DatasetError, data_dir, read_info

    glyph_file = glyphs_path(1600, 20, 0)
    rows: list[dict[str, Any]] = [
        {"name": "glyphs", "classes": 1600, "samples": 32000, "offline": True,
         "source": "SYNTHETIC Omniglot-style stand-in rendered from matplotlib's DejaVu/STIX fonts (28x28, 20 per class); "
                   + ("built: " + str(glyph_file) if glyph_file.exists() else "built on first use (~30 s)")},
        {"name": "digits", "classes": 10, "samples": 1797, "offline": True,
         "source": "scikit-learn load_digits: real 8x8 handwritten digits (hyper-cleaning, L2 regularization)"},
        {"name": "sinusoid", "classes": None, "samples": None, "offline": True,
         "source": "generated regression tasks y = A sin(x - phase) (Finn et al. 2017), unlimited"},
    ]
    rows += [{"name": n, "classes": c, "samples": s, "offline": False, "source": src} for n, c, s, src in _CONVERTIBLE]
    if include_local and data_dir().is_dir():
        for path in sorted(data_dir().glob("*.parquet")):
            if path.name.startswith("glyphs-"):
                continue
            try:
                info = read_info(path)
                samples = pq.ParquetFile(path).metadata.num_rows
            except DatasetError:
                continue
            rows.append({"name": path.stem, "classes": len(info.classes), "samples": samples, "offline": True,
                         "source": f"{path} ({info.source or info.name})"})
    return rows
