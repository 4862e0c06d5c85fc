"""Compress a small CNN on scikit-learn's digits with SVD training by adding one callback.

The LightningModule below is an ordinary user's module that knows nothing about lr_lightning.
``LowRankCallback(SVDTraining(...))`` rewrites its two inner convs (channel-wise) and its hidden
Linear as ``N diag(|s|) C`` at full rank when fit starts (the 1-channel stem and the head stay
dense), adds the orthogonality gradient before every optimizer step, adds Hoyer sparsity on the
singular values from the first third of the epochs, prunes each layer by energy at two thirds,
and fine-tunes the pruned model to the end. Test accuracy is printed right before and right after
pruning, with the per-layer ranks and the parameter counts of the exported compact model.

    python examples/cnn_digits_svd.py --max-epochs 30
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
from lr_lightning.strategies import SVDTraining


class DigitsCNN(L.LightningModule):
    """8x8 grayscale digit -> 10 classes: three 3x3 convs (two max-pools), a hidden Linear, a head."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.hidden = nn.Linear(64 * 2 * 2, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.hidden(self.features(x).flatten(1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digits() -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1,797 digits as ``1 x 8 x 8`` images in [0, 1]; a stratified 80/20 split."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    train_idx, test_idx = train_test_split(range(len(y)), test_size=0.2, random_state=0, stratify=data.target)
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    return (model(x).argmax(dim=1) == y).float().mean().item()


class EpochEndAccuracy(L.Callback):
    """Test accuracy at every training epoch's end. Callback hooks run in list order, so an
    instance placed before ``LowRankCallback`` sees the model before that epoch's pruning, one
    placed after sees it after."""

    def __init__(self, data: TensorDataset) -> None:
        self.data, self.history = data, {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.history[trainer.current_epoch] = accuracy(pl_module, self.data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--sparsity-weight", type=float, default=0.2)
    parser.add_argument("--energy", type=float, default=0.05)
    args = parser.parse_args()
    if args.max_epochs < 3:
        parser.error("--max-epochs must be >= 3 (train, sparsify, fine-tune)")

    torch.set_num_threads(1)  # the model is tiny: more threads only add synchronisation
    L.seed_everything(0)
    train, test = digits()
    model = DigitsCNN()
    dense_params = sum(p.numel() for p in model.parameters())
    prune_epoch = 2 * args.max_epochs // 3
    strategy = SVDTraining(orthogonality_weight=1.0, sparsity="hoyer", sparsity_weight=args.sparsity_weight,
                           energy=args.energy, sparsify_at=args.max_epochs // 3, prune_at=prune_epoch, unit="epoch")
    before, after = EpochEndAccuracy(test), EpochEndAccuracy(test)
    trainer = L.Trainer(max_epochs=args.max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[before, LowRankCallback(strategy, verbose=False), after])
    trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)))

    print(strategy.report(model))
    last = prune_epoch - 1  # the epoch at whose end pruning ran
    print(f"test accuracy before pruning: {before.history[last]:.4f}")
    print(f"test accuracy right after pruning: {after.history[last]:.4f}")
    print(f"test accuracy after fine-tuning: {accuracy(model, test):.4f}")
    ranks = ", ".join(f"{name} {layer.rank}/{min(layer.matrix_shape)}" for name, layer in strategy.svd_layers(model))
    print(f"ranks (kept / full): {ranks}")
    compact = strategy.export(model)
    compact_params = sum(p.numel() for p in compact.parameters())
    print(f"exported model: {compact_params:,} parameters vs {dense_params:,} dense "
          f"({compact_params / dense_params:.1%}); its test accuracy: {accuracy(compact, test):.4f}")


if __name__ == "__main__":
    main()
