"""``TranslationTask``: an encoder-decoder transformer (fairseq2) trained with a low-rank strategy, scored by BLEU."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

import sacrebleu
import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairseq2.data.data_pipeline import Collater
from fairseq2.generation.beam_search import BeamSearchSeq2SeqGenerator
from fairseq2.nn import BatchLayout
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from typing_extensions import override

from lr_lightning.data.translation import BOS, PAD, TranslationTokenizer
from lr_lightning.models.lorentz_transformer import LorentzTransformer
from lr_lightning.models.seq2seq import build_transformer
from lr_lightning.optim_riemannian import RiemannianAdamW
from lr_lightning.schedules import inverse_sqrt
from lr_lightning.strategies import LowRankStrategy
from lr_lightning.tasks.base import StrategyTask

Batch = dict[str, Any]
Architecture = Literal["transformer", "hybonet"]
ARCHITECTURES: tuple[str, ...] = ("transformer", "hybonet")


def seq_lens(side: dict[str, Any]) -> list[int]:
    """The unpadded lengths of a collated side (fairseq2 gives a tensor, or a list for uniform lengths)."""
    lens = side["seq_lens"]
    return lens.tolist() if torch.is_tensor(lens) else list(lens)


def layout(side: dict[str, torch.Tensor]) -> tuple[torch.Tensor, BatchLayout]:
    """A collated side (``seqs``, ``seq_lens``) as fairseq2's padded ``(seqs, BatchLayout)``."""
    seqs = side["seqs"]
    return seqs, BatchLayout(seqs.shape, seq_lens(side), device=seqs.device)


