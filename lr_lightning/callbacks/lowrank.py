"""``LowRankCallback``: apply a strategy to any LightningModule and keep its whole contract there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from typing_extensions import override

from lr_lightning.checkpoints import read_checkpoint
from lr_lightning.layers.tensors import local_tensor
from lr_lightning.optim import RoleOptimizer, StateEdit, wrap_innermost
from lr_lightning.strategies.base import LowRankStrategy

CHECKPOINT_KEY = "lowrank_strategy"
"""Checkpoint entry holding ``strategy.to_config()``, so a loader can re-apply the strategy."""

CAPACITY_KEY = "lowrank_capacities"
"""Checkpoint entry holding each converted layer's capacity, so a resumed run allocates shrunk layers at it."""

UNDECAYED_ROLES = frozenset({"basis", "spectrum"})
"""Roles stepped without weight decay in any optimizer: a method's bases and spectra (biases keep the user's choice)."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or low-rank layer; raised before any operation runs on it."""


class LowRankCallback(L.Callback):
    """Applies a strategy to any LightningModule and keeps its whole contract, whatever optimizer the module built.

    - ``setup`` converts the model, before ``configure_model``, the DDP/FSDP wrap and
      ``configure_optimizers``, so the optimizer sees the factorized parameters.
    - ``on_fit_start`` checks that the optimizers hold every parameter the strategy steps (else it
      stops with an error that says how to build them), then makes them step as the strategy's
      groups would (:class:`~lr_lightning.optim.RoleOptimizer`): each parameter's learning rate times
      ``strategy.lr_multiplier`` (ReLoRA's and SST's re-warmups), on top of any scheduler, and no weight
      decay on bases and spectra. Last, ``strategy.wrap_optimizer`` wraps them where the method needs it
      (TDLRT's faithful integrator).
    - The operations due (``strategy.should_update``) run in ``on_train_batch_end`` once per completed
      optimizer step (``trainer.global_step``), so gradient accumulation and validation never shift
      them; ``strategy.after_optimizer_step`` (a projection) runs there on every step first,
      ``strategy.should_update_at_epoch_end`` is asked at each epoch's end and
      ``strategy.before_optimizer_step`` (gradient edits) runs after AMP unscaling.
    - The optimizer-state edits these return are applied in place (the fraction of state entries
      changed is logged, so a reset that resets nothing shows), and the converted layers are broadcast
      from process 0 afterwards so replicas cannot drift. ``strategy.metrics`` (ranks, regularizer
      values) is logged after each operation and every ``log_every_n_steps`` optimizer steps.
    - Divergence stops training: after every optimizer step the loss must be finite (unless a
      ``GradScaler`` is there to skip such steps), and before any operation the converted layers must be,
      else :class:`DivergenceError` is raised on every process, so a merge, a re-SVD or a prune never
      spreads a NaN into the weights.

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
        self.epochs_ended: int | None = 0
        """Training epochs whose end-of-epoch operations have run (``None``: unknown, from an older checkpoint)."""
        self.stage_two_checkpoint: str | None = None
        self.role_optimizers: list[RoleOptimizer] = []

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Convert the model; when resuming, give shrunk layers the checkpoint's capacities before any wrap."""
        self.strategy.apply(pl_module)
        self.stage_two_checkpoint = None
        if trainer.ckpt_path:
            match_capacities_(self.strategy, pl_module, saved_capacities(trainer.ckpt_path))

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check the optimizers, then make them step as the strategy's contract says (see the class docstring)."""
        self.strategy.check_run(trainer.accumulate_grad_batches, str(trainer.precision))
        self._check_optimizers(trainer, pl_module)
        self._warn_unreached_operations(trainer, pl_module)
        self.role_optimizers = []
        trainer.optimizers = [self.keep_contract(optimizer, trainer, pl_module) for optimizer in trainer.optimizers]
        if self.verbose:
            rank_zero_info(str(self.strategy.report(pl_module)))

    def _warn_unreached_operations(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Warn about periodic operations whose period exceeds the optimizer steps this run plans (they never run)."""
        planned = trainer.estimated_stepping_batches
        late = {name: period for name, period in self.strategy.operations(pl_module).items()
                if period is not None and period > planned}
        if late:
            listed = ", ".join(f"{name} every {period} steps" for name, period in late.items())
            rank_zero_warn(f"{type(self.strategy).__name__}: this run plans {planned:g} optimizer steps, so {listed} "
                           "never runs: shorten the operation's period or train longer")

    def keep_contract(self, optimizer: Optimizer, trainer: L.Trainer, pl_module: L.LightningModule) -> Optimizer:
        """``optimizer`` stepping with the strategy's LR multipliers and decay rules, wrapped as the method needs."""
        roles = role_map(self.strategy, pl_module)
        if scales_lr(self.strategy) or decays_undecayed(optimizer, roles):
            optimizer = wrap_innermost(optimizer, lambda plain: self._role_optimizer(plain, roles, trainer))
            rank_zero_info(f"{type(self.strategy).__name__}: {type(optimizer).__name__} steps with the strategy's "
                           f"learning-rate multipliers and no weight decay on {sorted(UNDECAYED_ROLES)} parameters")
        return self.strategy.wrap_optimizer(optimizer, pl_module)

    def _role_optimizer(self, plain: Optimizer, roles: dict[int, str], trainer: L.Trainer) -> RoleOptimizer:
        optimizer = RoleOptimizer(plain, roles, self.strategy.lr_multiplier, lambda: trainer.global_step,
                                  UNDECAYED_ROLES)
        self.role_optimizers.append(optimizer)
        return optimizer

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Replay the end-of-epoch operations a resumed checkpoint missed, then log.

        A checkpoint saved on an epoch's last batch (``ModelCheckpoint(every_n_train_steps=...)``) comes
        before that epoch's ``on_train_epoch_end``, and the resumed run starts in the next epoch.
        """
        if self.epochs_ended is None:
            self.epochs_ended = trainer.current_epoch
        for epoch in range(self.epochs_ended, trainer.current_epoch):
            self._end_epoch(trainer, pl_module, epoch)
        self._log(trainer, pl_module)

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        edits = self.strategy.before_optimizer_step(pl_module, trainer.global_step)
        if edits:
            apply_edits_([optimizer], edits)
            broadcast_layers_(self.strategy.layers(pl_module))

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step <= self.last_step:
            return
        self.last_step = step
        operations = self.strategy.should_update(step)
        self._check_finite(trainer, pl_module, outputs, operations)
        self.strategy.after_optimizer_step(pl_module, step)
        if operations:
            self._run(trainer, pl_module, operations)
        elif step % trainer.log_every_n_steps == 0:
            self._log(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end_epoch(trainer, pl_module, trainer.current_epoch)

    def _end_epoch(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        if operations := self.strategy.should_update_at_epoch_end(epoch):
            self._check_finite(trainer, pl_module, None, operations)
            self._run(trainer, pl_module, operations)
        self.epochs_ended = epoch + 1

    def _check_finite(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                      operations: list[str]) -> None:
        """Raise :class:`DivergenceError` on every process if the step's loss (without a ``GradScaler``) or, when
        ``operations`` are due, a converted layer is non-finite on any process."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        loss = loss if torch.is_tensor(loss) and trainer.scaler is None else None
        layers = self.strategy.layers(pl_module) if operations else []
        flags = [torch.isfinite(loss.detach()).all() if loss is not None else torch.tensor(True)]
        flags += [all_finite(layer) for _, layer in layers]
        finite = all_processes(torch.stack([f.to(pl_module.device) for f in flags])).tolist()
        if all(finite):
            return
        names = ["the loss", *(name for name, _ in layers)]
        bad = ", ".join(name for name, ok in zip(names, finite) if not ok)
        due = f"{type(self.strategy).__name__}'s {', '.join(operations)}" if operations else "any operation"
        raise DivergenceError(f"training diverged: {bad} not finite after optimizer step {trainer.global_step}; "
                              f"stopped before {due} could spread it into the weights. Lower the learning rate "
                              "or clip gradients (Trainer(gradient_clip_val=1.0)).")

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, operations: list[str]) -> None:
        """Run the operations, apply their optimizer-state edits, re-sync the layers from process 0, shrink, log."""
        edits = self.strategy.run(pl_module, operations, trainer.global_step)
        zeroed, seen = apply_edits_(trainer.optimizers, edits)
        broadcast_layers_(self.strategy.layers(pl_module))
        shrunk = shrink_(self.strategy, pl_module, trainer.optimizers)
        if shrunk:
            roles = role_map(self.strategy, pl_module)
            for optimizer in self.role_optimizers:
                optimizer.roles = roles
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

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.strategy.to_config()
        checkpoint[CAPACITY_KEY] = {name: layer.capacity for name, layer in self.strategy.layers(pl_module)}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "epochs_ended": self.epochs_ended, "strategy": self.strategy.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = state_dict["last_step"]
        self.epochs_ended = state_dict.get("epochs_ended")
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
                "configure_optimizers from self.parameters() or strategy.param_groups(self) (with LightningCLI, "
                "take an `optimizer: OptimizerCallable` argument instead of --optimizer)."
            )


