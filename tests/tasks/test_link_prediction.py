"""LinkPredictionTask: the Fermi-Dirac decoder on Lorentz distances, every strategy trains HyboNet's encoder with its
points on the hyperboloid, SST's conversion keeps the scores, full rank predicts the tree's held-out edges, the
metrics, seeded negatives, bad input, and every configs/link config runs."""

import copy
import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from lr_lightning.cli import run_cli
from lr_lightning.data import LinkDataModule
from lr_lightning.data.links import sample_negatives
from lr_lightning.layers.base import LowRankLayer
from lr_lightning.models.hyperbolic import FermiDiracDecoder, lorentz_residual, lorentz_squared_distance
from lr_lightning.strategies import SST, TDLRT, FullRank, InRank, LoRA, ReLoRA, SVDTraining
from lr_lightning.tasks import LinkPredictionTask, RiemannianAdamW

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "link").glob("*.yaml"))
TREE = {"tree_nodes": 150, "tree_classes": 4, "tree_features": 8}
TINY = {"in_features": 8, "model_dim": 8, "num_layers": 2}
STRATEGIES = [
    FullRank(),
    LoRA(rank=2, alpha=4.0),
    ReLoRA(rank=2, alpha=4.0, merge_every=10, reset="full", restart_warmup_steps=2),
    SST(rank=2, iteration_interval=10, restart_warmup_steps=2),
    InRank(init_rank=1, buffer=2, max_rank=4, warmup_steps=5, check_every=5, switch_step=20, switch_epoch=None),
    TDLRT(init_rank=2, max_rank=4, augment_every=5),
    SVDTraining(sparsify_at=10, prune_at=20),
]


def _trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, default_root_dir=tmp_path, num_sanity_val_steps=0, **kw)


def _loaded(**kw) -> LinkDataModule:
    data = LinkDataModule(**{**TREE, **kw})
    data.setup()
    return data


def test_fermi_dirac_decoder_is_the_formula_on_hand_computed_lorentz_distances():
    a, b = math.log(2), math.log(3)  # cosh a = 5/4, sinh a = 3/4; cosh b = 5/3, sinh b = 4/3
    origin = torch.tensor([[1.0, 0.0, 0.0]])
    x = torch.tensor([[5 / 4, 3 / 4, 0.0]])
    y = torch.tensor([[5 / 3, 0.0, 4 / 3]])
    assert lorentz_residual(torch.cat([origin, x, y])).abs().max() < 1e-6
    # d^2 = -2 - 2 <u, v>_L: <o, x> = -5/4, <o, y> = -5/3, <x, y> = -25/12
    expected = torch.tensor([0.5, 4 / 3, 13 / 6])
    distances = lorentz_squared_distance(torch.cat([origin, origin, x]), torch.cat([x, y, y]))
    torch.testing.assert_close(distances, expected)
    assert math.isclose(2 * (math.cosh(a) - 1), 0.5) and math.isclose(2 * (math.cosh(b) - 1), 4 / 3)
    decoder = FermiDiracDecoder(radius=2.0, temperature=0.5)
    torch.testing.assert_close(decoder(distances), 1 / (torch.exp((expected - 2.0) / 0.5) + 1))
    task = LinkPredictionTask(in_features=2, model_dim=3, radius=2.0, temperature=0.5)
    points = torch.cat([origin, x, y])
    torch.testing.assert_close(task.edge_probability(points, torch.tensor([[0, 0, 1], [1, 2, 2]])),
                               1 / (torch.exp((expected - 2.0) / 0.5) + 1))
    # on squared distances of learned points
    data = _loaded()
    task = LinkPredictionTask(**TINY)
    with torch.no_grad():
        scores = task.edge_probability(task(data.graph), torch.cat([data.graph.test_pos, data.graph.test_neg], 1))
    assert bool(((scores > 0) & (scores < 1)).all())


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: type(s).__name__)
def test_every_strategy_trains_the_encoder_and_keeps_its_points_on_the_hyperboloid(strategy, tmp_path):
    torch.manual_seed(0)
    data = _loaded()
    graph = data.graph
    task = LinkPredictionTask(strategy=copy.deepcopy(strategy), optimizer=partial(RiemannianAdamW, lr=0.02),
                              negative_seed=0, **TINY)
    negatives = sample_negatives(graph.edge_index, graph.num_nodes, graph.train_pos.shape[1], seed=99)
    with torch.no_grad():
        first_loss = task.pair_loss(task(graph), graph.train_pos, negatives)
    _trainer(tmp_path, max_epochs=30).fit(task, data)
    if not isinstance(strategy, FullRank):
        assert all(isinstance(layer.transform.linear, LowRankLayer) for layer in task.model.layers)
    task.eval()
    with torch.no_grad():
        points = task(graph)
        last_loss = task.pair_loss(points, graph.train_pos, negatives)
    assert lorentz_residual(points).abs().max() < 1e-4
    assert last_loss < 0.9 * first_loss


