"""LoRA for pre-training (Hu et al. 2022): ``W = W0 + (alpha / r) B A`` with ``W0`` the random init."""

from __future__ import annotations

from torch import nn
from typing_extensions import override

from lr_lightning.layers.lora import LoRALinear
from lr_lightning.strategies.base import LowRankStrategy, check_rank_argument, layer_generator, resolve_rank


class LoRA(LowRankStrategy):
    """Train only ``B`` (zero at init) and ``A`` (Kaiming); ``W0`` stays at its random init.

    Converts ``nn.Linear`` layers only (``module_types``): convolutions stay dense (the LoRA and
    ReLoRA papers factor linear maps only), never half-converted.

    Args:
        rank: ``r`` as an int, or a float fraction of ``min(m, n)`` per layer.
        alpha: Scale numerator; the update is ``(alpha / r) B A``.
        dropout: Dropout on the input of the LoRA branch.
        seed: Seed of the generator that draws every ``A`` (identical on all processes).
        target_modules: See :class:`LowRankStrategy`.
        exclude_modules: See :class:`LowRankStrategy`.
    """

    layer_types = (LoRALinear,)

    def __init__(
        self,
        rank: int | float = 0.25,
        alpha: float = 32.0,
        dropout: float = 0.0,
        seed: int = 0,
        target_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
    ) -> None:
        super().__init__(target_modules, exclude_modules)
        check_rank_argument(rank)
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.rank, self.alpha, self.dropout, self.seed = rank, alpha, dropout, seed

    @override
    def convert(self, name: str, module: nn.Module, index: int) -> nn.Module:
        m, n = module.weight.shape
        rank = resolve_rank(self.rank, m, n, name)
        return LoRALinear.from_linear(module, rank, self.alpha, self.dropout,
                                      train_base=self.trains_base, generator=layer_generator(self.seed, index))

    @property
    def trains_base(self) -> bool:
        """Whether ``W0`` receives gradients (ReLoRA's full-rank warm start)."""
        return False
