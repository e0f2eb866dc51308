"""The task-source contract: ``sample(key) -> Task``, deterministic in ``key = (split, step, index)``.

Workers receive a small picklable source and sample locally, so an outer step ships only keys and x, never
data, and any worker produces the same task for the same key.
"""
from __future__ import annotations

import hashlib
from typing import Any, Protocol, runtime_checkable

import torch

TaskKey = tuple[str, int, int]  # (split, outer step, index within the step)
SPLITS = ("train", "val", "test")


@runtime_checkable
class TaskSource(Protocol):
    def sample(self, key: TaskKey) -> Any: ...


def check_key(key: Any) -> TaskKey:
    """A task key must be (split: str in SPLITS, step: int >= 0, index: int >= 0)."""
    if not (isinstance(key, tuple) and len(key) == 3):
        raise TypeError(f"task key must be a tuple (split, step, index), got {key!r}")
    split, step, index = key
    if split not in SPLITS:
        raise ValueError(f"task key split must be one of {SPLITS}, got {split!r}")
    for name, v in (("step", step), ("index", index)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"task key {name} must be an int >= 0, got {v!r}")
    return key


def key_seed(key: TaskKey, seed: int = 0) -> int:
    """A 63-bit seed derived from (seed, key) by a stable hash (Python's hash() is salted per process)."""
    split, step, index = check_key(key)
    digest = hashlib.blake2b(f"{seed}/{split}/{step}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def key_generator(key: TaskKey, seed: int = 0) -> torch.Generator:
    """A torch CPU generator seeded from the key: the only randomness a task source may use."""
    return torch.Generator().manual_seed(key_seed(key, seed))
