"""Image-classification networks: every architecture maps a batch to logits, parameter counts equal the published
ones, the layers strategies convert are plain ``nn.Conv2d`` / ``nn.Linear`` submodules, bad arguments are errors."""

import pytest
import torch
from torch import nn

from lr_lightning.models import IMAGE_ARCHITECTURES, LeNet5, build_image_model
from lr_lightning.models.resnet import resnet20, resnet56

SHAPES = {"lenet5": (1, 28)}  # (in_channels, image_size); CIFAR 3x32x32 for the others


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("architecture", IMAGE_ARCHITECTURES)
def test_every_architecture_maps_a_batch_to_logits(architecture):
    torch.manual_seed(0)
    channels, size = SHAPES.get(architecture, (3, 32))
    model = build_image_model(architecture, num_classes=7, in_channels=channels, image_size=size)
    logits = model(torch.randn(2, channels, size, size))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == 7
    assert any(isinstance(m, nn.Conv2d) for m in model.modules())


def test_architecture_list_is_the_constructor_table():
    assert IMAGE_ARCHITECTURES == ("lenet5", "vgg11", "vgg16", "resnet20", "resnet32", "resnet56", "resnet110",
                                   "resnet18")


def test_lenet5_has_dlrts_exact_parameter_count_and_layers():
    model = build_image_model("lenet5", 10, 1, 28)
    assert isinstance(model, LeNet5)
    expected = (20 * 25 + 20) + (50 * 20 * 25 + 50) + (800 * 500 + 500) + (500 * 10 + 10)
    assert _count(model) == expected == 431_080
    assert [(name, type(m)) for name, m in model.named_children()] == [
        ("conv1", nn.Conv2d), ("conv2", nn.Conv2d), ("fc", nn.Linear), ("classifier", nn.Linear)]
    assert model.fc.in_features == 800
    assert build_image_model("lenet5", 10, 3, 32).fc.in_features == 50 * 5 * 5  # 32x32: 28 -> 14 -> 10 -> 5


@pytest.mark.parametrize(("architecture", "expected"), [
    ("resnet20", 269_722),  # He et al. 2016, Table 6: 0.27M (option A)
    ("resnet32", 464_154),  # 0.46M
    ("resnet56", 853_018),  # 0.85M
    ("resnet110", 1_727_962),  # 1.7M
    ("resnet18", 11_173_962),  # CIFAR ResNet-18, 11.2M
    ("vgg11", 9_231_114),  # CIFAR VGG-11-BN with a 512 -> 10 head, 9.2M
    ("vgg16", 14_728_266),  # CIFAR VGG-16-BN, 14.7M
])
def test_parameter_counts_equal_the_published_ones(architecture, expected):
    assert _count(build_image_model(architecture, 10, 3, 32)) == expected


def test_resnet_shortcuts_option_a_has_no_parameters_option_b_projects():
    a, b = resnet20(), resnet20(shortcut="B")
    assert not any(m.kernel_size == (1, 1) for m in a.modules() if isinstance(m, nn.Conv2d))
    projections = [name for name, m in b.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert projections == ["layer2.0.shortcut.0", "layer3.0.shortcut.0"]
    # option B adds two 1x1 convolutions (16->32, 32->64) and their batch norms
    assert _count(b) - _count(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    convs = [m for m in resnet56().modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 2 * 27  # 6n + 2 = 56 weighted layers: the stem, 2 per block, the classifier
    x = torch.randn(2, 3, 32, 32)
    assert a(x).shape == b(x).shape == (2, 10)


def test_resnet18_projects_with_1x1_convolutions_and_batch_norm():
    model = build_image_model("resnet18", 10, 3, 32)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.out_channels == 64
    projections = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert projections == ["layer2.0.shortcut.0", "layer3.0.shortcut.0", "layer4.0.shortcut.0"]
    assert isinstance(model.layer2[0].shortcut[1], nn.BatchNorm2d)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


@pytest.mark.parametrize(("architecture", "channels", "size"), [
    ("lenet5", 3, 32), ("vgg11", 1, 64), ("resnet20", 1, 8), ("resnet18", 3, 8), ("resnet32", 3, 28),
])
def test_other_valid_sizes_and_channels(architecture, channels, size):
    model = build_image_model(architecture, 3, channels, size).eval()
    assert model(torch.randn(2, channels, size, size)).shape == (2, 3)


@pytest.mark.parametrize(("args", "match"), [
    (("alexnet", 10, 3, 32), r"architecture must be one of \('lenet5', 'vgg11'"),
    (("resnet20", 1, 3, 32), "num_classes must be an int >= 2"),
    (("resnet20", 10, 0, 32), "in_channels must be an int >= 1"),
    (("vgg16", 10, 3, 0), "image_size must be an int >= 1"),
    (("lenet5", 10, 1, 27), "image_size must be >= 28 for lenet5"),
    (("vgg11", 10, 3, 48), "image_size must be a multiple of 32 and >= 32 for vgg11"),
    (("vgg16", 10, 3, 16), "image_size must be a multiple of 32 and >= 32 for vgg16"),
    (("resnet56", 10, 3, 7), "image_size must be >= 8 for resnet56"),
    (("resnet18", 10, 3, 4), "image_size must be >= 8 for resnet18"),
])
def test_bad_arguments_raise_naming_the_parameter(args, match):
    with pytest.raises(ValueError, match=match):
        build_image_model(*args)
