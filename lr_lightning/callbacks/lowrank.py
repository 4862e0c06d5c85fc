"""``LowRankCallback``: apply a strategy to any LightningModule and run its periodic operation."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.tensor import DTensor

from lr_lightning.optim import StateEdit
from lr_lightning.strategies.base import LowRankStrategy

CHECKPOINT_KEY = "lowrank_strategy"
"""Checkpoint entry holding ``strategy.to_config()``, so a loader can re-apply the strategy."""


class LowRankCallback(L.Callback):
    """Converts the model in ``setup`` and runs ``strategy.update`` on optimizer steps.

    ``setup`` runs before ``configure_model``, the DDP/FSDP wrap and ``configure_optimizers``, so
    the optimizer sees the factorized parameters. The periodic operation fires in
    ``on_train_batch_end`` once per completed optimizer step (``trainer.global_step``), so gradient
    accumulation and validation never shift it; ``strategy.after_optimizer_step`` (a projection)
    runs there on every step first, ``strategy.update_at_epoch_end`` at each epoch's end and
    ``strategy.before_optimizer_step`` (gradient edits) after AMP unscaling. The optimizer-state
    edits these return are applied in place (the fraction of state entries changed is logged, so a
    reset that resets nothing shows), and the converted layers are broadcast from process 0
    afterwards so replicas cannot drift. ``strategy.metrics`` (ranks, regularizer values) is logged
    after each operation and every ``log_every_n_steps`` optimizer steps.

    Args:
        strategy: The low-rank method to apply.
        verbose: Print the strategy's report (per-layer ranks and parameter counts) at fit start.
    """

    def __init__(self, strategy: LowRankStrategy, verbose: bool = True) -> None:
        if not isinstance(strategy, LowRankStrategy):
            raise TypeError(f"strategy must be a LowRankStrategy, got {type(strategy).__name__}")
        self.strategy = strategy
        self.verbose = verbose
        self.last_step = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.strategy.apply(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_optimizers(trainer, pl_module)
        if self.verbose:
            rank_zero_info(str(self.strategy.report(pl_module)))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        edits = self.strategy.before_optimizer_step(pl_module, trainer.global_step)
        if edits:
            apply_edits_([optimizer], edits)
            broadcast_layers_(self.strategy.layers(pl_module))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step <= self.last_step:
            return
        self.last_step = step
        self.strategy.after_optimizer_step(pl_module, step)
        if self.strategy.should_update(step):
            self._run(trainer, pl_module, self.strategy.update(pl_module, step))
        elif step % trainer.log_every_n_steps == 0:
            self._log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        edits = self.strategy.update_at_epoch_end(pl_module, trainer.current_epoch)
        if edits:
            self._run(trainer, pl_module, edits)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, edits: list[StateEdit]) -> None:
        """Apply an operation's optimizer-state edits, re-sync the layers from process 0, log."""
        zeroed, seen = apply_edits_(trainer.optimizers, edits)
        broadcast_layers_(self.strategy.layers(pl_module))
        self._log(trainer, pl_module, {"lowrank/optimizer_state_zeroed": zeroed / seen} if seen else {})

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.strategy.to_config()

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "strategy": self.strategy.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = state_dict["last_step"]
        self.strategy.load_state_dict(state_dict["strategy"])

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, extra: dict[str, float] | None = None) -> None:
        metrics = {**self.strategy.metrics(pl_module), **(extra or {})}
        for logger in trainer.loggers if metrics else []:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _check_optimizers(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Fail if the optimizer misses factor parameters (built before conversion, e.g. CLI --optimizer)."""
        if not trainer.optimizers:
            return
        held = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        missing = [f"{name}.{pname}" for name, layer in self.strategy.layers(pl_module)
                   for pname, p in layer.named_parameters(recurse=False)
                   if p.requires_grad and id(p) not in held]
        if missing:
            raise RuntimeError(
                f"The optimizer does not hold {len(missing)} trainable low-rank parameters, e.g. "
                f"{missing[:3]}: it was built before the strategy converted the model. Build it in "
                "configure_optimizers from strategy.param_groups(self) (with LightningCLI, take an "
                "`optimizer: OptimizerCallable` argument instead of --optimizer)."
            )


def apply_edits_(optimizers: list[Any], edits: list[StateEdit]) -> tuple[int, int]:
    """Apply every edit to every optimizer; return (state entries changed, state entries seen)."""
    changed = seen = 0
    for optimizer in optimizers:
        for edit in edits:
            c, s = edit.apply_(optimizer)
            changed, seen = changed + c, seen + s
    return changed, seen


@torch.no_grad()
def broadcast_layers_(layers: list[tuple[str, nn.Module]]) -> None:
    """Copy process 0's replicated tensors of ``layers`` to every process (sharded DTensors are skipped)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for _, layer in layers:
        for tensor in [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]:
            if not isinstance(tensor, DTensor):
                dist.broadcast(tensor.data, src=0)
