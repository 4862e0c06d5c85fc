"""``StrategyTask``: what every task shares: a ``model`` converted by a low-rank strategy."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch
from geoopt.optim.mixin import OptimMixin
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from typing_extensions import override

from lr_lightning.callbacks import LowRankCallback
from lr_lightning.callbacks.lowrank import CHECKPOINT_KEY
from lr_lightning.optim_riemannian import is_manifold_point
from lr_lightning.schedules import warmup_cosine
from lr_lightning.strategies import FullRank, LowRankStrategy, strategy_from_config


class StrategyTask(L.LightningModule):
    """A LightningModule whose ``self.model`` (from :meth:`build_model`) is converted by ``self.strategy``.

    Subclasses call ``super().__init__(strategy, optimizer, warmup_steps, min_lr_ratio)``, save their
    hyperparameters (``warmup_steps`` and ``min_lr_ratio`` among them), then call :meth:`install_model`,
    which converts what :meth:`build_model` returns. The base class runs the strategy's
    :class:`LowRankCallback` (which applies the strategy's LR multipliers and optimizer wrapper),
    builds the optimizer from :meth:`param_groups` and a per-step scheduler from :meth:`lr_schedule`,
    and re-applies a checkpoint's strategy in ``load_from_checkpoint``.
    """

    def __init__(self, strategy: LowRankStrategy | None, optimizer: Callable[..., torch.optim.Optimizer],
                 warmup_steps: int, min_lr_ratio: float) -> None:
        super().__init__()
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.strategy = strategy if strategy is not None else FullRank()
        self.optimizer_factory = optimizer

    def build_model(self) -> nn.Module:
        """A fresh, unconverted model from ``self.hparams``."""
        raise NotImplementedError

    def install_model(self) -> None:
        """``self.model = build_model()``, converted in place by the strategy (module names start with ``model.``)."""
        self.model = self.build_model()
        self.strategy.apply(self)

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: the strategy's (each tagged with its ``lowrank_role``), with any
        ``ManifoldParameter`` points moved into a ``manifold`` group without weight decay."""
        groups = []
        for group in self.strategy.param_groups(self):
            euclidean = [p for p in group["params"] if not is_manifold_point(p)]
            if euclidean:
                groups.append({**group, "params": euclidean})
        points = [p for p in self.parameters() if p.requires_grad and is_manifold_point(p)]
        if points:
            groups.append({"params": points, "lowrank_role": "manifold", "weight_decay": 0.0})
        return groups

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer factory called with :meth:`param_groups`; with manifold points it must keep them on their
        manifold (a geoopt optimizer such as :class:`RiemannianAdamW`), and hold all of them."""
        optimizer = self.optimizer_factory(self.param_groups())
        expected = sum(is_manifold_point(p) for p in self.parameters() if p.requires_grad)
        held = sum(len(g["params"]) for g in optimizer.param_groups if g.get("lowrank_role") == "manifold")
        if held != expected:
            raise RuntimeError(f"the model had {expected} ManifoldParameter(s) but {held} remain: the distributed "
                               f"strategy replaced them (FSDP drops the class); use DDP or a single device")
        if held and not isinstance(optimizer, OptimMixin):
            raise TypeError(f"optimizer {type(optimizer).__name__} would move the manifold points off the manifold: "
                            f"use lr_lightning.optim_riemannian.RiemannianAdamW or a geoopt optimizer")
        return optimizer

    def total_steps(self) -> int | None:
        """Optimizer steps of the whole run, or ``None`` if it has no planned end (``max_steps=-1``, no epoch limit)."""
        total = self.trainer.estimated_stepping_batches
        return int(total) if math.isfinite(total) else None

    def lr_schedule(self) -> Callable[[int], float]:
        """The base LR factor per optimizer step: linear warmup, then cosine decay to ``min_lr_ratio`` at the end
        of the run (no decay when the run has no planned end)."""
        total = self.total_steps()
        return partial(warmup_cosine, warmup_steps=self.hparams.warmup_steps,
                       total_steps=total if total is not None else 2**62, min_lr_ratio=self.hparams.min_lr_ratio)

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.build_optimizer()
        scheduler = LambdaLR(optimizer, self.lr_schedule())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Re-apply the checkpoint's strategy before its weights load (``load_from_checkpoint``)."""
        config = checkpoint.get(CHECKPOINT_KEY)
        if config is None or config == self.strategy.to_config():
            return
        if self._trainer is not None:
            raise ValueError(f"the checkpoint was trained with {config['class_path']} {config['init_args']}, "
                             f"but this task uses {self.strategy!r}")
        self.strategy = strategy_from_config(config)
        self.install_model()

    @override
    def configure_callbacks(self) -> list[L.Callback]:
        return [LowRankCallback(self.strategy)]
