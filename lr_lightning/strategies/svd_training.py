"""SVD training (Yang et al., CVPR-W 2020, arXiv 2004.09031): orthogonality, spectrum sparsity, energy pruning.

Every selected ``nn.Linear`` and ``nn.Conv2d`` becomes ``N diag(|s|) C`` at full rank, and the
objective becomes ``L_task + lambda_o sum_l L_o(N_l, C_l) + lambda_s sum_l R_s(s_l)``. The strategy
adds the regularizer's gradient to ``.grad`` after the backward pass and AMP unscaling
(``before_optimizer_step``), so it works unchanged when only the callback is plugged into a user's
LightningModule, and the tasks never add it to their loss. The paper's four stages are one
schedule held here: decomposed training with ``L_o`` only, then sparsity from ``sparsify_at``, then
energy pruning at ``prune_at`` followed by fine-tuning with sparsity off.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from typing_extensions import override

from lr_lightning.layers.svd import DECOMPOSITIONS, SVD_INITS, Decomposition, SVDConv2d, SVDInit, SVDLayer, SVDLinear
from lr_lightning.optim import StateEdit, StateReset
from lr_lightning.strategies.base import LowRankStrategy, RunState, layer_generator

Sparsity = Literal["hoyer", "hoyer_square", "l1"]
SPARSITIES: tuple[str, ...] = ("hoyer", "hoyer_square", "l1")
STAGES: tuple[str, ...] = ("train", "sparsify", "finetune")
UNITS: tuple[str, ...] = ("step", "epoch")
INPUT_CONV_CHANNELS = 3
"""Convs reading at most this many channels (an image's first conv) stay dense unless ``input_convs``."""


def orthogonality_penalty(n: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``L_o = (||N^T N - I||_F^2 + ||C C^T - I||_F^2) / r^2`` for ``N`` (``a x r``) and ``C`` (``r x b``).

    Both Gram matrices are the ``r x r`` ones (the smaller Gram of each factor, since
    ``r <= min(a, b)``), each divided by its ``r^2`` entries as in the reference code.
    """
    r = n.shape[1]
    eye = torch.eye(r, device=n.device, dtype=n.dtype)
    return ((n.t() @ n - eye).square().sum() + (c @ c.t() - eye).square().sum()) / r**2


def sparsity_penalty(s: torch.Tensor, kind: Sparsity) -> torch.Tensor:
    """``R_s`` on ``|s|``: ``l1`` = ``||s||_1``, ``hoyer`` = ``||s||_1 / ||s||_2``, ``hoyer_square`` = its square.

    The reference code subtracts 1 from both Hoyer forms, which changes neither the gradient nor the
    argmin, so it is left out.
    """
    l1 = s.abs().sum()
    if kind == "l1":
        return l1
    squared = s.square().sum().clamp_min(torch.finfo(s.dtype).tiny)
    if kind == "hoyer":
        return l1 / squared.sqrt()
    if kind == "hoyer_square":
        return l1.square() / squared
    raise ValueError(f"sparsity must be one of {SPARSITIES}, got {kind!r}")


class SVDTraining(LowRankStrategy):
    """Train ``W = N diag(|s|) C`` with ``lambda_o L_o`` and, in the sparsity stage, ``lambda_s R_s``; prune by energy.

    Schedule (``unit`` = optimizer steps or epochs completed): stage ``train`` (``L_o`` only) until
    ``sparsify_at``, stage ``sparsify`` (``L_o + R_s``) until ``prune_at``, where every layer keeps the
    fewest largest ``|s_i|`` holding ``>= 1 - energy`` of ``sum_i s_i^2`` (after a sign-fixed re-SVD
    when ``standardize``), then stage ``finetune`` (``L_o`` only). The optimizer state of the
    rewritten layers' ``N``, ``s``, ``C`` is reset at the prune, as the reference fine-tunes with a
    fresh optimizer, and the callback then shrinks them to the kept values (:meth:`layers_to_shrink`),
    as the reference drops the zeroed columns before fine-tuning. The stage is saved in
    ``state_dict``; the masks and capacities live in the layers and the checkpoint.

    Args:
        orthogonality_weight: ``lambda_o`` (the paper: 1.0 on CIFAR, 2.0 on ImageNet).
        sparsity: ``R_s``: ``hoyer``, ``hoyer_square`` or ``l1``.
        sparsity_weight: ``lambda_s``; very model-dependent (the paper: 1e-4 to 0.3).
        energy: Fraction of each layer's squared spectrum removed by pruning, in [0, 1).
        sparsify_at: Steps (or epochs) completed before the sparsity term switches on (0: from the start).
        prune_at: Steps (or epochs) completed when pruning runs; ``None``: never (call :meth:`prune`).
        unit: ``step`` (optimizer steps) or ``epoch`` for ``sparsify_at`` and ``prune_at``.
        decomposition: ``channel`` or ``spatial`` for ``nn.Conv2d`` (linear layers are plain matrices).
        init: ``dense``: exact SVD of the layer's current weight (keeps the function, so a trained
            dense model converts losslessly); ``random``: the paper's Kaiming-normal ``N, C``, ``s ~ N(0, 1)``.
        standardize: Re-SVD ``N |s| C`` before pruning, so ``|s|`` is the exact spectrum.
        input_convs: Also decompose convs with at most 3 input channels (an image's first conv); off
            by default since their rank ``min(C_out, 9 C_in)`` is already small.
        seed: Seed of the generators of the ``random`` init (identical on all processes).
        target_modules: See :class:`LowRankStrategy`.
        exclude_modules: See :class:`LowRankStrategy`.
    """

    module_types = (*LowRankStrategy.module_types, nn.Conv2d)
    layer_types = (SVDLayer,)
    stage = RunState("train")
    """``train``, ``sparsify`` or ``finetune`` (see the schedule above)."""

    def __init__(
        self,
        orthogonality_weight: float = 1.0,
        sparsity: Sparsity = "hoyer",
        sparsity_weight: float = 0.05,
        energy: float = 0.01,
        sparsify_at: int = 0,
        prune_at: int | None = None,
        unit: Literal["step", "epoch"] = "step",
        decomposition: Decomposition = "channel",
        init: SVDInit = "dense",
        standardize: bool = True,
        input_convs: bool = False,
        seed: int = 0,
        target_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
    ) -> None:
        super().__init__(target_modules, exclude_modules)
        for name, value in (("orthogonality_weight", orthogonality_weight), ("sparsity_weight", sparsity_weight)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        choices = (("sparsity", sparsity, SPARSITIES), ("unit", unit, UNITS),
                   ("decomposition", decomposition, DECOMPOSITIONS), ("init", init, SVD_INITS))
        for name, value, allowed in choices:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not 0 <= energy < 1:
            raise ValueError(f"energy must be in [0, 1), got {energy}")
        if isinstance(sparsify_at, bool) or not isinstance(sparsify_at, int) or sparsify_at < 0:
            raise ValueError(f"sparsify_at must be an int >= 0, got {sparsify_at!r}")
        if prune_at is not None and (isinstance(prune_at, bool) or not isinstance(prune_at, int)
                                     or prune_at < max(sparsify_at, 1)):
            raise ValueError(f"prune_at must be None or an int >= max(sparsify_at, 1) = {max(sparsify_at, 1)}, "
                             f"got {prune_at!r}")
        self.orthogonality_weight, self.sparsity, self.sparsity_weight = orthogonality_weight, sparsity, sparsity_weight
        self.energy, self.sparsify_at, self.prune_at, self.unit = energy, sparsify_at, prune_at, unit
        self.decomposition, self.init, self.standardize = decomposition, init, standardize
        self.input_convs, self.seed = input_convs, seed
        self.stage = "sparsify" if sparsify_at == 0 else "train"

    # ----------------------------------------------------------------------------- conversion
    @override
    def handles(self, module: nn.Module) -> bool:
        """``nn.Linear`` with a 2-D weight; ``nn.Conv2d`` with ``groups=1``, zero padding and (unless
        ``input_convs``) more than 3 input channels."""
        if isinstance(module, nn.Conv2d):
            return (module.groups == 1 and module.padding_mode == "zeros"
                    and (self.input_convs or module.in_channels > INPUT_CONV_CHANNELS))
        return super().handles(module)

    @override
    def _no_match_message(self, model: nn.Module, pattern: str, names: list[str]) -> str:
        message = super()._no_match_message(model, pattern, names)
        if self.input_convs:
            return message
        return (f"{message} Convs with at most {INPUT_CONV_CHANNELS} input channels are left dense "
                "unless input_convs=True.")

    @override
    def convert(self, name: str, module: nn.Module, index: int) -> nn.Module:
        if isinstance(module, nn.Conv2d):
            return SVDConv2d.from_conv(module, self.decomposition, self.init, layer_generator(self.seed, index))
        return SVDLinear.from_linear(module, self.init, layer_generator(self.seed, index))

    def svd_layers(self, model: nn.Module) -> list[tuple[str, SVDLayer]]:
        """The converted layers in SVD form."""
        return [(n, m) for n, m in self.layers(model) if isinstance(m, SVDLayer)]

    # ----------------------------------------------------------------------------- regularizer
    @property
    def sparsity_on(self) -> bool:
        """Whether ``R_s`` is part of the objective now (stage ``sparsify``)."""
        return self.stage == "sparsify"

    def penalties(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum_l L_o, sum_l R_s)`` over the kept singular values of every layer, in float32, differentiable."""
        layers = [layer for _, layer in self.svd_layers(model)]
        if not layers:
            return torch.zeros(()), torch.zeros(())
        with torch.autocast(layers[0].N.device.type, enabled=False):
            terms = [(orthogonality_penalty(n.float(), c.float()), sparsity_penalty(s.float(), self.sparsity))
                     for n, s, c in (layer.factors() for layer in layers)]
        orthogonality, sparsity = (torch.stack(column).sum() for column in zip(*terms))
        return orthogonality, sparsity

    def regularizer(self, model: nn.Module) -> torch.Tensor:
        """``lambda_o sum_l L_o + lambda_s sum_l R_s`` (the second term only while sparsity is on)."""
        orthogonality, sparsity = self.penalties(model)
        return self.orthogonality_weight * orthogonality + (self.sparsity_weight * sparsity if self.sparsity_on else 0)

    @override
    def before_optimizer_step(self, model: nn.Module, step: int) -> list[StateEdit]:
        """``grad += d regularizer / d (N, s, C)``, after backward and AMP unscaling, before clipping."""
        layers = self.svd_layers(model)
        if not layers:
            return []
        params = [p for _, layer in layers for p in (layer.N, layer.s, layer.C)]
        with torch.enable_grad():
            grads = torch.autograd.grad(self.regularizer(model), params, allow_unused=True)
        with torch.no_grad():
            for param, grad in zip(params, grads):
                if grad is None:
                    continue
                grad = grad.to(param.dtype)
                if param.grad is None:
                    param.grad = grad
                else:
                    param.grad.add_(grad)
        return []

    # ----------------------------------------------------------------------------- stages
    @override
    def operations(self, model: nn.Module) -> dict[str, int | None]:
        return {"sparsify": None, "prune": None}

    @override
    def should_update(self, step: int) -> list[str]:
        """With ``unit="step"``: the stage change due once ``step`` optimizer steps have completed."""
        return self._due(step) if self.unit == "step" and step > 0 else []

    @override
    def should_update_at_epoch_end(self, epoch: int) -> list[str]:
        """With ``unit="epoch"``: the stage change due once ``epoch + 1`` epochs have completed."""
        return self._due(epoch + 1) if self.unit == "epoch" else []

    def _due(self, completed: int) -> list[str]:
        due = ["sparsify"] if completed == self.sparsify_at else []
        return due + (["prune"] if completed == self.prune_at else [])

    def sparsify(self, model: nn.Module, step: int) -> list[StateEdit]:
        """Enter stage ``sparsify`` from ``train``: ``R_s`` joins the objective (layers and optimizer unchanged)."""
        if self.stage == "train":
            self.stage = "sparsify"
        return []

    def prune(self, model: nn.Module, step: int) -> list[StateEdit]:
        """Energy-prune every layer (after ``standardize_`` if set) and enter ``finetune``.

        Returns a full reset of the optimizer state of ``N``, ``s``, ``C`` in the layers it rewrote.
        """
        rewritten = []
        for _, layer in self.svd_layers(model):
            if self.standardize:
                layer.standardize_()
            if layer.prune_(layer.energy_keep(self.energy)) or self.standardize:
                rewritten += [layer.N, layer.s, layer.C]
        self.stage = "finetune"
        return [StateReset(rewritten, "full")] if rewritten else []

    @override
    def layers_to_shrink(self, model: nn.Module) -> list[tuple[str, SVDLayer]]:
        """After the prune (stage ``finetune``): every layer holding pruned singular values."""
        if self.stage != "finetune":
            return []
        return [(name, layer) for name, layer in self.svd_layers(model) if layer.rank < layer.capacity]

    # ----------------------------------------------------------------------------- logging, state
    @override
    def metrics(self, model: nn.Module) -> dict[str, float]:
        """Total rank, ``sum_l L_o``, ``sum_l R_s`` and the stage index (0 train, 1 sparsify, 2 finetune)."""
        with torch.no_grad():
            orthogonality, sparsity = self.penalties(model)
        return {**super().metrics(model), "svd/orthogonality": float(orthogonality),
                "svd/sparsity": float(sparsity), "svd/stage": float(STAGES.index(self.stage))}