def teacher_forcing(target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, BatchLayout, torch.Tensor]:
    """Decoder input ``<s> y`` with its layout, and the shifted targets ``y </s>`` (padding = ``PAD``)."""
    seqs = target["seqs"]
    inputs = seqs[:, :-1]
    return inputs, BatchLayout(inputs.shape, [n - 1 for n in seq_lens(target)], device=seqs.device), seqs[:, 1:]


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every FSDP2 parameter group of ``model`` all-gathered once and kept whole inside the block, resharded after it.

    Beam search runs a data-dependent number of forwards per process; all-gathering per forward would leave
    processes waiting in collectives the others never start. Without FSDP2 this does nothing.
    """
    groups = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for module in groups:
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for module in groups:
            module.set_reshard_after_forward(module is not model, recurse=False)  # fully_shard's defaults
            module.reshard()


class VocabularyLimit:
    """fairseq2 step processor: never emit ids ``>= size`` (embedding rows beyond the tokenizer's vocabulary)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, seqs: torch.Tensor, probs: torch.Tensor, lprob: bool = False) -> None:
        probs[:, self.size:] = -torch.inf if lprob else 0.0


class TranslationTask(StrategyTask):
    """Sequence-to-sequence translation; loss ``-(1/|y|) sum_t log p(y_t | y_<t, x)`` with label smoothing.

    The model is fairseq2's pre-norm transformer (``models.seq2seq.build_transformer``): shared
    source/target embedding tied to the output projection, sinusoidal positions. The strategy converts
    its attention and FFN projections in ``__init__`` (names like ``model.encoder.layers.0.self_attn.q_proj``,
    ``model.decoder.layers.2.ffn.inner_proj``). Validation and test report the label-smoothed loss, the
    per-token NLL and detokenized corpus BLEU (sacrebleu) of fairseq2's beam search. Under
    ``ModelParallelStrategy`` each encoder and decoder layer and the whole model are sharded with FSDP2's
    ``fully_shard`` in ``configure_model``; beam search then gathers the whole model once per batch.

    ``architecture="hybonet"`` builds HyboNet's fully hyperbolic Transformer instead
    (``models.lorentz_transformer.LorentzTransformer``, Chen et al. 2022): Lorentz token points and
    learned positions, Lorentz attention, FFN and residual maps whose ``nn.Linear`` matrices the strategy
    converts (``model.encoder.layers.0.self_attn.q_proj.linear``, ...), logits ``2k + 2<x, p_c>_L + b_c``
    (minus the squared Lorentzian distance to token point ``p_c``).
    Its token points are ``geoopt.ManifoldParameter`` s, so the optimizer must be a geoopt one (the default,
    ``lr_lightning.optim_riemannian.RiemannianAdamW``; a Euclidean optimizer is refused when training
    starts), and FSDP2 (which drops the point class) is refused.

    Args:
        strategy: The low-rank method (default: ``FullRank()``).
        optimizer: Optimizer factory called with the parameter groups (default: AdamW for ``transformer``,
            :class:`RiemannianAdamW` for ``hybonet``, whose token points need a geoopt optimizer).
        vocab_size: Embedding rows; at least the data module's SentencePiece vocabulary.
        model_dim: Model width ``d`` (fairseq2's ``model_dim``).
        num_layers: Encoder layers and decoder layers (each).
        num_heads: Attention heads.
        ffn_dim: FFN inner width.
        dropout: Dropout on attention and FFN outputs and embeddings.
        max_seq_len: Longest source or target sequence (positions).
        label_smoothing: Label-smoothing ``epsilon`` of the training loss.
        schedule: ``inverse_sqrt`` (warmup, then ``sqrt(warmup / t)``) or ``cosine`` (warmup, cosine
            to ``min_lr_ratio``), times the strategy's LR factor.
        warmup_steps: Linear LR warmup steps.
        min_lr_ratio: Final LR of the cosine schedule, relative to the peak.
        beam_size: Beam width of validation and test decoding.
        len_penalty: Beam search length penalty (``> 1`` favours longer outputs).
        max_gen_len: Longest output as ``a * source length + b``, given as ``[a, b]``.
        bleu_on_validation: Decode the validation set for BLEU at every validation (off: loss only).
        architecture: ``transformer`` (fairseq2, Euclidean) or ``hybonet`` (Lorentz model).
        curvature: HyboNet's ``k`` (points satisfy ``<x, x>_L = -k``); unused by ``transformer``.
    """

    def __init__(
        self,
        strategy: LowRankStrategy | None = None,
        optimizer: OptimizerCallable | None = None,
        vocab_size: int = 8000,
        model_dim: int = 256,
        num_layers: int = 3,
        num_heads: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        max_seq_len: int = 256,
        label_smoothing: float = 0.1,
        schedule: Literal["inverse_sqrt", "cosine"] = "inverse_sqrt",
        warmup_steps: int = 500,
        min_lr_ratio: float = 0.1,
        beam_size: int = 5,
        len_penalty: float = 1.0,
        max_gen_len: tuple[float, int] = (1.5, 10),
        bleu_on_validation: bool = True,
        architecture: Architecture = "transformer",
        curvature: float = 1.0,
    ) -> None:
        if optimizer is None:
            optimizer = RiemannianAdamW if architecture == "hybonet" else torch.optim.AdamW
        super().__init__(strategy, optimizer, warmup_steps, min_lr_ratio)
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        if not curvature > 0:
            raise ValueError(f"curvature must be > 0 (the k of <x, x>_L = -k), got {curvature}")
        if architecture == "hybonet" and model_dim < 2 * num_heads:
            raise ValueError(f"hybonet needs model_dim >= 2 * num_heads (points of >= 2 coordinates per head), "
                             f"got model_dim={model_dim}, num_heads={num_heads}")
        if model_dim % num_heads:
            raise ValueError(f"model_dim ({model_dim}) must be a multiple of num_heads ({num_heads})")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        self.save_hyperparameters(ignore=["strategy", "optimizer"])
        self.install_model()
        self.tokenizer: TranslationTokenizer | None = None
        self._outputs: dict[str, list[tuple[str, str]]] = {"val": [], "test": []}

    @override
    def build_model(self) -> torch.nn.Module:
        h = self.hparams
        if h.architecture == "hybonet":
            return LorentzTransformer(h.vocab_size, h.model_dim, h.num_layers, h.num_heads, h.ffn_dim, h.dropout,
                                      h.max_seq_len, h.curvature)
        return build_transformer(h.vocab_size, h.model_dim, h.num_layers, h.num_heads, h.ffn_dim, h.dropout,
                                 h.max_seq_len, PAD)

    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self.tokenizer = getattr(datamodule, "tokenizer", None) or self.tokenizer
        if self.tokenizer is not None and self.tokenizer.vocab_size > self.hparams.vocab_size:
            raise ValueError(f"model vocab_size={self.hparams.vocab_size} is smaller than the tokenizer's "
                             f"vocabulary ({self.tokenizer.vocab_size}): set --model.init_args.vocab_size "
                             f"{self.tokenizer.vocab_size}")
        seq_len = getattr(datamodule, "max_seq_len", None)
        if seq_len is not None and seq_len > self.hparams.max_seq_len:
            raise ValueError(f"data max_seq_len={seq_len} exceeds the model's max_seq_len="
                             f"{self.hparams.max_seq_len}: lower --data.init_args.max_seq_len or raise "
                             f"--model.init_args.max_seq_len")

    @override
    def configure_model(self) -> None:
        """FSDP2 under ``ModelParallelStrategy``: ``fully_shard`` each encoder and decoder layer, then the whole
        model, whose group holds the embedding that the output projection shares (one parameter, one shard).
        ``hybonet`` is refused: FSDP2 replaces its ``ManifoldParameter`` points by plain tensors."""
        mesh = self.device_mesh
        if mesh is None or isinstance(self.model, FSDPModule):
            return
        if self.hparams.architecture == "hybonet":
            raise ValueError("architecture='hybonet' cannot be sharded with FSDP2 (ModelParallelStrategy): it drops "
                             "the ManifoldParameter class of the token points; use DDP or a single device")
        data_parallel = mesh["data_parallel"]
        for layer in [*self.model.encoder.layers, *self.model.decoder.layers]:
            fully_shard(layer, mesh=data_parallel)
        fully_shard(self.model, mesh=data_parallel)

    # ----------------------------------------------------------------------------- loss
    @override
    def forward(self, source: torch.Tensor, source_layout: BatchLayout, target_in: torch.Tensor,
                target_layout: BatchLayout) -> torch.Tensor:
        """Logits of the next target token at every decoder position."""
        return self.model(source, source_layout, target_in, target_layout)

    def _logits(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Flattened next-token logits, their targets (``PAD`` where padded) and the count of real targets."""
        source, source_layout = layout(batch["source"])
        target_in, target_layout, target_out = teacher_forcing(batch["target"])
        logits = self(source, source_layout, target_in, target_layout).float().flatten(0, 1)
        targets = target_out.flatten()
        return logits, targets, int((targets != PAD).sum())

    def _smoothed_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, ignore_index=PAD, label_smoothing=self.hparams.label_smoothing)

    @override
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        logits, targets, tokens = self._logits(batch)
        loss = self._smoothed_loss(logits, targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=tokens)
        return loss

    # ----------------------------------------------------------------------------- decoding
    def generator(self, beam_size: int | None = None) -> BeamSearchSeq2SeqGenerator:
        """fairseq2's beam search over this model (puts the model in eval mode)."""
        if self.tokenizer is None:
            raise ValueError("decoding needs the data module's tokenizer: run through a Trainer with "
                             "TranslationDataModule, or set task.tokenizer")
        return BeamSearchSeq2SeqGenerator(self.model, self.tokenizer.vocab_info,
                                          beam_size=beam_size or self.hparams.beam_size,
                                          max_gen_len=tuple(self.hparams.max_gen_len),
                                          len_penalty=self.hparams.len_penalty,
                                          step_processors=[VocabularyLimit(self.tokenizer.vocab_size)])

    @torch.no_grad()
    def translate_tokens(self, source: torch.Tensor, source_layout: BatchLayout,
                         beam_size: int | None = None) -> list[torch.Tensor]:
        """The best hypothesis (token ids after ``<s>``, ending with ``</s>``) for every source sequence; under
        FSDP2 every process must call it (the model is gathered)."""
        prompt = torch.full((source.size(0), 1), BOS, dtype=source.dtype, device=source.device)
        with gathered(self.model):
            output = self.generator(beam_size)(source, source_layout, prompt,
                                               BatchLayout(prompt.shape, [1] * source.size(0), device=source.device))
        return [hypotheses[0].seq for hypotheses in output.hypotheses]

    def translate(self, sources: list[str], beam_size: int | None = None) -> list[str]:
        """Detokenized translations of ``sources`` (one batch)."""
        if self.tokenizer is None:
            raise ValueError("translate needs a tokenizer: set task.tokenizer (TranslationDataModule.tokenizer)")
        batch = Collater(pad_value=PAD)([self.tokenizer.encode_source(s) for s in sources])
        tokens = self.translate_tokens(*layout({**batch, "seqs": batch["seqs"].to(self.device)}), beam_size)
        return [self.tokenizer.decode(t) for t in tokens]

    # ----------------------------------------------------------------------------- evaluation
    def _evaluate(self, batch: Batch, stage: str) -> None:
        logits, targets, tokens = self._logits(batch)
        smoothed = self._smoothed_loss(logits, targets)
        nll = F.cross_entropy(logits, targets, ignore_index=PAD) if self.hparams.label_smoothing else smoothed
        self.log(f"{stage}/loss", smoothed, prog_bar=True, sync_dist=True, batch_size=tokens)
        self.log(f"{stage}/nll", nll, sync_dist=True, batch_size=tokens)
        if stage == "val" and not self.hparams.bleu_on_validation:
            return
        hypotheses = self.translate_tokens(*layout(batch["source"]))
        self._outputs[stage] += [(self.tokenizer.decode(h), ref) for h, ref in zip(hypotheses, batch["reference"])]

    def _log_bleu(self, stage: str) -> None:
        pairs, self._outputs[stage] = self._outputs[stage], []
        if dist.is_available() and dist.is_initialized():
            gathered: list[list[tuple[str, str]]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, pairs)
            pairs = [pair for part in gathered for pair in part]
        if pairs:
            hypotheses, references = zip(*pairs)
            bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score
            self.log(f"{stage}/bleu", bleu, prog_bar=True, sync_dist=True)  # equal on every process

    @override
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_bleu("val")

    @override
    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_bleu("test")

    # ----------------------------------------------------------------------------- optimization
    @override
    def lr_schedule(self) -> Callable[[int], float]:
        """``inverse_sqrt`` (warmup, then ``sqrt(warmup / t)``) or the base class's warmup + cosine."""
        if self.hparams.schedule == "inverse_sqrt":
            return partial(inverse_sqrt, warmup_steps=self.hparams.warmup_steps)
        return super().lr_schedule()
