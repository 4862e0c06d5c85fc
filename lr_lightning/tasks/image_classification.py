"""``ImageClassificationTask``: image classification (LeNet-5, VGG, ResNet) with a strategy, reported as the papers do.

The convolutional methods convert convolutions: :class:`~lr_lightning.strategies.TDLRT` turns every
selected ``nn.Conv2d`` into a Tucker layer (and every ``nn.Linear`` into ``U S V^T``),
:class:`~lr_lightning.strategies.SVDTraining` into ``N diag(|s|) C`` channel- or spatial-wise (convs
reading at most 3 channels only with ``input_convs=True``). LoRA, ReLoRA, SST and InRank convert
``nn.Linear`` layers only, so with them the convolutions train dense. :meth:`ImageClassificationTask.compression_report`
gives the figures DLRT and SVD training report: ranks per layer, the compression of the convolutions'
train and test parameters, and the FLOPs of the exported compact model against the dense one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lr_lightning.layers.base import LowRankLayer
from lr_lightning.models.checks import check_classifier_shape
from lr_lightning.models.image import IMAGE_ARCHITECTURES, build_image_model
from lr_lightning.strategies import LowRankStrategy
from lr_lightning.tasks.base import StrategyTask

Schedule = Literal["cosine", "step"]
SCHEDULES: tuple[str, ...] = ("cosine", "step")


def warmup_step_decay(step: int, warmup_steps: int, total_steps: int | None, milestones: Sequence[float],
                      gamma: float) -> float:
    """Linear warmup to 1, then ``gamma ** k`` where ``k`` milestones have been passed.

    Milestone ``f`` (a fraction of the run) is passed at optimizer step ``round(f * total_steps)``;
    without a planned end (``total_steps=None``) no milestone is ever passed.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None:
        return 1.0
    passed = sum(step >= round(f * total_steps) for f in milestones)
    return gamma**passed


def is_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a 2-D convolution: an ``nn.Conv2d`` or a factorized layer that replaced one
    (``TuckerConv2d``, ``SVDConv2d``: a :class:`LowRankLayer` with a ``kernel_size``)."""
    return isinstance(module, nn.Conv2d) or (isinstance(module, LowRankLayer) and hasattr(module, "kernel_size"))


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The convolutions of ``model`` (see :func:`is_conv`), none counted twice (nothing inside a factorized layer)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        if is_conv(module):
            found.append((name, module))
    return found


def dense_numel(module: nn.Module) -> int:
    """Parameters of the dense layer ``module`` stands for (weight and bias)."""
    if isinstance(module, LowRankLayer):
        return module.dense_numel()
    return sum(p.numel() for p in module.parameters())


def trainable_numel(module: nn.Module) -> int:
    """Elements of the tensors ``module`` trains (``requires_grad``), at the size they are allocated."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass of ``model`` on ``example``, as ``torch.utils.flop_counter.FlopCounterMode`` counts
    them (convolutions and matrix products; a multiply-add is 2 FLOPs), in eval mode and without gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


@dataclass
class CompressionReport:
    """What DLRT (Schotthoefer et al. 2022) and SVD training (Yang et al. 2020) report about a compressed CNN.

    Train parameters are the elements of the tensors the run trains (``requires_grad``) at the size they are
    allocated while training (DLRT's "train params"): TDLRT's factors at their capacity ``min(2 max_rank, n)``
    per mode (the constant-shape analogue of DLRT's augmented ``2r`` bases), SVD training's ``N, s, C`` at full
    rank before the prune and at the kept rank after it, a dense layer's weight and bias. Test parameters are
    those of the compact model ``strategy.export`` returns (DLRT's "test params"). The ``conv_*`` counts cover
    the convolutions only (dense, factorized or exported), the ``params_*`` counts the whole network.

    Attributes:
        ranks: Rank of every layer the strategy reports (``strategy.report(...).rows``; a Tucker conv's is its
            largest channel rank), and of every convolution it leaves dense, at ``min(C_out, C_in k_h k_w)``;
            in the model's order, named without the ``model.`` prefix.
        full_ranks: The same layers' largest rank ``min(m, n)`` as matrices (``C_out x C_in k_h k_w`` for a conv).
        mode_ranks: Per-mode ranks of the Tucker layers (``(r_out, r_in[, r_h, r_w])`` for a conv).
        conv_dense: Parameters of the dense model's convolutions (weights and biases).
        conv_train: Train parameters of the convolutions.
        conv_test: Parameters of the exported model's convolutions (the modules that replaced them).
        params_dense: Parameters of the dense model.
        params_train: Train parameters of the whole model.
        params_test: Parameters of the exported model.
        flops_dense: FLOPs of the dense model on one input (``FlopCounterMode``).
        flops_test: FLOPs of the exported model on the same input.
        input_shape: ``(C, H, W)`` of that input.
    """

    ranks: dict[str, int]
    full_ranks: dict[str, int]
    mode_ranks: dict[str, tuple[int, ...]]
    conv_dense: int
    conv_train: int
    conv_test: int
    params_dense: int
    params_train: int
    params_test: int
    flops_dense: int
    flops_test: int
    input_shape: tuple[int, ...] = field(default=())

    @property
    def conv_compression_train(self) -> float:
        """``1 - conv_train / conv_dense`` (negative when training holds more than the dense convolutions)."""
        return 1.0 - self.conv_train / max(self.conv_dense, 1)

    @property
    def conv_compression_test(self) -> float:
        """``1 - conv_test / conv_dense``."""
        return 1.0 - self.conv_test / max(self.conv_dense, 1)

    @property
    def compression_train(self) -> float:
        """``1 - params_train / params_dense`` (whole network)."""
        return 1.0 - self.params_train / max(self.params_dense, 1)

    @property
    def compression_test(self) -> float:
        """``1 - params_test / params_dense`` (whole network)."""
        return 1.0 - self.params_test / max(self.params_dense, 1)

    @property
    def flops_ratio(self) -> float:
        """``flops_test / flops_dense``: 1 for a model whose export is as costly as the dense one."""
        return self.flops_test / max(self.flops_dense, 1)

    def metrics(self) -> dict[str, float]:
        """The scalars the task logs (without a split prefix)."""
        return {"flops_ratio": self.flops_ratio, "conv_compression_train": self.conv_compression_train,
                "conv_compression_test": self.conv_compression_test}

    def to_dict(self) -> dict[str, Any]:
        """Every count, ratio and rank as plain JSON-ready values."""
        data = asdict(self)
        data["mode_ranks"] = {name: list(ranks) for name, ranks in self.mode_ranks.items()}
        data["input_shape"] = list(self.input_shape)
        for name in ("conv_compression_train", "conv_compression_test", "compression_train", "compression_test",
                     "flops_ratio"):
            data[name] = getattr(self, name)
        return data


