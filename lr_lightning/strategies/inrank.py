"""InRank (Zhao et al., arXiv 2306.11250): grow the rank of ``B A`` by explained ratio, then fix it (Efficient)."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.distributed as dist
from torch import nn
from typing_extensions import override

from lr_lightning.layers.incremental import IncrementalLinear
from lr_lightning.optim import StateEdit, StateReset
from lr_lightning.strategies.base import LowRankStrategy, RunState, check_rank_argument, layer_generator, resolve_rank

RatioKind = Literal["variance", "energy"]
Growth = Literal["reference", "zero"]


def explained_ratio(s: torch.Tensor, k: int, size: int, kind: RatioKind = "variance") -> float:
    """How much of the spectrum ``s`` (descending) its top ``k`` values explain; 1 for an all-zero ``s``.

    ``variance`` (the reference code): ``g = 1 - Var(s - s_≤k) / Var(s)``, the unbiased variance over
    ``size = min(m, n)`` values (``s`` padded with zeros, as the code's full-size ``svdvals``);
    ``s_≤k`` keeps the top ``k`` values. ``energy``: ``g = Σ_{i≤k} s_i² / Σ_i s_i²``.
    """
    s = s.double()
    if kind == "energy":
        total = (s * s).sum()
        return 1.0 if total == 0 else float((s[:k] * s[:k]).sum() / total)
    padded = torch.cat([s, s.new_zeros(max(size - len(s), 0))])
    spread = padded.var()
    if spread == 0:
        return 1.0
    tail = padded.clone()
    tail[:k] = 0
    return float(1 - tail.var() / spread)


def select_rank(s: torch.Tensor, rank: int, limit: int, threshold: float, size: int,
                kind: RatioKind = "variance") -> int:
    """The smallest ``k`` in ``rank..limit - 1`` with ``explained_ratio(s, k) > threshold``, else ``limit - 1``.

    The released code's rule (``_matrx_svd_approximation_explained_variance``: a strict ``>``, the scan
    stopping one short of ``limit = min(r + b, R_max - b)``), so a check grows the rank by at most
    ``b - 1``. Starting at the current ``rank`` makes the rank never decrease.
    """
    for k in range(rank, limit):
        if explained_ratio(s, k, size, kind) > threshold:
            return k
    return max(rank, limit - 1)


class InRank(LowRankStrategy):
    """Incremental low-rank learning: ``W = [W0 +] B A`` whose rank ``r`` grows while training.

    Converts ``nn.Linear`` layers only (``module_types``): convolutions stay dense (the paper and its
    code factor the GPT's MLP layers), never half-converted.

    The forward uses ``r + buffer`` columns of factors allocated at ``max_rank``. Every
    ``check_every`` optimizer steps after ``warmup_steps``, each layer's ``B A`` spectrum ``s`` (QR of
    both factors, then an SVD of the small ``(r + b) x (r + b)`` core) sets ``r`` to the smallest
    ``k >= r`` with ``g(s, k) > threshold``, scanning at most to ``min(r + b, max_rank - b) - 1``
    (:func:`select_rank`, the released code's rule: a check adds at most ``b - 1``); the rank never
    shrinks. The decision is taken on process 0 and broadcast. How new columns start is ``growth``:

    - ``reference`` (default): as the released code (jiaweizzhao/InRank,
      ``in_rank_efficient.py``), all of ``A`` and ``B`` are Kaiming-initialised at conversion and
      columns are turned on as they are. Each growth adds random directions, so the next check
      sees them and the rank keeps rising while the spectrum stays spread. AdamW's decoupled decay
      shrinks the inactive columns meanwhile, as in the released code.
    - ``zero``: new rows of ``A`` are drawn Kaiming-uniform (seeded, the same on every process) and
      new columns of ``B`` start at 0, so growth keeps the function; the unused capacity stays
      zero. New columns then add nothing to the spectrum until trained, and the rank tends to stop
      at its first grown value (our earlier default; the only choice for ``keep_base=True``).

    InRank-Efficient (the default, ``keep_base=False``: ``W = B A`` with no ``W0``, as the released
    code): at the end of training epoch ``switch_epoch`` (or after optimizer step ``switch_step``)
    every layer is re-factored by SVD at its found rank with balanced factors, the buffer is
    dropped, the factors' optimizer state is reset, and the callback shrinks the factors to ``r``
    columns (:meth:`layers_to_shrink`): training continues at a fixed rank with ``r (m + n)``
    parameters, gradients and multiply-adds per token instead of the capacity's. With
    ``keep_base=True`` the layer is the paper's general InRank, ``W = W0 + B A`` with ``W0`` the
    frozen initial weight and ``B A`` starting at 0 (the paper gives no released code for it).

    Args:
        init_rank: ``r_0``, the starting rank.
        buffer: ``b``, extra active columns in which new directions can appear (the reference
            code uses 100 for GPT-2's 768-wide MLPs).
        threshold: ``alpha``, the explained ratio the found rank must reach (paper: 0.9).
        ratio: The explained-ratio definition: ``variance`` (default; the reference code's
            ``1 - Var(s - s_≤k) / Var(s)``, which produced the published numbers) or ``energy``
            (``Σ_{i≤k} s_i² / Σ s_i²``). See :func:`explained_ratio`.
        warmup_steps: Optimizer steps without rank checks (the code's 200 forwards at its
            gradient accumulation of 8 are 25 steps).
        check_every: Checks run after optimizer steps that are multiples of ``check_every`` past
            ``warmup_steps`` (the code's 25 forwards at accumulation 8 are about 3 steps).
        max_rank: Capacity of the factors: an int, or a float fraction of ``min(m, n)`` (default
            0.5, the code's ``R_max = min(m, n) / 2``). The rank stops at ``max_rank - buffer``.
        keep_base: ``True``: ``W = W0 + B A`` with ``W0`` frozen (general InRank; ``B A`` starts at
            0; needs ``growth="zero"``). ``False``: ``W = B A`` from a random Kaiming init (InRank-Efficient).
        growth: ``reference`` (columns turned on as the random init left them) or ``zero``
            (function-preserving: new columns of ``B`` start at 0). See above.
        switch_step: Re-factor and fix the ranks after this optimizer step; overrides
            ``switch_epoch``.
        switch_epoch: Re-factor and fix the ranks at the end of this training epoch (0-based;
            default 0, the end of the first epoch as in the paper); ``None`` with ``switch_step``
            ``None`` keeps growing for the whole run.
        seed: Seed of the generators that draw ``A`` (identical on all processes).
        target_modules: See :class:`LowRankStrategy` (the paper converts MLP layers only:
            ``["*.mlp.*"]`` for this package's GPT).
        exclude_modules: See :class:`LowRankStrategy`.
    """

    layer_types = (IncrementalLinear,)
    switched = RunState(False)
    """Whether the ranks are fixed (InRank-Efficient's second stage)."""

    def __init__(
        self,
        init_rank: int = 2,
        buffer: int = 16,
        threshold: float = 0.9,
        ratio: RatioKind = "variance",
        warmup_steps: int = 25,
        check_every: int = 3,
        max_rank: int | float = 0.5,
        keep_base: bool = False,
        growth: Growth = "reference",
        switch_step: int | None = None,
        switch_epoch: int | None = 0,
        seed: int = 0,
        target_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
    ) -> None:
        super().__init__(target_modules, exclude_modules)
        for name, value, low in (("init_rank", init_rank, 1), ("buffer", buffer, 1), ("check_every", check_every, 1),
                                 ("warmup_steps", warmup_steps, 0)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int >= {low}, got {value!r}")
            if value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value}")
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if ratio not in get_args(RatioKind):
            raise ValueError(f"ratio must be one of {get_args(RatioKind)}, got {ratio!r}")
        check_rank_argument(max_rank, "max_rank")
        if growth not in get_args(Growth):
            raise ValueError(f"growth must be one of {get_args(Growth)}, got {growth!r}")
        if keep_base and growth != "zero":
            raise ValueError(f"keep_base=True (W = W0 + B A, B A starting at 0) needs growth='zero', got "
                             f"growth={growth!r}: the reference growth turns on random columns of W = B A")
        if switch_step is not None and switch_step < 1:
            raise ValueError(f"switch_step must be an int >= 1 or None, got {switch_step}")
        if switch_epoch is not None and switch_epoch < 0:
            raise ValueError(f"switch_epoch must be an int >= 0 or None, got {switch_epoch}")
        self.init_rank, self.buffer, self.threshold, self.ratio = init_rank, buffer, threshold, ratio
        self.warmup_steps, self.check_every, self.max_rank = warmup_steps, check_every, max_rank
        self.keep_base, self.growth = keep_base, growth
        self.switch_step, self.switch_epoch, self.seed = switch_step, switch_epoch, seed

    @override
    def convert(self, name: str, module: nn.Module, index: int) -> nn.Module:
        m, n = module.weight.shape
        capacity = resolve_rank(self.max_rank, m, n, name)
        if self.init_rank + self.buffer > capacity:
            raise ValueError(
                f"init_rank + buffer = {self.init_rank + self.buffer} exceeds the capacity {capacity} of layer "
                f"'{name}' of shape ({m}, {n}) (max_rank={self.max_rank}): lower init_rank or buffer, or raise "
                f"max_rank up to {min(m, n)} (1.0)")
        return IncrementalLinear.from_linear(module, capacity, self.init_rank, self.buffer, base=self.keep_base,
                                             generator=layer_generator(self.seed, index),
                                             fill="random" if self.growth == "reference" else "zero")

    # ----------------------------------------------------------------------------- schedule
    def is_check_step(self, step: int) -> bool:
        """Whether a rank check runs after optimizer step ``step`` (multiples of ``check_every`` past warmup)."""
        return not self.switched and step > self.warmup_steps and step % self.check_every == 0

    @override
    def operations(self, model: nn.Module) -> dict[str, int | None]:
        return {"grow": self.check_every, "switch": None}

    @override
    def should_update(self, step: int) -> list[str]:
        """``grow`` on a check step; ``switch`` after ``switch_step``."""
        due = ["grow"] if self.is_check_step(step) else []
        return due + (["switch"] if not self.switched and step == self.switch_step else [])

    @override
    def should_update_at_epoch_end(self, epoch: int) -> list[str]:
        """``switch`` once epoch ``switch_epoch`` ends (unless ``switch_step`` is set)."""
        due = self.switch_step is None and epoch == self.switch_epoch and not self.switched
        return ["switch"] if due else []

    # ----------------------------------------------------------------------------- operations
    def grow(self, model: nn.Module, step: int) -> list[StateEdit]:
        """Set each layer's rank from its spectrum (decided on process 0) and turn the new columns on
        (``growth``). Their optimizer state is zero (unused capacity never had a gradient): no edit."""
        layers = self._incremental_layers(model)
        ranks = []
        for _, _, layer in layers:
            size = min(layer.in_features, layer.out_features)
            limit = min(layer.active_rank, layer.capacity - layer.buffer)
            ranks.append(select_rank(layer.spectrum(), layer.rank, limit, self.threshold, size, self.ratio))
        ranks = _from_process_zero(ranks, layers[0][2].current_rank.device) if layers else ranks
        for (index, _, layer), rank in zip(layers, ranks):
            layer.grow_(rank, layer_generator(self.seed, index, step) if self.growth == "zero" else None)
        return []

    def switch(self, model: nn.Module, step: int) -> list[StateEdit]:
        """InRank-Efficient's second stage: SVD re-factor at rank ``r``, no buffer; reset the factors' state."""
        factors = []
        for _, _, layer in self._incremental_layers(model):
            if layer.buffer > 0:
                layer.truncate_()
                factors += [layer.A, layer.B]
        self.switched = True
        return [StateReset(factors, "full")] if factors else []

    @override
    def layers_to_shrink(self, model: nn.Module) -> list[tuple[str, IncrementalLinear]]:
        """After the switch: every layer whose capacity exceeds its found rank (stage 2 trains ``r (m + n)``)."""
        if not self.switched:
            return []
        return [(name, layer) for _, name, layer in self._incremental_layers(model)
                if layer.capacity > layer.active_rank]

    def _incremental_layers(self, model: nn.Module) -> list[tuple[int, str, IncrementalLinear]]:
        return [(i, name, layer) for i, (name, layer) in enumerate(self.layers(model))
                if isinstance(layer, IncrementalLinear)]

    # ----------------------------------------------------------------------------- logging, state
    @override
    def metrics(self, model: nn.Module) -> dict[str, float]:
        active = sum(layer.active_rank for _, _, layer in self._incremental_layers(model))
        return {**super().metrics(model), "inrank/total_active_rank": float(active),
                "inrank/switched": float(self.switched)}


def _from_process_zero(values: list[int], device: torch.device) -> list[int]:
    """Process 0's ``values`` on every process (the values themselves outside a process group)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    tensor = torch.tensor(values, dtype=torch.long, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()
