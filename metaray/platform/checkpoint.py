"""Checkpoints of a run: outer params, optimizer state, RNG state, step, the pool's per-task solver state and
the metrics rows so far.

Checkpoints are checksummed, atomic files (``integrity.py``): written to a temporary name, fsynced, renamed,
read back and verified before ``latest.json`` points at them and older ones are pruned. Resuming walks from the
newest checkpoint back to the first one that verifies, so a torn or altered newest file costs a few steps,
never the run. Everything stored is tensors or plain Python types, read with ``torch.load(weights_only=True)``.

User-facing artifacts (``final_params.pt``, learned-optimizer files) are plain ``torch.save`` files written
atomically, so ``torch.load(path, weights_only=True)`` reads them without metaray.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .integrity import list_checkpoints, load_latest_good, save_rotating, write_atomic

CHECKPOINT_DIR = "checkpoints"


def atomic_write_text(path: Path, text: str) -> None:
    write_atomic(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then an atomic rename: a reader sees the old file or the new one."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


def save_checkpoint(run_dir: Path, step: int, payload: dict[str, Any], keep: int = 2) -> Path:
    """Writes ``checkpoints/ckpt_<step>.pt`` (checksummed, verified), points ``latest.json`` at it, and keeps the
    ``keep`` newest checkpoints that verify."""
    return save_rotating(Path(run_dir) / CHECKPOINT_DIR, step, {**payload, "step": step, "rng": rng_state()}, keep=keep)


def has_checkpoint(run_dir: Path) -> bool:
    return bool(list_checkpoints(Path(run_dir) / CHECKPOINT_DIR))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint file that verifies, or None if there is none."""
    if not has_checkpoint(run_dir):
        return None
    return load_latest_good(Path(run_dir) / CHECKPOINT_DIR)[0]


def load_latest(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """(path, contents) of the newest checkpoint that verifies; newer bad ones are skipped with a warning.
    Raises ``CheckpointError`` if there is no good checkpoint."""
    return load_latest_good(Path(run_dir) / CHECKPOINT_DIR)
