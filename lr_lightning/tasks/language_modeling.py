"""``LanguageModelingTask``: next-token prediction with a decoder (our GPT, a LLaMA preset or any Hugging Face causal
LM built from its config) and a low-rank strategy."""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torchmetrics.text import Perplexity
from typing_extensions import override

from lr_lightning.models import GPT, GPT_SIZES, GPTConfig
from lr_lightning.models.llama import (
    LLAMA_COMMON,
    LLAMA_SIZES,
    build_causal_lm,
    check_llama_size,
    config_file,
    context_length,
    decoder_layers,
    hf_config_with,
    llama_config,
    load_hf_config,
)
from lr_lightning.strategies import LowRankStrategy
from lr_lightning.tasks.base import StrategyTask

Architecture = Literal["gpt", "llama", "hf"]
GPT_DEFAULTS: dict[str, Any] = dict(vocab_size=256, block_size=128, n_layer=4, n_head=4, model_dim=128, ffn_mult=4,
                                    dropout=0.0, activation="gelu")
"""Our GPT's shape when neither the argument nor ``size`` gives it."""
GPT_ONLY = ("n_layer", "n_head", "model_dim", "ffn_mult", "dropout", "activation")
"""Arguments that shape our GPT only (a LLaMA takes its shape from ``size``, an ``hf`` model from its config)."""
DEFAULT_LLAMA_SIZE = "llama-9m"


