"""Learning-rate schedules that compose a task's base schedule with a strategy's multiplier."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lr_lightning.strategies.base import LowRankStrategy


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def inverse_sqrt(step: int, warmup_steps: int) -> float:
    """Linear warmup to 1, then ``sqrt(warmup_steps / t)`` (Vaswani et al. 2017, as fairseq's schedule)."""
    t = step + 1
    return min(t / warmup_steps, (warmup_steps / t) ** 0.5) if warmup_steps > 0 else t ** -0.5


def _group_factor(step: int, base: Callable[[int], float], strategy: LowRankStrategy, role: str) -> float:
    return base(step) * strategy.lr_multiplier(step, role)


def strategy_lr_scheduler(
    optimizer: Optimizer, strategy: LowRankStrategy, base: Callable[[int], float]
) -> LambdaLR:
    """``lr_g(t) = lr_g * base(t) * strategy.lr_multiplier(t, role_g)`` for every group ``g``.

    With ReLoRA this is the jagged cosine: the base cosine times a re-warmup after every merge.
    Groups without a ``lowrank_role`` key count as ``dense``.
    """
    factors = [partial(_group_factor, base=base, strategy=strategy, role=g.get("lowrank_role", "dense"))
               for g in optimizer.param_groups]
    return LambdaLR(optimizer, factors)
