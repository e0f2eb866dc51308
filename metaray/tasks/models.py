"""Small reference models for problems and benchmarks (plain nn.Modules; problems call them functionally)."""
from __future__ import annotations

import copy

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


class FunctionalBatchNorm(nn.Module):
    """BatchNorm with batch statistics (``track_running_stats=False``) written with plain tensor ops, under the
    same parameter names (``weight``, ``bias``). Numerically the same normalization as ``nn.BatchNorm*d`` in
    training mode (biased variance, ``eps`` inside the square root); used where torch's own batching rule is
    wrong: the gradient of a mean over ``vmap``-ped tasks of a second-order MAML step through ``nn.BatchNorm2d``
    is off by ~4e-2 relative in float64 on torch 2.13 (NOTES.md), this module's is exact."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.eps = bn.eps
        self.affine = bn.affine
        if bn.affine:
            self.weight, self.bias = bn.weight, bn.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0] + list(range(2, x.ndim))
        mean = x.mean(dims, keepdim=True)
        centered = x - mean
        out = centered / torch.sqrt(centered.square().mean(dims, keepdim=True) + self.eps)
        if not self.affine:
            return out
        shape = [1, -1] + [1] * (x.ndim - 2)
        return out * self.weight.view(shape) + self.bias.view(shape)


def functional_batch_norm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every batch-statistics BatchNorm replaced by ``FunctionalBatchNorm`` (same
    parameter names, so the same params dict calls both through ``functional_call``)."""
    module = copy.deepcopy(module)

    def swap(m: nn.Module) -> None:
        for name, child in m.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not child.track_running_stats:
                setattr(m, name, FunctionalBatchNorm(child))
            else:
                swap(child)

    swap(module)
    return module
