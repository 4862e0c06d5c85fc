"""Factorized ``nn.Module`` layers (pure torch)."""

from lr_lightning.layers.base import LowRankLayer
from lr_lightning.layers.incremental import IncrementalLinear
from lr_lightning.layers.lora import LoRALinear
from lr_lightning.layers.spectral import SpectralLinear
from lr_lightning.layers.svd import SVDConv2d, SVDLayer, SVDLinear
from lr_lightning.layers.tucker import TuckerConv2d, TuckerLayer, TuckerLinear

__all__ = ["LowRankLayer", "LoRALinear", "SpectralLinear", "IncrementalLinear", "TuckerLayer", "TuckerLinear",
           "TuckerConv2d", "SVDLayer", "SVDLinear", "SVDConv2d"]
