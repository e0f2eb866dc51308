"""The task value most problems read: a support set and a query set."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Episode:
    """support (x, y) for the inner loss, query (x, y) for the outer loss; ``info`` is free-form metadata."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "Episode":
        return Episode(
            self.support_x.to(device), self.support_y.to(device), self.query_x.to(device), self.query_y.to(device), self.info
        )
