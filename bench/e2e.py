"""End-to-end cost of every strategy on a GPT: step time, training-state bytes, bytes saved for backward.

    python bench/e2e.py                                   # d = 768, 2 blocks, 1 x 1024 tokens, vocab 8192
    python bench/e2e.py --width 1024 --depth 4 --device cuda --rounds 10
    python bench/e2e.py --tiny                            # seconds: d = 64, 1 block, 64 tokens (the smoke test)

The model is ``lr_lightning.models.GPT`` at GPT-2-small width (``--width``, heads of 64, MLP ``4 d``),
``--depth`` blocks, ``--vocab`` tokens (tied head; kept modest so the embedding does not dominate)
and a context of ``--tokens / --batch``. Every strategy converts ``*.attn.*`` and ``*.mlp.*`` (``qkv``,
``proj``, ``fc``, ``proj``) at rank ``r = d / --rank-divisor`` (``d / 8``):

- ``FullRank``: the dense baseline; ``LoRA`` and ``ReLoRA`` at ``r`` (same layer; ReLoRA's merges are
  periodic and not timed here); ``SST`` at ``r`` active pairs; ``TDLRT`` with ``init_rank = max_rank = r``
  (the cheap integrator trains the core at the augmented ``2 r`` between truncations).
- ``InRank`` (InRank-Efficient) at found rank ``r`` with a buffer of ``min(16, r / 2)`` inside its default
  capacity ``min(m, n) / 2``: one row in stage 1, one after ``strategy.switch`` (SVD re-factor at ``r``,
  buffer dropped) and ``shrink_`` (the layers made compact, optimizer state moved).
- ``SVDTraining``: one row at full rank (before pruning), one after ``strategy.prune`` with every layer
  kept at its top ``r`` singular values (the energy rule replaced by a top-``r`` mask; ``standardize``
  runs first as in the strategy) and ``shrink_``.

Each step is what ``LowRankCallback`` runs around an optimizer step: forward, cross-entropy, backward,
``strategy.before_optimizer_step`` (its state edits applied), ``AdamW.step`` on ``strategy.param_groups``
through the optimizer the callback installs (a ``RoleOptimizer`` for the strategies with an LR
re-warmup, ReLoRA and SST, then ``strategy.wrap_optimizer``), ``strategy.after_optimizer_step`` and the
operations ``strategy.should_update`` names (none, at the step index timed). Each strategy takes one
untimed warm-up step (step 0: TDLRT augments there); then ``--rounds`` rounds each time one step of every
strategy in turn (round-robin in one process, the starting strategy rotating), and the table gives the
median and, since other processes on a shared machine disturb some rounds, the fastest step too.

Memory, in bytes of distinct storages (a view counts its whole storage once; tied weights once):

- converted-layer training state: parameters (frozen ones too) and buffers of the targeted layers, their
  gradients after a step and their AdamW moments; ``ideal`` is what their rank needs,
  ``4 (r (m + n) + m)`` numbers per layer (parameters, gradients, two moments; ``4 (m n + m)`` for the
  dense layers of FullRank, ``r = min(m, n)`` for SVD training before pruning). Adam's 0-d step counters
  are left out everywhere.
- whole-model training state: the same over every parameter and buffer of the model.
- saved for backward: the tensors autograd keeps from the forward and loss
  (``torch.autograd.graph.saved_tensors_hooks``), each storage once, the model's own parameters and
  buffers (and views of them) excluded since they are no extra memory.
- on CUDA also the step's peak: ``torch.cuda.max_memory_allocated`` during a step, less what the other
  strategies' models hold (all stay resident for the interleaved rounds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, machine_summary, markdown_table  # noqa: E402
from lr_lightning.callbacks import lowrank as lowrank_callbacks  # noqa: E402
from lr_lightning.callbacks.lowrank import UNDECAYED_ROLES, apply_edits_, decays_undecayed, role_map, scales_lr  # noqa: E402
from lr_lightning.layers import IncrementalLinear  # noqa: E402
from lr_lightning.layers.base import LowRankLayer  # noqa: E402
from lr_lightning.models import GPT, GPTConfig  # noqa: E402
from lr_lightning.optim import RoleOptimizer  # noqa: E402
from lr_lightning.strategies import SST, TDLRT, FullRank, InRank, LoRA, LowRankStrategy, ReLoRA, SVDTraining  # noqa: E402

STRATEGIES = ("full", "lora", "relora", "sst", "inrank", "tdlrt", "svd")
TARGETS = ["*.attn.*", "*.mlp.*"]
HEAD_DIM = 64
"""Width per attention head (GPT-2's), so ``n_head = d / 64``."""
PLAIN_STEP = 1
"""Step index of the timed steps: no strategy's periodic operation is due there (as bench/layers.py)."""
WARMUP_STEP = 0
"""Step index of the warm-up step (TDLRT's cheap integrator augments its bases there)."""
EVENT_STEP = WARMUP_STEP + 1
"""Optimizer steps completed when SVD training's prune and InRank's switch run (right after the warm-up step)."""
TARGET_RATIO = 1.25
"""The issue's bound on converted-layer training state after SVD training's prune / InRank's switch."""


# ------------------------------------------------------------------------------------------ byte counting
def _storage(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view counts its whole storage, once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        ptr, nbytes = _storage(t)
        if nbytes:
            seen[ptr] = max(seen.get(ptr, 0), nbytes)
    return sum(seen.values())


def state_tensors(modules: Iterable[nn.Module], optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters, buffers, gradients and optimizer moments (0-d step counters left out) of ``modules``."""
    params, buffers = {}, {}
    for module in modules:
        params.update((id(p), p) for p in module.parameters())
        buffers.update((id(b), b) for b in module.buffers())
    tensors = [*params.values(), *buffers.values()]
    tensors += [p.grad for p in params.values() if p.grad is not None]
    for p in params.values():
        tensors += [t for t in optimizer.state.get(p, {}).values() if torch.is_tensor(t) and t.dim() > 0]
    return tensors


class SavedForBackward:
    """``saved_tensors_hooks`` that record the distinct storages autograd keeps, minus ``model``'s own."""

    def __init__(self, model: nn.Module) -> None:
        self.own = {_storage(t)[0] for t in [*model.parameters(), *model.buffers()]}
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = _storage(t)
        if ptr not in self.own and nbytes:
            self.storages[ptr] = max(self.storages.get(ptr, 0), nbytes)
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


# ------------------------------------------------------------------------------------------ trainees
@dataclass
class Measured:
    """What one strategy's row reports."""

    times: list[float] = field(default_factory=list)
    converted: int = 0
    ideal: int = 0
    model: int = 0
    saved: int = 0
    peak: int | None = None

    @property
    def step(self) -> float:
        """Median seconds of the timed steps."""
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        """Fastest timed step (on a shared machine, the one least disturbed by other processes)."""
        return min(self.times)


@dataclass
class Trainee:
    """One row: a converted GPT with its strategy, optimizer and a fixed batch of random tokens."""

    label: str
    strategy: LowRankStrategy
    model: GPT
    optimizer: torch.optim.Optimizer
    idx: torch.Tensor
    targets: torch.Tensor
    ideal_rank: int | None
    """Rank ``r`` of the ideal ``r (m + n) + m`` per layer; ``None``: each layer's own (``m n + m`` if dense)."""
    note: str = ""
    measured: Measured = field(default_factory=Measured)
    completed: int = 0
    """Optimizer steps completed (what ``RoleOptimizer`` reads, as the callback's reads ``trainer.global_step``)."""

    def __post_init__(self) -> None:
        self.optimizer = training_optimizer(self.strategy, self.model, self.optimizer, lambda: self.completed)

    def converted_layers(self) -> list[tuple[str, nn.Module]]:
        return self.strategy.select(self.model)

    def step(self, step: int, saved: SavedForBackward | None = None) -> None:
        """One optimizer step as ``LowRankCallback`` runs it; ``step`` counts the steps completed before it."""
        self.completed = step
        self.optimizer.zero_grad(set_to_none=True)
        with saved.hooks() if saved is not None else nullcontext():
            logits = self.model(self.idx)
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), self.targets.view(-1))
        loss.backward()
        apply_edits_([self.optimizer], self.strategy.before_optimizer_step(self.model, step))
        self.optimizer.step()
        done = step + 1
        self.strategy.after_optimizer_step(self.model, done)
        if operations := self.strategy.should_update(done):
            apply_edits_([self.optimizer], self.strategy.run(self.model, operations, done))

    def rank_label(self) -> str:
        """The ideal's rank and, if different, the rank the forward runs at (first converted layer)."""
        layer = self.converted_layers()[0][1]
        active = forward_rank(layer)
        rank = self.ideal_rank if self.ideal_rank is not None else active
        text = str(rank) if active == rank else f"{rank} (runs {active})"
        return f"{text}{self.note}"


def training_optimizer(strategy: LowRankStrategy, model: nn.Module, optimizer: torch.optim.Optimizer,
                       steps: Callable[[], int]) -> torch.optim.Optimizer:
    """``optimizer`` as ``LowRankCallback`` makes it step: a ``RoleOptimizer`` (the strategy's LR multipliers, no
    decay on bases and spectra) where the strategy scales learning rates or the optimizer decays those roles,
    then ``strategy.wrap_optimizer``."""
    roles = role_map(strategy, model)
    if scales_lr(strategy) or decays_undecayed(optimizer, roles):
        optimizer = RoleOptimizer(optimizer, roles, strategy.lr_multiplier, steps, UNDECAYED_ROLES)
    return strategy.wrap_optimizer(optimizer, model)


def forward_rank(layer: nn.Module) -> int:
    """The rank the layer's forward computes at (``r + buffer`` for InRank; ``min(m, n)`` if dense)."""
    if isinstance(layer, IncrementalLinear):
        return layer.active_rank
    if isinstance(layer, LowRankLayer):
        return layer.rank
    return min(layer.weight.shape)


def ideal_bytes(trainee: Trainee) -> int:
    """``4 (r (m + n) + m)`` numbers per converted layer (dense ``4 (m n + m)``) at the parameters' dtype."""
    total = 0
    for _, layer in trainee.converted_layers():
        m, n = layer.out_features, layer.in_features
        bias = getattr(layer, "bias", None)
        bias_numel = bias.numel() if bias is not None else 0
        dtype = next(p.dtype for p in layer.parameters())
        if isinstance(layer, LowRankLayer):
            rank = trainee.ideal_rank if trainee.ideal_rank is not None else layer.rank
            numel = min(rank, m, n) * (m + n) + bias_numel
        else:
            numel = m * n + bias_numel
        total += 4 * numel * torch.empty((), dtype=dtype).element_size()
    return total


def make_strategy(name: str, rank: int) -> LowRankStrategy:
    """``name``'s strategy at rank ``rank`` on attention and MLP (the events run separately)."""
    if name == "full":
        return FullRank(target_modules=TARGETS)
    if name == "lora":
        return LoRA(rank=rank, target_modules=TARGETS)
    if name == "relora":
        return ReLoRA(rank=rank, target_modules=TARGETS)
    if name == "sst":
        return SST(rank=rank, target_modules=TARGETS)
    if name == "inrank":
        return InRank(init_rank=rank, buffer=inrank_buffer(rank), switch_epoch=None, target_modules=TARGETS)
    if name == "tdlrt":
        return TDLRT(init_rank=rank, max_rank=rank, target_modules=TARGETS)
    if name == "svd":
        return SVDTraining(target_modules=TARGETS)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")


def inrank_buffer(rank: int) -> int:
    """InRank's buffer in this benchmark: the package default 16, at most half the rank."""
    return max(1, min(16, rank // 2))


LABELS = {"full": "FullRank", "lora": "LoRA", "relora": "ReLoRA", "sst": "SST", "inrank": "InRank",
          "tdlrt": "TDLRT", "svd": "SVDTraining"}


@dataclass(frozen=True)
class Setup:
    """Model shape, batch and device of a run."""

    width: int
    depth: int
    tokens: int
    batch: int
    vocab: int
    rank: int
    device: torch.device

    @property
    def block(self) -> int:
        return self.tokens // self.batch


def build(name: str, setup: Setup, seed: int = 0) -> tuple[LowRankStrategy, GPT, torch.optim.Optimizer,
                                                              torch.Tensor, torch.Tensor]:
    """A fresh GPT converted by ``name``'s strategy, AdamW on its groups, a fixed batch."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=setup.vocab, block_size=setup.block, n_layer=setup.depth,
                       n_head=max(1, setup.width // HEAD_DIM), n_embd=setup.width)
    strategy = make_strategy(name, setup.rank)
    model = strategy.apply(GPT(config).to(setup.device))
    optimizer = torch.optim.AdamW(strategy.param_groups(model), lr=1e-4)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(setup.vocab, (setup.batch, setup.block + 1), generator=generator).to(setup.device)
    return strategy, model, optimizer, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


# ------------------------------------------------------------------------------------------ one-time events
def shrink_function() -> Callable[..., list[str]] | None:
    """``lr_lightning.callbacks.lowrank.shrink_`` (compaction after the prune / switch), if the package has it."""
    return getattr(lowrank_callbacks, "shrink_", None)


def top_rank_keep(layer: nn.Module, rank: int) -> Callable[[float], torch.Tensor]:
    """A stand-in for ``layer.energy_keep``: keep the ``rank`` largest ``|s|`` among the kept values."""
    def keep(energy: float) -> torch.Tensor:
        power = layer.s.detach().abs().masked_fill(~layer.active, -1.0)
        mask = torch.zeros_like(layer.active)
        mask[power.argsort(descending=True, stable=True)[:min(rank, layer.rank)]] = True
        return mask
    return keep


def prune_svd_(trainee: Trainee, rank: int) -> list[str]:
    """SVD training's prune through ``strategy.prune`` with every layer kept at its top ``rank``; then shrink."""
    layers = trainee.strategy.svd_layers(trainee.model)
    for _, layer in layers:
        layer.energy_keep = top_rank_keep(layer, rank)
    try:
        edits = trainee.strategy.prune(trainee.model, EVENT_STEP)
    finally:
        for _, layer in layers:
            del layer.energy_keep
    if trainee.strategy.stage != "finetune":
        raise RuntimeError(f"SVDTraining.prune left stage {trainee.strategy.stage!r}, expected 'finetune'")
    apply_edits_([trainee.optimizer], edits)
    return _shrink(trainee)


def switch_inrank_(trainee: Trainee) -> list[str]:
    """InRank-Efficient's switch (SVD re-factor at the found rank, buffer dropped); then shrink."""
    apply_edits_([trainee.optimizer], trainee.strategy.switch(trainee.model, EVENT_STEP))
    if not trainee.strategy.switched:
        raise RuntimeError("InRank.switch did not set strategy.switched")
    return _shrink(trainee)


def _shrink(trainee: Trainee) -> list[str]:
    shrink = shrink_function()
    if shrink is None:
        trainee.note = " (not compacted: no shrink_)"
        return []
    return shrink(trainee.strategy, trainee.model, [trainee.optimizer])


def make_trainees(names: list[str], setup: Setup, log: Callable[[str], None] = print) -> list[Trainee]:
    """One trainee per strategy; SVD training and InRank also after their one-time event (two rows each)."""
    trainees = []
    for name in names:
        log(f"  building {name}")
        label = LABELS[name]
        rank = None if name in ("full", "svd") else setup.rank
        if name == "inrank":
            trainees.append(Trainee(f"{label} stage 1 (r + buffer)", *build(name, setup), rank))
        elif name == "svd":
            trainees.append(Trainee(f"{label} before prune (full rank)", *build(name, setup), rank))
        else:
            trainees.append(Trainee(label, *build(name, setup), rank))
        if name in ("inrank", "svd"):
            after = Trainee(f"{label} after {'switch' if name == 'inrank' else 'prune'} + shrink_",
                            *build(name, setup), setup.rank)
            after.step(WARMUP_STEP)  # the event comes mid-training: optimizer state exists
            compacted = switch_inrank_(after) if name == "inrank" else prune_svd_(after, setup.rank)
            log(f"    {after.label}: compacted {len(compacted)} layers")
            trainees.append(after)
    return trainees


# ------------------------------------------------------------------------------------------ measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(trainees: list[Trainee], rounds: int, device: torch.device,
                log: Callable[[str], None] = print) -> None:
    """One warm-up step each, then ``rounds`` round-robin rounds of one timed step per trainee."""
    for trainee in trainees:
        trainee.step(WARMUP_STEP)
    synchronize(device)
    for index in range(rounds):
        start = index % len(trainees)
        for trainee in trainees[start:] + trainees[:start]:
            synchronize(device)
            begin = time.perf_counter()
            trainee.step(PLAIN_STEP)
            synchronize(device)
            trainee.measured.times.append(time.perf_counter() - begin)
        log(f"  round {index + 1}/{rounds}: " + ", ".join(
            f"{t.label.split(' ')[0]} {t.measured.times[-1] * 1e3:.0f}" for t in trainees) + " ms")


def measure_memory(trainee: Trainee, device: torch.device) -> None:
    """One more step with the saved-tensor hooks on; the training state after it; on CUDA its peak."""
    trainee.optimizer.zero_grad(set_to_none=True)
    saved = SavedForBackward(trainee.model)
    if device.type == "cuda":
        synchronize(device)
        resident = storage_bytes(state_tensors([trainee.model], trainee.optimizer))
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    trainee.step(PLAIN_STEP, saved)
    synchronize(device)
    measured = trainee.measured
    if device.type == "cuda":
        measured.peak = torch.cuda.max_memory_allocated(device) - baseline + resident
    measured.saved = saved.bytes
    measured.converted = storage_bytes(state_tensors([m for _, m in trainee.converted_layers()], trainee.optimizer))
    measured.ideal = ideal_bytes(trainee)
    measured.model = storage_bytes(state_tensors([trainee.model], trainee.optimizer))
    trainee.optimizer.zero_grad(set_to_none=True)


def run(names: list[str], setup: Setup, rounds: int, log: Callable[[str], None] = print) -> list[Trainee]:
    """Build every trainee, time the interleaved rounds, then measure memory one trainee at a time."""
    trainees = make_trainees(names, setup, log)
    time_rounds(trainees, rounds, setup.device, log)
    for trainee in trainees:
        measure_memory(trainee, setup.device)
    return trainees


# ------------------------------------------------------------------------------------------ table
HEADER = ("strategy", "rank r (runs at)", "step ms (median)", "x FullRank", "best step ms", "converted state MB",
          "ideal MB", "x ideal", "model state MB", "saved for backward MB")


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f}"


def rows(trainees: list[Trainee], cuda: bool = False) -> list[tuple[str, ...]]:
    """One row per trainee; step ratios against FullRank's median when it ran (else ``-``)."""
    base = next((t.measured.step for t in trainees if isinstance(t.strategy, FullRank)), None)
    table = []
    for t in trainees:
        m = t.measured
        cells = (t.label, t.rank_label(), f"{m.step * 1e3:.1f}", f"{m.step / base:.2f}" if base else "-",
                 f"{m.best * 1e3:.1f}", _mb(m.converted), _mb(m.ideal), f"{m.converted / m.ideal:.2f}", _mb(m.model),
                 _mb(m.saved))
        if cuda:
            cells += (_mb(m.peak or 0),)
        table.append(cells)
    return table


def report(trainees: list[Trainee], header: str, cuda: bool = False) -> str:
    """The table as Markdown under ``header``, with what the columns count as footnote."""
    return "\n\n".join([
        header,
        markdown_table(HEADER + (("CUDA step peak MB",) if cuda else ()), rows(trainees, cuda)),
        "step = forward + cross-entropy + backward + strategy hooks + AdamW: the median over the interleaved "
        "rounds (x FullRank: its ratio to FullRank's median) and the fastest round. converted state = "
        "parameters (frozen too), buffers, gradients and AdamW moments of the attention and MLP layers; "
        "ideal = 4 (r (m + n) + m) numbers per layer at the rank shown (dense 4 (m n + m) for FullRank); "
        "model state = the same over the whole model; saved for backward = "
        "distinct storages autograd keeps from the forward, parameters excluded. MB = 2^20 bytes.",
    ])


# ------------------------------------------------------------------------------------------ command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=768, help="model width d (default 768, GPT-2 small)")
    parser.add_argument("--depth", type=int, default=2, help="transformer blocks")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step (batch x context)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step; context = tokens / batch")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size (tied embedding and head)")
    parser.add_argument("--rank-divisor", type=int, default=8, help="rank r = width / this")
    parser.add_argument("--rounds", type=int, default=5, help="timed round-robin rounds (after one warm-up)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch.set_num_threads (default: every CPU this process may use)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--tiny", action="store_true",
                        help="smoke-test size: width 64, depth 1, 64 tokens, vocab 256, 2 rounds")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    if args.tiny:
        args.width, args.depth, args.tokens, args.batch, args.vocab, args.rounds = 64, 1, 64, 1, 256, 2
    for name in ("width", "depth", "tokens", "batch", "vocab", "rank_divisor", "rounds", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.tokens % args.batch:
        raise ValueError(f"--tokens ({args.tokens}) must be a multiple of --batch ({args.batch})")
    if args.width % HEAD_DIM and args.width > HEAD_DIM:
        raise ValueError(f"--width must be a multiple of {HEAD_DIM} (the head width), got {args.width}")
    if args.width // args.rank_divisor < 1:
        raise ValueError(f"--rank-divisor must be <= --width, got {args.rank_divisor} > {args.width}")
    args.strategies = list(dict.fromkeys(args.strategies))
    return args


def main(argv: list[str] | None = None) -> list[Trainee]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    setup = Setup(args.width, args.depth, args.tokens, args.batch, args.vocab, args.width // args.rank_divisor,
                  device)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    header = (f"End-to-end benchmark: GPT d = {setup.width}, {setup.depth} blocks, {setup.batch} x {setup.block} "
              f"tokens per step, vocab {setup.vocab}, rank r = d / {args.rank_divisor} = {setup.rank} on attention "
              f"and MLP, AdamW, float32; median of {args.rounds} interleaved rounds. Machine: "
              f"{machine_summary(device)}. Command: `python bench/e2e.py{' ' + command if command else ''}`")
    print(header, flush=True)
    trainees = run(args.strategies, setup, args.rounds, log=lambda line: print(line, flush=True))
    text = report(trainees, header, cuda=device.type == "cuda")
    emit(text, args.out)
    return trainees


if __name__ == "__main__":
    main()
