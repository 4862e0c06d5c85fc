"""VGG with batch normalization for CIFAR-sized images, in plain PyTorch.

Source: Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR 2015
(configurations A = VGG-11 and D = VGG-16: 3x3 convolutions with padding 1, 2x2 max-pools), with batch
normalization after every convolution (Ioffe & Szegedy 2015), in the CIFAR form of the widely reproduced
``kuangliu/pytorch-cifar`` baseline::

    [conv 3x3 -> BatchNorm -> ReLU] x k, max-pool 2  (five times; widths 64, 128, 256, 512, 512)
    -> global average pool -> Linear 512 -> num_classes

Classifier: one ``Linear(512, num_classes)``, not ImageNet's 4096-4096 head nor a 512-512-num_classes MLP. On
32x32 inputs the five max-pools leave a 1x1x512 map, so a single linear layer is the common CIFAR head
(kuangliu/pytorch-cifar, and the VGG baselines reported with it: ~9.2M parameters for VGG-11, ~14.7M for VGG-16);
a hidden 512 -> 512 layer adds parameters without a consistent accuracy gain, and the low-rank methods are about
the convolutions. The global average pool is the identity at 32x32 (kuangliu's ``AvgPool2d(1)``) and makes larger
inputs (any multiple of 32) end in the same 512 features.

Convolutions keep their bias (as kuangliu's and torchvision's ``vgg*_bn``), so the parameter counts match the
commonly quoted ones; they are initialized as torchvision's VGG (Kaiming normal, fan-out; biases zero).

Qualified names: ``features.{i}`` (a ``Sequential`` of ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.ReLU`` /
``nn.MaxPool2d``) and the head ``classifier``, which strategies leave dense by default.
"""

from __future__ import annotations

import torch
from torch import nn

from lr_lightning.models.checks import check_classifier_shape

VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}
"""Output widths of the 3x3 convolutions, ``"M"`` for a 2x2 max-pool (Simonyan & Zisserman's A and D)."""

VGG_DOWNSAMPLING = 32
"""Five 2x2 max-pools: ``image_size`` must be a multiple of 32 (and at least 32)."""


class VGG(nn.Module):
    """VGG-BN: the convolutional ``features`` of ``VGG_CONFIGS[name]``, global average pool, ``classifier``.

    Args:
        name: A key of ``VGG_CONFIGS`` (``vgg11`` or ``vgg16``).
        num_classes: Output classes (>= 2).
        in_channels: Input channels (3 for CIFAR).
        image_size: Side of the square input: a multiple of 32, at least 32.
    """

    def __init__(self, name: str = "vgg11", num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        if name not in VGG_CONFIGS:
            raise ValueError(f"name must be one of {tuple(VGG_CONFIGS)}, got {name!r}")
        check_classifier_shape(num_classes, in_channels)
        if image_size < VGG_DOWNSAMPLING or image_size % VGG_DOWNSAMPLING:
            raise ValueError(f"image_size must be a multiple of {VGG_DOWNSAMPLING} and >= {VGG_DOWNSAMPLING} for "
                             f"{name} (five 2x2 max-pools halve it exactly), got {image_size}")
        layers: list[nn.Module] = []
        width = in_channels
        for item in VGG_CONFIGS[name]:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                conv = nn.Conv2d(width, item, kernel_size=3, padding=1)
                layers += [conv, nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                width = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)
        for module in self.features:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, in_channels, image_size, image_size]``."""
        return self.classifier(self.pool(self.features(x)).flatten(1))


def vgg11(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> VGG:
    """VGG-11 with batch normalization (configuration A): 8 convolutions."""
    return VGG("vgg11", num_classes, in_channels, image_size)


def vgg16(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> VGG:
    """VGG-16 with batch normalization (configuration D): 13 convolutions."""
    return VGG("vgg16", num_classes, in_channels, image_size)
