"""Add low-rank training to an existing Lightning project by adding one callback.

The LightningModule below is an ordinary user's module: a character-level MLP language model on
Tiny-Shakespeare-like text that knows nothing about lr_lightning. ``LowRankCallback(ReLoRA(...))``
converts its Linear layers in ``setup`` (before ``configure_optimizers`` runs, so the optimizer
sees the factors), makes the module's own AdamW follow ReLoRA's learning-rate re-warmup after each
merge, merges every ``merge_every`` optimizer steps and resets the optimizer state of the factors
in place. ``RankMonitor`` writes a plot of ranks over steps.

    python examples/plug_into_existing_project.py --max-steps 300
"""

from __future__ import annotations

import argparse
import pydoc_data.topics

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lr_lightning.callbacks import LowRankCallback, RankMonitor
from lr_lightning.strategies import ReLoRA

CONTEXT = 8


class CharMLP(L.LightningModule):
    """Predict the next byte from the previous ``CONTEXT`` bytes (Bengio et al. 2003 style)."""

    def __init__(self, width: int = 256, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.embed = nn.Embedding(256, 32)
        self.hidden = nn.Sequential(nn.Linear(CONTEXT * 32, width), nn.GELU(), nn.Linear(width, width), nn.GELU())
        self.head = nn.Linear(width, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(self.embed(x).flatten(1)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def byte_windows(limit: int = 200_000) -> TensorDataset:
    """Windows of ``CONTEXT`` bytes and the byte that follows, from Python's own help text."""
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))[:limit]
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    x = data.unfold(0, CONTEXT, 1)[:-1]
    return TensorDataset(x, data[CONTEXT:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--plot", default="ranks.png")
    args = parser.parse_args()

    L.seed_everything(0)
    model = CharMLP()
    strategy = ReLoRA(rank=args.rank, merge_every=100, reset="full", restart_warmup_steps=10,
                      target_modules=["hidden.*"])
    trainer = L.Trainer(max_steps=args.max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        callbacks=[LowRankCallback(strategy), RankMonitor(every_n_steps=50, plot_path=args.plot)])
    loader = DataLoader(byte_windows(), batch_size=64, shuffle=True)
    trainer.fit(model, loader)
    print(strategy.report(model))
    print(f"merges: {strategy.merges}; final train loss: {trainer.callback_metrics['train_loss']:.3f}")
    compact = strategy.export(model)
    print(f"exported model: {sum(p.numel() for p in compact.parameters()):,} parameters, plain nn.Linear layers")


if __name__ == "__main__":
    main()
