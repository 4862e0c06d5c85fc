"""``LowRankCallback``: apply a strategy to any LightningModule and run its periodic operation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.tensor import DTensor

from lr_lightning.optim import StateEdit
from lr_lightning.strategies.base import LowRankStrategy

CHECKPOINT_KEY = "lowrank_strategy"
"""Checkpoint entry holding ``strategy.to_config()``, so a loader can re-apply the strategy."""

CAPACITY_KEY = "lowrank_capacities"
"""Checkpoint entry holding each converted layer's capacity, so a resumed run allocates shrunk layers at it."""


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
        self.stage_two_checkpoint: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Convert the model; when resuming, give shrunk layers the checkpoint's capacities before any wrap."""
        self.strategy.apply(pl_module)
        self.stage_two_checkpoint = None
        if trainer.ckpt_path:
            match_capacities_(self.strategy, pl_module, saved_capacities(trainer.ckpt_path))

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
        """Apply an operation's optimizer-state edits, re-sync the layers from process 0, shrink, log."""
        zeroed, seen = apply_edits_(trainer.optimizers, edits)
        broadcast_layers_(self.strategy.layers(pl_module))
        shrunk = shrink_(self.strategy, pl_module, trainer.optimizers)
        self._log(trainer, pl_module, {"lowrank/optimizer_state_zeroed": zeroed / seen} if seen else {})
        if shrunk and not isinstance(trainer.strategy, SingleDeviceStrategy):
            self._stop_for_stage_two(trainer, shrunk)

    def _stop_for_stage_two(self, trainer: L.Trainer, shrunk: list[str]) -> None:
        """Save the shrunk model and stop: DDP's buckets and FSDP2's shards were built for the old shapes.

        Stage 2 is a resume from this checkpoint (:func:`fit_in_stages`, or ``lr-lightning fit`` which
        runs it itself): the layers are allocated at their new capacities before the model is wrapped.
        """
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        folder = Path(dirpath) if dirpath else Path(trainer.default_root_dir, "checkpoints")
        path = str(folder / f"lowrank-shrink-step={trainer.global_step}.ckpt")
        trainer.save_checkpoint(path)
        trainer.should_stop = True
        self.stage_two_checkpoint = path
        rank_zero_info(f"{type(self.strategy).__name__} shrank {len(shrunk)} layers to their ranks at step "
                       f"{trainer.global_step}; a {type(trainer.strategy).__name__} run continues from {path} "
                       "as stage 2 (re-wrapped at the new shapes)")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.strategy.to_config()
        checkpoint[CAPACITY_KEY] = {name: layer.capacity for name, layer in self.strategy.layers(pl_module)}

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
        """Fail if the optimizer misses layer parameters the strategy's groups step (an optimizer built before
        conversion, e.g. by the CLI's --optimizer); tensors the strategy never steps may stay out of it."""
        if not trainer.optimizers:
            return
        held = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        stepped = {id(p) for group in self.strategy.param_groups(pl_module) for p in group["params"]}
        missing = [f"{name}.{pname}" for name, layer in self.strategy.layers(pl_module)
                   for pname, p in layer.named_parameters(recurse=False)
                   if id(p) in stepped and id(p) not in held]
        if missing:
            raise RuntimeError(
                f"The optimizer does not hold {len(missing)} trainable low-rank parameters, e.g. "
                f"{missing[:3]}: it was built before the strategy converted the model. Build it in "
                "configure_optimizers from strategy.param_groups(self) (with LightningCLI, take an "
                "`optimizer: OptimizerCallable` argument instead of --optimizer)."
            )


def shrink_(strategy: LowRankStrategy, model: nn.Module, optimizers: list[Any]) -> list[str]:
    """Shrink the layers whose rank ``strategy`` has fixed for good; move their optimizer state along.

    Each layer's factors become new Parameters at its rank (:meth:`LowRankLayer.shrink_`); every
    optimizer holds the new ones in the old ones' places, with the kept part of their state.
    Returns the names of the shrunk layers.
    """
    shrunk = []
    for name, layer in strategy.layers_to_shrink(model):
        apply_edits_(optimizers, layer.shrink_())
        shrunk.append(name)
    return shrunk


def saved_capacities(checkpoint_path: str | Path) -> dict[str, int]:
    """The layer capacities a :class:`LowRankCallback` stored in a checkpoint file or distributed-checkpoint folder."""
    path = Path(checkpoint_path)
    path = path / _METADATA_FILENAME if path.is_dir() else path
    if not path.is_file():
        return {}
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return dict(checkpoint.get(CAPACITY_KEY, {}))


def match_capacities_(strategy: LowRankStrategy, model: nn.Module, capacities: dict[str, int]) -> None:
    """Allocate each converted layer at its capacity in ``capacities`` (values follow from the checkpoint load)."""
    for name, layer in strategy.layers(model):
        capacity = capacities.get(name)
        if capacity is not None and capacity != layer.capacity:
            layer.resize_(capacity)


def fit_in_stages(make_trainer: Any, make_model: Any, ckpt_path: str | None = None,
                  **fit_kwargs: Any) -> tuple[L.Trainer, L.LightningModule]:
    """``trainer.fit`` that goes on through a shrink: a distributed run stops there, so resume it from the
    shrunk checkpoint with a fresh trainer and model, until the run ends.

    Args:
        make_trainer: ``() -> Trainer``, called once per stage.
        make_model: ``() -> LightningModule`` (a fresh, unconverted or converted model), once per stage.
        ckpt_path: Checkpoint to start from.
        fit_kwargs: Passed to ``trainer.fit`` (dataloaders or ``datamodule``).
    """
    while True:
        trainer, model = make_trainer(), make_model()
        trainer.ckpt_path = ckpt_path
        trainer.fit(model, **fit_kwargs)
        ckpt_path = stage_two_checkpoint(trainer)
        if ckpt_path is None:
            return trainer, model


def stage_two_checkpoint(trainer: L.Trainer) -> str | None:
    """The checkpoint a :class:`LowRankCallback` saved when it stopped this trainer's run at a shrink."""
    for callback in trainer.callbacks:
        if isinstance(callback, LowRankCallback) and callback.stage_two_checkpoint:
            return callback.stage_two_checkpoint
    return None


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
