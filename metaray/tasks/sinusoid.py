"""Sinusoid regression (Finn et al. 2017, section 5.1): y = A sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π],
x ~ U[-5, 5], K support and K query points per task."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import TaskKey, key_generator
from .episodes import Episode


@dataclass(frozen=True)
class SinusoidSource:
    shots: int = 10             # K support points
    queries: int = 10           # query points
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    seed: int = 0
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.shots < 1 or self.queries < 1:
            raise ValueError(f"shots and queries must be >= 1, got shots={self.shots}, queries={self.queries}")
        for name in ("amplitude", "phase", "x_range"):
            lo, hi = getattr(self, name)
            if not lo < hi:
                raise ValueError(f"{name} must be an interval (low < high), got {(lo, hi)}")

    def sample(self, key: TaskKey) -> Episode:
        g = key_generator(key, self.seed)
        u = torch.rand(2, generator=g, dtype=torch.float64)
        amp = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * u[0]
        phase = self.phase[0] + (self.phase[1] - self.phase[0]) * u[1]
        lo, hi = self.x_range
        xs = lo + (hi - lo) * torch.rand(self.shots + self.queries, 1, generator=g, dtype=torch.float64)
        ys = amp * torch.sin(xs - phase)
        xs, ys = xs.to(self.dtype), ys.to(self.dtype)
        k = self.shots
        return Episode(xs[:k], ys[:k], xs[k:], ys[k:], info={"amplitude": float(amp), "phase": float(phase)})
