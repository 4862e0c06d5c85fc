"""LightningModules that compose a model with a low-rank strategy."""

from lr_lightning.tasks.language_modeling import LanguageModelingTask

__all__ = ["LanguageModelingTask"]