def role_map(strategy: LowRankStrategy, model: nn.Module) -> dict[int, str]:
    """``{id(parameter): role}`` of every parameter in ``strategy.param_groups(model)``."""
    return {id(p): group["lowrank_role"] for group in strategy.param_groups(model) for p in group["params"]}


def scales_lr(strategy: LowRankStrategy) -> bool:
    """Whether ``strategy`` writes its own ``lr_multiplier`` (a re-warmup the optimizer must follow)."""
    return type(strategy).lr_multiplier is not LowRankStrategy.lr_multiplier


def decays_undecayed(optimizer: Optimizer, roles: dict[int, str]) -> bool:
    """Whether a group of ``optimizer`` with weight decay holds a parameter of a role in ``UNDECAYED_ROLES``."""
    return any(group.get("weight_decay", 0) != 0 and roles.get(id(p)) in UNDECAYED_ROLES
               for group in optimizer.param_groups for p in group["params"])


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
    return dict(read_checkpoint(path, mmap=True).get(CAPACITY_KEY, {}))


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
def all_finite(layer: nn.Module) -> torch.Tensor:
    """Whether every parameter and buffer of ``layer`` (this process's shard) is finite, as a 0-d bool tensor."""
    tensors = [local_tensor(t) for t in [*layer.parameters(), *layer.buffers()] if t.is_floating_point()]
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors else torch.tensor(True)


def all_processes(flags: torch.Tensor) -> torch.Tensor:
    """``flags`` (bool) and-ed over every process of the process group (``flags`` itself outside one)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flags
    values = flags.to(torch.int32)
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values.bool()


@torch.no_grad()
def broadcast_layers_(layers: list[tuple[str, nn.Module]]) -> None:
    """Copy process 0's replicated tensors of ``layers`` to every process (sharded DTensors are skipped)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for _, layer in layers:
        for tensor in [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]:
            if not isinstance(tensor, DTensor):
                dist.broadcast(tensor.data, src=0)
