import pytest
import torch
from torch import nn

from lr_lightning.layers import LoRALinear
from lr_lightning.strategies import LoRA

ALPHA, RANK = 16.0, 4  # alpha / r = 4: distinct from 1, alpha and 1 / r


def _layer(seed: int = 0) -> tuple[nn.Linear, LoRALinear]:
    """A dense layer and its LoRA wrapper with a random, non-zero ``B``."""
    torch.manual_seed(seed)
    dense = nn.Linear(20, 12)
    layer = LoRALinear.from_linear(dense, RANK, alpha=ALPHA, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn_like(layer.lora_B))
    return dense, layer


def _update(layer: LoRALinear, alpha: float, rank: int) -> torch.Tensor:
    """``(alpha / r) B A`` from the layer's factors."""
    return (alpha / rank) * layer.lora_B.detach() @ layer.lora_A.detach()


def test_output_adds_alpha_over_rank_times_b_a_to_the_frozen_map():
    """``y - (W0 x + b) = x ((alpha / r) B A)^T``."""
    dense, layer = _layer()
    x = torch.randn(3, 5, 20)
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - dense(x), x @ _update(layer, ALPHA, RANK).mT)


def test_merged_weight_is_the_init_plus_alpha_over_rank_times_b_a():
    """``export().weight = dense_weight() = merge_()``'d ``W0`` ``= W0 + (alpha / r) B A``."""
    dense, layer = _layer()
    expected = dense.weight.detach() + _update(layer, ALPHA, RANK)
    exported = layer.export()
    assert isinstance(exported, nn.Linear)
    torch.testing.assert_close(exported.weight, expected)
    torch.testing.assert_close(exported.bias, dense.bias.detach())
    torch.testing.assert_close(layer.dense_weight().detach(), expected)
    layer.merge_()
    torch.testing.assert_close(layer.weight.detach(), expected)


@pytest.mark.parametrize(("alpha", "rank"), [(16.0, 4), (8.0, 2), (3.0, 6)])
def test_strategy_builds_layers_scaled_by_its_alpha_over_rank(tiny_mlp, alpha, rank):
    """``LoRA(rank=r, alpha=alpha)`` converts ``W0`` into ``W0 + (alpha / r) B A``."""
    dense = tiny_mlp.body[0].weight.detach().clone()
    LoRA(rank=rank, alpha=alpha).apply(tiny_mlp)
    layer = tiny_mlp.body[0]
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn_like(layer.lora_B))
        x = torch.randn(4, layer.in_features)
        torch.testing.assert_close(layer(x) - nn.functional.linear(x, dense, layer.bias),
                                   x @ _update(layer, alpha, rank).mT)
