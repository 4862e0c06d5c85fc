"""``NodeClassificationTask``: full-batch node classification, hyperbolic (HyboNet) or Euclidean GCN, with a strategy.

The class prototypes are ``geoopt.ManifoldParameter`` points; :class:`StrategyTask` puts them in their own
parameter group and the default :class:`lr_lightning.optim_riemannian.RiemannianAdamW` keeps them on the hyperboloid.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from typing_extensions import override

from lr_lightning.data.graphs import Graph
from lr_lightning.models.gcn import GCN
from lr_lightning.models.hyperbolic import HyboNet
from lr_lightning.optim_riemannian import RiemannianAdamW
from lr_lightning.strategies import LowRankStrategy
from lr_lightning.tasks.base import StrategyTask

Architecture = Literal["hybonet", "gcn"]
ARCHITECTURES: tuple[str, ...] = ("hybonet", "gcn")
Loss = Literal["cross_entropy", "margin"]
LOSSES: tuple[str, ...] = ("cross_entropy", "margin")


def margin_loss(logits: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """HyboNet's ``mean_{i, c} relu(margin - logit_{i, y_i} + logit_{i, c})``."""
    return F.relu(margin - logits.gather(1, target.unsqueeze(1)) + logits).mean()


class NodeClassificationTask(StrategyTask):
    """Classify the nodes of one graph (a :class:`lr_lightning.data.graphs.Graph` batch) with ``-log p(y_i | G)``
    or HyboNet's margin loss over the training nodes; accuracy and macro-F1 on validation and test nodes.

    The strategy converts the model's ``nn.Linear`` matrices in ``__init__``: for HyboNet the
    ``layers.<i>.transform.linear`` inside every Lorentz linear layer (the re-projection onto the
    hyperboloid is kept), for the GCN the hidden ``layers.<i>.linear`` (its ``classifier`` stays
    dense under ``target_modules=None``). The optimizer is built from ``strategy.param_groups`` with
    the ``ManifoldParameter`` points moved into their own group (``lowrank_role="manifold"``, no
    weight decay); it must be a geoopt optimizer when there are points (the default
    :class:`RiemannianAdamW` is). The LR follows linear warmup and cosine decay to ``min_lr_ratio``
    times the strategy's own factor.

    Args:
        strategy: The low-rank method (default: ``FullRank()``).
        optimizer: Optimizer factory called with the parameter groups (default: ``RiemannianAdamW``).
        architecture: ``hybonet`` (fully hyperbolic, Lorentz model) or ``gcn`` (Euclidean baseline).
        in_features: Node feature width; must match the data (``GraphDataModule.num_features``).
        num_classes: Classes; must match the data.
        model_dim: Model width of every hidden layer (HyboNet: ambient width of the points, e.g. 16 for ``H^15``).
        num_layers: Graph convolutions (the GCN's output layer included).
        dropout: Dropout on every layer's input.
        curvature: HyboNet's ``k`` (``<x, x>_L = -k``).
        loss: ``cross_entropy`` or ``margin`` (HyboNet's).
        margin: The margin of the ``margin`` loss.
        warmup_steps: Linear LR warmup steps (one step per epoch: the graph is one batch).
        min_lr_ratio: Final LR of the cosine decay relative to the peak (1.0: constant).
    """

    def __init__(
        self,
        strategy: LowRankStrategy | None = None,
        optimizer: OptimizerCallable = RiemannianAdamW,
        architecture: Architecture = "hybonet",
        in_features: int = 16,
        num_classes: int = 4,
        model_dim: int = 16,
        num_layers: int = 2,
        dropout: float = 0.0,
        curvature: float = 1.0,
        loss: Loss = "cross_entropy",
        margin: float = 1.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 1.0,
    ) -> None:
        super().__init__(strategy, optimizer, warmup_steps, min_lr_ratio)
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        for name, value in (("in_features", in_features), ("num_classes", num_classes), ("model_dim", model_dim)):
            if value < (2 if name == "num_classes" else 1):
                raise ValueError(f"{name} must be >= {2 if name == 'num_classes' else 1}, got {value}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.save_hyperparameters(ignore=["strategy", "optimizer"])
        self.install_model()
        metrics = {"acc": partial(MulticlassAccuracy, average="micro"),
                   "f1": partial(MulticlassF1Score, average="macro")}
        self.scores = nn.ModuleDict({f"{split}_{name}": make(num_classes=num_classes)
                                      for split in ("val", "test") for name, make in metrics.items()})

    @override
    def build_model(self) -> nn.Module:
        """The dense model the hyperparameters describe."""
        h = self.hparams
        if h.architecture == "hybonet":
            return HyboNet(h.in_features, h.model_dim, h.num_classes, h.num_layers, h.dropout, h.curvature)
        return GCN(h.in_features, h.model_dim, h.num_classes, h.num_layers, h.dropout)

    @override
    def forward(self, graph: Graph) -> torch.Tensor:
        return self.model(graph.x, graph.edge_index, graph.edge_weight)

    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        for name, flag in (("num_features", "in_features"), ("num_classes", "num_classes")):
            found = getattr(datamodule, name, None)
            expected = self.hparams[flag]
            if found is not None and found != expected:
                raise ValueError(f"the data has {name}={found} but the model was built with {flag}={expected}: "
                                 f"set --model.init_args.{flag} {found}")

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.hparams.loss == "margin":
            return margin_loss(logits.float(), target, self.hparams.margin)
        return F.cross_entropy(logits.float(), target)

    @override
    def training_step(self, graph: Graph, batch_idx: int) -> torch.Tensor:
        logits = self(graph)[graph.train_index]
        loss = self._loss(logits, graph.y[graph.train_index])
        self.log("train/loss", loss, prog_bar=True, batch_size=1)
        self.log("train/acc", (logits.argmax(-1) == graph.y[graph.train_index]).float().mean(), batch_size=1)
        return loss

    def _evaluate(self, graph: Graph, split: str) -> None:
        index = getattr(graph, f"{split}_index")
        logits, target = self(graph)[index], graph.y[index]
        self.log(f"{split}/loss", self._loss(logits, target), batch_size=1, sync_dist=True)
        for name in ("acc", "f1"):
            metric = self.scores[f"{split}_{name}"]
            metric(logits, target)
            self.log(f"{split}/{name}", metric, prog_bar=split == "val", batch_size=1)

    @override
    def validation_step(self, graph: Graph, batch_idx: int) -> None:
        self._evaluate(graph, "val")

    @override
    def test_step(self, graph: Graph, batch_idx: int) -> None:
        self._evaluate(graph, "test")
