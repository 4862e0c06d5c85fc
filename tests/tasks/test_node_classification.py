"""NodeClassificationTask: every strategy trains HyboNet with its points kept on the hyperboloid; RiemannianAdamW is
AdamW on Euclidean tensors and RiemannianAdam on points; parameter groups, checks and checkpoints."""

import copy
from functools import partial

import geoopt
import lightning as L
import pytest
import torch

from lr_lightning.data import GraphDataModule
from lr_lightning.layers.base import LowRankLayer
from lr_lightning.models.hyperbolic import lorentz_residual
from lr_lightning.strategies import SST, TDLRT, FullRank, InRank, LoRA, ReLoRA, SVDTraining
from lr_lightning.tasks import NodeClassificationTask, RiemannianAdamW

TREE = {"tree_nodes": 150, "tree_classes": 3, "tree_features": 6, "tree_signal": 0.5}
TINY = {"in_features": 6, "num_classes": 3, "model_dim": 8, "num_layers": 2}


def _trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, default_root_dir=tmp_path, num_sanity_val_steps=0, **kw)


def _on_manifold(task: NodeClassificationTask, data: GraphDataModule) -> float:
    graph = data.graph
    with torch.no_grad():
        points = task.model.embed(graph.x, graph.edge_index, graph.edge_weight)
    prototypes = task.model.decoder.prototypes
    return max(lorentz_residual(points).abs().max().item(), lorentz_residual(prototypes).abs().max().item())


STRATEGIES = [
    FullRank(),
    LoRA(rank=2, alpha=4.0),
    ReLoRA(rank=2, alpha=4.0, merge_every=10, reset="full", restart_warmup_steps=2),
    SST(rank=2, iteration_interval=10, restart_warmup_steps=2),
    InRank(init_rank=1, buffer=2, max_rank=4, warmup_steps=5, check_every=5, switch_step=20, switch_epoch=None),
    TDLRT(init_rank=2, max_rank=4, augment_every=5),
    SVDTraining(sparsify_at=10, prune_at=20),
]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: type(s).__name__)
def test_every_strategy_trains_hybonet_and_keeps_its_points_on_the_hyperboloid(strategy, tmp_path):
    torch.manual_seed(0)
    data = GraphDataModule(**TREE)
    task = NodeClassificationTask(strategy=copy.deepcopy(strategy), optimizer=partial(RiemannianAdamW, lr=0.02), **TINY)
    start = task.model.decoder.prototypes.detach().clone()
    data.setup()
    with torch.no_grad():
        first_loss = task._loss(task(data.graph)[data.graph.train_index], data.graph.y[data.graph.train_index])
    _trainer(tmp_path, max_epochs=30).fit(task, data)
    if not isinstance(strategy, FullRank):
        assert all(isinstance(layer.transform.linear, LowRankLayer) for layer in task.model.layers)
    prototypes = task.model.decoder.prototypes
    assert isinstance(prototypes, geoopt.ManifoldParameter)
    assert (prototypes - start).abs().max() > 1e-3  # the Riemannian step moved them
    assert _on_manifold(task, data) < 1e-4
    with torch.no_grad():
        last_loss = task._loss(task(data.graph)[data.graph.train_index], data.graph.y[data.graph.train_index])
    assert last_loss < 0.8 * first_loss


def test_full_rank_hybonet_learns_the_tree_well_above_chance(tmp_path):
    torch.manual_seed(0)
    data = GraphDataModule(**TREE)
    task = NodeClassificationTask(optimizer=partial(RiemannianAdamW, lr=0.02), **TINY)
    trainer = _trainer(tmp_path, max_epochs=60)
    trainer.fit(task, data)
    result = trainer.test(task, data, verbose=False)[0]
    assert result["test/acc"] > 0.8 and result["test/f1"] > 0.7  # chance is 1/3


