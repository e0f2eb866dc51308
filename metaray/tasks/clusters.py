"""Gaussian-cluster images: a synthetic few-shot classification family where learned features matter.

Each class of a task is a Gaussian cluster in image space. A family (fixed by ``seed``) has K "signal"
patterns S_k (fine, high-frequency textures) and J "nuisance" patterns N_j (smooth, low-frequency blobs).
A task draws ``ways`` new classes with means μ_c = signal · Σ_k a_ck S_k / √K, a_ck ~ N(0, 1), and each
image of class c is

    μ_c + spread · Σ_k e_k S_k / √K  +  nuisance · Σ_j b_j N_j / √J  +  noise · ε,     e, b, ε ~ N(0, I)

The nuisance directions carry much more variance than the class signal and are the same in every task, so a
feature extractor that learns to ignore them (by meta-training) separates new classes far better than a
random one. Classes are fresh in every task (no class is ever reused), so train/val/test tasks never share
classes. Deterministic in the task key: all randomness comes from ``key_generator(key, seed)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as Fn

from .base import TaskKey, key_generator
from .episodes import Episode


@dataclass(frozen=True)
class GaussianClusterImages:
    ways: int = 5
    shots: int = 1              # support images per class
    queries: int = 5            # query images per class
    size: int = 12              # images are [1, size, size]
    signal_patterns: int = 6    # K
    nuisance_patterns: int = 6  # J
    signal: float = 1.0
    spread: float = 0.3
    nuisance: float = 3.0
    noise: float = 0.2
    seed: int = 0
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name in ("ways", "shots", "queries", "size", "signal_patterns", "nuisance_patterns"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.ways < 2:
            raise ValueError(f"ways must be >= 2, got {self.ways}")
        if self.size < 4:
            raise ValueError(f"size must be >= 4, got {self.size}")
        for name in ("signal", "spread", "nuisance", "noise"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    def patterns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's unit-norm signal [K, s·s] and nuisance [J, s·s] patterns (from ``seed`` only)."""
        g = torch.Generator().manual_seed(self.seed)
        s = self.size
        signal = torch.randn(self.signal_patterns, s * s, generator=g, dtype=torch.float64)
        low = torch.randn(self.nuisance_patterns, 1, 3, 3, generator=g, dtype=torch.float64)
        nuisance = Fn.interpolate(low, size=(s, s), mode="bilinear", align_corners=True).reshape(self.nuisance_patterns, -1)
        return (signal / signal.norm(dim=1, keepdim=True), nuisance / nuisance.norm(dim=1, keepdim=True))

    def sample(self, key: TaskKey) -> Episode:
        g = key_generator(key, self.seed)
        S, N = self.patterns()
        K, J, s = self.signal_patterns, self.nuisance_patterns, self.size
        d64 = torch.float64
        means = self.signal * torch.randn(self.ways, K, generator=g, dtype=d64) @ S / K**0.5
        per_class = self.shots + self.queries
        labels = torch.arange(self.ways).repeat_interleave(per_class)
        count = labels.numel()
        images = (
            means[labels]
            + self.spread * torch.randn(count, K, generator=g, dtype=d64) @ S / K**0.5
            + self.nuisance * torch.randn(count, J, generator=g, dtype=d64) @ N / J**0.5
            + self.noise * torch.randn(count, s * s, generator=g, dtype=d64) / s
        ).reshape(self.ways, per_class, 1, s, s)
        labels = labels.reshape(self.ways, per_class)
        k = self.shots
        support_x, query_x = images[:, :k].reshape(-1, 1, s, s), images[:, k:].reshape(-1, 1, s, s)
        support_y, query_y = labels[:, :k].reshape(-1), labels[:, k:].reshape(-1)
        return Episode(support_x.to(self.dtype), support_y, query_x.to(self.dtype), query_y, info={"ways": self.ways})
