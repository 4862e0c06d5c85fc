"""Optimizer-state policies applied in place when a strategy changes a basis.

In-place edits keep every tensor object alive: AMP's GradScaler, ZeroRedundancyOptimizer and
FSDP2 hold references to the state tensors, and replacing them breaks those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch.optim import Optimizer

from lr_lightning.layers.tensors import local_tensor

ResetMode = Literal["full", "random_prune", "magnitude_prune"]
RESET_MODES: tuple[str, ...] = ("full", "random_prune", "magnitude_prune")
"""The policies a user chooses between; ``drop`` is internal, for parameters that never step again."""


@runtime_checkable
class StateEdit(Protocol):
    """An in-place edit of an optimizer's state that a strategy asks for after changing a basis."""

    def apply_(self, optimizer: Optimizer) -> tuple[int, int]:
        """Edit ``optimizer.state`` in place; return (moment entries changed, moment entries seen)."""
        ...


@dataclass
class StateReset:
    """Reset the optimizer state of ``params``.

    ``full`` zeroes every state tensor (moments and Adam's step count); ``random_prune`` zeroes a
    random ``fraction`` of the moment entries; ``magnitude_prune`` zeroes the entries whose
    magnitude is below the ``fraction`` quantile (ReLoRA, Lialin et al. 2023); ``drop`` frees the
    state of parameters that will not be stepped again.
    """

    params: list[torch.Tensor]
    mode: ResetMode | Literal["drop"] = "full"
    fraction: float = 1.0
    seed: int = 0

    def apply_(self, optimizer: Optimizer) -> tuple[int, int]:
        return reset_state_(optimizer, self)


def reset_state_(optimizer: Optimizer, reset: StateReset) -> tuple[int, int]:
    """Apply ``reset`` to ``optimizer`` in place; return (moment entries zeroed, moment entries seen)."""
    generator = torch.Generator().manual_seed(reset.seed)
    zeroed = seen = 0
    for param in reset.params:
        state = optimizer.state.get(param)
        if not state:
            continue
        if reset.mode == "drop":
            del optimizer.state[param]
            continue
        for key, value in state.items():
            if not torch.is_tensor(value):
                continue
            local = local_tensor(value)
            if key == "step" or local.dim() == 0:
                if reset.mode == "full":
                    local.zero_()
                continue
            zeroed += _zero_(local, reset, generator)
            seen += local.numel()
    return zeroed, seen


def _zero_(t: torch.Tensor, reset: StateReset, generator: torch.Generator) -> int:
    if reset.mode == "full":
        t.zero_()
        return t.numel()
    if reset.mode == "random_prune":
        mask = (torch.rand(t.shape, generator=generator) < reset.fraction).to(t.device)
    else:
        magnitude = t.detach().abs().float()
        k = max(1, int(reset.fraction * magnitude.numel()))
        mask = magnitude <= magnitude.flatten().kthvalue(k).values
    t.masked_fill_(mask, 0)
    return int(mask.sum())
