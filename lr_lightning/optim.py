"""Optimizer-state policies applied in place when a strategy changes a basis, and optimizer wrappers.

In-place edits keep every tensor object alive: AMP's GradScaler, ZeroRedundancyOptimizer and
FSDP2 hold references to the state tensors, and replacing them breaks those.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

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


class OptimizerWrapper(Optimizer):
    """Steps ``optimizer`` its own way while sharing its parameter groups and state.

    Groups and state are the same objects as ``optimizer``'s, so LR schedulers built on ``optimizer``,
    in-place state edits and checkpoints work on either object. Subclasses write ``step``.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups, self.state = optimizer.param_groups, optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
        self.param_groups, self.state = self.optimizer.param_groups, self.optimizer.state


def wrap_innermost(optimizer: Optimizer, wrap: Callable[[Optimizer], Optimizer]) -> Optimizer:
    """``optimizer`` with the plain optimizer at the end of its :class:`OptimizerWrapper` chain wrapped by ``wrap``."""
    if isinstance(optimizer, OptimizerWrapper):
        optimizer.optimizer = wrap_innermost(optimizer.optimizer, wrap)
        return optimizer
    return wrap(optimizer)


class RoleOptimizer(OptimizerWrapper):
    """``optimizer`` stepped as a strategy's parameter groups would step, whatever groups it was built with.

    At optimizer step ``t + 1`` (``t = steps()`` completed), a parameter of role ``rho`` takes the
    learning rate ``lr_g * multiplier(t, rho)`` of its group ``g``, and no weight decay if ``rho`` is in
    ``no_decay``. A group whose parameters need different values is split for the step only; groups
    and learning rates are restored afterwards, so schedulers, ``LearningRateMonitor`` and checkpoints
    see the module's own values.

    Args:
        optimizer: The optimizer a LightningModule built.
        roles: ``{id(parameter): role}``; parameters missing from it count as ``dense``.
        multiplier: ``(t, role) -> factor`` on the learning rate (a strategy's ``lr_multiplier``).
        steps: Returns the number of completed optimizer steps.
        no_decay: Roles stepped without weight decay.
    """

    def __init__(self, optimizer: Optimizer, roles: dict[int, str], multiplier: Callable[[int, str], float],
                 steps: Callable[[], int], no_decay: Collection[str] = ()) -> None:
        super().__init__(optimizer)
        self.roles, self.multiplier, self.steps, self.no_decay = roles, multiplier, steps, frozenset(no_decay)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        groups = self.optimizer.param_groups
        step = self.steps()
        factors = {role: self.multiplier(step, role) for role in {*self.roles.values(), "dense"}}
        stepped = [part for group in groups for part in self.split(group, factors)]
        if len(stepped) == len(groups) and all(a is b for a, b in zip(stepped, groups)):
            return self.optimizer.step(closure)
        self.optimizer.param_groups = stepped
        try:
            return self.optimizer.step(closure)
        finally:
            self.optimizer.param_groups = groups

    def split(self, group: dict[str, Any], factors: dict[str, float]) -> list[dict[str, Any]]:
        """``group`` itself when every parameter keeps its values, else one copy per (LR factor, decay); ``factors``
        holds this step's LR factor of every role."""
        parts: dict[tuple[float, bool], list[torch.Tensor]] = {}
        for p in group["params"]:
            role = self.roles.get(id(p), "dense")
            decays = role not in self.no_decay and group.get("weight_decay", 0) != 0
            parts.setdefault((factors[role], decays), []).append(p)
        if list(parts) in ([], [(1.0, group.get("weight_decay", 0) != 0)]):
            return [group]
        return [{**group, "params": params, "lr": group["lr"] * factor, **({} if decays else {"weight_decay": 0.0})}
                for (factor, decays), params in parts.items()]
