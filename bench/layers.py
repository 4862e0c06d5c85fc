"""Cost of every strategy's layer against a dense ``nn.Linear``: time, memory, periodic operations.

    python bench/layers.py                                   # CPU: widths 512..2048, ranks 1/4..1/32
    python bench/layers.py --shapes 4096 1024x4096 --rank-fractions 8 --layers dense sst tdlrt

Each case is a one-layer model ``proj: R^n -> R^m`` converted by the real strategy (``strategy.apply``)
and trained as the callback would: forward and backward of ``T`` tokens (``--tokens``; the input
requires grad, as inside a network), the strategy's per-step hooks (``before_optimizer_step``:
SVD training's regularizer gradient, TDLRT's dropped basis gradients; ``after_optimizer_step``:
SST's projection), and AdamW on ``strategy.param_groups``. Times are the best of ``--repeats``
after a warm-up step; rates are relative to the dense layer of the same shape and ``T``.

FLOP-count ideal of forward + backward (matmuls only; ``m' = min(m, n)``, ``r`` the active rank):

- dense ``W``: ``6 T m n``.
- LoRA / ReLoRA, ``W0 + B A`` with ``W0`` frozen: ``4 T m n + 6 T r (m + n)`` (``W0``'s forward and input
  gradient, no weight gradient).
- SST ``U diag(s) V^T`` (METHODS 3.3): ``4 T m' (m + n) + 2 T r (m + n)``: forward and input gradient
  through the whole bases, weight gradients for the ``r`` active columns only.
- InRank ``B A`` at ``r`` active columns (``r + buffer`` in stage 1) and SVD training ``N diag(|s|) C``
  at its rank (``m'`` until pruned): ``6 T r (m + n)``.
- TDLRT ``U S V^T``: ``6 T r (m + n + r)``; the cheap integrator trains the core at the augmented rank
  (``2 r`` for ``max_rank = r``) between truncations, so that is the rank timed.

``x ideal = measured time / (dense time * ideal FLOPs / dense FLOPs)``: 1.0 means the layer runs at
the dense layer's FLOP rate. Memory counts tensors in bytes: weights (parameters and buffers),
gradients after backward (only what requires grad), AdamW state (two moments per trained element
plus a step counter per tensor); on CUDA also ``torch.cuda.max_memory_allocated`` of a step
(activations included). Every operation the strategy names (``strategy.operations``: ReLoRA's merge,
SST's resvd and resample, ...) is timed as the callback runs it, ``getattr(strategy, name)(model, step)``
plus its optimizer-state edits, at each strategy's default schedule: on a fresh copy of the trained
case, after a forward and backward (fresh gradients) and the operations due before it, at ``step``
equal to its period (so SST's resvd ends a round) or ``PLAIN_STEP`` for one that runs once. Periodic
ones are amortised per step as a percentage of that layer's whole training step.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, machine_summary, markdown_table  # noqa: E402
from lr_lightning.callbacks.lowrank import apply_edits_, shrink_  # noqa: E402
from lr_lightning.layers import IncrementalLinear, SVDLinear  # noqa: E402
from lr_lightning.strategies import SST, TDLRT, FullRank, InRank, LowRankStrategy, ReLoRA, SVDTraining  # noqa: E402

LAYERS = ("dense", "lora", "sst", "inrank", "inrank2", "reference", "tdlrt", "svd")
PLAIN_STEP = 1
"""Step index passed to the per-step hooks while timing: no strategy runs a periodic operation there."""


# ------------------------------------------------------------------------------------------ FLOP-count ideal
def dense_flops(tokens: int, m: int, n: int) -> int:
    """``6 T m n``: forward ``2 T m n``, input and weight gradients ``2 T m n`` each."""
    return 6 * tokens * m * n


def lora_flops(tokens: int, m: int, n: int, rank: int) -> int:
    """``4 T m n + 6 T r (m + n)``: the frozen ``W0`` has no weight gradient."""
    return 4 * tokens * m * n + 6 * tokens * rank * (m + n)


def sst_flops(tokens: int, m: int, n: int, rank: int) -> int:
    """``4 T m' (m + n) + 2 T r (m + n)``: whole bases forward and backward, ``r`` active weight gradients."""
    return 4 * tokens * min(m, n) * (m + n) + 2 * tokens * rank * (m + n)


