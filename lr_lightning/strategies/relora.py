"""ReLoRA (Lialin et al., ICLR 2024): LoRA with periodic merge-and-reinit, optimizer reset, jagged LR."""

from __future__ import annotations

import torch
from torch import nn
from typing_extensions import override

from lr_lightning.layers.lora import LoRALinear
from lr_lightning.optim import RESET_MODES, ResetMode, StateEdit, StateReset
from lr_lightning.strategies.base import RunState, layer_generator
from lr_lightning.strategies.lora import LoRA


class ReLoRA(LoRA):
    """Every ``merge_every`` optimizer steps: ``W0 <- W0 + (alpha / r) B A``, new ``A``, ``B = 0``.

    Like :class:`LoRA` it converts ``nn.Linear`` layers only; convolutions stay dense.

    After each merge the optimizer state of ``A`` and ``B`` is reset (``reset``) and the learning
    rate of every group re-warms linearly from 0 over ``restart_warmup_steps`` (a multiplier on the
    task's schedule, which gives ReLoRA's jagged cosine). With ``warm_start_steps > 0`` the model
    first trains full rank: ``W0`` trains beside the factors, the first merge folds ``B A`` in at
    the end of the warm start and drops ``W0``'s optimizer state, and from then on ``W0``'s
    gradient is discarded before every step, so the optimizer skips it. Its ``requires_grad`` never
    flips, so DDP's buckets stay valid; the gradient is still computed and reduced.
    SST's ReLoRA* is ``reset="full", warm_start_steps=0`` with ``merge_every`` equal to SST's interval.
    It produces LoRA's layers (``layer_types``), so it may be applied over a model :class:`LoRA` converted (and the
    other way round): the layers keep how they were built, so a warm start over LoRA's frozen ``W0`` trains no ``W0``.

    Args:
        rank: ``r`` as an int, or a float fraction of ``min(m, n)`` per layer.
        alpha: Scale numerator; the update is ``(alpha / r) B A``.
        dropout: Dropout on the input of the LoRA branch.
        merge_every: Optimizer steps between merges.
        reset: Optimizer-state policy for ``A`` and ``B`` at a merge: ``full`` (zero the moments and
            step), ``random_prune`` or ``magnitude_prune`` (zero ``reset_fraction`` of the entries).
        reset_fraction: Fraction pruned by the two pruning policies (the reference uses 0.999
            random, the paper 0.99 magnitude).
        restart_warmup_steps: Length of the linear LR re-warmup after each merge.
        warm_start_steps: Full-rank steps before low-rank training starts (0 = none).
        seed: Seed of the generators that draw every ``A`` (identical on all processes).
        target_modules: See :class:`LowRankStrategy`.
        exclude_modules: See :class:`LowRankStrategy`.
    """

    merges = RunState(0)
    """Merges done so far (they seed the re-drawn ``A``)."""

    def __init__(
        self,
        rank: int | float = 0.25,
        alpha: float = 32.0,
        dropout: float = 0.0,
        merge_every: int = 200,
        reset: ResetMode = "random_prune",
        reset_fraction: float = 0.999,
        restart_warmup_steps: int = 50,
        warm_start_steps: int = 0,
        seed: int = 0,
        target_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
    ) -> None:
        super().__init__(rank, alpha, dropout, seed, target_modules, exclude_modules)
        if merge_every < 1:
            raise ValueError(f"merge_every must be >= 1, got {merge_every}")
        if reset not in RESET_MODES:
            raise ValueError(f"reset must be one of {RESET_MODES}, got {reset!r}")
        if not 0 < reset_fraction <= 1:
            raise ValueError(f"reset_fraction must be in (0, 1], got {reset_fraction}")
        if not 0 <= restart_warmup_steps < merge_every:
            raise ValueError(f"restart_warmup_steps must be in [0, merge_every={merge_every}), "
                             f"got {restart_warmup_steps}")
        if warm_start_steps < 0:
            raise ValueError(f"warm_start_steps must be >= 0, got {warm_start_steps}")
        self.merge_every, self.reset, self.reset_fraction = merge_every, reset, reset_fraction
        self.restart_warmup_steps, self.warm_start_steps = restart_warmup_steps, warm_start_steps

    @override
    @property
    def trains_base(self) -> bool:
        return self.warm_start_steps > 0

    @override
    def operations(self, model: nn.Module) -> dict[str, int | None]:
        return {"merge": self.merge_every}

    @override
    def should_update(self, step: int) -> list[str]:
        """Merge at the end of the warm start and every ``merge_every`` steps after it."""
        since = step - self.warm_start_steps
        return ["merge"] if since >= 0 and since % self.merge_every == 0 and step > 0 else []

    def merge(self, model: nn.Module, step: int) -> list[StateEdit]:
        """Merge ``B A`` into ``W0`` and re-draw ``A`` in every layer; reset their optimizer state."""
        self.merges += 1
        factors = []
        for index, (_, layer) in enumerate(self.layers(model)):
            if isinstance(layer, LoRALinear):
                layer.merge_()
                layer.reinit_(layer_generator(self.seed, index, self.merges))
                factors += [layer.lora_A, layer.lora_B]
        resets = [StateReset(factors, self.reset, self.reset_fraction, seed=self.seed + self.merges)]
        if self.trains_base and step == self.warm_start_steps:
            resets.append(StateReset(self._bases(model), "drop"))
        return resets

    @override
    def before_optimizer_step(self, model: nn.Module, step: int) -> list[StateEdit]:
        """After the warm start, drop ``W0``'s gradient so the optimizer skips it (no step, no decay)."""
        if self.trains_base and step >= self.warm_start_steps:
            for weight in self._bases(model):
                weight.grad = None
        return []

    def _bases(self, model: nn.Module) -> list[torch.Tensor]:
        return [layer.weight for _, layer in self.layers(model) if isinstance(layer, LoRALinear)]

    @override
    def lr_multiplier(self, step: int, role: str) -> float:
        """A linear ramp from 0 to 1 over ``restart_warmup_steps`` after each merge."""
        first_merge = self.warm_start_steps or self.merge_every
        if step < first_merge or self.restart_warmup_steps == 0:
            return 1.0
        return min(1.0, ((step - first_merge) % self.merge_every) / self.restart_warmup_steps)

    @override
    def metrics(self, model: nn.Module) -> dict[str, float]:
        return {**super().metrics(model), "relora/merges": float(self.merges)}
