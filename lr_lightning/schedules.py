"""Base learning-rate schedules of the tasks (LowRankCallback multiplies in a strategy's own factor)."""

from __future__ import annotations

import math


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
