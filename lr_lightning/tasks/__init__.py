"""LightningModules that compose a model with a low-rank strategy.

``TranslationTask`` is imported on first access (``from lr_lightning.tasks import TranslationTask``):
it needs fairseq2, which the other tasks and ``import lr_lightning.tasks`` do not.
"""

from typing import Any

from lr_lightning.optim_riemannian import RiemannianAdamW
from lr_lightning.tasks.base import StrategyTask
from lr_lightning.tasks.image_classification import CompressionReport, ImageClassificationTask
from lr_lightning.tasks.language_modeling import LanguageModelingTask
from lr_lightning.tasks.link_prediction import LinkPredictionTask
from lr_lightning.tasks.node_classification import NodeClassificationTask

__all__ = ["StrategyTask", "LanguageModelingTask", "NodeClassificationTask", "RiemannianAdamW",
           "ImageClassificationTask", "CompressionReport", "TranslationTask", "LinkPredictionTask"]


def __getattr__(name: str) -> Any:
    """The lazily imported ``TranslationTask`` (PEP 562 module attribute)."""
    if name == "TranslationTask":
        from lr_lightning.tasks.translation import TranslationTask

        return TranslationTask
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
