"""Models (pure torch)."""

from lr_lightning.models.gcn import GCN
from lr_lightning.models.gpt import GPT, GPT_SIZES, GPTConfig
from lr_lightning.models.hyperbolic import HyboNet, LorentzGraphConvolution, LorentzLinear

__all__ = ["GPT", "GPTConfig", "GPT_SIZES", "GCN", "HyboNet", "LorentzLinear", "LorentzGraphConvolution"]
