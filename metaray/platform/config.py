"""Experiment configuration: frozen dataclasses with validation, loaded from TOML.

One ``ExperimentConfig`` describes a run: which problem (and its task source), which solver with which
options, how tasks are drawn, the cluster, the outer optimizer and the run settings. It reads from TOML::

    name = "sinusoid-maml"

    [problem]                 # name + the problem's options
    name = "sinusoid"
    shots = 10

    [solver]                  # name + the solver's options (validated by metaray.solvers)
    name = "maml"
    inner_steps = 1
    inner_lr = 0.01

    [tasks]
    meta_batch_size = 4

    [outer]
    optimizer = "adam"
    lr = 0.001

    [cluster]
    num_workers = 2

    [run]
    steps = 500

Unknown keys fail with the nearest valid key; wrong types and bad values fail naming the field and what is
valid. ``to_dict()`` gives the resolved config (every default filled in), saved as ``config.toml`` in the run dir.
"""
from __future__ import annotations

import dataclasses
import re
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A config that cannot run: says which field is wrong and what is valid."""


# ----------------------------------------------------------------------------------------------------------
# Field checks
# ----------------------------------------------------------------------------------------------------------


def _type_name(ann: Any) -> str:
    args = typing.get_args(ann)
    if args:
        return " or ".join(_type_name(a) for a in args)
    return "none" if ann is type(None) else getattr(ann, "__name__", str(ann))


def _coerce(value: Any, ann: Any, where: str) -> Any:
    """Checks ``value`` against a simple annotation (bool, int, float, str, None unions, tuple[float, ...])."""
    args = typing.get_args(ann)
    origin = typing.get_origin(ann)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r} ({type(value).__name__})")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if args:  # a union such as float | None
        for a in args:
            try:
                return _coerce(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} must be {_type_name(ann)}, got {value!r} ({type(value).__name__})")
    if ann is type(None):
        if value is None:
            return None
    elif ann is bool:
        if isinstance(value, bool):
            return value
    elif ann is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif ann is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where} must be finite, got {value!r}")
            return float(value)
    elif ann is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{where} must be {_type_name(ann)}, got {value!r} ({type(value).__name__})")


def _setting(default: Any, doc: str, check: tuple[Any, str] | None = None, choices: tuple | None = None):
    return field(default=default, metadata={"doc": doc, "check": check, "choices": choices})


_positive = (lambda v: v > 0, "> 0")
_nonnegative = (lambda v: v >= 0, ">= 0")
_fraction = (lambda v: 0 <= v < 0.5, "in [0, 0.5)")


class _Section:
    """Validation shared by the config sections: types, checks, choices, then ``validate()`` for cross-field rules."""

    _section: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name.startswith("_") or f.name == "options":
                continue
            where = f"{self._section}.{f.name}" if self._section else f.name
            value = _coerce(getattr(self, f.name), hints[f.name], where)
            object.__setattr__(self, f.name, value)
            check, choices = f.metadata.get("check"), f.metadata.get("choices")
            if check is not None and value is not None and not check[0](value):
                raise ConfigError(f"{where} must be {check[1]}, got {value!r}")
            if choices is not None and value not in choices:
                close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}{hint}")
        self.validate()

    def validate(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProblemConfig(_Section):
    """The bilevel problem and its task source, by name; every other key is an option of that problem."""

    _section: typing.ClassVar[str] = "problem"
    name: str = _setting("sinusoid", "problem name (`metaray datasets` lists them)")
    options: Mapping[str, Any] = field(default_factory=dict, metadata={"doc": "problem options"})

    def validate(self) -> None:
        from .problems import check_problem_options

        try:
            check_problem_options(self.name, self.options)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"[problem] {e}") from None


@dataclass(frozen=True)
class SolverConfig(_Section):
    """The hypergradient solver, by registry name; every other key is a solver option (validated there)."""

    _section: typing.ClassVar[str] = "solver"
    name: str = _setting("maml", "solver name (`metaray solvers` lists them)")
    options: Mapping[str, Any] = field(default_factory=dict, metadata={"doc": "solver options"})

    def validate(self) -> None:
        from .. import solvers

        try:
            solvers.make(self.name, **dict(self.options))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"[solver] {e}") from None


@dataclass(frozen=True)
class TasksConfig(_Section):
    _section: typing.ClassVar[str] = "tasks"
    meta_batch_size: int = _setting(4, "tasks per outer step: keys ('train', step, i), i < meta_batch_size", _positive)
    val_tasks: int = _setting(100, "tasks per meta-validation (the fixed set ('val', 0, i))", _nonnegative)
    test_tasks: int = _setting(600, "tasks in the final meta-test ('test', 0, i); the literature uses >= 600", _nonnegative)
    persistent: bool = _setting(
        False, "single-task HPO: every outer step uses the same task key ('train', 0, i) (stateful solvers keep state)"
    )


@dataclass(frozen=True)
class OuterConfig(_Section):
    _section: typing.ClassVar[str] = "outer"
    optimizer: str = _setting("adam", "outer optimizer", choices=("sgd", "adam", "adamw"))
    lr: float = _setting(1e-3, "outer learning rate", _positive)
    momentum: float = _setting(0.0, "SGD momentum", (lambda v: 0 <= v < 1, "in [0, 1)"))
    nesterov: bool = _setting(False, "SGD Nesterov momentum (needs momentum > 0)")
    betas: tuple[float, ...] = _setting((0.9, 0.999), "Adam betas", (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"))
    eps: float = _setting(1e-8, "Adam epsilon", _positive)
    weight_decay: float = _setting(0.0, "weight decay", _nonnegative)
    schedule: str = _setting("constant", "learning-rate schedule", choices=("constant", "cosine", "step", "exponential"))
    warmup_steps: int = _setting(0, "linear warm-up steps before the schedule", _nonnegative)
    decay_every: int = _setting(1000, "'step' schedule: multiply lr by gamma every this many steps", _positive)
    gamma: float = _setting(0.5, "'step'/'exponential' schedule factor", (lambda v: 0 < v <= 1, "in (0, 1]"))
    min_lr: float = _setting(0.0, "'cosine' schedule floor", _nonnegative)
    clip_norm: float | None = _setting(None, "clip the aggregated hypergradient to this global norm (none: no clipping)", _positive)

    def validate(self) -> None:
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise ConfigError("outer.nesterov needs optimizer = 'sgd' and momentum > 0")
        if self.min_lr > self.lr:
            raise ConfigError(f"outer.min_lr ({self.min_lr}) must be <= outer.lr ({self.lr})")


@dataclass(frozen=True)
class ClusterSettings(_Section):
    """Where inner learners run. Mirrors ``metaray.cluster.ClusterConfig`` plus the backend choice."""

    _section: typing.ClassVar[str] = "cluster"
    backend: str = _setting("ray", "'ray': Ray actors (WorkerPool); 'inprocess': same interface, no Ray", choices=("ray", "inprocess"))
    num_workers: int = _setting(2, "inner-learner actors", _positive)
    num_cpus_per_worker: float = _setting(1.0, "CPUs per actor", _positive)
    num_gpus_per_worker: float = _setting(0.0, "GPUs per actor (fractional allowed)", _nonnegative)
    strategy: str = _setting("PACK", "placement strategy", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    placement_timeout_s: float = _setting(60.0, "seconds to wait for the placement group", _positive)
    aggregation: str = _setting("mean", "how task hypergradients combine", choices=("mean", "weighted", "median", "trimmed_mean"))
    trim_fraction: float = _setting(0.1, "trimmed_mean: fraction cut at each end", _fraction)
    step_timeout_s: float | None = _setting(None, "re-dispatch a straggler after this many seconds", _positive)
    max_restarts: int = _setting(3, "actor restarts before a step fails", _nonnegative)
    address: str | None = _setting(None, "Ray address (none: join the current cluster or start a local one)")
    metrics: bool = _setting(True, "export ray.util.metrics to the dashboard")
    tasks_per_batch: int | str = _setting(
        1, "tasks per solver.hypergrad_batch call on an actor (vmapped where the solver batches): an int >= 1 or 'auto'",
        (lambda v: v == "auto" or (isinstance(v, int) and v >= 1), "an int >= 1 or 'auto'"))
    reduction: str = _setting(
        "actors", "'actors': mean/weighted gradients summed exactly on the actors, none sent per task; 'driver': "
        "every task's gradient sent to the driver (same result)", choices=("actors", "driver"))
    scheduling: str = _setting(
        "dynamic", "'dynamic': a stateless solver's next task goes to whichever actor is free; 'static': task i to "
        "actor owner(key) (same result)", choices=("dynamic", "static"))
    collective: str = _setting(
        "auto", "how the actors' reduction moves its blocks: 'gloo' or 'nccl' (a torch.distributed group among the "
        "actors), 'object_store' (Ray's); 'auto': nccl where every actor has a whole GPU, else gloo from 8 actors "
        "on and the object store below (same result)", choices=("auto", "gloo", "nccl", "object_store"))
    collective_timeout_s: float = _setting(120.0, "seconds a rank of the actors' group waits for the others", _positive)
    task_threads: int = _setting(
        1, "threads an actor computes a call's tasks on at once (each with its own problem copy), instead of vmapping "
        "them; needs tasks_per_batch > 1 or 'auto'", _positive)
    prefetch: bool | str = _setting(
        "auto", "load an actor's next tasks onto its device while it computes: true, false, or 'auto' (on for GPU "
        "actors; same result)", (lambda v: isinstance(v, bool) or v == "auto",
                                 "true, false or 'auto'"))
    keep_host_memory: bool = _setting(
        True, "keep freed host memory in each process for reuse (no page faults for gradients above 32 MiB: 2.1x "
        "faster CPU steps at 10M params); resident memory then stays near its peak")

    def validate(self) -> None:
        # The fields' cross-checks (task_threads against tasks_per_batch, ...) live in one place, ClusterConfig;
        # its message names the field as this file does.
        try:
            self.cluster_config()
        except ValueError as e:
            raise ConfigError(str(e).replace("ClusterConfig.", "cluster.")) from None

    def cluster_config(self):
        from ..cluster.config import ClusterConfig

        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "backend"}
        return ClusterConfig(**kw)


@dataclass(frozen=True)
class RunSettings(_Section):
    _section: typing.ClassVar[str] = "run"
    steps: int = _setting(100, "outer steps", _nonnegative)
    seed: int = _setting(0, "seed of the outer params' initialization and of the task sources", _nonnegative)
    dtype: str = _setting("float32", "dtype of params and tasks", choices=("float32", "float64"))
    precision: str = _setting(
        "fp32", "inner loop precision: 'fp32', or 'bf16' (the inner loss's forward under bf16 autocast; params, gradients "
        "and the outer loss in fp32; needs dtype 'float32')", choices=("fp32", "bf16"))
    device: str = _setting("auto", "inner-learner device: 'auto' (GPU if the actor has one), 'cpu', 'cuda'")
    val_every: int = _setting(0, "meta-validate every this many steps (0: only at the end)", _nonnegative)
    checkpoint_every: int = _setting(0, "checkpoint every this many steps (0: only at the end)", _nonnegative)
    keep_checkpoints: int = _setting(2, "checkpoints kept on disk (older ones are deleted)", _positive)
    output_dir: str = _setting("runs", "parent directory of run directories")
    run_dir: str | None = _setting(None, "exact run directory (default: <output_dir>/<name>-<timestamp>)")
    baseline: bool = _setting(True, "also meta-test the initial outer params (the no-meta-learning baseline)")
    plots: bool = _setting(True, "write PNG plots")
    progress: bool = _setting(True, "show a progress bar")
    tensorboard: bool = _setting(False, "also write the per-step metrics as TensorBoard event files in <run_dir>/tensorboard")

    def validate(self) -> None:
        if self.precision == "bf16" and self.dtype != "float32":
            raise ConfigError(f"run.precision = 'bf16' needs run.dtype = 'float32' (autocast leaves float64 alone), got {self.dtype!r}")


_SECTIONS: dict[str, type] = {
    "problem": ProblemConfig,
    "solver": SolverConfig,
    "tasks": TasksConfig,
    "outer": OuterConfig,
    "cluster": ClusterSettings,
    "run": RunSettings,
}


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole run. Build it in Python or load it from TOML with ``load_config``."""

    name: str = "experiment"
    problem: ProblemConfig = field(default_factory=ProblemConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    run: RunSettings = field(default_factory=RunSettings)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or any(c in self.name for c in "/\\ "):
            raise ConfigError(f"name must be a non-empty string without spaces or slashes, got {self.name!r}")
        for key, cls in _SECTIONS.items():
            if not isinstance(getattr(self, key), cls):
                raise ConfigError(f"{key} must be a {cls.__name__}, got {type(getattr(self, key)).__name__}")

    # ---- conversions ---------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ExperimentConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a table, got {type(data).__name__}")
        _check_keys(data, ["name", *_SECTIONS], "top level")
        kwargs: dict[str, Any] = {}
        if "name" in data:
            kwargs["name"] = data["name"]
        for key, section_cls in _SECTIONS.items():
            if key not in data:
                continue
            table = data[key]
            if not isinstance(table, Mapping):
                raise ConfigError(f"[{key}] must be a table, got {table!r}")
            kwargs[key] = _section_from_dict(section_cls, key, table)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for key in _SECTIONS:
            section = getattr(self, key)
            table: dict[str, Any] = {}
            for f in dataclasses.fields(section):
                v = getattr(section, f.name)
                if f.name == "options":
                    table.update(dict(v))
                else:
                    table[f.name] = list(v) if isinstance(v, tuple) else v
            out[key] = table
        return out

    def replace(self, **changes: Any) -> "ExperimentConfig":
        """A copy with dotted-key overrides, e.g. ``cfg.replace(**{"outer.lr": 0.01, "run.steps": 5})``."""
        data = self.to_dict()
        for dotted, value in changes.items():
            *path, last = dotted.split(".")
            node = data
            for p in path:
                if p not in node or not isinstance(node[p], dict):
                    _check_keys({p: None}, list(k for k, v in node.items() if isinstance(v, dict)), "override")
                node = node[p]
            node[last] = value
        return ExperimentConfig.from_dict(data)

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())


