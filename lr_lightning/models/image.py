"""The image-classification networks by name: ``build_image_model("resnet20", num_classes=10, ...)``.

=============  ==========================================================  =====================================
architecture   network                                                     ``image_size``
=============  ==========================================================  =====================================
``lenet5``     DLRT's LeNet-5 (conv 20, conv 50, fc 500; :mod:`.lenet`)    >= 28
``vgg11``      VGG-11 with batch norm, CIFAR head (:mod:`.vgg`)            a multiple of 32, >= 32
``vgg16``      VGG-16 with batch norm, CIFAR head                          a multiple of 32, >= 32
``resnet20``   He et al.'s CIFAR ResNet-20, option-A shortcuts             >= 8
``resnet32``   ResNet-32, option A (:mod:`.resnet`)                        >= 8
``resnet56``   ResNet-56, option A                                         >= 8
``resnet110``  ResNet-110, option A                                        >= 8
``resnet18``   CIFAR ResNet-18 (64-channel 3x3 stem, 1x1 projections)      >= 8
=============  ==========================================================  =====================================
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lr_lightning.models.lenet import LeNet5
from lr_lightning.models.resnet import resnet18, resnet20, resnet32, resnet56, resnet110
from lr_lightning.models.vgg import vgg11, vgg16

IMAGE_ARCHITECTURES: tuple[str, ...] = ("lenet5", "vgg11", "vgg16", "resnet20", "resnet32", "resnet56", "resnet110",
                                        "resnet18")

CONSTRUCTORS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": LeNet5,
    "vgg11": vgg11,
    "vgg16": vgg16,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet18": resnet18,
}
"""Each called as ``constructor(num_classes=..., in_channels=..., image_size=...)``."""


def build_image_model(architecture: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The network ``architecture`` (one of ``IMAGE_ARCHITECTURES``) for square ``image_size`` inputs with
    ``in_channels`` channels and ``num_classes`` outputs (logits ``[B, num_classes]``).

    Raises ``ValueError`` naming the parameter for an unknown architecture, ``num_classes < 2``,
    ``in_channels < 1`` or an ``image_size`` the network cannot take (see the module's table).
    """
    if architecture not in CONSTRUCTORS:
        raise ValueError(f"architecture must be one of {IMAGE_ARCHITECTURES}, got {architecture!r}")
    for name, value, low in (("num_classes", num_classes, 2), ("in_channels", in_channels, 1),
                             ("image_size", image_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return CONSTRUCTORS[architecture](num_classes=num_classes, in_channels=in_channels, image_size=image_size)
