"""Combining per-task hypergradients into one outer gradient.

The linear rules (mean, weighted) are an exact fixed-point sum (``reduce.py``): the result depends on the set of
task gradients only, not on their order, so the actors can reduce among themselves and any number of them gives
the same bits as this one-process version. The robust rules sort each coordinate across tasks (their result is
order-free too) and need every task's gradient in one place.

    mean:          g = (1/n) Σ_i g_i
    weighted:      g = Σ_i w_i g_i / Σ_i w_i                  (w_i >= 0, Σ w_i > 0; e.g. task sizes)
    median:        g_j = median_i g_ij                        (coordinate-wise; robust to < n/2 bad tasks)
    trimmed_mean:  g_j = mean of g_ij after dropping the ⌊αn⌋ smallest and ⌊αn⌋ largest   (α = trim_fraction)
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..solvers.core import Params
from .config import AGGREGATIONS, LINEAR_AGGREGATIONS
from .reduce import coefficients, exact_sum, robust


def _stack(grads: Sequence[Params], k: str) -> Tensor:
    return torch.stack([g[k] for g in grads])


def aggregate(
    grads: Sequence[Params],
    rule: str = "mean",
    weights: Sequence[float] | None = None,
    trim_fraction: float = 0.1,
) -> Params:
    """One gradient from per-task gradients (all with the same keys and shapes), by ``rule``."""
    if rule not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {list(AGGREGATIONS)}, got {rule!r}")
    n = len(grads)
    if n == 0:
        raise ValueError("cannot aggregate zero task gradients: the step needs at least one task key")
    keys = list(grads[0])
    for i, g in enumerate(grads):
        if list(g) != keys:
            raise ValueError(f"task gradient {i} has keys {sorted(g)}, task gradient 0 has {sorted(keys)}")
    if rule == "weighted":
        if weights is None:
            raise ValueError("aggregation 'weighted' needs weights (one per task key)")
        w = [float(v) for v in weights]
        if len(w) != n:
            raise ValueError(f"got {len(w)} weights for {n} task gradients")
        if any(not math.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all zero, got {w}")
    elif weights is not None:
        raise ValueError(f"weights are only used by aggregation 'weighted', not {rule!r}")

    if rule in LINEAR_AGGREGATIONS:
        return exact_sum(grads, coefficients(rule, n, w if rule == "weighted" else None))
    return {k: robust(_stack(grads, k), rule, trim_fraction) for k in keys}
