"""Image classifiers for 32x32 inputs, written with torch alone: CIFAR ResNets, WRN-28-10 and a ViT.

``build_vision_model`` is the entry point. Every model maps a float batch (N, 3, 32, 32) to
logits (N, num_classes), and every size can be shrunk (``width``, ``widen_factor`` and ``depth``,
``dim`` and ``depth``) so that tests can train the same code quickly.

- ``resnet18`` and ``resnet50``: the CIFAR variants of He et al. (2016). The ImageNet stem (7x7
  convolution with stride 2 and max-pooling) is replaced by one 3x3 convolution with stride 1, so
  the four stages of 64, 128, 256 and 512 channels see 32, 16, 8 and 4 pixels a side.
- ``wrn28_10``: Zagoruyko & Komodakis (2016), pre-activation basic blocks in three groups of
  16k, 32k and 64k channels, with depth 28 = 6n + 4 (n = 4 blocks per group) and k = 10.
- ``vit``: Dosovitskiy et al. (2021) with ViT-S sizes (dim 384, depth 12, 6 heads, MLP ratio 4)
  and 4x4 patches, so a 32x32 image becomes 64 tokens plus the class token.

References:
    He, K., Zhang, X., Ren, S., & Sun, J. (2016). Deep Residual Learning for Image Recognition.
    CVPR.
    He, K., Zhang, X., Ren, S., & Sun, J. (2016). Identity Mappings in Deep Residual Networks.
    ECCV.
    Zagoruyko, S., & Komodakis, N. (2016). Wide Residual Networks. BMVC.
    Dosovitskiy, A., et al. (2021). An Image is Worth 16x16 Words: Transformers for Image
    Recognition at Scale. ICLR.
    He, K., Zhang, X., Ren, S., & Sun, J. (2015). Delving Deep into Rectifiers: Surpassing
    Human-Level Performance on ImageNet Classification. ICCV.
    Touvron, H., et al. (2021). Training data-efficient image transformers & distillation through
    attention. ICML. (The ViT-S sizes.)
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from crsam.errors import UsageError

VISION_MODEL_CHOICES = ("resnet18", "resnet50", "wrn28_10", "vit")


def _activation_class(name: str) -> type[nn.Module]:
    """Return the module class for an activation name shared with ``crsam.models``."""
    # Imported here so that crsam.models can import this module at its top without a cycle.
    from crsam.models import ACTIVATIONS

    if name not in ACTIVATIONS:
        raise UsageError(f"--activation {name!r} is unknown; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _check_positive(**sizes: int) -> None:
    for size_name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{size_name} must be a positive int, got {size!r}")


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias, because every convolution here is followed or preceded by BatchNorm.
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _init_convolutions(model: nn.Module) -> None:
    """Initialize convolutions with He et al.'s (2015) normal initialization for ReLU networks.

    BatchNorm starts at weight 1 and bias 0 (torch's default); linear layers keep torch's default.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------
# CIFAR ResNets
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut: ``act(bn(conv(act(bn(conv(x))))) + shortcut(x))``.

    The shortcut is the identity, or a strided 1x1 convolution with BatchNorm when the block
    changes the resolution or the channel count.
    """

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int, activation: type[nn.Module]):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = _conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.activation = activation()
        self.shortcut = _projection(in_channels, channels * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.activation(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) convolutions with BatchNorm, and a shortcut.

    The stride sits on the 3x3 convolution. Stage widths count the inner channels, so a stage of
    width 64 outputs 256 channels.
    """

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int, activation: type[nn.Module]):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.activation = activation()
        self.shortcut = _projection(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation(self.bn1(self.conv1(x)))
        out = self.activation(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.activation(out + self.shortcut(x))


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Return the identity when shapes match, else a strided 1x1 convolution with BatchNorm."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class CifarResNet(nn.Module):
    """ResNet for 32x32 images: a 3x3 stem, four stages of residual blocks, global average pooling.

    Stage ``i`` has ``width * 2**i`` inner channels and ``blocks_per_stage[i]`` blocks; stages
    after the first halve the resolution with stride 2 in their first block. ``width=64`` gives
    the standard network; smaller widths give fast variants of the same architecture.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks_per_stage: tuple[int, ...],
        *,
        num_classes: int = 10,
        width: int = 64,
        activation: str = "relu",
        in_channels: int = 3,
    ):
        super().__init__()
        _check_positive(num_classes=num_classes, width=width, in_channels=in_channels)
        activation_class = _activation_class(activation)

        # Stem: one 3x3 convolution at full resolution, no max-pooling.
        self.stem = nn.Sequential(
            _conv3x3(in_channels, width),
            nn.BatchNorm2d(width),
            activation_class(),
        )

        # Four stages; the first block of each later stage downsamples.
        stages = []
        channels_in = width
        for stage_index, num_blocks in enumerate(blocks_per_stage):
            channels = width * 2**stage_index
            blocks = []
            for block_index in range(num_blocks):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(block(channels_in, channels, stride, activation_class))
                channels_in = channels * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)

        self.classifier = nn.Linear(channels_in, num_classes)
        _init_convolutions(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (N, C, H, W) to logits (N, num_classes)."""
        features = self.stages(self.stem(x))
        return self.classifier(features.mean(dim=(2, 3)))


# --------------------------------------------------------------------------------------------
# Wide ResNet
# --------------------------------------------------------------------------------------------


class WideBlock(nn.Module):
    """Pre-activation basic block: ``conv(drop(act(bn(conv(act(bn(x))))))) + shortcut``.

    BatchNorm and the activation come before each convolution (He et al., 2016, "Identity
    Mappings"), with dropout between the two convolutions as in Zagoruyko & Komodakis (2016).
    When the block changes shape, the shortcut is a strided 1x1 convolution applied to the
    pre-activated input, so both branches share the first BatchNorm and activation.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float, activation: type[nn.Module]):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.activation = activation()
        self.dropout = nn.Dropout(dropout)
        self.projection = None
        if stride != 1 or in_channels != out_channels:
            self.projection = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.activation(self.bn1(x))
        shortcut = x if self.projection is None else self.projection(activated)
        out = self.conv1(activated)
        out = self.conv2(self.dropout(self.activation(self.bn2(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 images (Zagoruyko & Komodakis, 2016).

    A 3x3 convolution to 16 channels, then three groups of n = (depth - 4) / 6 wide blocks with
    16k, 32k and 64k channels at strides 1, 2 and 2, then BatchNorm, the activation, global
    average pooling and a linear classifier. ``depth=28, widen_factor=10`` is WRN-28-10;
    ``dropout`` is the rate between the convolutions of each block (the authors used 0.3 on CIFAR).
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
        activation: str = "relu",
        in_channels: int = 3,
    ):
        super().__init__()
        _check_positive(num_classes=num_classes, depth=depth, widen_factor=widen_factor, in_channels=in_channels)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        _check_probability("dropout", dropout)
        activation_class = _activation_class(activation)
        blocks_per_group = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)

        self.stem = _conv3x3(in_channels, 16)

        # The first block of each group changes the width, and in the second and third groups it
        # also halves the resolution with stride 2.
        groups = []
        channels_in = 16
        for group_index, channels in enumerate(widths):
            blocks = []
            for block_index in range(blocks_per_group):
                stride = 2 if group_index > 0 and block_index == 0 else 1
                blocks.append(WideBlock(channels_in, channels, stride, dropout, activation_class))
                channels_in = channels
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)

        # The last block ends with a convolution, so normalize and activate once more before pooling.
        self.final_bn = nn.BatchNorm2d(channels_in)
        self.final_activation = activation_class()
        self.classifier = nn.Linear(channels_in, num_classes)
        _init_convolutions(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (N, C, H, W) to logits (N, num_classes)."""
        features = self.final_activation(self.final_bn(self.groups(self.stem(x))))
        return self.classifier(features.mean(dim=(2, 3)))


# --------------------------------------------------------------------------------------------
# Vision transformer
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Fill ``tensor`` in place from N(0, std^2) truncated to [-2 std, 2 std], by redrawing outliers.

    About 4.6 % of the first draws fall outside and are redrawn until none is left; only those
    entries are touched after the first pass. ``torch.nn.init.trunc_normal_`` gives the same
    distribution through the inverse error function but took about five times as long for 21M
    entries (2.7 s against 0.5 s on a shared 2-core CPU with torch 2.13).
    """
    tensor.normal_(0.0, std)
    if tensor.device.type == "meta":
        return tensor
    flat = tensor.view(-1)
    outside = (flat.abs() > 2 * std).nonzero().squeeze(1)
    while outside.numel() > 0:
        redrawn = torch.randn(outside.numel(), dtype=tensor.dtype, device=tensor.device) * std
        flat[outside] = redrawn
        outside = outside[redrawn.abs() > 2 * std]
    return tensor


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused query/key/value projection.

    ``torch.nn.functional.scaled_dot_product_attention`` computes softmax(q k^T / sqrt(d)) v per
    head, choosing a fused kernel where the device has one.
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_dropout = dropout
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        head_dim = dim // self.heads

        # (N, T, 3 * dim) -> three tensors (N, heads, T, head_dim).
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        dropout_p = self.attention_dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p)

        # Merge the heads back into (N, T, dim).
        merged = attended.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_dropout(self.proj(merged))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, dropout: float, activation: type[nn.Module]):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_hidden),
            activation(),
            nn.Dropout(dropout),
            nn.Linear(mlp_hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT for small images: patch embedding, class token, learned positions, pre-norm blocks.

    A ``patch_size`` x ``patch_size`` convolution with the same stride embeds each patch into
    ``dim`` channels; the class token is prepended and a learned position embedding added. After
    ``depth`` blocks and a final LayerNorm, the class token's features go to a linear head. The
    defaults are ViT-S (dim 384, depth 12, 6 heads, MLP ratio 4) with 4x4 patches for 32x32 inputs.
    Linear weights, the class token and the position embedding start from a normal distribution
    with standard deviation 0.02 truncated at two standard deviations, biases at zero.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        activation: str = "gelu",
        in_channels: int = 3,
    ):
        super().__init__()
        _check_positive(num_classes=num_classes, image_size=image_size, patch_size=patch_size,
                        dim=dim, depth=depth, heads=heads, in_channels=in_channels)
        if image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        if dim % heads != 0:
            raise ValueError(f"dim {dim} must be a multiple of heads {heads}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio!r}")
        _check_probability("dropout", dropout)
        activation_class = _activation_class(activation)
        num_patches = (image_size // patch_size) ** 2
        self.image_size = image_size

        # Patch embedding, class token and one learned position per token.
        self.patch_embedding = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position_embedding = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.embedding_dropout = nn.Dropout(dropout)

        mlp_hidden = int(dim * mlp_ratio)
        self.blocks = nn.Sequential(
            *(TransformerBlock(dim, heads, mlp_hidden, dropout, activation_class) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        _truncated_normal_(self.class_token, std=0.02)
        _truncated_normal_(self.position_embedding, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                _truncated_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (N, C, image_size, image_size) to logits (N, num_classes)."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"this ViT was built for {self.image_size}x{self.image_size} images, got {tuple(x.shape[-2:])}; "
                "build it with image_size set to the input size"
            )
        # (N, C, H, W) -> (N, patches, dim), then prepend the class token and add positions.
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)
        class_tokens = self.class_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([class_tokens, tokens], dim=1) + self.position_embedding
        tokens = self.blocks(self.embedding_dropout(tokens))
        return self.head(self.norm(tokens[:, 0]))


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


def _resnet18(**options) -> CifarResNet:
    return CifarResNet(BasicBlock, (2, 2, 2, 2), **options)


def _resnet50(**options) -> CifarResNet:
    return CifarResNet(Bottleneck, (3, 4, 6, 3), **options)


# name -> (constructor, class whose keyword arguments are the accepted options).
_BUILDERS = {
    "resnet18": (_resnet18, CifarResNet),
    "resnet50": (_resnet50, CifarResNet),
    "wrn28_10": (WideResNet, WideResNet),
    "vit": (VisionTransformer, VisionTransformer),
}


def vision_model_options(name: str) -> tuple[str, ...]:
    """Return the keyword options ``build_vision_model`` accepts for ``name``, besides ``num_classes`` and ``activation``."""
    if name not in _BUILDERS:
        raise UsageError(f"--model {name!r} is unknown; choose one of {', '.join(VISION_MODEL_CHOICES)}")
    parameters = inspect.signature(_BUILDERS[name][1].__init__).parameters
    return tuple(
        option for option, parameter in parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and option not in ("num_classes", "activation")
    )


def build_vision_model(name: str, *, num_classes: int = 10, activation: str | None = None, **options) -> nn.Module:
    """Build the 32x32 image classifier ``name`` (see ``VISION_MODEL_CHOICES``) with fresh weights.

    ``activation`` (a name of ``crsam.models.ACTIVATIONS``) defaults to ``"relu"`` for the
    ResNets and WRN and ``"gelu"`` for the ViT. ``options`` set sizes and regularization:

    - ``resnet18``, ``resnet50``: ``width`` (64; stage widths are width, 2x, 4x, 8x), ``in_channels``;
    - ``wrn28_10``: ``depth`` (28), ``widen_factor`` (10), ``dropout`` (0.0), ``in_channels``;
    - ``vit``: ``image_size`` (32), ``patch_size`` (4), ``dim`` (384), ``depth`` (12),
      ``heads`` (6), ``mlp_ratio`` (4.0), ``dropout`` (0.0), ``in_channels``.

    The initial weights come from the global torch generator, so seed it first for reproducible
    weights. Raises UsageError for an unknown name or activation and ValueError for an option the
    model does not take or an invalid size.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> model = build_vision_model("resnet18", num_classes=100, width=8)
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 100])
    """
    accepted = vision_model_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"{name} does not take the option(s) {', '.join(unknown)}; accepted options are {', '.join(accepted)}"
        )
    builder = _BUILDERS[name][0]
    if activation is not None:
        options["activation"] = activation
    return builder(num_classes=num_classes, **options)
