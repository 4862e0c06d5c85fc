"""ResNets for CIFAR-sized images (basic blocks, no stem max-pool), in plain PyTorch.

Source: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2 (CIFAR-10):
a 3x3 stem convolution with 16 channels, three stages of ``n`` basic blocks with 16, 32 and 64 channels (the
first block of stages 2 and 3 halves the resolution with stride 2), global average pooling and a linear layer:
``6n + 2`` weighted layers, ResNet-20/32/56/110 for ``n = 3, 5, 9, 18``.

Shortcuts. Where a block changes the width and resolution, the paper's CIFAR networks use **option A**: the
identity, subsampled by the stride and zero-padded with the missing channels (no parameters). That is the
default here (``shortcut="A"``), so the parameter counts are the published ones (ResNet-20 0.27M, ResNet-32
0.46M, ResNet-56 0.85M, ResNet-110 1.7M). **Option B** (``shortcut="B"``) projects with a 1x1 convolution and
batch normalization instead. Note for SVD training: its code (yanghr/SVD_Prune_EDLCV, ``CNN/cifar10/resnet.py``)
builds option-B shortcuts and decomposes every convolution, the 1x1 shortcut projections included; with the
option-A default here there are no shortcut convolutions to decompose (pass ``shortcut="B"`` to the constructors
below to have them).

``resnet18`` is the CIFAR variant of ResNet-18 (kuangliu/pytorch-cifar): a 3x3 stem with 64 channels and no
max-pool, four stages of 2 basic blocks with 64/128/256/512 channels, and option-B (1x1 convolution + batch
norm) projection shortcuts as in the ImageNet ResNet-18 (11.17M parameters for 10 classes).

Convolutions have no bias (batch norm follows each) and are initialized Kaiming normal (fan-out); BN weights 1,
biases 0. Qualified names: ``conv1``/``bn1`` (stem), ``layer{s}.{b}.conv1``, ``layer{s}.{b}.conv2``,
``layer{s}.{b}.shortcut.0`` (a projection's 1x1 convolution) and the head ``classifier``, which strategies leave
dense by default. All convolutions are plain ``nn.Conv2d`` submodules.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from lr_lightning.models.checks import check_classifier_shape

Shortcut = Literal["A", "B"]

RESNET_MIN_IMAGE_SIZE = 8
"""The smallest ``image_size`` accepted: the stride-2 stages shrink the input 4x (CIFAR ResNets) or 8x (ResNet-18);
at least 8 leaves the last stage at least 2x2 (CIFAR ResNets) or 1x1 (ResNet-18)."""

CIFAR_RESNET_DEPTHS = {20: 3, 32: 5, 56: 9, 110: 18}
"""Depth ``6n + 2`` -> blocks per stage ``n``."""


class ZeroPadShortcut(nn.Module):
    """Option A: ``x`` subsampled by ``stride`` and zero-padded from ``in_planes`` to ``planes`` channels (the added
    channels split evenly before and after, as in the common CIFAR implementations)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_before = (planes - in_planes) // 2
        self.pad_after = planes - in_planes - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad_before, self.pad_after))


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convolutions; ``conv1`` carries the stride."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: Shortcut = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ZeroPadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """3x3 stem (stride 1, no max-pool), stages ``layer1..layerK`` of basic blocks, global average pool, classifier.

    Args:
        widths: Channels of the stages (the stem has ``widths[0]``); every stage after the first starts with a
            stride-2 block.
        blocks: Basic blocks per stage.
        num_classes: Output classes (>= 2).
        in_channels: Input channels (3 for CIFAR).
        image_size: Side of the square input (>= 8; only checked, the global pool takes any size).
        shortcut: ``"A"`` (zero-padding identity) or ``"B"`` (1x1 convolution + batch norm projection) where a
            block changes shape.
        name: Network name used in error messages.
    """

    def __init__(self, widths: tuple[int, ...], blocks: tuple[int, ...], num_classes: int = 10, in_channels: int = 3,
                 image_size: int = 32, shortcut: Shortcut = "A", name: str = "resnet") -> None:
        super().__init__()
        if len(widths) != len(blocks) or not widths or min(blocks) < 1:
            raise ValueError(f"widths and blocks must be non-empty, of equal length, blocks >= 1; got {widths}, "
                             f"{blocks}")
        check_classifier_shape(num_classes, in_channels)
        if image_size < RESNET_MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be >= {RESNET_MIN_IMAGE_SIZE} for {name} (its stride-2 stages "
                             f"shrink the input {2 ** (len(widths) - 1)}x), got {image_size}")
        if shortcut not in get_args(Shortcut):
            raise ValueError(f"shortcut must be one of {get_args(Shortcut)}, got {shortcut!r}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for stage, (planes, count) in enumerate(zip(widths, blocks), start=1):
            stride = 1 if stage == 1 else 2
            layer = []
            for i in range(count):
                layer.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, shortcut))
                in_planes = planes
            self.add_module(f"layer{stage}", nn.Sequential(*layer))
        self.num_stages = len(widths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, in_channels, H, W]``."""
        x = F.relu(self.bn1(self.conv1(x)))
        for stage in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.classifier(self.pool(x).flatten(1))


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 shortcut: Shortcut = "A") -> ResNet:
    """He et al.'s CIFAR ResNet of ``depth = 6n + 2`` layers (20, 32, 56 or 110): stages 16/32/64 of ``n`` blocks."""
    if depth not in CIFAR_RESNET_DEPTHS:
        raise ValueError(f"depth must be one of {tuple(CIFAR_RESNET_DEPTHS)}, got {depth}")
    n = CIFAR_RESNET_DEPTHS[depth]
    return ResNet((16, 32, 64), (n, n, n), num_classes, in_channels, image_size, shortcut, name=f"resnet{depth}")


def resnet20(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, shortcut: Shortcut = "A") -> ResNet:
    """ResNet-20 (0.27M parameters with option A)."""
    return cifar_resnet(20, num_classes, in_channels, image_size, shortcut)


def resnet32(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, shortcut: Shortcut = "A") -> ResNet:
    """ResNet-32 (0.46M parameters with option A)."""
    return cifar_resnet(32, num_classes, in_channels, image_size, shortcut)


def resnet56(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, shortcut: Shortcut = "A") -> ResNet:
    """ResNet-56 (0.85M parameters with option A)."""
    return cifar_resnet(56, num_classes, in_channels, image_size, shortcut)


def resnet110(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, shortcut: Shortcut = "A") -> ResNet:
    """ResNet-110 (1.7M parameters with option A)."""
    return cifar_resnet(110, num_classes, in_channels, image_size, shortcut)


def resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> ResNet:
    """CIFAR ResNet-18: 3x3 stem with 64 channels, stages 64/128/256/512 of 2 blocks, 1x1 projection shortcuts."""
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels, image_size, "B", name="resnet18")
