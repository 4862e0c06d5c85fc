"""LightningModules that compose a model with a low-rank strategy."""

from lr_lightning.tasks.base import StrategyTask
from lr_lightning.tasks.language_modeling import LanguageModelingTask
from lr_lightning.tasks.node_classification import NodeClassificationTask, RiemannianAdamW

__all__ = ["StrategyTask", "LanguageModelingTask", "NodeClassificationTask", "RiemannianAdamW"]
