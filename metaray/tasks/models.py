"""Small reference models for problems and benchmarks (plain nn.Modules; problems call them functionally)."""
from __future__ import annotations

import torch
from torch import nn


def mlp(sizes: list[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Fully connected net; Finn et al.'s sinusoid regressor is mlp([1, 40, 40, 1])."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def conv_block(cin: int, cout: int, *, batch_norm: bool = True, pool: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1)]
    if batch_norm:
        # track_running_stats=False: statistics come from the current batch, so the functional inner loop never
        # mutates module buffers (learn2learn's vision models make the same choice).
        layers.append(nn.BatchNorm2d(cout, track_running_stats=False))
    layers.append(nn.ReLU())
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    """The 4-block conv net of the few-shot literature (Vinyals et al. 2016; Finn et al. 2017)."""

    def __init__(self, ways: int, in_channels: int = 1, hidden: int = 32, image_size: int = 28, batch_norm: bool = True):
        super().__init__()
        self.features = nn.Sequential(
            conv_block(in_channels, hidden, batch_norm=batch_norm),
            *[conv_block(hidden, hidden, batch_norm=batch_norm) for _ in range(3)],
            nn.Flatten(),
        )
        side = image_size
        for _ in range(4):
            side //= 2
        self.embedding_dim = hidden * max(side, 1) ** 2
        self.classifier = nn.Linear(self.embedding_dim, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
