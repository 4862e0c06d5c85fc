"""Sparse Spectral Training, SST (Zhao et al., ICML 2025; arXiv 2405.15481)."""

from __future__ import annotations

import math

from torch import nn
from typing_extensions import override

from lr_lightning.layers.spectral import SpectralLinear
from lr_lightning.optim import StateEdit, StateReset
from lr_lightning.strategies.base import LowRankStrategy, check_rank_argument, layer_generator, resolve_rank


class SST(LowRankStrategy):
    """``W = U diag(s) V^T`` from the SVD of the dense init; all of ``s`` and ``r`` sampled pairs train each step.

    Converts ``nn.Linear`` layers only (``module_types``): convolutions stay dense (the paper's image
    experiments are MLPs), never half-converted.

    After every optimizer step ``s <- max(s, 0)`` and the active ``u_i, v_i`` are renormalised (the
    magnitude lives in ``s``). Every ``iteration_interval`` steps a new set of ``r`` pairs is drawn
    from ``p_i = uniform_mix / m' + (1 - uniform_mix) s_i / sum_j s_j`` without replacement; the
    optimizer state of the active vectors is reset in place and their learning rate re-warms
    linearly over ``restart_warmup_steps``. At the end of each round of ``round_length`` draws the
    layer is re-factored, ``[U, s, V] <- SVD(U diag(s) V^T)`` (sign-fixed, so every process computes
    the same factors), and the moments of ``s`` are reset because its entries are re-sorted.
    Draws use generators seeded by (seed, layer, draw), so they are identical on every process.

    The schedule follows Zhao et al., ICML 2025, appendix F.2: "number of steps per iteration (T3)
    is set to 200. Each iteration begins with a warmup phase lasting 20 steps. The number of
    iterations per round (T2) is determined by the formula T2 = d/r, where d is the embedding
    dimension and r the rank." The defaults below are those values.

    Args:
        rank: Active singular-vector pairs ``r``, as an int or a float fraction of ``min(m, n)``.
        iteration_interval: Optimizer steps between two draws of the active set, the paper's ``T3``
            (200 in appendix F.2).
        round_length: Draws per round, i.e. between two re-SVDs, the paper's ``T2``; ``None`` takes
            ``ceil(min(m, n) / r)`` per layer, appendix F.2's ``T2 = d / r`` with ``d`` the layer's
            ``m' = min(m, n)`` (the embedding dimension for a layer to or from it), rounded up so a
            round can visit every vector on average. A run shorter than ``iteration_interval * T2``
            steps never re-factors: set a smaller value there.
        uniform_mix: Weight of the uniform part of the sampling distribution: 0.5 is the ICML'25
            version, 0.0 the arXiv v1 ``p_i ∝ s_i``.
        restart_warmup_steps: Length of the linear LR re-warmup of ``U, V`` after each draw (the
            20-step warmup that begins each iteration in appendix F.2).
        enhanced_gradient: Drop the ``s_i`` factor from the gradients of ``u_i, v_i`` (the paper's
            enhanced gradient); ``False`` gives the plain gradient of ``U diag(s) V^T``.
        seed: Seed of the sampling generators.
        target_modules: See :class:`LowRankStrategy`.
        exclude_modules: See :class:`LowRankStrategy`.
    """

    layer_types = (SpectralLinear,)

    def __init__(
        self,
        rank: int | float = 0.125,
        iteration_interval: int = 200,
        round_length: int | None = None,
        uniform_mix: float = 0.5,
        restart_warmup_steps: int = 20,
        enhanced_gradient: bool = True,
        seed: int = 0,
        target_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
    ) -> None:
        super().__init__(target_modules, exclude_modules)
        check_rank_argument(rank)
        if iteration_interval < 1:
            raise ValueError(f"iteration_interval must be >= 1, got {iteration_interval}")
        if round_length is not None and round_length < 1:
            raise ValueError(f"round_length must be >= 1 or None (ceil(min(m, n) / r)), got {round_length}")
        if not 0 <= uniform_mix <= 1:
            raise ValueError(f"uniform_mix must be in [0, 1], got {uniform_mix}")
        if not 0 <= restart_warmup_steps < iteration_interval:
            raise ValueError(f"restart_warmup_steps must be in [0, iteration_interval={iteration_interval}), "
                             f"got {restart_warmup_steps}")
        self.rank, self.iteration_interval, self.round_length = rank, iteration_interval, round_length
        self.uniform_mix, self.restart_warmup_steps = uniform_mix, restart_warmup_steps
        self.enhanced_gradient, self.seed = enhanced_gradient, seed

    @override
    def convert(self, name: str, module: nn.Module, index: int) -> SpectralLinear:
        m, n = module.weight.shape
        layer = SpectralLinear.from_linear(module, resolve_rank(self.rank, m, n, name), self.enhanced_gradient)
        layer.select_(layer.sample(layer_generator(self.seed, index, 0), self.uniform_mix))
        return layer

    def rounds_of(self, layer: SpectralLinear) -> int:
        """Draws per round of ``layer``."""
        return self.round_length or math.ceil(layer.capacity / layer.rank)

    @override
    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Projected step: clamp ``s`` at 0 and renormalise the active singular vectors."""
        for _, layer in self.spectral_layers(model):
            layer.project_()

    @override
    def operations(self, model: nn.Module) -> dict[str, int | None]:
        """``resample`` every ``iteration_interval`` steps; ``resvd`` once a round ends (the longest round)."""
        rounds = [self.rounds_of(layer) for _, layer in self.spectral_layers(model)]
        return {"resvd": self.iteration_interval * max(rounds, default=1), "resample": self.iteration_interval}

    @override
    def should_update(self, step: int) -> list[str]:
        """At the end of every iteration: re-SVD the layers whose round ends, then draw new active sets."""
        return ["resvd", "resample"] if step > 0 and step % self.iteration_interval == 0 else []

    def resvd(self, model: nn.Module, step: int) -> list[StateEdit]:
        """``[U, s, V] <- SVD(U diag(s) V^T)`` in every layer whose round of draws ends after ``step``; reset ``s``'s
        moments (its entries are re-sorted)."""
        draw = step // self.iteration_interval
        spectra = []
        for _, layer in self.spectral_layers(model):
            if draw % self.rounds_of(layer) == 0:
                layer.resvd_()
                spectra.append(layer.s)
        return [StateReset(spectra, "full")]

    def resample(self, model: nn.Module, step: int) -> list[StateEdit]:
        """Draw every layer's next ``r`` active pairs from ``p_i``; reset the active vectors' optimizer state."""
        draw = step // self.iteration_interval
        active = []
        for index, (_, layer) in enumerate(self.layers(model)):
            if isinstance(layer, SpectralLinear):
                layer.select_(layer.sample(layer_generator(self.seed, index, draw), self.uniform_mix))
                active += [layer.U_active, layer.V_active]
        return [StateReset(active, "full")]

    def spectral_layers(self, model: nn.Module) -> list[tuple[str, SpectralLinear]]:
        """The converted layers of ``model``."""
        return [(n, m) for n, m in self.layers(model) if isinstance(m, SpectralLinear)]

    @override
    def lr_multiplier(self, step: int, role: str) -> float:
        """A linear ramp from 0 to 1 over ``restart_warmup_steps`` for ``U, V`` after each draw."""
        if role != "basis" or step < self.iteration_interval or self.restart_warmup_steps == 0:
            return 1.0
        return min(1.0, (step % self.iteration_interval) / self.restart_warmup_steps)
