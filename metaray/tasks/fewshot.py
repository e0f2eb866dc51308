"""N-way K-shot episodes over any labelled dataset, deterministic in the task key.

An episode for key = (split, step, index): draw N classes from the split's class pool, then K support and Q query
samples from each, all from ``key_generator(key, seed)``, so every process that holds the same dataset file draws
the same episode for the same key, with nothing shipped but the key. Labels are remapped to 0..N-1 in the order
the classes were drawn. The meta-train / meta-validation / meta-test splits are disjoint sets of classes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .base import SPLITS, TaskKey, check_key, key_generator
from .episodes import Episode
from .storage import DatasetError, check_class_splits, load

DEFAULT_FRACTIONS = (0.64, 0.16, 0.20)  # mini-ImageNet's 64/16/20 classes, as fractions


def split_classes(
    classes: Sequence[str], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> dict[str, list[str]]:
    """Disjoint train/val/test class lists: a seeded permutation of the classes cut by ``fractions``."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not abs(sum(fractions) - 1.0) < 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test) summing to 1, got {tuple(fractions)}")
    n = len(classes)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    names = [classes[i] for i in perm]
    return {"train": names[:n_train], "val": names[n_train : n_train + n_val], "test": names[n_train + n_val :]}


@dataclass(frozen=True, eq=False)
class FewShotSource:
    """N-way K-shot Q-query classification episodes over a labelled dataset.

    dataset:    a ``LabelledDataset`` or the path of a metaray Parquet dataset (opened memory-mapped; the source
                then pickles as the path, so workers map the same file).
    class_splits: {split: [class names]} overriding the dataset's own splits; if neither exists, a seeded
                64/16/20 % split of the classes (``split_classes``, seed ``split_seed``).
    augment:    optional transform applied to each episode image (a float tensor (C, H, W) in [0, 1]), e.g.
                torchvision transforms; its randomness is seeded from the key, so augmented episodes stay
                deterministic.
    """

    dataset: Any
    ways: int = 5
    shots: int = 1
    queries: int = 15
    seed: int = 0
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    class_splits: dict[str, list[str]] | None = None
    split_seed: int = 0
    dtype: torch.dtype = torch.float32
    _pools: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("ways", "shots", "queries"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.augment is not None and not callable(self.augment):
            raise TypeError(f"augment must be callable (e.g. a torchvision transform), got {type(self.augment).__name__}")
        ds = load(self.dataset)
        object.__setattr__(self, "dataset", ds)
        if self.class_splits is not None:
            splits = check_class_splits(self.class_splits, ds.classes, ds.where)
        elif ds.info.class_splits is not None:
            splits = ds.info.class_splits
        else:
            splits = split_classes(ds.classes, DEFAULT_FRACTIONS, self.split_seed)
        index = {c: i for i, c in enumerate(ds.classes)}
        counts = ds.class_counts()
        need = self.shots + self.queries
        pools = {}
        for split in SPLITS:
            ids = np.array(sorted(index[c] for c in splits.get(split, [])), dtype=np.int64)
            if len(ids) == 0:
                continue  # sampling this split raises; a dataset may lack e.g. a validation split
            if len(ids) < self.ways:
                raise DatasetError(
                    f"{ds.where}: split {split!r} has {len(ids)} classes, too few for {self.ways}-way episodes"
                )
            short = [(ds.classes[i], int(counts[i])) for i in ids if counts[i] < need]
            if short:
                raise DatasetError(
                    f"{ds.where}: {len(short)} classes of split {split!r} have fewer than shots + queries = "
                    f"{self.shots} + {self.queries} = {need} samples, e.g. {short[:3]} (class, samples)"
                )
            pools[split] = ids
        if not pools:
            raise DatasetError(f"{ds.where}: no class split has any classes")
        object.__setattr__(self, "_pools", pools)

    def split_classes(self, split: str) -> list[str]:
        return [self.dataset.classes[i] for i in self._pools.get(split, [])]

    def sample(self, key: TaskKey) -> Episode:
        split, _, _ = check_key(key)
        pool = self._pools.get(split)
        if pool is None:
            raise DatasetError(f"{self.dataset.where}: split {split!r} has no classes; splits with classes: {sorted(self._pools)}")
        g = key_generator(key, self.seed)
        chosen = pool[torch.randperm(len(pool), generator=g)[: self.ways].numpy()]
        need = self.shots + self.queries
        rows = np.stack(
            [self.dataset.class_indices[c][torch.randperm(len(self.dataset.class_indices[c]), generator=g)[:need].numpy()] for c in chosen]
        )
        order = np.concatenate([rows[:, : self.shots].reshape(-1), rows[:, self.shots :].reshape(-1)])
        x = torch.from_numpy(self.dataset.images(order)).to(self.dtype).div_(255.0)
        if self.augment is not None:
            aug_seed = int(torch.randint(0, 2**62, (1,), generator=g))
            with torch.random.fork_rng(devices=[]):  # transforms draw from the global RNG: seed it from the key
                torch.manual_seed(aug_seed)
                x = torch.stack([self.augment(xi) for xi in x]).to(self.dtype)
        n_support = self.ways * self.shots
        ways = torch.arange(self.ways)
        return Episode(
            x[:n_support],
            ways.repeat_interleave(self.shots),
            x[n_support:],
            ways.repeat_interleave(self.queries),
            info={
                "key": key,
                "dataset": self.dataset.name,
                "classes": [self.dataset.classes[c] for c in chosen],
                "labels": chosen.tolist(),
            },
        )


def nearest_centroid_accuracy(episode: Episode) -> float:
    """Query accuracy of a prototypical nearest-centroid classifier on raw pixels (no learning): the baseline a
    few-shot benchmark must make a meta-learned model beat."""
    s = episode.support_x.flatten(1).double()
    q = episode.query_x.flatten(1).double()
    ways = int(episode.support_y.max()) + 1
    centroids = torch.stack([s[episode.support_y == c].mean(0) for c in range(ways)])
    pred = torch.cdist(q, centroids).argmin(1)
    return float((pred == episode.query_y).double().mean())

