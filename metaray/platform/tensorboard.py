"""TensorBoard event files of a run (``[run] tensorboard = true``): the rows of ``metrics.parquet`` as scalars.

``tensorboard --logdir runs/`` then shows every run directory's ``tensorboard/`` folder as one TensorBoard run.
Tags are grouped the way TensorBoard groups them (by the part before ``/``)::

    loss/outer_loss, loss/inner_loss            the step's mean losses
    optim/grad_norm, optim/update_norm, ...     the aggregated hypergradient norm, lr, clipping, update norm
    val/<metric>                                meta-validation (the rows that have it)
    train/<metric>                              the problem's metrics and pool diagnostics over the step's tasks
    worker<i>/tasks_per_second, worker<i>/...   per-worker throughput (tasks / compute seconds) and losses
    step/seconds, step/restarts, step/retries   wall clock and faults of the step

The writer is tensorboardX, not ``torch.utils.tensorboard``: torch's ``SummaryWriter`` needs the ``tensorboard``
package (TensorBoard's server, with werkzeug, markdown, absl and its data server) just to write, while tensorboardX
writes the same event-file format with only numpy and protobuf, and comes with ``ray[tune]`` already (Tune's own
TensorBoard logger uses it). Reading the files needs TensorBoard itself, which is where a user looks at them anyway.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Mapping

TENSORBOARD_DIR = "tensorboard"

_GROUPS = {
    "outer_loss": "loss",
    "inner_loss": "loss",
    "grad_norm": "optim",
    "update_norm": "optim",
    "lr": "optim",
    "clipped": "optim",
}
_WORKER = re.compile(r"worker(\d+)_(\w+)")


def tag_of(column: str) -> str:
    """The TensorBoard tag of a ``metrics.parquet`` column."""
    if column in _GROUPS:
        return f"{_GROUPS[column]}/{column}"
    m = _WORKER.fullmatch(column)
    if m:
        return f"worker{m.group(1)}/{m.group(2)}"
    for prefix in ("val_", "train_"):
        if column.startswith(prefix):
            return f"{prefix[:-1]}/{column[len(prefix):]}"
    return f"step/{column}"


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """Tag -> value for one metrics row: every numeric column but ``step`` (the x axis), plus each worker's
    throughput ``worker<i>/tasks_per_second`` (its tasks / its compute seconds, as the Prometheus gauge)."""
    out: dict[str, float] = {}
    for column, value in row.items():
        if column == "step" or not isinstance(value, (bool, int, float)):
            continue
        out[tag_of(column)] = float(value)
        m = _WORKER.fullmatch(column)
        if m and m.group(2) == "tasks":
            seconds = row.get(f"worker{m.group(1)}_seconds")
            if isinstance(seconds, (int, float)) and seconds > 0:
                out[f"worker{m.group(1)}/tasks_per_second"] = float(value) / float(seconds)
    return out


class TensorBoardLog:
    """Writes metrics rows as scalars into ``<run_dir>/tensorboard``.

    ``write(row)`` may be called again for the same step after the row gained columns (the end-of-training
    validation is added to the last row): only the new tags are written. ``first_step`` (on resume: the step
    after the checkpoint) purges events a crashed run wrote past its last checkpoint, so the curves show the
    trajectory the run really followed.
    """

    def __init__(self, run_dir: str | Path, *, first_step: int = 1, config_toml: str | None = None):
        from tensorboardX import SummaryWriter

        self.logdir = Path(run_dir) / TENSORBOARD_DIR
        # A unique suffix: two writers opened in the same second (resume right after a run) would otherwise get
        # the same file name, and the second would truncate the first's events.
        self._writer = SummaryWriter(
            logdir=str(self.logdir),
            purge_step=first_step if first_step > 1 else None,
            flush_secs=2,  # tensorboardX writes from a background queue; a killed driver loses at most this much
            filename_suffix=f".{time.time_ns()}",
        )
        if config_toml is not None:
            self._writer.add_text("config", "```toml\n" + config_toml + "```", 0)
        self._first_step = first_step
        self._step: int | None = None
        self._written: set[str] = set()

    def write(self, row: Mapping[str, Any]) -> None:
        step = int(row["step"])
        if step < self._first_step:
            return  # a resumed run's rows from before its checkpoint: already in an earlier event file
        if step != self._step:
            self._step, self._written = step, set()
        for tag, value in scalars(row).items():
            if tag in self._written:
                continue
            self._writer.add_scalar(tag, value, step)  # stored as float32 (TensorBoard's simple_value)
            self._written.add(tag)

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
