"""``LanguageModelingTask``: next-token prediction with a GPT-style decoder and a low-rank strategy."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch.distributed.fsdp import FSDPModule, fully_shard
from torchmetrics.text import Perplexity
from typing_extensions import override

from lr_lightning.models import GPT, GPTConfig
from lr_lightning.strategies import LowRankStrategy
from lr_lightning.tasks.base import StrategyTask


class LanguageModelingTask(StrategyTask):
    """Train a GPT decoder on ``(x, y)`` token windows; loss ``-1/T sum_t log p(y_t | x_<=t)``.

    The strategy converts the decoder's linear layers in ``__init__`` (module names start with
    ``model.``, e.g. ``model.blocks.0.attn.qkv``), so checkpoints and ``load_from_checkpoint`` see
    the factorized parameters. The optimizer is built from ``strategy.param_groups``, with linear
    warmup and cosine decay (:class:`StrategyTask`); the callback adds the strategy's own LR factor
    (ReLoRA's re-warmups). Under ``ModelParallelStrategy`` each block and the whole
    decoder are sharded with FSDP2's ``fully_shard`` in ``configure_model``.

    Args:
        strategy: The low-rank method (default: ``FullRank()``).
        optimizer: Optimizer factory called with the parameter groups (default: AdamW, lr 1e-3).
        vocab_size: Embedding rows; at least the tokenizer's vocabulary.
        block_size: Longest context.
        n_layer: Decoder blocks.
        n_head: Attention heads.
        model_dim: Model width (GPTConfig's ``n_embd``).
        ffn_mult: MLP hidden width over model width.
        dropout: Dropout in attention and MLP outputs.
        activation: MLP nonlinearity (``gelu`` as GPT-2, ``relu`` as OPT).
        warmup_steps: Linear LR warmup steps.
        min_lr_ratio: Final LR of the cosine decay, relative to the peak.
    """

    def __init__(
        self,
        strategy: LowRankStrategy | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        vocab_size: int = 256,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        model_dim: int = 128,
        ffn_mult: int = 4,
        dropout: float = 0.0,
        activation: Literal["gelu", "relu"] = "gelu",
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__(strategy, optimizer, warmup_steps, min_lr_ratio)
        self.save_hyperparameters(ignore=["strategy", "optimizer"])
        self.install_model()
        self.val_ppl = Perplexity()
        self.test_ppl = Perplexity()

    @override
    def build_model(self) -> GPT:
        h = self.hparams
        return GPT(GPTConfig(vocab_size=h.vocab_size, block_size=h.block_size, n_layer=h.n_layer, n_head=h.n_head,
                             n_embd=h.model_dim, ffn_mult=h.ffn_mult, dropout=h.dropout, activation=h.activation))

    @override
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        needed = getattr(datamodule, "tokenizer_vocab_size", None)
        if needed is not None and needed > self.hparams.vocab_size:
            raise ValueError(f"model vocab_size={self.hparams.vocab_size} is smaller than the tokenizer's "
                             f"vocabulary ({needed}): set --model.init_args.vocab_size {needed}")
        seq_len = getattr(datamodule, "seq_len", None)
        if seq_len is not None and seq_len > self.hparams.block_size:
            raise ValueError(f"data seq_len={seq_len} exceeds the model's block_size={self.hparams.block_size}: "
                             f"lower --data.init_args.seq_len or raise --model.init_args.block_size")

    @override
    def configure_model(self) -> None:
        mesh = self.device_mesh
        if mesh is None or isinstance(self.model, FSDPModule):
            return
        data_parallel = mesh["data_parallel"]
        for block in self.model.blocks:
            fully_shard(block, mesh=data_parallel)
        fully_shard(self.model, mesh=data_parallel)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()), logits

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits = self._loss(batch)
        self.val_ppl(logits.float(), batch[1])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", self.val_ppl, prog_bar=True)

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits = self._loss(batch)
        self.test_ppl(logits.float(), batch[1])
        self.log("test/loss", loss, sync_dist=True)
        self.log("test/ppl", self.test_ppl)