class ImageClassificationTask(StrategyTask):
    """Classify images with cross-entropy; top-1 accuracy on every split; compression figures at test time.

    The strategy converts the model in ``__init__`` (module names start with ``model.``). The optimizer
    is built from ``strategy.param_groups``; the LR follows linear warmup, then cosine decay to
    ``min_lr_ratio`` (DLRT's and TDLRT's runs) or step decay by ``gamma`` at each milestone fraction of
    the run (SVD training's), times the strategy's own factor.

    Logged: ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``; at the end of
    the test epoch ``test/flops_ratio``, ``test/conv_compression_train``, ``test/conv_compression_test`` and
    ``test/rank/<layer>`` (:meth:`compression_report`, kept as :attr:`last_compression_report`); at the end of
    training the same three ratios as ``fit/...`` to the loggers. A cheap-variant TDLRT run that stops between
    an augmentation and its truncation reports the augmented ranks: end runs on a multiple of ``augment_every``.

    Args:
        strategy: The low-rank method (default: ``FullRank()``).
        optimizer: Optimizer factory called with the parameter groups (default: AdamW, lr 1e-3; the configs set
            SGD with momentum as the papers).
        architecture: One of ``lr_lightning.models.image.IMAGE_ARCHITECTURES``.
        num_classes: Output classes; at least the number of labels the data holds.
        in_channels: Image channels; must match the data.
        image_size: Image height and width; must match the data.
        schedule: ``cosine`` (warmup, cosine decay to ``min_lr_ratio``) or ``step`` (warmup, then ``gamma`` at
            every milestone).
        milestones: Step schedule: fractions of the run, strictly increasing in (0, 1), at which the LR is
            multiplied by ``gamma``.
        gamma: Step schedule's factor, in (0, 1].
        warmup_steps: Linear LR warmup steps.
        min_lr_ratio: Cosine schedule's final LR relative to the peak.
        label_smoothing: Cross-entropy label smoothing, in [0, 1).
    """

    def __init__(
        self,
        strategy: LowRankStrategy | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        architecture: str = "lenet5",
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        schedule: Schedule = "cosine",
        milestones: Sequence[float] = (0.5, 0.75),
        gamma: float = 0.1,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(strategy, optimizer, warmup_steps, min_lr_ratio)
        if architecture not in IMAGE_ARCHITECTURES:
            raise ValueError(f"architecture must be one of {IMAGE_ARCHITECTURES}, got {architecture!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        milestones = [float(f) for f in milestones]
        increasing = all(a < b for a, b in zip(milestones, milestones[1:]))
        if not milestones or not increasing or any(not 0 < f < 1 for f in milestones):
            raise ValueError(f"milestones must be fractions of the run, strictly increasing in (0, 1), "
                             f"got {milestones}")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        check_classifier_shape(num_classes, in_channels)
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.save_hyperparameters(ignore=["strategy", "optimizer"])
        self.hparams.milestones = milestones
        self.install_model()
        accuracy = partial(MulticlassAccuracy, num_classes=num_classes, average="micro")
        self.train_acc, self.val_acc, self.test_acc = accuracy(), accuracy(), accuracy()
        self.last_compression_report: CompressionReport | None = None
        self._dense_counts: tuple[int, int, int] | None = None

    @override
    def build_model(self) -> nn.Module:
        """The dense network the hyperparameters describe (``build_image_model``)."""
        h = self.hparams
        return build_image_model(h.architecture, h.num_classes, h.in_channels, h.image_size)

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    @override
    def setup(self, stage: str) -> None:
        """Check the model against the data (``trainer.datamodule``, after its ``setup``) before any batch."""
        datamodule = getattr(self.trainer, "datamodule", None)
        for name in ("in_channels", "image_size"):
            found, expected = getattr(datamodule, name, None), self.hparams[name]
            if found is not None and found != expected:
                raise ValueError(f"the data has {name}={found} but the model was built with {name}={expected}: "
                                 f"set --model.init_args.{name} {found}")
        labels = getattr(datamodule, "labels_found", None)
        if labels is not None and labels > self.hparams.num_classes:
            raise ValueError(f"the data has labels_found={labels} (its largest training label + 1) but the model "
                             f"was built with num_classes={self.hparams.num_classes}: "
                             f"set --model.init_args.num_classes {labels}")

    # ----------------------------------------------------------------------------- steps
    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        logits = self(images)
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.hparams.label_smoothing), logits

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logits = self._loss(batch)
        self.train_acc(logits.detach(), batch[1])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=False)
        return loss

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits = self._loss(batch)
        self.val_acc(logits, batch[1])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits = self._loss(batch)
        self.test_acc(logits, batch[1])
        self.log("test/loss", loss, sync_dist=True)
        self.log("test/acc", self.test_acc)

    # ----------------------------------------------------------------------------- schedule
    @override
    def lr_schedule(self) -> Callable[[int], float]:
        """``cosine``: :class:`StrategyTask`'s warmup and cosine decay. ``step``: warmup, then the LR times ``gamma``
        at every milestone fraction of the run's planned optimizer steps (:func:`warmup_step_decay`)."""
        if self.hparams.schedule == "cosine":
            return super().lr_schedule()
        return partial(warmup_step_decay, warmup_steps=self.hparams.warmup_steps, total_steps=self.total_steps(),
                       milestones=tuple(self.hparams.milestones), gamma=self.hparams.gamma)

    # ----------------------------------------------------------------------------- reporting
    def _dense_figures(self, example: torch.Tensor) -> tuple[int, int, int]:
        """``(conv params, params, FLOPs)`` of the dense network (a fresh ``build_model``; the global RNG is kept)."""
        if self._dense_counts is None:
            with torch.random.fork_rng(devices=[]):
                dense = self.build_model().to(example.device)
            conv = sum(dense_numel(m) for _, m in conv_layers(dense))
            self._dense_counts = (conv, sum(p.numel() for p in dense.parameters()), count_flops(dense, example))
        return self._dense_counts

    @torch.no_grad()
    def compression_report(self) -> CompressionReport:
        """Ranks, train / test parameters of the convolutions and the network, and the exported model's FLOPs
        against the dense network's on one ``in_channels x image_size x image_size`` image (:class:`CompressionReport`).

        The compact model is ``strategy.export(self.model)`` (a copy; ``self`` is unchanged). The dense figures
        come from a freshly built dense network of the same architecture.
        """
        h = self.hparams
        parameter = next(self.model.parameters())
        example = torch.zeros(1, h.in_channels, h.image_size, h.image_size, device=parameter.device,
                              dtype=parameter.dtype)
        conv_dense, params_dense, flops_dense = self._dense_figures(example)
        compact = self.strategy.export(self.model)
        convs = conv_layers(self.model)
        conv_test = sum(sum(p.numel() for p in compact.get_submodule(name).parameters()) for name, _ in convs)
        rows = {row.name.removeprefix("model."): (row.rank, min(row.shape)) for row in self.strategy.report(self).rows}
        for name, module in convs:
            if name not in rows and isinstance(module, nn.Conv2d):
                full = min(module.weight.shape[0], module.weight[0].numel())
                rows[name] = (full, full)
        order = {name: i for i, (name, _) in enumerate(self.model.named_modules())}
        names = sorted(rows, key=order.__getitem__)
        mode_ranks = {name: tuple(layer.ranks) for name, layer in self.strategy.layers(self.model)
                      if hasattr(layer, "ranks")}
        return CompressionReport(
            ranks={name: rows[name][0] for name in names}, full_ranks={name: rows[name][1] for name in names},
            mode_ranks=mode_ranks,
            conv_dense=conv_dense, conv_train=sum(trainable_numel(m) for _, m in convs), conv_test=conv_test,
            params_dense=params_dense, params_train=trainable_numel(self.model),
            params_test=sum(p.numel() for p in compact.parameters()),
            flops_dense=flops_dense, flops_test=count_flops(compact, example), input_shape=tuple(example.shape[1:]))

    @override
    def on_train_end(self) -> None:
        report = self.compression_report()
        self.last_compression_report = report
        for logger in self.loggers:
            logger.log_metrics({f"fit/{k}": v for k, v in report.metrics().items()}, step=self.trainer.global_step)

    @override
    def on_test_epoch_end(self) -> None:
        report = self.compression_report()
        self.last_compression_report = report
        for name, value in report.metrics().items():
            self.log(f"test/{name}", value)
        for name, rank in report.ranks.items():
            self.log(f"test/rank/{name}", float(rank))
