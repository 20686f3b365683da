"""Small seeded networks and data sets on which the oracles are cheap and exact."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "smooth_mlp", "smooth_cnn1d", "random_classification_data"]

# Smooth (infinitely differentiable) activations, so that Taylor expansions hold everywhere.
ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "softplus": nn.Softplus}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is invalid; use one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def smooth_mlp(
    widths: Sequence[int], activation: str = "tanh", *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> nn.Sequential:
    """Build an MLP with layer sizes ``widths`` (input first, outputs last) and a smooth activation.

    Weights use PyTorch's default initialization from a generator seeded with ``seed``.
    """
    if len(widths) < 2 or any(int(n) < 1 for n in widths):
        raise ValueError(f"widths={list(widths)} is invalid; give at least an input and an output size, all >= 1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(widths) - 2:
                layers.append(_activation(activation))
        return nn.Sequential(*layers).to(dtype)


class _SmoothCNN1d(nn.Module):
    """Conv1d -> activation -> Conv1d -> activation -> flatten -> Linear, on inputs (N, length)."""

    def __init__(self, length: int, channels: int, num_classes: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1)
        self.activation = _activation(activation)
        self.head = nn.Linear(channels * ((length + 1) // 2), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activation(self.conv1(x.unsqueeze(1)))
        h = self.activation(self.conv2(h))
        return self.head(h.flatten(1))


def smooth_cnn1d(
    length: int,
    channels: int,
    num_classes: int,
    activation: str = "tanh",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> nn.Module:
    """Build a two-layer 1-D CNN with a smooth activation for inputs of shape (N, length)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _SmoothCNN1d(length, channels, num_classes, activation).to(dtype)


def random_classification_data(
    n: int, input_dim: int, num_classes: int, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw n standard Gaussian inputs and uniform integer labels from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, input_dim, generator=generator, dtype=dtype)
    y = torch.randint(0, num_classes, (n,), generator=generator)
    return X, y