def _check_keys(data: Mapping[str, Any], valid: list[str], where: str) -> None:
    for k in data:
        if k not in valid:
            close = difflib.get_close_matches(str(k), valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {k!r} in {where}{hint} (valid keys: {', '.join(valid)})")


def _section_from_dict(section_cls: type, key: str, table: Mapping[str, Any]):
    names = [f.name for f in dataclasses.fields(section_cls) if f.name != "options"]
    if section_cls in (ProblemConfig, SolverConfig):
        # name + free options: the problem / solver validates the options (with its own suggestions).
        opts = {k: v for k, v in table.items() if k != "name"}
        return section_cls(**({"name": table["name"]} if "name" in table else {}), options=opts)
    _check_keys(table, names, f"[{key}]")
    return section_cls(**dict(table))


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Reads an ``ExperimentConfig`` from a TOML file; ``overrides`` are dotted keys (``{"run.steps": 5}``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        cfg = ExperimentConfig.from_dict(data)
        return cfg.replace(**overrides) if overrides else cfg
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def loads_config(text: str) -> ExperimentConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}") from None
    return ExperimentConfig.from_dict(data)


# ----------------------------------------------------------------------------------------------------------
# A small TOML writer (tomllib only reads): tables of scalars, lists and one level of sub-tables.
# ----------------------------------------------------------------------------------------------------------


_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"'}


def _toml_key(k: str) -> str:
    """A bare key where TOML allows one, else a quoted key."""
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        # TOML basic strings: backslash and quote escaped, control characters as \uXXXX (tab is allowed as is)
        return '"' + "".join(_TOML_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if (ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F else c) for c in v) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} ({type(v).__name__}) as TOML")


def dumps_toml(data: Mapping[str, Any]) -> str:
    lines: list[str] = []
    tables = []
    for k, v in data.items():
        if isinstance(v, Mapping):
            tables.append((k, v))
        elif v is not None:  # TOML has no null: a missing key means the default (None)
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for name, table in tables:
        lines.append(f"\n[{_toml_key(name)}]")
        for k, v in table.items():
            if v is None:
                lines.append(f"# {_toml_key(k)} = (none)")
            elif isinstance(v, Mapping):
                lines.append(f"{_toml_key(k)} = {{ " + ", ".join(f"{_toml_key(kk)} = {_toml_value(vv)}" for kk, vv in v.items()) + " }")
            else:
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"
