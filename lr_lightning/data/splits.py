"""``SplitDataModule``: the train / val / test DataLoaders of a data module that holds one dataset per split."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override


class SplitDataModule(L.LightningDataModule):
    """Loaders over :meth:`split_dataset`: the training one shuffled (without its last partial batch when
    ``drop_last_train``), validation and test in order. Subclasses set ``batch_size``, ``num_workers`` and
    ``datasets`` (a dict from split name to dataset, filled in ``setup``)."""

    drop_last_train: bool = False
    batch_size: int
    num_workers: int
    datasets: dict[str, Dataset]

    def split_dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` (``train``, ``val`` or ``test``)."""
        return self.datasets[split]

    def _loader(self, split: str, train: bool) -> DataLoader:
        return DataLoader(self.split_dataset(split), batch_size=self.batch_size, shuffle=train,
                          drop_last=train and self.drop_last_train, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