def factor_flops(tokens: int, m: int, n: int, rank: int) -> int:
    """``6 T r (m + n)``: a two-factor product ``B A`` (InRank) or ``N diag(|s|) C`` (SVD training)."""
    return 6 * tokens * rank * (m + n)


def tucker_flops(tokens: int, m: int, n: int, rank: int) -> int:
    """``6 T r (m + n + r)``: ``U S V^T`` with an ``r x r`` core; the cheap step computes the bases' gradients
    too (the augmentation reads them and DDP reduces them), though it only steps the core."""
    return 6 * tokens * rank * (m + n + rank)


# ------------------------------------------------------------------------------------------ cases
class OneLayer(nn.Module):
    """The model a case trains: a single ``proj = nn.Linear(n, m)`` for the strategy to convert."""

    def __init__(self, m: int, n: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@dataclass(frozen=True)
class LayerKind:
    """How to build one strategy's layer at a rank, count its ideal FLOPs and bring it to the stage it is timed in."""

    name: str
    strategy: Callable[[int], LowRankStrategy]
    flops: Callable[[int, int, int, int], int]
    ranked: bool = True
    stage: Callable[[Trainee, int], bool] | None = None
    """Runs a one-time operation on a fresh case at rank ``r``; returns whether it ran (the case is then past it,
    and its operations are not timed)."""


def _inrank(rank: int) -> InRank:
    buffer = min(16, rank // 2)
    return InRank(init_rank=rank - buffer, buffer=buffer, switch_epoch=None, target_modules=["proj"])


def _inrank_stage2(rank: int) -> InRank:
    return InRank(init_rank=rank, buffer=1, switch_epoch=None, target_modules=["proj"])


class ReferenceFactors(LowRankStrategy):
    """The released InRank code's stage-2 layer (``resize`` to rank ``r``): ``Linear(n, r, no bias)``, ``Linear(r, m)``.

    A plain baseline for ``inrank2``: the same function class with nothing of ours around it.
    """

    def __init__(self, rank: int, target_modules: list[str] | None = None) -> None:
        super().__init__(target_modules)
        self.rank = rank

    def convert(self, name: str, module: nn.Module, index: int) -> nn.Module:
        m, n = module.weight.shape
        return nn.Sequential(nn.Linear(n, self.rank, bias=False), nn.Linear(self.rank, m))


def prune_to(trainee: Trainee, rank: int) -> bool:
    """Below full rank, keep the ``rank`` largest ``|s|`` and shrink to them (SVD training pruned to that rank)."""
    layer: SVDLinear = trainee.layer
    if rank >= layer.capacity:
        return False
    keep = torch.zeros_like(layer.active)
    keep[layer.s.detach().abs().argsort(descending=True)[:rank]] = True
    layer.prune_(keep)
    trainee.strategy.stage = "finetune"
    shrink_(trainee.strategy, trainee.model, [trainee.optimizer])
    return True


def switch(trainee: Trainee, rank: int) -> bool:
    """InRank's switch to stage 2, shrinking the layer to its rank."""
    apply_edits_([trainee.optimizer], trainee.strategy.switch(trainee.model, PLAIN_STEP))
    shrink_(trainee.strategy, trainee.model, [trainee.optimizer])
    return True


KINDS: dict[str, LayerKind] = {
    "dense": LayerKind("dense", lambda r: FullRank(target_modules=["proj"]), lambda t, m, n, r: dense_flops(t, m, n),
                       ranked=False),
    "lora": LayerKind("lora", lambda r: ReLoRA(rank=r, target_modules=["proj"]), lora_flops),
    "sst": LayerKind("sst", lambda r: SST(rank=r, target_modules=["proj"]), sst_flops),
    "inrank": LayerKind("inrank", _inrank, factor_flops),
    "inrank2": LayerKind("inrank2", _inrank_stage2, factor_flops, stage=switch),
    "reference": LayerKind("reference", lambda r: ReferenceFactors(r, target_modules=["proj"]), factor_flops),
    "tdlrt": LayerKind("tdlrt", lambda r: TDLRT(init_rank=r, max_rank=r, target_modules=["proj"]), tucker_flops),
    "svd": LayerKind("svd", lambda r: SVDTraining(init="random", target_modules=["proj"]), factor_flops,
                     stage=prune_to),
}
"""Each strategy at its default schedule; ``lora`` is timed with ReLoRA's defaults (same layer, plus merges).
SVD training starts at full rank; its ranked cases are the layer pruned to ``r`` and shrunk to it
(``init="random"``, the paper's init, spares an SVD per case; the timed prune still runs one).
``inrank`` is stage 1 (``r`` plus a buffer inside the capacity), ``inrank2`` stage 2 (after the switch,
shrunk to ``r``), ``reference`` the released InRank code's stage-2 layer, two plain ``nn.Linear``."""


def active_rank(layer: nn.Module) -> int:
    """The rank the layer's forward runs at (``r + buffer`` for InRank; ``m`` for dense)."""
    if isinstance(layer, IncrementalLinear):
        return layer.active_rank
    if isinstance(layer, nn.Linear):
        return min(layer.weight.shape)
    if isinstance(layer, nn.Sequential):
        return layer[0].out_features
    return layer.rank


# ------------------------------------------------------------------------------------------ measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn()`` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Memory:
    """Bytes of weights (parameters and buffers), gradients and optimizer state; CUDA peak if measured."""

    weights: int
    grads: int
    state: int
    peak: int | None = None

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.state


def count_memory(model: nn.Module, optimizer: torch.optim.Optimizer) -> Memory:
    """Count ``model``'s tensors now: weights, existing ``.grad`` of trainable parameters, optimizer state."""
    params = list(model.parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return Memory(tensor_bytes(params) + tensor_bytes(list(model.buffers())),
                  tensor_bytes([p.grad for p in params if p.requires_grad and p.grad is not None]),
                  tensor_bytes(state))


@dataclass
class Trainee:
    """A converted one-layer model with its strategy, optimizer and a fixed batch."""

    model: OneLayer
    strategy: LowRankStrategy
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    grad_out: torch.Tensor

    @property
    def layer(self) -> nn.Module:
        return self.model.proj

    def forward_backward(self) -> None:
        for p in self.model.parameters():
            p.grad = None
        self.x.grad = None
        self.model(self.x).backward(self.grad_out)

    def update(self, step: int) -> None:
        """The strategy's hooks around one optimizer step, with their state edits applied."""
        apply_edits_([self.optimizer], self.strategy.before_optimizer_step(self.model, step))
        self.optimizer.step()
        self.strategy.after_optimizer_step(self.model, step + 1)


def make_trainee(kind: LayerKind, m: int, n: int, rank: int, tokens: int, device: torch.device,
                 seed: int = 0) -> Trainee:
    """``kind``'s strategy applied to a fresh ``OneLayer`` on ``device``, AdamW on its parameter groups."""
    torch.manual_seed(seed)
    strategy = kind.strategy(rank)
    model = strategy.apply(OneLayer(m, n).to(device))
    optimizer = torch.optim.AdamW(strategy.param_groups(model), lr=1e-4)
    x = torch.randn(tokens, n, device=device, requires_grad=True)
    return Trainee(model, strategy, optimizer, x, torch.randn(tokens, m, device=device) / math.sqrt(tokens * m))


@dataclass
class StepTiming:
    """Best-of-repeats seconds of forward + backward and of the update (hooks + optimizer step)."""

    forward_backward: float
    update: float
    memory: Memory

    @property
    def step(self) -> float:
        return self.forward_backward + self.update


def time_steps(trainee: Trainee, repeats: int, device: torch.device) -> StepTiming:
    """One warm-up training step at step 0 (TDLRT augments there), then ``repeats`` timed steps."""
    trainee.forward_backward()
    trainee.update(0)
    fb, up, grads = [], [], 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        fb.append(timed(trainee.forward_backward, device))
        grads = count_memory(trainee.model, trainee.optimizer).grads
        up.append(timed(lambda: trainee.update(PLAIN_STEP), device))
    memory = count_memory(trainee.model, trainee.optimizer)
    memory.grads = grads
    if device.type == "cuda":
        memory.peak = torch.cuda.max_memory_allocated(device)
    return StepTiming(min(fb), min(up), memory)


# ------------------------------------------------------------------------------------------ periodic operations
@dataclass(frozen=True)
class PeriodicOp:
    """One periodic operation: seconds per call and optimizer steps between calls (``None``: once per run)."""

    name: str
    seconds: float
    every: int | None

    @property
    def per_step(self) -> float:
        return 0.0 if self.every is None else self.seconds / self.every


def best_of(repeats: int, fn: Callable[[], float]) -> float:
    return min(fn() for _ in range(repeats))


def copy_trainee(trainee: Trainee) -> Trainee:
    """A deep copy of ``trainee``'s model, strategy and optimizer (its state moved to the copied parameters)."""
    model, strategy, optimizer = copy.deepcopy((trainee.model, trainee.strategy, trainee.optimizer))
    return Trainee(model, strategy, optimizer, trainee.x, trainee.grad_out)


def run_operation(trainee: Trainee, name: str, step: int) -> None:
    """The strategy's operation ``name`` after ``step`` optimizer steps, its state edits applied to the optimizer."""
    apply_edits_([trainee.optimizer], getattr(trainee.strategy, name)(trainee.model, step))


def due_before(strategy: LowRankStrategy, name: str, step: int) -> list[str]:
    """The operations the schedule runs before ``name`` after ``step`` steps: those listed ahead of it, or all due
    ones for an operation the schedule does not list (TDLRT's augment, run from the next step's gradients)."""
    due = strategy.should_update(step)
    return due[:due.index(name)] if name in due else due


def _on_copy(trainee: Trainee, name: str, step: int, device: torch.device) -> float:
    """Seconds of operation ``name`` on a copy of ``trainee``, after the operations due before it and a forward and
    backward (fresh gradients); ``trainee`` itself is left as it was."""
    clone = copy_trainee(trainee)
    for earlier in due_before(clone.strategy, name, step):
        run_operation(clone, earlier, step)
    clone.forward_backward()
    return timed(lambda: run_operation(clone, name, step), device)


def time_operation(trainee: Trainee, name: str, period: int | None, repeats: int,
                   device: torch.device) -> PeriodicOp:
    """Best-of-``repeats`` seconds of operation ``name`` after ``period`` steps (a one-off: ``PLAIN_STEP``)."""
    step = period or PLAIN_STEP
    seconds = best_of(repeats, lambda: _on_copy(trainee, name, step, device))
    return PeriodicOp(f"{type(trainee.strategy).__name__} {name}", seconds, period)


def periodic_ops(trainee: Trainee, repeats: int, device: torch.device) -> list[PeriodicOp]:
    """Every operation ``trainee.strategy.operations`` names, timed on fresh copies of ``trainee``."""
    return [time_operation(trainee, name, period, repeats, device)
            for name, period in trainee.strategy.operations(trainee.model).items()]


# ------------------------------------------------------------------------------------------ running cases
@dataclass
class CaseResult:
    """Measured figures of one layer at one shape and rank."""

    layer: str
    m: int
    n: int
    rank: int
    tokens: int
    timing: StepTiming
    ideal_ratio: float
    ops: list[PeriodicOp] = field(default_factory=list)


def run_case(kind: LayerKind, m: int, n: int, rank: int, tokens: int, repeats: int, device: torch.device,
             with_ops: bool) -> CaseResult:
    """Build, time and (``with_ops``) time the periodic operations of one case."""
    trainee = make_trainee(kind, m, n, rank, tokens, device)
    past_one_off = kind.stage(trainee, rank) if kind.stage else False
    timing = time_steps(trainee, repeats, device)
    r = active_rank(trainee.layer)
    ops = periodic_ops(trainee, repeats, device) if with_ops and not past_one_off else []
    return CaseResult(kind.name, m, n, r, tokens, timing, kind.flops(tokens, m, n, r) / dense_flops(tokens, m, n), ops)


def parse_shape(spec: str) -> tuple[int, int]:
    """``"1024"`` -> ``(1024, 1024)``; ``"1024x4096"`` -> ``(m=1024, n=4096)`` (out x in)."""
    parts = spec.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--shapes entries must be WIDTH or OUTxIN with positive ints, got {spec!r}")
    return (int(parts[0]), int(parts[-1]))


def run(shapes: list[tuple[int, int]], fractions: list[int], layers: list[str], tokens: int, repeats: int,
        device: torch.device, with_ops: bool = True, log: Callable[[str], None] = print) -> list[CaseResult]:
    """Every case: per shape the dense layer, then each layer kind at each rank ``min(m, n) / fraction``."""
    results = []
    for m, n in shapes:
        dense = run_case(KINDS["dense"], m, n, min(m, n), tokens, repeats, device, with_ops)
        results.append(dense)
        for name in layers:
            kind = KINDS[name]
            if name == "dense":
                continue
            ranks = [max(1, min(m, n) // f) for f in fractions]
            if name == "svd":
                ranks = [min(m, n), *ranks]
            for rank in ranks:
                log(f"  {name} {m}x{n} rank {rank}")
                results.append(run_case(kind, m, n, rank, tokens, repeats, device, with_ops))
    return results


# ------------------------------------------------------------------------------------------ tables
SPEED_HEADER = ("layer", "m x n", "active rank", "fwd+bwd ms", "x dense", "ideal x dense", "x ideal",
                "step ms", "memory MB (weights / grads / AdamW)", "memory x dense")
OPS_HEADER = ("layer", "m x n", "active rank", "operation", "ms per call", "every (steps)", "amortised ms/step",
              "% of step", "T for 5%")
TARGET_SHARE = 0.05
"""The issue's bound on periodic operations, amortised, as a share of the step."""


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f}"


def speed_rows(results: list[CaseResult], cuda: bool = False) -> list[tuple[str, ...]]:
    """One row per case: times and memory against the dense layer of the same shape."""
    dense = {(r.m, r.n): r for r in results if r.layer == "dense"}
    rows = []
    for r in results:
        base = dense[(r.m, r.n)]
        ratio = r.timing.forward_backward / base.timing.forward_backward
        memory = r.timing.memory
        cells = (r.layer, f"{r.m}x{r.n}", str(r.rank), f"{r.timing.forward_backward * 1e3:.1f}", f"{ratio:.2f}",
                 f"{r.ideal_ratio:.2f}", f"{ratio / r.ideal_ratio:.2f}", f"{r.timing.step * 1e3:.1f}",
                 f"{_mb(memory.weights)} / {_mb(memory.grads)} / {_mb(memory.state)}",
                 f"{memory.total / base.timing.memory.total:.2f}")
        if cuda:
            cells += (_mb(memory.peak or 0),)
        rows.append(cells)
    return rows


def tokens_for_share(tokens: int, share: float, target: float = TARGET_SHARE) -> int:
    """Tokens per step at which an operation taking ``share`` of a ``tokens``-token step takes ``target``.

    The operation's cost does not depend on ``T`` and the step's grows linearly with it, so the share
    falls as ``1 / T``; this is the smallest ``T`` at which it reaches ``target`` (``tokens`` if it already does).
    """
    return max(tokens, math.ceil(tokens * share / target))


def ops_rows(results: list[CaseResult]) -> list[tuple[str, ...]]:
    """One row per periodic operation, amortised at its schedule as a share of that layer's step."""
    rows = []
    for r in results:
        for op in r.ops:
            cells = (r.layer, f"{r.m}x{r.n}", str(r.rank), op.name, f"{op.seconds * 1e3:.1f}")
            if op.every:
                share = op.per_step / r.timing.step
                cells += (str(op.every), f"{op.per_step * 1e3:.2f}", f"{100 * share:.2f}%",
                          f"{tokens_for_share(r.tokens, share):,}")
            else:
                cells += ("once", "-", f"once (= {op.seconds / r.timing.step:.1f} steps)", "-")
            rows.append(cells)
    return rows


def report(results: list[CaseResult], header: str, cuda: bool = False) -> str:
    """Both tables as Markdown under ``header``, with the formulas as footnote."""
    speed_header = SPEED_HEADER + (("CUDA peak MB",) if cuda else ())
    return "\n\n".join([
        header,
        markdown_table(speed_header, speed_rows(results, cuda)),
        "Ideal FLOPs (fwd+bwd, matmuls): dense 6Tmn; LoRA 4Tmn + 6Tr(m+n); SST 4Tm'(m+n) + 2Tr(m+n); "
        "InRank, SVD training 6Tr(m+n); TDLRT 6Tr(m+n+r); m' = min(m, n), r = active rank (TDLRT: augmented "
        "core). x ideal = time / (dense time x ideal/dense FLOPs). step = fwd+bwd + strategy hooks + AdamW.",
        "Periodic operations at each strategy's default schedule; % of step = amortised time / that layer's "
        "step; T for 5% = tokens per step at which the share falls to 5% (it scales as 1/T).",
        markdown_table(OPS_HEADER, ops_rows(results)),
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["512", "1024", "2048", *(["4096"] if cuda else [])],
                        help="WIDTH or OUTxIN per shape (default 512 1024 2048, and 4096 on CUDA)")
    parser.add_argument("--rank-fractions", nargs="+", type=int, default=[4, 8, 16, 32],
                        help="ranks as min(m, n) / k for each k")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    parser.add_argument("--tokens", type=int, default=16384 if cuda else 1024, help="tokens T per step")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per case (the best counts)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (1: on a shared machine, several threads stall in QR/SVD)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--no-ops", action="store_true", help="skip the periodic operations")
    parser.add_argument("--out", type=Path, help="also write the tables to this Markdown file")
    args = parser.parse_args(argv)
    for name in ("tokens", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(k < 1 for k in args.rank_fractions):
        raise ValueError(f"--rank-fractions must be ints >= 1, got {args.rank_fractions}")
    args.shapes = [parse_shape(s) for s in args.shapes]
    return args


def main(argv: list[str] | None = None) -> list[CaseResult]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    header = (f"Layer benchmark: T = {args.tokens} tokens, best of {args.repeats} steps, float32. "
              f"Machine: {machine_summary(device)}. Command: `python bench/layers.py "
              f"{' '.join(sys.argv[1:] if argv is None else argv)}`")
    print(header, flush=True)
    results = run(args.shapes, args.rank_fractions, args.layers, args.tokens, args.repeats, device,
                  with_ops=not args.no_ops, log=lambda line: print(line, flush=True))
    text = report(results, header, cuda=device.type == "cuda")
    emit(text, args.out)
    return results


if __name__ == "__main__":
    main()
