"""LoRA layer for pre-training: ``W = W0 + (alpha / r) B A`` with ``W0`` the frozen random init."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lr_lightning.layers.base import LowRankLayer
from lr_lightning.layers.tensors import full_tensor, write_full_


class LoRALinear(LowRankLayer):
    """``y = W0 x + b + (alpha / r) B A dropout(x)``; ``B = 0`` at init, so ``y`` equals the dense map.

    ``W0`` (``weight``) is frozen unless ``train_base`` is set (ReLoRA's full-rank warm start),
    ``A`` is Kaiming-uniform, ``B`` is zero. ``merge_()`` folds ``(alpha / r) B A`` into ``W0`` and
    ``reinit_()`` draws a new ``A`` and zeroes ``B`` (ReLoRA's merge-and-reinit).
    """

    roles = {"weight": "frozen", "bias": "bias", "lora_A": "factor", "lora_B": "factor"}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float = 1.0,
        dropout: float = 0.0,
        bias: bool = True,
        train_base: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=train_base)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if train_base:
            self.roles = {**self.roles, "weight": "base"}

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        rank: int,
        alpha: float = 1.0,
        dropout: float = 0.0,
        train_base: bool = False,
        generator: torch.Generator | None = None,
    ) -> LoRALinear:
        """Wrap a dense layer: its weight becomes ``W0``, its bias is kept trainable."""
        weight = linear.weight
        layer = cls(
            weight.shape[1], weight.shape[0], rank, alpha, dropout,
            bias=getattr(linear, "bias", None) is not None, train_base=train_base,
            device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(weight)
            if layer.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.reinit_(generator)
        return layer

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def capacity(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        return base + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) B A``, the low-rank update as an ``m x n`` tensor."""
        return self.scaling * full_tensor(self.lora_B) @ full_tensor(self.lora_A)

    def dense_weight(self) -> torch.Tensor:
        return full_tensor(self.weight) + self.delta_weight()

    @torch.no_grad()
    def merge_(self) -> None:
        """``W0 <- W0 + (alpha / r) B A``, in place (the Parameter object survives)."""
        write_full_(self.weight, self.dense_weight())

    @torch.no_grad()
    def reinit_(self, generator: torch.Generator | None = None) -> None:
        """``A <- Kaiming-uniform``, ``B <- 0``: the update restarts from zero, the function is kept.

        Draws on the CPU from ``generator`` so every process gets the same ``A``.
        """
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear
        a = torch.empty(self.lora_A.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        write_full_(self.lora_A, a)
        write_full_(self.lora_B, torch.zeros(self.lora_B.shape))

    def export(self) -> nn.Linear:
        """The merged dense layer (``W0`` is full rank, so that is LoRA's compact form)."""
        return self.merged_linear()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scaling={self.scaling:g}")
