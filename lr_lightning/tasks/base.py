"""``StrategyTask``: what every task shares: a ``model`` converted by a low-rank strategy."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import nn

from lr_lightning.callbacks import LowRankCallback
from lr_lightning.callbacks.lowrank import CHECKPOINT_KEY
from lr_lightning.strategies import LowRankStrategy, strategy_from_config


class StrategyTask(L.LightningModule):
    """A LightningModule whose ``self.model`` (from :meth:`build_model`) is converted by ``self.strategy``.

    Subclasses build the model from their hyperparameters in :meth:`build_model` and call
    :meth:`install_model` in ``__init__``; the base class runs the strategy's :class:`LowRankCallback`
    and re-applies a checkpoint's strategy in ``load_from_checkpoint``.
    """

    strategy: LowRankStrategy

    def build_model(self) -> nn.Module:
        """A fresh, unconverted model from ``self.hparams``."""
        raise NotImplementedError

    def install_model(self) -> None:
        """``self.model = build_model()``, converted in place by the strategy (module names start with ``model.``)."""
        self.model = self.build_model()
        self.strategy.apply(self)

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

    def configure_callbacks(self) -> list[L.Callback]:
        return [LowRankCallback(self.strategy)]
