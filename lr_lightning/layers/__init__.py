"""Factorized ``nn.Module`` layers (pure torch)."""

from lr_lightning.layers.base import LowRankLayer
from lr_lightning.layers.lora import LoRALinear

__all__ = ["LowRankLayer", "LoRALinear"]
