"""Models (pure torch)."""

from lr_lightning.models.gpt import GPT, GPT_SIZES, GPTConfig

__all__ = ["GPT", "GPTConfig", "GPT_SIZES"]