class LanguageModelingTask(StrategyTask):
    """Train a decoder on ``(x, y)`` token windows; loss ``-1/T sum_t log p(y_t | x_<=t)``.

    ``architecture`` picks the decoder:

    - ``gpt`` (default): our GPT (:class:`~lr_lightning.models.GPT`), shaped by ``n_layer``, ``n_head``,
      ``model_dim``, ``ffn_mult``, ``dropout``, ``activation`` and ``block_size``, each defaulting to the preset
      ``size`` names in ``GPT_SIZES`` (``tiny``, ``mini``, ``small``, ``gpt2-small``, ``opt-125m``) or, without
      one, to 4 layers, 4 heads, width 128, ``ffn_mult`` 4, no dropout, GELU, 128 positions; vocabulary 256.
    - ``llama``: ``transformers``' ``LlamaForCausalLM`` built from the preset ``size`` (default ``llama-9m``; see
      :data:`lr_lightning.models.llama.LLAMA_SIZES`: the ReLoRA/GaLore shapes ``llama-9m`` ... ``llama-1b``, and
      ``llama-tiny`` for smoke tests). ``vocab_size`` replaces the preset's published 32100 (so a CPU run uses its
      local BPE vocabulary) and ``block_size`` its 1024 positions.
    - ``hf``: ``AutoModelForCausalLM.from_config`` of the local ``config.json`` at ``config_path`` (a file or a
      folder holding one), random weights, nothing downloaded; ``vocab_size`` and ``block_size`` replace the
      config's where given. The checkpoint names ``config_path``, so loading it needs that file.

    The GPT-shape arguments apply to ``gpt`` only, ``size`` to ``gpt`` and ``llama``, ``config_path`` to ``hf``;
    passing one to another architecture is a ``ValueError``. ``setup`` checks ``vocab_size`` and ``block_size``
    against the datamodule's tokenizer and ``seq_len``.

    With ``target_modules=None`` a strategy converts every ``nn.Linear`` but the output head (``lm_head``) and leaves
    the embeddings dense: for ``gpt`` ``blocks.{i}.attn.{qkv,proj}`` and ``blocks.{i}.mlp.{fc,proj}``; for ``llama``
    ``model.layers.{i}.self_attn.{q,k,v,o}_proj`` and ``model.layers.{i}.mlp.{gate,up,down}_proj``; for ``hf``
    the model's linear layers (GPT-2's ``Conv1D`` projections are built as the equivalent ``nn.Linear``, so
    ``transformer.h.{i}.attn.{c_attn,c_proj}`` and ``transformer.h.{i}.mlp.{c_fc,c_proj}``).
    The strategy converts the decoder in ``__init__`` (module names start with ``model.``), so checkpoints and
    ``load_from_checkpoint`` see the factorized parameters. The optimizer is built from ``strategy.param_groups``,
    with linear warmup and cosine decay (:class:`StrategyTask`); the callback adds the strategy's own LR factor
    (ReLoRA's re-warmups). Under ``ModelParallelStrategy`` each decoder block (our GPT's ``blocks``, a Hugging Face
    model's ``_no_split_modules``: ``LlamaDecoderLayer``) and the whole decoder are sharded with FSDP2's
    ``fully_shard`` in ``configure_model``.

    Args:
        strategy: The low-rank method (default: ``FullRank()``).
        optimizer: Optimizer factory called with the parameter groups (default: AdamW, lr 1e-3).
        vocab_size: Embedding rows; at least the tokenizer's vocabulary (default: 256 for ``gpt``, the preset's or
            config's otherwise).
        block_size: Longest context (default: 128 or the ``gpt`` preset's; the preset's or config's otherwise).
        n_layer: Decoder blocks (``gpt``).
        n_head: Attention heads (``gpt``).
        model_dim: Model width, GPTConfig's ``n_embd`` (``gpt``).
        ffn_mult: MLP hidden width over model width (``gpt``).
        dropout: Dropout in attention and MLP outputs (``gpt``).
        activation: MLP nonlinearity, ``gelu`` as GPT-2 or ``relu`` as OPT (``gpt``).
        warmup_steps: Linear LR warmup steps.
        min_lr_ratio: Final LR of the cosine decay, relative to the peak.
        architecture: ``gpt``, ``llama`` or ``hf`` (above).
        size: A preset of ``GPT_SIZES`` (``gpt``) or ``LLAMA_SIZES`` (``llama``).
        config_path: The Hugging Face ``config.json`` (``hf``).
    """

    def __init__(
        self,
        strategy: LowRankStrategy | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        vocab_size: int | None = None,
        block_size: int | None = None,
        n_layer: int | None = None,
        n_head: int | None = None,
        model_dim: int | None = None,
        ffn_mult: int | None = None,
        dropout: float | None = None,
        activation: Literal["gelu", "relu"] | None = None,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        architecture: Architecture = "gpt",
        size: str | None = None,
        config_path: str | None = None,
    ) -> None:
        super().__init__(strategy, optimizer, warmup_steps, min_lr_ratio)
        self.save_hyperparameters(ignore=["strategy", "optimizer"])
        self.hparams.update(self.resolved_shape())
        self.install_model()
        self.val_ppl = Perplexity()
        self.test_ppl = Perplexity()

    def resolved_shape(self) -> dict[str, Any]:
        """The hyperparameters ``None`` stood for (``vocab_size``, ``block_size`` and, for ``gpt``, its shape),
        after checking that each argument applies to ``architecture``."""
        h = self.hparams
        if h.architecture not in get_args(Architecture):
            raise ValueError(f"architecture must be one of {get_args(Architecture)}, got {h.architecture!r}")
        for name in ("vocab_size", "block_size"):
            value = h[name]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if h.architecture != "hf" and h.config_path is not None:
            raise ValueError(f"config_path applies to architecture='hf' only, got it with "
                             f"architecture={h.architecture!r}")
        if h.architecture != "gpt":
            given = [name for name in GPT_ONLY if h[name] is not None]
            if given:
                raise ValueError(f"{', '.join(given)} shape our GPT only (architecture='gpt'); a "
                                 f"{h.architecture!r} model takes its shape from "
                                 + ("size" if h.architecture == "llama" else "the config at config_path"))
        if h.architecture == "gpt":
            return self._gpt_shape()
        if h.architecture == "llama":
            size = h.size if h.size is not None else DEFAULT_LLAMA_SIZE
            check_llama_size(size)
            return {"size": size, "vocab_size": h.vocab_size or LLAMA_COMMON["vocab_size"],
                    "block_size": h.block_size or LLAMA_COMMON["max_position_embeddings"]}
        if h.size is not None:
            raise ValueError(f"size applies to architecture 'gpt' ({', '.join(GPT_SIZES)}) or 'llama' "
                             f"({', '.join(LLAMA_SIZES)}); architecture='hf' takes its shape from config_path")
        if h.config_path is None:
            raise ValueError("architecture='hf' needs config_path: a local config.json (or a folder holding one) "
                             "that AutoModelForCausalLM.from_config builds")
        config = hf_config_with(load_hf_config(h.config_path), h.vocab_size, h.block_size)
        return {"config_path": str(config_file(h.config_path)), "vocab_size": config.vocab_size,
                "block_size": h.block_size or context_length(config)}

    def _gpt_shape(self) -> dict[str, Any]:
        h = self.hparams
        preset: dict[str, Any] = {}
        if h.size is not None:
            if h.size not in GPT_SIZES:
                raise ValueError(f"size {h.size!r} is no GPT preset; allowed for architecture='gpt': "
                                 f"{', '.join(GPT_SIZES)} (LLaMA sizes need architecture='llama')")
            preset = dict(GPT_SIZES[h.size])
            preset["model_dim"] = preset.pop("n_embd")
        defaults = {**GPT_DEFAULTS, **preset}
        return {name: h[name] if h[name] is not None else defaults[name] for name in GPT_DEFAULTS}

    @override
    def build_model(self) -> nn.Module:
        h = self.hparams
        if h.architecture == "llama":
            return build_causal_lm(llama_config(h.size, h.vocab_size, h.block_size))
        if h.architecture == "hf":
            return build_causal_lm(hf_config_with(load_hf_config(h.config_path), h.vocab_size, h.block_size))
        return GPT(GPTConfig(vocab_size=h.vocab_size, block_size=h.block_size, n_layer=h.n_layer, n_head=h.n_head,
                             n_embd=h.model_dim, ffn_mult=h.ffn_mult, dropout=h.dropout, activation=h.activation))

    @override
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.hparams.architecture == "gpt":
            return self.model(idx)
        return self.model(input_ids=idx, use_cache=False).logits

    def blocks(self) -> list[nn.Module]:
        """The decoder's repeated blocks (FSDP2 shards each on its own)."""
        if self.hparams.architecture == "gpt":
            return list(self.model.blocks)
        return decoder_layers(self.model)

    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        needed = getattr(datamodule, "tokenizer_vocab_size", None)
        if needed is not None and needed > self.hparams.vocab_size:
            raise ValueError(f"model vocab_size={self.hparams.vocab_size} is smaller than the tokenizer's "
                             f"vocabulary ({needed}): set --model.init_args.vocab_size {needed}")
        seq_len = getattr(datamodule, "seq_len", None)
        block_size = self.hparams.block_size
        if seq_len is not None and block_size is not None and seq_len > block_size:
            raise ValueError(f"data seq_len={seq_len} exceeds the model's block_size={self.hparams.block_size}: "
                             f"lower --data.init_args.seq_len or raise --model.init_args.block_size")

    @override
    def configure_model(self) -> None:
        mesh = self.device_mesh
        if mesh is None or isinstance(self.model, FSDPModule):
            return
        data_parallel = mesh["data_parallel"]
        for block in self.blocks():
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
