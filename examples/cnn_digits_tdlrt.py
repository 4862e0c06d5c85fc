"""Train a small CNN in Tucker format with TDLRT: the ranks find themselves during training.

The LightningModule below is an ordinary user's CNN on scikit-learn's bundled 8x8 handwritten
digits (1,797 images, no download). ``LowRankCallback(TDLRT(...))`` turns its second convolution
into a Tucker layer (orthonormal channel bases, full 3x3 spatial modes) and its hidden linear
layer into ``U S V^T``; every ``augment_every`` optimizer steps the bases are augmented with their
gradients, the cores train in between, and the cores are truncated with relative tolerance
``tau``. At the end it prints the per-layer ranks, the test accuracy of the compact exported model
and the compression of the converted layers (``1 - trainable / dense`` parameters).

    python examples/cnn_digits_tdlrt.py --max-epochs 15
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lr_lightning.callbacks import LowRankCallback
from lr_lightning.strategies import TDLRT


class DigitsCNN(L.LightningModule):
    """conv 3x3 (1 -> 16) -> conv 3x3 (16 -> 32) -> max-pool -> fc (512 -> 64) -> head (64 -> 10)."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.head(F.relu(self.fc(x.flatten(1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digits(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Stratified 80/20 split of the 8x8 digits, pixels scaled to [0, 1]."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target)
    train, test = train_test_split(torch.arange(len(labels)), test_size=0.2, random_state=seed, stratify=labels)
    return TensorDataset(images[train], labels[train]), TensorDataset(images[test], labels[test])


@torch.no_grad()
def accuracy(model: nn.Module, dataset: TensorDataset) -> float:
    model.eval()
    images, labels = dataset.tensors
    return (model(images).argmax(dim=1) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=15)
    parser.add_argument("--tau", type=float, default=0.15)
    args = parser.parse_args()

    L.seed_everything(0)
    train, test = digits()
    model = DigitsCNN()
    strategy = TDLRT(tau=args.tau, init_rank=0.5, max_rank=0.5, augment_every=10, target_modules=["conv2", "fc"])
    trainer = L.Trainer(max_epochs=args.max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[LowRankCallback(strategy)])
    trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True))
    if trainer.global_step % strategy.augment_every:  # training stopped between an augmentation and its truncation
        strategy.truncate(model, trainer.global_step)
    print(strategy.report(model))
    compact = strategy.export(model)
    print(f"ranks: {[layer.ranks for _, layer in strategy.tucker_layers(model)]}")
    print(f"test accuracy: {accuracy(compact, test):.4f}")
    print(f"compression: {strategy.compression(model):.4f}")


if __name__ == "__main__":
    main()
