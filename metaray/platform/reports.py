"""Run reports: ``metrics.parquet`` (one row per outer step, per-worker columns), ``summary.json`` and PNG plots."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .checkpoint import atomic_write_text

METRICS_FILE = "metrics.parquet"
SUMMARY_FILE = "summary.json"
PLOTS_DIR = "plots"


def rows_to_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Rows may differ in columns (validation only every k steps): missing values become nulls."""
    columns: list[str] = []
    for r in rows:
        columns.extend(c for c in r if c not in columns)
    return pa.table({c: [r.get(c) for r in rows] for c in columns}) if rows else pa.table({"step": pa.array([], pa.int64())})


def write_metrics(rows: Sequence[Mapping[str, Any]], run_dir: Path) -> Path:
    path = Path(run_dir) / METRICS_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(rows_to_table(rows), tmp)
    tmp.replace(path)
    return path


def read_metrics(run_dir: Path) -> pa.Table:
    return pq.read_table(Path(run_dir) / METRICS_FILE)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def write_summary(summary: Mapping[str, Any], run_dir: Path) -> Path:
    path = Path(run_dir) / SUMMARY_FILE
    atomic_write_text(path, json.dumps(_jsonable(summary), indent=2) + "\n")
    return path


def plot_run(rows: Sequence[Mapping[str, Any]], run_dir: Path, metric: str = "outer_loss") -> list[Path]:
    """learning_curves.png (train outer/inner loss), meta_validation.png, hypergradient_norm.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(run_dir) / PLOTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    def series(name: str):
        pts = [(r["step"], r[name]) for r in rows if r.get(name) is not None and math.isfinite(r[name])]
        return [p[0] for p in pts], [p[1] for p in pts]

    def save(fig, ax, title: str, ylabel: str, filename: str) -> None:
        ax.set_xlabel("outer step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        fig.tight_layout()
        paths.append(out_dir / filename)
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("outer_loss", "inner_loss"):
        s, v = series(name)
        ax.plot(s, v, label=f"train {name.replace('_', ' ')}")
    ax.set_yscale("log" if all(v > 0 for v in series("outer_loss")[1]) and rows else "linear")
    ax.legend()
    save(fig, ax, "learning curves", "loss", "learning_curves.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    name = f"val_{metric}"
    s, v = series(name)
    if not s:
        name = "val_outer_loss"
        s, v = series(name)
    ax.plot(s, v, marker="o")
    save(fig, ax, "meta-validation", name.replace("_", " "), "meta_validation.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    s, v = series("grad_norm")
    ax.plot(s, v)
    if v and all(x > 0 for x in v):
        ax.set_yscale("log")
    save(fig, ax, "hypergradient norm", "‖hypergradient‖ (aggregated, before clipping)", "hypergradient_norm.png")
    return paths