def test_sst_conversion_leaves_the_scores_unchanged():
    data = _loaded()
    pairs = torch.cat([data.graph.test_pos, data.graph.test_neg], dim=1)
    torch.manual_seed(0)
    dense = LinkPredictionTask(**TINY).eval()
    torch.manual_seed(0)
    sst = LinkPredictionTask(strategy=SST(rank=2), **TINY).eval()
    assert all(isinstance(layer.transform.linear, LowRankLayer) for layer in sst.model.layers)
    with torch.no_grad():
        expected = dense.edge_probability(dense(data.graph), pairs)
        torch.testing.assert_close(sst.edge_probability(sst(data.graph), pairs), expected, atol=1e-5, rtol=1e-4)


def test_full_rank_predicts_the_trees_held_out_edges_well_above_chance(tmp_path):
    torch.manual_seed(0)
    data = LinkDataModule()  # the default: 500 nodes, 8 subtrees, HGCN's split with seed 1234
    task = LinkPredictionTask(optimizer=partial(RiemannianAdamW, lr=0.01, weight_decay=0.01), dropout=0.5,
                              negative_seed=0)
    trainer = _trainer(tmp_path, max_epochs=100, gradient_clip_val=0.5)
    trainer.fit(task, data)
    result = trainer.test(task, data, verbose=False)[0]
    assert result["test/roc_auc"] > 0.8 and result["test/ap"] > 0.7  # chance: 0.5; measured 0.86 and 0.77


def test_metrics_are_roc_auc_and_average_precision_of_the_edge_probabilities():
    data = _loaded()
    graph = data.graph
    task = LinkPredictionTask(**TINY).eval()
    with torch.no_grad():
        metrics = task.evaluate(graph, "test")
        points = task(graph)
        pos = task.edge_probability(points.double(), graph.test_pos)
        neg = task.edge_probability(points.double(), graph.test_neg)
    ordered = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    torch.testing.assert_close(metrics["roc_auc"].double(), ordered.mean(), atol=1e-6, rtol=0)
    scores, labels = torch.cat([pos, neg]), torch.cat([torch.ones_like(pos), torch.zeros_like(neg)])
    ranked = labels[scores.argsort(descending=True)]
    precision_at_hits = ranked.cumsum(0)[ranked == 1] / (torch.nonzero(ranked == 1).flatten() + 1)
    torch.testing.assert_close(metrics["ap"].double(), precision_at_hits.mean(), atol=1e-6, rtol=0)
    torch.testing.assert_close(metrics["auc_ap"], (metrics["roc_auc"] + metrics["ap"]) / 2)


def test_training_negatives_follow_the_step_so_a_resumed_run_draws_the_same(tmp_path):
    data = _loaded()
    task = LinkPredictionTask(negative_seed=5, **TINY)
    again = LinkPredictionTask(negative_seed=5, **TINY)
    first = task.training_negatives(data.graph)
    assert torch.equal(first, again.training_negatives(data.graph))
    assert first.shape == data.graph.train_pos.shape
    assert not torch.equal(first, LinkPredictionTask(negative_seed=6, **TINY).training_negatives(data.graph))


@pytest.mark.parametrize("kwargs, message", [
    ({"architecture": "hgcn"}, r"architecture must be one of \('hybonet',\), got 'hgcn'"),
    ({"curvature": 0.0}, r"curvature must be > 0"),
    ({"curvature": -1.0}, r"curvature must be > 0"),
    ({"loss": "hinge"}, r"loss must be one of \('margin', 'bce'\)"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"temperature": 0.0}, r"temperature must be > 0"),
])
def test_bad_settings_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LinkPredictionTask(**{**TINY, **kwargs})


def test_feature_width_must_match_the_data_before_training(tmp_path):
    with pytest.raises(ValueError, match="num_features=8 but the model was built with in_features=5"):
        _trainer(tmp_path, max_epochs=1).fit(LinkPredictionTask(**{**TINY, "in_features": 5}), LinkDataModule(**TREE))


def test_bce_loss_is_hgcns_cross_entropy_on_the_fermi_dirac_probabilities():
    data = _loaded()
    graph = data.graph
    task = LinkPredictionTask(loss="bce", **TINY).eval()
    with torch.no_grad():
        points = task(graph)
        loss = task.pair_loss(points, graph.val_pos, graph.val_neg)
        pos, neg = task.edge_probability(points, graph.val_pos), task.edge_probability(points, graph.val_neg)
    torch.testing.assert_close(loss, -(pos.log().mean() + (1 - neg).log().mean()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_link_config_parses_and_trains_a_couple_of_steps(config, tmp_path):
    cli = run_cli(save_config_callback=None, args=[
        "fit", "--config", str(config), "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false"])
    assert isinstance(cli.model, LinkPredictionTask) and isinstance(cli.datamodule, LinkDataModule)
    assert cli.trainer.global_step == 2


def test_there_is_a_link_config_for_every_node_config():
    node = {p.name for p in (CONFIGS[0].parents[1] / "node").glob("*.yaml")}
    assert {p.name for p in CONFIGS} == node and len(node) == 8
