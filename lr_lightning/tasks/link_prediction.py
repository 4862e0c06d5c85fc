"""``LinkPredictionTask``: full-batch hyperbolic link prediction (HyboNet encoder, Fermi-Dirac decoder), low-rank.

HyboNet's link prediction (Chen et al., ACL 2022) as SST evaluates it: the encoder's points ``h_i`` score a pair by
``p(i ~ j) = 1 / (exp((d_L^2(h_i, h_j) - r) / t) + 1)``; the loss is HyboNet's margin loss on ``-d_L^2`` (or
HGCN's binary cross-entropy on ``p``) with one negative drawn per training edge every step; ROC-AUC and average
precision on the fixed validation and test pairs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torchmetrics.functional.classification import binary_auroc, binary_average_precision
from typing_extensions import override

from lr_lightning.data.links import LinkGraph, sample_negatives
from lr_lightning.models.hyperbolic import FermiDiracDecoder, HyboNetEncoder, lorentz_squared_distance
from lr_lightning.optim_riemannian import RiemannianAdamW
from lr_lightning.strategies import LowRankStrategy
from lr_lightning.tasks.base import StrategyTask
from lr_lightning.tasks.node_classification import margin_loss

Architecture = Literal["hybonet"]
ARCHITECTURES: tuple[str, ...] = ("hybonet",)
Loss = Literal["margin", "bce"]
LOSSES: tuple[str, ...] = ("margin", "bce")


class LinkPredictionTask(StrategyTask):
    """Predict the held-out edges of one graph (a :class:`lr_lightning.data.links.LinkGraph` batch).

    Training: every step draws ``m`` negatives (``m`` training edges) from the pairs that are not training
    edges, seeded by ``negative_seed + global_step`` so a resumed run draws the same ones. Loss ``margin``
    (HyboNet's): ``mean_{i, c} relu(margin - s_i^+ + s_{i,c})`` over the scores ``s = -d_L^2`` of the pair
    ``(positive_i, negative_i)``; ``bce`` (HGCN's): ``-log p(pos) - log(1 - p(neg))``. Evaluation: ROC-AUC and
    average precision of ``p`` (in float64, so no score saturates to a tie) over the positive and fixed negative
    pairs, and their mean ``auc_ap`` (HyboNet's model selection).

    The strategy converts the encoder's ``layers.<i>.transform.linear`` matrices in ``__init__``; the
    decoder has no parameters.

    Args:
        strategy: The low-rank method (default: ``FullRank()``).
        optimizer: Optimizer factory called with the parameter groups (default: ``RiemannianAdamW``).
        architecture: ``hybonet`` (fully hyperbolic encoder on the Lorentz model).
        in_features: Node feature width; must match the data (``LinkDataModule.num_features``).
        model_dim: Ambient width of the points (16 for ``H^15``, HyboNet's ``dim``).
        num_layers: Graph convolutions (HyboNet's link-prediction ``num_layers``).
        dropout: Dropout on every layer's input.
        curvature: ``k`` of the hyperboloid ``<x, x>_L = -k``.
        loss: ``margin`` (HyboNet's) or ``bce`` (HGCN's).
        margin: The margin of the ``margin`` loss (HyboNet: 30 on Disease-LP, 0.1 on Cora, 2 by default).
        radius: The Fermi-Dirac ``r`` (HGCN: 2).
        temperature: The Fermi-Dirac ``t`` (HGCN: 1).
        negative_seed: Base seed of the training negatives (``None``: ``torch.initial_seed()`` at fit start, which
            ``seed_everything`` sets).
        warmup_steps: Linear LR warmup steps (one step per epoch: the graph is one batch).
        min_lr_ratio: Final LR of the cosine decay relative to the peak (1.0: constant).
    """

    def __init__(
        self,
        strategy: LowRankStrategy | None = None,
        optimizer: OptimizerCallable = RiemannianAdamW,
        architecture: Architecture = "hybonet",
        in_features: int = 16,
        model_dim: int = 16,
        num_layers: int = 2,
        dropout: float = 0.0,
        curvature: float = 1.0,
        loss: Loss = "margin",
        margin: float = 2.0,
        radius: float = 2.0,
        temperature: float = 1.0,
        negative_seed: int | None = None,
        warmup_steps: int = 0,
        min_lr_ratio: float = 1.0,
    ) -> None:
        super().__init__(strategy, optimizer, warmup_steps, min_lr_ratio)
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        for name, value in (("in_features", in_features), ("model_dim", model_dim), ("num_layers", num_layers)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if curvature <= 0:
            raise ValueError(f"curvature must be > 0 (the k of <x, x>_L = -k), got {curvature}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.save_hyperparameters(ignore=["strategy", "optimizer"])
        self.decoder = FermiDiracDecoder(radius, temperature)
        self.install_model()
        self.negative_base = negative_seed

    @override
    def build_model(self) -> nn.Module:
        """The dense encoder the hyperparameters describe."""
        h = self.hparams
        return HyboNetEncoder(h.in_features, h.model_dim, h.num_layers, h.dropout, h.curvature)

    @override
    def forward(self, graph: LinkGraph) -> torch.Tensor:
        """The nodes' points on the hyperboloid, encoded from the training graph."""
        return self.model(graph.x, graph.edge_index, graph.edge_weight)

    def squared_distance(self, points: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """``d_L^2(h_i, h_j)`` for every pair ``(i, j)`` (columns of ``pairs``)."""
        return lorentz_squared_distance(points[pairs[0]], points[pairs[1]], self.hparams.curvature)

    def edge_probability(self, points: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """The Fermi-Dirac ``p(i ~ j)`` of every pair."""
        return self.decoder(self.squared_distance(points, pairs))

    def pair_loss(self, points: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """The loss of positive pair ``i`` against negative pair ``i mod len(negatives)``."""
        negatives = negatives[:, torch.arange(positives.shape[1], device=negatives.device) % negatives.shape[1]]
        d_pos = self.squared_distance(points, positives).float()
        d_neg = self.squared_distance(points, negatives).float()
        if self.hparams.loss == "margin":
            scores = torch.stack([-d_pos, -d_neg], dim=-1)
            return margin_loss(scores, torch.zeros_like(d_pos, dtype=torch.long), self.hparams.margin)
        return (F.binary_cross_entropy_with_logits(self.decoder.logit(d_pos), torch.ones_like(d_pos))
                + F.binary_cross_entropy_with_logits(self.decoder.logit(d_neg), torch.zeros_like(d_neg)))

    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        found = getattr(datamodule, "num_features", None)
        if found is not None and found != self.hparams.in_features:
            raise ValueError(f"the data has num_features={found} but the model was built with "
                             f"in_features={self.hparams.in_features}: set --model.init_args.in_features {found}")

    @override
    def on_fit_start(self) -> None:
        if self.negative_base is None:
            self.negative_base = torch.initial_seed()

    def training_negatives(self, graph: LinkGraph) -> torch.Tensor:
        """One pair per training edge that is not a training edge, drawn with seed ``negative_seed + global_step``."""
        seed = (self.negative_base or 0) + self.global_step
        edges = graph.edge_index[:, graph.edge_index[0] != graph.edge_index[1]]
        return sample_negatives(edges, graph.num_nodes, graph.train_pos.shape[1], seed).to(graph.x.device)

    @override
    def training_step(self, graph: LinkGraph, batch_idx: int) -> torch.Tensor:
        loss = self.pair_loss(self(graph), graph.train_pos, self.training_negatives(graph))
        self.log("train/loss", loss, prog_bar=True, batch_size=1)
        return loss

    def evaluate(self, graph: LinkGraph, split: str) -> dict[str, torch.Tensor]:
        """Loss, ROC-AUC, average precision and their mean on ``split``'s positive and fixed negative pairs."""
        positives, negatives = getattr(graph, f"{split}_pos"), getattr(graph, f"{split}_neg")
        points = self(graph)
        pairs = torch.cat([positives, negatives], dim=1)
        probability = self.decoder(self.squared_distance(points.double(), pairs))
        target = torch.cat([torch.ones(positives.shape[1]), torch.zeros(negatives.shape[1])]).long()
        target = target.to(points.device)
        roc_auc = binary_auroc(probability, target)
        ap = binary_average_precision(probability, target)
        return {"loss": self.pair_loss(points, positives, negatives), "roc_auc": roc_auc, "ap": ap,
                "auc_ap": (roc_auc + ap) / 2}

    def _log_split(self, graph: LinkGraph, split: str) -> None:
        for name, value in self.evaluate(graph, split).items():
            self.log(f"{split}/{name}", value.float(), prog_bar=split == "val" and name == "roc_auc", batch_size=1,
                     sync_dist=True)

    @override
    def validation_step(self, graph: LinkGraph, batch_idx: int) -> None:
        self._log_split(graph, "val")

    @override
    def test_step(self, graph: LinkGraph, batch_idx: int) -> None:
        self._log_split(graph, "test")
