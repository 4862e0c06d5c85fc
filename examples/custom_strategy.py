"""Write a new low-rank method by subclassing a strategy: LoRA-FA (Zhang et al. 2023).

LoRA-FA freezes the down-projection ``A`` at its random init and trains only ``B``, which halves
the trainable parameters of LoRA and removes the need to keep ``A``'s activations' gradients.
The base class already does module selection, rank validation, reporting, optimizer groups
(frozen tensors are left out), checkpoint config and export; the subclass writes only its math.

    python examples/custom_strategy.py --max-steps 100
"""

from __future__ import annotations

import argparse

import lightning as L
from torch import nn

from lr_lightning.data import TextDataModule
from lr_lightning.layers import LoRALinear
from lr_lightning.strategies import LoRA
from lr_lightning.tasks import LanguageModelingTask


class LoRAFA(LoRA):
    """``W = W0 + (alpha / r) B A`` with ``W0`` and ``A`` frozen at their random init; only ``B`` trains."""

    def convert(self, name: str, module: nn.Module, index: int) -> nn.Module:
        layer: LoRALinear = super().convert(name, module, index)
        layer.lora_A.requires_grad_(False)
        layer.roles = {**layer.roles, "lora_A": "frozen"}
        return layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    L.seed_everything(0)
    strategy = LoRAFA(rank=args.rank, target_modules=["*.attn.*", "*.mlp.*"])
    task = LanguageModelingTask(strategy=strategy, n_layer=2, model_dim=128, block_size=64, warmup_steps=10)
    data = TextDataModule(seq_len=64, batch_size=16, max_chars=200_000)
    trainer = L.Trainer(max_steps=args.max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=10, val_check_interval=min(50, args.max_steps))
    trainer.fit(task, datamodule=data)
    print(f"LoRA-FA trains {strategy.report(task).ratio:.2%} of the converted layers' parameters; "
          f"val perplexity {trainer.callback_metrics['val/ppl']:.2f}")


if __name__ == "__main__":
    main()
