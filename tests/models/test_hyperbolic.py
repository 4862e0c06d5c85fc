"""HyboNet on the Lorentz model: every layer maps onto the hyperboloid, strategies convert exactly the Lorentz
linear matrices, SST's conversion changes no output, the decoder is a (negative squared) Lorentzian distance."""

import geoopt
import pytest
import torch
from torch import nn

from lr_lightning.layers import SpectralLinear
from lr_lightning.layers.base import LowRankLayer
from lr_lightning.models import GCN, HyboNet, LorentzLinear
from lr_lightning.models.gcn import propagate
from lr_lightning.models.hyperbolic import LorentzAggregation, lorentz_inner, lorentz_residual
from lr_lightning.strategies import SST, TDLRT, InRank, LoRA, ReLoRA, SVDTraining


def _points(n: int, dim: int, k: float = 1.0, scale: float = 0.5) -> torch.Tensor:
    manifold = geoopt.Lorentz(k=k)
    return manifold.expmap0(nn.functional.pad(scale * torch.randn(n, dim - 1), (1, 0)))


def _graph(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    source = torch.arange(1, n)
    target = torch.div(source - 1, 2, rounding_mode="floor")
    edge_index = torch.cat([torch.stack([source, target]), torch.stack([target, source]),
                            torch.arange(n).repeat(2, 1)], dim=1)
    return edge_index, torch.rand(edge_index.shape[1]) + 0.1


@pytest.mark.parametrize("k", [1.0, 2.5])
def test_lorentz_linear_lands_on_the_hyperboloid_for_any_weight(k):
    torch.manual_seed(0)
    layer = LorentzLinear(9, 6, curvature=k)
    with torch.no_grad():
        layer.linear.weight.normal_(0, 3.0)  # far from the init: the constraint holds by construction
        layer.linear.bias.normal_()
    y = layer(_points(32, 9, k))
    assert lorentz_residual(y, k).abs().max() < 1e-4
    assert (y[:, 0] > 0).all()  # upper sheet
    assert y[:, 0].min() >= 1.1 * k ** 0.5 - 1e-6  # HyboNet's time floor 1.1 sqrt(k)


def test_lorentz_linear_init_ignores_the_input_time_coordinate():
    layer = LorentzLinear(9, 6)
    assert layer.linear.weight[:, 0].abs().max() == 0 and layer.linear.bias.abs().max() == 0


def test_aggregation_is_the_lorentzian_centroid():
    torch.manual_seed(0)
    x = _points(12, 5)
    edge_index, weight = _graph(12)
    out = LorentzAggregation()(x, edge_index, weight)
    assert lorentz_residual(out).abs().max() < 1e-4
    alone = torch.arange(12).repeat(2, 1)  # self-loops only: every point is its own centroid
    torch.testing.assert_close(LorentzAggregation()(x, alone, torch.full((12,), 3.0)), x, atol=1e-5, rtol=1e-5)


def test_decoder_logits_are_minus_the_squared_lorentzian_distance():
    torch.manual_seed(0)
    model = HyboNet(in_features=6, hidden_dim=5, num_classes=3)
    x, prototypes = _points(10, 5), model.decoder.prototypes
    logits = model.decoder(x)
    diff = x[:, None, :] - prototypes[None, :, :]
    squared = (diff[..., 1:] ** 2).sum(-1) - diff[..., 0] ** 2
    torch.testing.assert_close(logits, -squared, atol=1e-4, rtol=1e-4)
    geodesic = model.manifold.dist(x[:, None, :], prototypes[None, :, :])
    assert torch.equal(logits.argmax(1), geodesic.argmin(1))  # the nearest prototype wins
    assert torch.allclose(lorentz_inner(prototypes, prototypes).diagonal(), torch.tensor(-1.0), atol=1e-4)


def test_prototypes_are_manifold_parameters_and_the_input_map_is_expmap0():
    model = HyboNet(in_features=4, hidden_dim=8, num_classes=3)
    assert isinstance(model.decoder.prototypes, geoopt.ManifoldParameter)
    assert model.decoder.prototypes.manifold is model.manifold
    assert lorentz_residual(model.decoder.prototypes).abs().max() < 1e-5


STRATEGIES = [LoRA(rank=2), ReLoRA(rank=2, merge_every=5, restart_warmup_steps=1), SST(rank=2),
              InRank(init_rank=1, buffer=1, max_rank=4), TDLRT(init_rank=2, max_rank=3), SVDTraining()]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: type(s).__name__)
def test_every_strategy_converts_exactly_the_lorentz_linear_matrices(strategy):
    torch.manual_seed(0)
    model = strategy.apply(HyboNet(in_features=10, hidden_dim=8, num_classes=3, num_layers=3))
    converted = [name for name, m in model.named_modules() if isinstance(m, LowRankLayer)]
    assert converted == [f"layers.{i}.transform.linear" for i in range(3)]
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    x = torch.rand(12, 10)
    h = model.embed(x, *_graph(12))
    assert lorentz_residual(h).abs().max() < 1e-4


def test_sst_conversion_keeps_every_lorentz_layer_and_the_model_output():
    torch.manual_seed(0)
    model = HyboNet(in_features=10, hidden_dim=8, num_classes=3, num_layers=2).eval()
    x, graph = torch.rand(12, 10), _graph(12)
    points = model.manifold.expmap0(nn.functional.pad(x, (1, 0)))
    before_layer = model.layers[0].transform(points)
    before = model(x, *graph)
    SST(rank=2).apply(model)
    assert isinstance(model.layers[0].transform.linear, SpectralLinear)
    torch.testing.assert_close(model.layers[0].transform(points), before_layer, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x, *graph), before, atol=1e-4, rtol=1e-5)


def test_gcn_propagation_is_the_normalized_adjacency_product_and_its_classifier_stays_dense():
    torch.manual_seed(0)
    edge_index, weight = _graph(12)
    x = torch.randn(12, 4)
    dense = torch.zeros(12, 12).index_put_((edge_index[1], edge_index[0]), weight, accumulate=True)
    torch.testing.assert_close(propagate(x, edge_index, weight), dense @ x)
    model = LoRA(rank=2).apply(GCN(in_features=4, hidden_dim=8, num_classes=3, num_layers=3))
    converted = [name for name, m in model.named_modules() if isinstance(m, LowRankLayer)]
    assert converted == ["layers.0.linear", "layers.1.linear"]
    assert type(model.classifier) is nn.Linear
    assert model(x, edge_index, weight).shape == (12, 3)
