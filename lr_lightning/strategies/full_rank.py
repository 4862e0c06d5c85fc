"""The dense baseline: nothing is converted."""

from __future__ import annotations

from torch import nn
from typing_extensions import override

from lr_lightning.strategies.base import LowRankStrategy


class FullRank(LowRankStrategy):
    """Dense training; the selected ``nn.Linear`` layers are reported at rank ``min(m, n)`` and left unchanged."""

    layer_types = ()
    """None: any factorized layer in the model was converted by another strategy, and ``select`` refuses it."""

    @override
    def convert(self, name: str, module: nn.Module, index: int) -> nn.Module:
        return module
