"""The cluster layer's errors (public as ``metaray.cluster.PoolError`` etc.)."""
from __future__ import annotations

from ..solvers.core import NonFiniteError


class PoolError(RuntimeError):
    """A worker pool could not do what was asked; the message says why and what to change."""


class PlacementTimeoutError(PoolError, TimeoutError):
    """The placement group did not fit in the cluster within ``placement_timeout_s``."""


class NonFiniteStepError(NonFiniteError):
    """A task's hypergradient stayed non-finite after its retry: the step is abandoned, x is unchanged."""
