"""Lightning data modules."""

from lr_lightning.data.text import TextDataModule

__all__ = ["TextDataModule"]
