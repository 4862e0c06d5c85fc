"""Transport optimizer moments of a preallocated Tucker core to new bases, in place (TDLRT, arXiv 2305.19059).

When the bases of a Tucker layer change, its core's coordinates change as ``C_new = C_old x_i A_i``
(``A_i = U_new_i^T U_old_i`` at augmentation, ``P_i^T`` at truncation). The core's moments follow:
first moments linearly, second moments through their square roots. Like :class:`lr_lightning.optim.StateReset`
this is a :class:`lr_lightning.optim.StateEdit`: it edits the state tensors in place, so AMP's
GradScaler and FSDP2 keep their references.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.optim import Optimizer

from lr_lightning.layers.tensors import full_tensor, write_full_
from lr_lightning.layers.tucker import compute_dtype, mode_product

FIRST_MOMENTS = frozenset({"exp_avg", "momentum_buffer"})
"""State entries transported as ``m <- m x_i A_i`` (Adam's ``m``, SGD's momentum)."""

SECOND_MOMENTS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})
"""State entries transported as ``v <- (sqrt(v) x_i A_i)^2`` (Adam/AMSGrad, RMSprop, Adagrad)."""


@dataclass
class CoreMomentTransport:
    """``m <- m x_1 A_1 ... x_d A_d``, ``v <- (sqrt(v) x_1 A_1 ... x_d A_d)^2`` on the active block of ``param``.

    For a matrix core this is ``m <- M m N^T``, ``v <- (M sqrt(v) N^T)^2``. The block of
    ``old_ranks`` is mapped to the block of ``new_ranks``; everything outside it is zeroed (the
    core is preallocated). Any other state tensor of ``param``'s shape is zeroed; scalars such as
    Adam's ``step`` are kept.

    Args:
        param: The core parameter whose state is edited.
        maps: ``A_i`` (``new_ranks[i] x old_ranks[i]``) per mode, ``None`` where the mode is unchanged.
        old_ranks: Active block before the change.
        new_ranks: Active block after the change.
    """

    param: torch.Tensor
    maps: Sequence[torch.Tensor | None]
    old_ranks: Sequence[int]
    new_ranks: Sequence[int]

    def apply_(self, optimizer: Optimizer) -> tuple[int, int]:
        """Edit ``optimizer.state[param]`` in place; return (entries whose value changed, entries seen)."""
        state = optimizer.state.get(self.param)
        if not state:
            return 0, 0
        changed = seen = 0
        for key, value in state.items():
            if not torch.is_tensor(value) or value.shape != self.param.shape:
                continue
            before = full_tensor(value).detach().clone()
            after = self._transported(before, key)
            write_full_(value, after)
            changed += int((after.to(before.dtype) != before).sum())
            seen += before.numel()
        return changed, seen

    def _transported(self, moment: torch.Tensor, key: str) -> torch.Tensor:
        result = torch.zeros_like(moment)
        if key not in FIRST_MOMENTS | SECOND_MOMENTS:
            return result
        block = moment[tuple(slice(0, r) for r in self.old_ranks)].to(compute_dtype(moment.dtype))
        if key in SECOND_MOMENTS:
            block = block.clamp_min(0).sqrt()
        with torch.autocast(moment.device.type, enabled=False):
            for mode, matrix in enumerate(self.maps):
                if matrix is not None and not is_padding(matrix):
                    block = mode_product(block, matrix.to(block), mode)
        if key in SECOND_MOMENTS:
            block = block.square()
        result[tuple(slice(0, n) for n in block.shape)] = block.to(moment.dtype)
        return result


def is_padding(matrix: torch.Tensor) -> bool:
    """Whether ``A = [I; 0]`` (an augmentation's ``U_new^T U_old``): then ``x_i A`` only pads with zeros."""
    return matrix.shape[0] >= matrix.shape[1] and torch.equal(
        matrix, torch.eye(*matrix.shape, dtype=matrix.dtype, device=matrix.device))