def test_riemannian_adamw_is_adamw_on_tensors_and_riemannian_adam_on_points():
    torch.manual_seed(0)
    manifold = geoopt.Lorentz()
    weight = torch.nn.Parameter(torch.randn(4, 3))
    point = geoopt.ManifoldParameter(manifold.random_normal(5, 4, std=0.5).data, manifold=manifold)
    ref_weight = torch.nn.Parameter(weight.detach().clone())
    ref_point = geoopt.ManifoldParameter(point.detach().clone(), manifold=manifold)
    ours = RiemannianAdamW([{"params": [weight], "weight_decay": 0.1}, {"params": [point], "weight_decay": 0.0}],
                           lr=0.05, stabilize=2)
    adamw = torch.optim.AdamW([ref_weight], lr=0.05, weight_decay=0.1)
    radam = geoopt.optim.RiemannianAdam([ref_point], lr=0.05, stabilize=2)
    for _ in range(5):
        for w, p, optimizers in ((weight, point, [ours]), (ref_weight, ref_point, [adamw, radam])):
            loss = (w ** 2).sum() + (p[:, 1:] * torch.arange(1.0, 4.0)).sum()
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
    torch.testing.assert_close(weight, ref_weight)
    torch.testing.assert_close(point, ref_point)
    assert lorentz_residual(point).abs().max() < 1e-4
    assert torch.is_tensor(ours.state[weight]["step"])  # a strategy's state reset can zero it


def test_points_get_their_own_group_without_weight_decay():
    task = NodeClassificationTask(strategy=SST(rank=2), **TINY)
    groups = task.param_groups()
    manifold = [g for g in groups if g["lowrank_role"] == "manifold"]
    assert len(manifold) == 1 and manifold[0]["params"] == [task.model.decoder.prototypes]
    assert manifold[0]["weight_decay"] == 0.0
    others = [p for g in groups if g["lowrank_role"] != "manifold" for p in g["params"]]
    assert not any(isinstance(p, geoopt.ManifoldParameter) for p in others)
    assert {"basis", "spectrum"} <= {g["lowrank_role"] for g in groups}


def test_a_euclidean_optimizer_for_manifold_points_is_refused(tmp_path):
    task = NodeClassificationTask(optimizer=torch.optim.AdamW, **TINY)
    with pytest.raises(TypeError, match="would move the manifold points off the manifold"):
        _trainer(tmp_path, max_epochs=1).fit(task, GraphDataModule(**TREE))


def test_the_euclidean_gcn_trains_with_plain_adamw(tmp_path):
    task = NodeClassificationTask(strategy=LoRA(rank=2), optimizer=torch.optim.AdamW, architecture="gcn", **TINY)
    _trainer(tmp_path, max_epochs=2).fit(task, GraphDataModule(**TREE))
    assert isinstance(task.model.layers[0].linear, LowRankLayer)


def test_model_and_data_sizes_must_match_before_training(tmp_path):
    task = NodeClassificationTask(**{**TINY, "in_features": 5})
    with pytest.raises(ValueError, match="num_features=6 but the model was built with in_features=5: "
                                         "set --model.init_args.in_features 6"):
        _trainer(tmp_path, max_epochs=1).fit(task, GraphDataModule(**TREE))


def test_load_from_checkpoint_reapplies_the_strategy(tmp_path):
    torch.manual_seed(0)
    data = GraphDataModule(**TREE)
    task = NodeClassificationTask(strategy=SST(rank=2, iteration_interval=3, restart_warmup_steps=1), **TINY)
    trainer = _trainer(tmp_path, max_epochs=4)
    trainer.fit(task, data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = NodeClassificationTask.load_from_checkpoint(tmp_path / "last.ckpt")
    assert isinstance(loaded.strategy, SST) and loaded.strategy.iteration_interval == 3
    assert isinstance(loaded.model.decoder.prototypes, geoopt.ManifoldParameter)
    torch.testing.assert_close(loaded.eval()(data.graph), task.eval()(data.graph))
