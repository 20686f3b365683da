"""Small networks for MNIST-1D, written with torch alone.

``build_model`` is the one entry point: the training command and the commands that rebuild a model
from a checkpoint's configuration both call it with the same arguments, so a name and its options
always mean the same network.
"""

from __future__ import annotations

import torch
from torch import nn

from crsam.errors import UsageError

# Names accepted by ``--model``; the CIFAR and vision-transformer models are not written yet.
MODEL_CHOICES = ("mlp", "cnn1d", "resnet18", "resnet50", "wrn28_10", "vit")
AVAILABLE_MODELS = ("mlp", "cnn1d")

# Activation name -> module class. GELU, tanh, softplus and SiLU are smooth, so the loss has a
# Hessian everywhere; ReLU has kinks where finite differences of gradients are not exact.
ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "silu": nn.SiLU,
}


class MLP(nn.Module):
    """Fully connected network: ``input_length -> width -> ... -> num_classes``.

    ``depth`` is the number of hidden layers, each followed by the activation.
    """

    def __init__(self, *, input_length: int, num_classes: int, width: int, depth: int, activation: str):
        super().__init__()
        layers: list[nn.Module] = []
        in_features = input_length
        for _ in range(depth):
            layers += [nn.Linear(in_features, width), ACTIVATIONS[activation]()]
            in_features = width
        layers.append(nn.Linear(in_features, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map inputs of shape ``(batch, input_length)`` to logits ``(batch, num_classes)``."""
        return self.layers(x)


class CNN1d(nn.Module):
    """1-D convolutional network: ``depth`` strided convolutions, then one linear layer.

    Each convolution has ``channels`` output channels, kernel ``kernel_size`` and stride 2, with
    padding that halves the length (rounding up): 40 -> 20 -> 10 -> 5 for three layers.
    """

    def __init__(
        self,
        *,
        input_length: int,
        num_classes: int,
        channels: int,
        depth: int,
        kernel_size: int,
        activation: str,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 1
        length = input_length
        for _ in range(depth):
            layers += [
                nn.Conv1d(in_channels, channels, kernel_size, stride=2, padding=kernel_size // 2),
                ACTIVATIONS[activation](),
            ]
            in_channels = channels
            # Output length of a convolution with stride 2 and padding kernel_size // 2 (odd kernel).
            length = (length + 2 * (kernel_size // 2) - kernel_size) // 2 + 1
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map inputs of shape ``(batch, input_length)`` to logits ``(batch, num_classes)``."""
        features = self.features(x.unsqueeze(1))
        return self.classifier(features.flatten(1))


def build_model(
    name: str,
    *,
    activation: str = "gelu",
    num_classes: int = 10,
    input_length: int = 40,
    width: int = 100,
    depth: int | None = None,
    channels: int = 25,
    kernel_size: int = 5,
) -> nn.Module:
    """Build the network ``name`` (see ``MODEL_CHOICES``) with freshly initialized weights.

    ``mlp`` uses ``width`` and ``depth`` hidden layers (default 2); ``cnn1d`` uses ``channels``,
    ``kernel_size`` (odd) and ``depth`` convolutions (default 3). The initial weights come from the
    global torch generator, so seed it first for reproducible weights.
    """
    if name not in MODEL_CHOICES:
        raise UsageError(f"--model {name!r} is unknown; choose one of {', '.join(AVAILABLE_MODELS)}")
    if name not in AVAILABLE_MODELS:
        raise UsageError(
            f"--model {name} is not available yet; choose one of {', '.join(AVAILABLE_MODELS)}"
        )
    if activation not in ACTIVATIONS:
        raise UsageError(
            f"--activation {activation!r} is unknown; choose one of {', '.join(ACTIVATIONS)}"
        )

    # Sizes come from code, not from users, but a wrong one would fail deep inside torch.
    for size_name, size in (("num_classes", num_classes), ("input_length", input_length),
                            ("width", width), ("channels", channels)):
        if size < 1:
            raise ValueError(f"{size_name} must be at least 1, got {size}")
    if depth is not None and depth < 0:
        raise ValueError(f"depth must be at least 0, got {depth}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")

    if name == "mlp":
        return MLP(
            input_length=input_length,
            num_classes=num_classes,
            width=width,
            depth=2 if depth is None else depth,
            activation=activation,
        )
    return CNN1d(
        input_length=input_length,
        num_classes=num_classes,
        channels=channels,
        depth=3 if depth is None else depth,
        kernel_size=kernel_size,
        activation=activation,
    )


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
