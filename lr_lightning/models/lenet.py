"""LeNet-5 as in DLRT's MNIST experiment, in plain PyTorch.

Source: Schotthöfer, Zangrando, Kusch, Ceruti, Tudisco, "Low-rank lottery tickets: finding efficient low-rank
neural networks via matrix differential equations", NeurIPS 2022 (DLRT), whose code
(COMPiLELab/DLRT-Net, ``models_folder/Lenet5.py``) builds::

    conv 5x5 (in -> 20) -> ReLU -> max-pool 2 -> conv 5x5 (20 -> 50) -> ReLU -> max-pool 2
    -> flatten (800 for 28x28) -> Linear 800 -> 500 -> ReLU -> Linear 500 -> num_classes

(LeCun et al.'s original LeNet-5 has 6 and 16 feature maps and three dense layers; this is the 20/50/500
variant of Caffe's MNIST example that DLRT and the low-rank literature use.)

The convolutions and dense layers are plain ``nn.Conv2d`` / ``nn.Linear`` attributes called as submodules, so a
strategy finds them by name: ``conv1``, ``conv2``, ``fc`` and the output head ``classifier`` (which strategies
leave dense by default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lr_lightning.models.checks import check_classifier_shape

LENET5_MIN_IMAGE_SIZE = 28
"""The smallest ``image_size`` accepted: LeNet-5 is a network for 28x28 digits (32x32 images work as well)."""


def lenet5_feature_size(image_size: int) -> int:
    """Side of the feature maps after both conv 5x5 + max-pool 2 stages: ``((s - 4) // 2 - 4) // 2`` (4 for 28)."""
    return ((image_size - 4) // 2 - 4) // 2


class LeNet5(nn.Module):
    """LeNet-5 (DLRT's 20/50/500 variant) for square ``image_size x image_size`` images.

    Args:
        num_classes: Output classes (>= 2).
        in_channels: Input channels (1 for digits, 3 for colour images).
        image_size: Side of the square input; at least 28 (``fc`` takes ``50 * s * s`` inputs with
            ``s = lenet5_feature_size(image_size)``: 800 for 28x28, 1250 for 32x32).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        check_classifier_shape(num_classes, in_channels)
        if image_size < LENET5_MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be >= {LENET5_MIN_IMAGE_SIZE} for lenet5 (a network for 28x28 digits, "
                             f"two conv 5x5 + max-pool 2 stages), got {image_size}")
        side = lenet5_feature_size(image_size)
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.fc = nn.Linear(50 * side * side, 500)
        self.classifier = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, in_channels, image_size, image_size]``."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.classifier(F.relu(self.fc(x.flatten(1))))
