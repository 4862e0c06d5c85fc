"""lr_lightning: low-rank training from scratch for PyTorch Lightning.

Strategies (``lr_lightning.strategies``) say which layers to factorize and how; callbacks
(``lr_lightning.callbacks``) apply them to any LightningModule and run their periodic operations on
optimizer steps; tasks (``lr_lightning.tasks``) compose a model with a strategy for ``lr-lightning fit``.
"""

__version__ = "0.1.0"
