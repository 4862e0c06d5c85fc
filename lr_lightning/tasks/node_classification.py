"""``NodeClassificationTask``: full-batch node classification, hyperbolic (HyboNet) or Euclidean GCN, with a strategy.

One optimizer steps everything, so Lightning's automatic optimization, the strategies' in-place
optimizer-state resets and ReLoRA's or SST's per-group LR schedule work unchanged:
:class:`RiemannianAdamW` applies geoopt's ``RiemannianAdam`` step to every ``ManifoldParameter``
(the class prototypes on the hyperboloid) and AdamW's decoupled step to every other tensor. Two
optimizers would need manual optimization, where ``trainer.global_step`` counts both and shifts
every strategy's schedule; one ``RiemannianAdam`` over all tensors would give the Euclidean
weights coupled L2 decay instead of AdamW's and keep its step count as an int that a strategy's
state reset cannot zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

import geoopt
import torch
import torch.nn.functional as F
from geoopt import ManifoldParameter, ManifoldTensor
from geoopt.optim.mixin import OptimMixin
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from typing_extensions import override

from lr_lightning.data.graphs import Graph
from lr_lightning.models.gcn import GCN
from lr_lightning.models.hyperbolic import HyboNet
from lr_lightning.strategies import LowRankStrategy
from lr_lightning.tasks.base import StrategyTask

Architecture = Literal["hybonet", "gcn"]
ARCHITECTURES: tuple[str, ...] = ("hybonet", "gcn")
Loss = Literal["cross_entropy", "margin"]
LOSSES: tuple[str, ...] = ("cross_entropy", "margin")


def is_manifold_point(p: torch.Tensor) -> bool:
    """Whether ``p`` lives on a manifold that a Riemannian step must respect."""
    return isinstance(p, (ManifoldParameter, ManifoldTensor))


@contextmanager
def hidden_gradients(params: list[torch.Tensor]) -> Iterator[None]:
    """Set ``p.grad = None`` for ``params`` inside the block (optimizers skip them), restore afterwards."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad


class RiemannianAdamW(geoopt.optim.RiemannianAdam):
    """AdamW on Euclidean tensors, geoopt's RiemannianAdam on ``ManifoldParameter`` points, in one optimizer.

    Euclidean: ``p <- p - lr (m_hat / (sqrt(v_hat) + eps) + lambda p)`` (``torch.optim.Adam`` with
    decoupled decay). Points: ``g <- egrad2rgrad(p, grad)``, Adam moments, ``p <- retr(p, -lr d)``
    with the first moment transported, and every ``stabilize`` steps a projection back onto the
    manifold. Give the points' group ``weight_decay=0`` (``NodeClassificationTask`` does).

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate.
        betas: Adam's ``(beta_1, beta_2)``.
        eps: Adam's ``eps``.
        weight_decay: AdamW's decoupled decay ``lambda`` (Euclidean tensors).
        stabilize: Project the points onto their manifold every this many steps (``None``: never).
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, stabilize: int | None = 10) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, stabilize=stabilize,
                         decoupled_weight_decay=True)

    @override
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"]]
        with hidden_gradients([p for p in params if is_manifold_point(p)]):
            torch.optim.Adam.step(self)
        with hidden_gradients([p for p in params if not is_manifold_point(p)]):
            geoopt.optim.RiemannianAdam.step(self)
        return loss


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
        self.manifold_points = sum(is_manifold_point(p) for p in self.parameters())
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

    @override
    def param_groups(self) -> list[dict[str, Any]]:
        """The strategy's groups, with the manifold points moved into a ``manifold`` group without weight decay."""
        groups = []
        for group in self.strategy.param_groups(self):
            euclidean = [p for p in group["params"] if not is_manifold_point(p)]
            if euclidean:
                groups.append({**group, "params": euclidean})
        points = [p for p in self.parameters() if p.requires_grad and is_manifold_point(p)]
        if points:
            groups.append({"params": points, "lowrank_role": "manifold", "weight_decay": 0.0})
        return groups

    @override
    def build_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over :meth:`param_groups`; it must keep the manifold points on their manifold."""
        optimizer = super().build_optimizer()
        held = sum(len(g["params"]) for g in optimizer.param_groups if g.get("lowrank_role") == "manifold")
        if held != self.manifold_points:
            raise RuntimeError(f"the model had {self.manifold_points} ManifoldParameter(s) but {held} remain: the "
                               f"distributed strategy replaced them (FSDP drops the class); use DDP or a single device")
        if held and not isinstance(optimizer, OptimMixin):
            raise TypeError(f"optimizer {type(optimizer).__name__} would move the manifold points off the manifold: "
                            f"use lr_lightning.tasks.node_classification.RiemannianAdamW or a geoopt optimizer")
        return optimizer
