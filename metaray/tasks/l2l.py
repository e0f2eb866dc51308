"""learn2learn adapters: an l2l ``TaskDataset`` as a metaray task source, and a metaray dataset as an l2l
``MetaDataset``.

learn2learn samples tasks with Python's ``random`` module (NWays, KShots, ...) and, through dataset transforms,
with torch's global generator; the order of calls decides the task, so two workers never agree. ``L2LSource``
makes them agree: for key = (split, step, index) it seeds ``random``, NumPy's and torch's global generators from
``key_seed(key, seed)`` (restoring them afterwards), samples a fresh task description from the split's taskset
and loads it. With ``num_tasks > 0`` (l2l's finite task pool) the key selects one of ``num_tasks`` seeds instead,
so the pool is the same in every process.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from .base import SPLITS, TaskKey, check_key, key_seed
from .episodes import Episode
from .storage import LabelledDataset

_SPLIT_ATTRS = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}


@contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seeds Python's ``random``, NumPy's and torch's (CPU) global generators, restoring them on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % (2**32))
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _as_split_map(tasksets: Any) -> dict[str, Any]:
    if isinstance(tasksets, Mapping):
        out = dict(tasksets)
    else:  # l2l.vision.benchmarks.BenchmarkTasksets(train, validation, test) and look-alikes
        out = {}
        for split, attrs in _SPLIT_ATTRS.items():
            for a in attrs:
                if getattr(tasksets, a, None) is not None:
                    out[split] = getattr(tasksets, a)
                    break
    bad = sorted(set(out) - set(SPLITS))
    if bad or not out:
        raise ValueError(f"tasksets must map splits {list(SPLITS)} to l2l TaskDatasets, got keys {sorted(out)}")
    for split, ts in out.items():
        if not (callable(getattr(ts, "sample_task_description", None)) and callable(getattr(ts, "get_task", None))):
            raise TypeError(f"tasksets[{split!r}] is not a learn2learn TaskDataset (got {type(ts).__name__})")
    return out


class L2LSource:
    """A metaray task source over learn2learn TaskDatasets.

    tasksets: {"train"/"val"/"test": TaskDataset}, an ``l2l.vision.benchmarks.BenchmarkTasksets``, or a
        picklable zero-argument callable returning either (called lazily, once per process: the form to ship to
        Ray workers, since TaskDatasets hold their data).
    shots: support samples per class; the other samples of each class in the l2l task are queries (sample
        KShots(k = shots + queries) in the taskset). Labels are remapped to 0..N-1 by sorted label value.
    """

    def __init__(self, tasksets: Any, *, shots: int, seed: int = 0, dtype: torch.dtype | None = None):
        if not isinstance(shots, int) or isinstance(shots, bool) or shots < 1:
            raise ValueError(f"shots must be an int >= 1, got {shots!r}")
        self.shots, self.seed, self.dtype = shots, seed, dtype
        self._factory = tasksets if callable(tasksets) and not hasattr(tasksets, "sample_task_description") else None
        self._tasksets = None if self._factory is not None else _as_split_map(tasksets)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self._factory is not None:
            state["_tasksets"] = None  # rebuilt from the factory in the receiving process
        return state

    @property
    def tasksets(self) -> dict[str, Any]:
        if self._tasksets is None:
            self._tasksets = _as_split_map(self._factory())
        return self._tasksets

    def sample(self, key: TaskKey) -> Episode:
        split, _, _ = check_key(key)
        ts = self.tasksets.get(split)
        if ts is None:
            raise ValueError(f"no learn2learn taskset for split {split!r}; have {sorted(self.tasksets)}")
        seed = key_seed(key, self.seed)
        num_tasks = int(getattr(ts, "num_tasks", -1))
        if num_tasks > 0:  # l2l's finite task pool: the key picks one of num_tasks fixed tasks
            seed = key_seed((split, 0, seed % num_tasks), self.seed)
        with seeded_global_rngs(seed):
            data, labels = ts.get_task(ts.sample_task_description())[:2]
        return split_episode(data, labels, self.shots, dtype=self.dtype, info={"key": key})


def split_episode(data: torch.Tensor, labels: torch.Tensor, shots: int, *, dtype: torch.dtype | None = None, info: dict | None = None) -> Episode:
    """An l2l task batch (data, labels) → Episode: per class (sorted label value → 0..N-1), the first ``shots``
    samples in batch order are support, the rest query."""
    labels = torch.as_tensor(labels)
    classes, remapped = torch.unique(labels, sorted=True, return_inverse=True)
    counts = torch.bincount(remapped, minlength=len(classes))
    if int(counts.min()) <= shots:
        raise ValueError(
            f"each class needs more than shots={shots} samples to leave queries; the task has {counts.tolist()} "
            "per class (sample KShots(k = shots + queries))"
        )
    support = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(len(classes)):
        support[torch.nonzero(remapped == c).flatten()[:shots]] = True
    # class-major order, as FewShotSource: stable sort by remapped label
    s_idx = torch.nonzero(support).flatten()
    q_idx = torch.nonzero(~support).flatten()
    s_idx = s_idx[torch.argsort(remapped[s_idx], stable=True)]
    q_idx = q_idx[torch.argsort(remapped[q_idx], stable=True)]
    data = torch.as_tensor(data)
    if dtype is not None:
        data = data.to(dtype)
    return Episode(data[s_idx], remapped[s_idx], data[q_idx], remapped[q_idx], info={**(info or {}), "labels": classes.tolist()})


def to_l2l_metadataset(dataset: LabelledDataset, *, split: str | None = None) -> Any:
    """The dataset (or the classes of one split) as an ``l2l.data.MetaDataset``, with the class index l2l would
    otherwise build by loading every sample."""
    import learn2learn as l2l

    if split is None:
        return l2l.data.MetaDataset(dataset, labels_to_indices={c: ix.tolist() for c, ix in enumerate(dataset.class_indices)})
    splits = dataset.info.class_splits
    if splits is None or split not in splits:
        raise ValueError(f"{dataset.where}: dataset has no class split {split!r}")
    keep = [dataset.classes.index(n) for n in splits[split]]
    rows = np.concatenate([dataset.class_indices[c] for c in keep])
    sub = torch.utils.data.Subset(dataset, rows.tolist())
    pos = {int(r): i for i, r in enumerate(rows)}
    l2i = {c: [pos[int(r)] for r in dataset.class_indices[c]] for c in keep}
    return l2l.data.MetaDataset(sub, labels_to_indices=l2i)
