"""TDLRT (Zangrando et al., NeurIPS 2024, arXiv 2305.19059) and its matrix case DLRT (Schotthoefer et al., 2022).

Every Linear and Conv2d becomes a Tucker layer ``W = C x_i U_i`` with orthonormal bases, trained by
the rank-adaptive augmented BUG integrator: basis update (K-step), augmentation
``U_i <- orth([K_i^1 | U_i])``, a Galerkin step on the augmented core, and a truncation of the core
by HOSVD with relative tolerance ``tau``. Two variants:

- ``cheap`` (default, the single-pass variant of the authors' later code): every ``augment_every``
  optimizer steps the bases are augmented with their own gradients, ``orth([U_i | -dL/dU_i])``,
  and that step skips the factorized layers; the steps in between train only the cores; the core
  is truncated right before the next augmentation. One forward/backward per batch.
- ``faithful``: every optimizer step is a whole integrator step (two forward/backward passes). It
  needs the optimizer wrapped by :meth:`TDLRT.wrap_optimizer`, which returns a :class:`BUGOptimizer`
  (:class:`~lr_lightning.callbacks.LowRankCallback` does that at fit start).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lr_lightning.layers.tensors import full_tensor
from lr_lightning.layers.tucker import TuckerChange, TuckerConv2d, TuckerLayer, TuckerLinear
from lr_lightning.optim import OptimizerWrapper, StateEdit, StateReset
from lr_lightning.optim_transport import CoreMomentTransport
from lr_lightning.strategies.base import LowRankStrategy, check_rank_argument

Variant = Literal["cheap", "faithful"]
VARIANTS: tuple[str, ...] = ("cheap", "faithful")
MomentPolicy = Literal["transport", "reset"]
MOMENT_POLICIES: tuple[str, ...] = ("transport", "reset")


def mode_rank(rank: int | float, bound: int) -> int:
    """An int rank clipped to ``bound``, or a float fraction of ``bound`` rounded (at least 1)."""
    return min(rank, bound) if isinstance(rank, int) else max(1, min(bound, round(rank * bound)))


class TDLRT(LowRankStrategy):
    """Geometry-aware rank-adaptive training of Linear (matrix) and Conv2d (Tucker) layers.

    Ranks start at ``init_rank`` and adapt within ``[min_rank, max_rank]``; factors are
    preallocated at ``min(2 * max_rank, n_i)`` per mode. Ranks given as a float are a fraction of
    each mode's largest possible rank (``min(m, n)`` for a Linear; ``min(C_out, C_in k^2)`` and
    ``min(C_in, C_out k^2)`` for the channel modes of a Conv2d); ints are clipped to it. The cheap
    variant leaves the bases out of :meth:`param_groups` (they never step, so they hold no optimizer
    state); the faithful variant steps them as ``K_i`` without weight decay, from fresh optimizer
    state at every integrator step (see ``moments``). The core gets the optimizer's decay, which with
    orthonormal bases is exactly the dense decay ``-lambda W`` seen in core coordinates
    (``||W||_F = ||C||_F``).

    Args:
        tau: Relative truncation tolerance: keep the smallest rank whose discarded singular values
            of each core unfolding have norm below ``tau`` times the norm of all of them.
        init_rank: Initial rank of every adaptive mode (int, or float fraction).
        max_rank: Largest rank truncation keeps (int, or float fraction); DLRT uses ``min(m, n) / 2``.
        min_rank: Smallest rank truncation keeps (2 in DLRT).
        variant: ``cheap`` (one pass per batch, augment every ``augment_every`` steps) or
            ``faithful`` (two passes per step; wrap the optimizer with :meth:`wrap_optimizer`).
        augment_every: Cheap variant: optimizer steps per augment-train-truncate cycle (>= 2).
        moments: Optimizer-state policy for the core at augmentation and truncation: ``transport``
            (``m <- m x_i A_i``, ``v <- (sqrt(v) x_i A_i)^2``) or ``reset`` (zero the core's state).
            The faithful variant's ``K_i`` change coordinates every integrator step, so their state is
            reset every step under either policy: each K-step is then the optimizer's first step (for
            Adam a normalised-gradient step). DLRT trains the integrator with plain SGD, which has no
            moments; the reset departs from nothing in the paper and is our choice for Adam.
        spatial_rank: Conv2d only: ``None`` keeps the kernel's spatial modes unfactored (the
            reference code's choice); an int factors them too, starting at that rank, adaptive.
        target_modules: See :class:`LowRankStrategy`.
        exclude_modules: See :class:`LowRankStrategy`.
    """

    module_types = (nn.Linear, nn.Conv2d)
    layer_types = (TuckerLayer,)

    def __init__(
        self,
        tau: float = 0.1,
        init_rank: int | float = 0.5,
        max_rank: int | float = 0.5,
        min_rank: int = 2,
        variant: Variant = "cheap",
        augment_every: int = 10,
        moments: MomentPolicy = "transport",
        spatial_rank: int | None = None,
        target_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
    ) -> None:
        super().__init__(target_modules, exclude_modules)
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau < 1:
            raise ValueError(f"tau must be a relative tolerance in [0, 1), got {tau!r}")
        check_rank_argument(init_rank, "init_rank")
        check_rank_argument(max_rank, "max_rank")
        if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
            raise ValueError(f"min_rank must be an int >= 1, got {min_rank!r}")
        if type(init_rank) is type(max_rank) and init_rank > max_rank:
            raise ValueError(f"init_rank must be <= max_rank, got init_rank={init_rank}, max_rank={max_rank}")
        if isinstance(max_rank, int) and min_rank > max_rank:
            raise ValueError(f"min_rank must be <= max_rank, got min_rank={min_rank}, max_rank={max_rank}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if isinstance(augment_every, bool) or not isinstance(augment_every, int) or augment_every < 2:
            raise ValueError(f"augment_every must be an int >= 2 (one augmentation step, then core steps), "
                             f"got {augment_every!r}")
        if moments not in MOMENT_POLICIES:
            raise ValueError(f"moments must be one of {MOMENT_POLICIES}, got {moments!r}")
        if spatial_rank is not None and (isinstance(spatial_rank, bool) or not isinstance(spatial_rank, int)
                                         or spatial_rank < 1):
            raise ValueError(f"spatial_rank must be None (unfactored spatial modes) or an int >= 1, "
                             f"got {spatial_rank!r}")
        self.tau, self.init_rank, self.max_rank, self.min_rank = float(tau), init_rank, max_rank, min_rank
        self.variant, self.augment_every, self.moments = variant, augment_every, moments
        self.spatial_rank = spatial_rank
        self.integrating = False

    # ----------------------------------------------------------------------------- conversion
    @override
    def handles(self, module: nn.Module) -> bool:
        """Linear layers with a 2-D weight, and Conv2d with ``groups=1`` and zeros padding."""
        if isinstance(module, nn.Conv2d):
            return module.groups == 1 and module.padding_mode == "zeros"
        return super().handles(module)

    @override
    def convert(self, name: str, module: nn.Module, index: int) -> nn.Module:
        if isinstance(module, nn.Conv2d):
            c_out, c_in, k_h, k_w = module.weight.shape
            bounds = (min(c_out, c_in * k_h * k_w), min(c_in, c_out * k_h * k_w))
            max_ranks = tuple(mode_rank(self.max_rank, b) for b in bounds)
            ranks = tuple(min(mode_rank(self.init_rank, b), m) for b, m in zip(bounds, max_ranks))
            spatial = None if self.spatial_rank is None else (min(self.spatial_rank, k_h), min(self.spatial_rank, k_w))
            return TuckerConv2d.from_conv2d(module, ranks, max_ranks, spatial)
        bound = min(module.weight.shape)
        max_rank = mode_rank(self.max_rank, bound)
        return TuckerLinear.from_linear(module, min(mode_rank(self.init_rank, bound), max_rank), max_rank)

    def tucker_layers(self, model: nn.Module) -> list[tuple[str, TuckerLayer]]:
        """The converted layers of ``model``."""
        return [(n, m) for n, m in self.layers(model) if isinstance(m, TuckerLayer)]

    # ----------------------------------------------------------------------------- integrator steps
    def augment(self, model: nn.Module, step: int) -> list[StateEdit]:
        """``U_i <- orth([U_i | -dL/dU_i])`` in every layer from the current basis gradients (the cheap
        variant's basis update); the core is padded with zeros, so the function is unchanged.
        """
        edits = []
        for _, layer in self.tucker_layers(model):
            directions = []
            for mode, rank in enumerate(layer.ranks):
                basis = layer.basis(mode)
                directions.append(None if basis is None or basis.grad is None else -full_tensor(basis.grad)[:, :rank])
            edits.append(self.moment_edit(layer, layer.augment_(directions)))
        return edits

    def truncate(self, model: nn.Module, step: int) -> list[StateEdit]:
        """Truncate every layer's core by HOSVD with tolerance ``tau``, ranks in ``[min_rank, max_rank]``."""
        return [self.moment_edit(layer, layer.truncate_(self.tau, self.min_rank))
                for _, layer in self.tucker_layers(model)]

    def moment_edit(self, layer: TuckerLayer, change: TuckerChange) -> StateEdit:
        """The optimizer-state edit of ``layer``'s core after ``change`` (``moments`` policy)."""
        if self.moments == "reset":
            return StateReset([layer.core], "full")
        return CoreMomentTransport(layer.core, change.maps, change.old_ranks, change.new_ranks)

    # ----------------------------------------------------------------------------- schedule (cheap variant)
    def is_augment_step(self, step: int) -> bool:
        """Whether optimizer step ``step + 1`` is an augmentation (cheap variant)."""
        return self.variant == "cheap" and step % self.augment_every == 0

    @override
    def before_optimizer_step(self, model: nn.Module, step: int) -> list[StateEdit]:
        """Cheap variant: augment on augmentation steps and keep the factorized layers from stepping
        then; on the other steps only the cores step. The basis gradients are consumed here (cleared
        every step: the bases are not in :meth:`param_groups`, so ``optimizer.zero_grad`` never sees
        them), so the bases never step and hold no optimizer state. The rest of the model steps
        every time: augmentation keeps the function, so its gradients stay valid.
        """
        if self.variant == "faithful":
            if not self.integrating:
                raise RuntimeError("TDLRT(variant='faithful') steps through strategy.wrap_optimizer(optimizer, model): "
                                   "LowRankCallback installs it at fit start; without the callback, step that")
            return []
        augmenting = self.is_augment_step(step)
        edits = self.augment(model, step) if augmenting else []
        for _, layer in self.tucker_layers(model):
            for basis in layer.basis_parameters():
                basis.grad = None
            if augmenting:
                layer.core.grad = None
        return edits

    @override
    def operations(self, model: nn.Module) -> dict[str, int | None]:
        """Cheap variant: ``augment`` (from the fresh gradients, before a step) and ``truncate`` every
        ``augment_every`` steps. Faithful: ``truncate`` every step, inside :class:`BUGOptimizer` (whose
        augmentation comes from the K-step, not from :meth:`augment`)."""
        if self.variant == "cheap":
            return {"augment": self.augment_every, "truncate": self.augment_every}
        return {"truncate": 1}

    @override
    def should_update(self, step: int) -> list[str]:
        """Cheap variant: truncate once every ``augment_every`` steps, right before the next augmentation."""
        return ["truncate"] if self.variant == "cheap" and step > 0 and step % self.augment_every == 0 else []

    @override
    def operations_to_finish(self, step: int) -> list[str]:
        """Cheap variant stopped between an augmentation and its truncation: ``truncate`` (the cores otherwise
        keep the augmented, up to doubled, ranks in reports and exports)."""
        return ["truncate"] if self.variant == "cheap" and step % self.augment_every else []

    @override
    def param_groups(self, model: nn.Module, weight_decay: float | None = None) -> list[dict[str, Any]]:
        """:meth:`LowRankStrategy.param_groups` without the ``basis`` group in the cheap variant: its bases
        never take an optimizer step, so they get no optimizer state (a distributed checkpoint then
        has nothing to miss). The faithful variant steps them as ``K_i`` and keeps them.
        """
        groups = super().param_groups(model, weight_decay)
        return groups if self.variant == "faithful" else [g for g in groups if g["lowrank_role"] != "basis"]

    @override
    def check_run(self, accumulate_grad_batches: int, precision: str) -> None:
        """The faithful variant needs ``accumulate_grad_batches=1``: each integrator step evaluates the loss twice
        on one batch (K pass, then Galerkin pass at the augmented bases), so gradients accumulated over earlier
        micro-batches at the old bases cannot enter it (only the last micro-batch's would reach the other
        parameters). It refuses ``16-mixed`` too: its ``GradScaler`` steps without a closure. The cheap variant
        takes both (its augmentation uses the accumulated basis gradients, as the large batch's)."""
        if self.variant != "faithful":
            return
        if accumulate_grad_batches != 1:
            raise ValueError("TDLRT(variant='faithful') needs accumulate_grad_batches=1 (each step evaluates the "
                             f"loss twice on one batch), got accumulate_grad_batches={accumulate_grad_batches}: "
                             "raise the batch size instead, or use variant='cheap'")
        if precision == "16-mixed":
            raise ValueError("TDLRT(variant='faithful') cannot train with precision='16-mixed' (its GradScaler steps "
                             "without the closure the integrator evaluates twice): use precision='bf16-mixed' or "
                             "'32-true'")

    @override
    def wrap_optimizer(self, optimizer: Optimizer, model: nn.Module) -> Optimizer:
        """The faithful variant's :class:`BUGOptimizer` around ``optimizer`` (once); ``optimizer`` itself if cheap."""
        if self.variant == "cheap" or isinstance(optimizer, BUGOptimizer):
            return optimizer
        return BUGOptimizer(optimizer, self, model)

    # ----------------------------------------------------------------------------- reporting
    def compression(self, model: nn.Module) -> float:
        """``1 - trainable / dense`` parameters of the targeted layers at their current ranks."""
        return 1.0 - self.report(model).ratio

    @override
    def metrics(self, model: nn.Module) -> dict[str, float]:
        return {**super().metrics(model), "tdlrt/compression": self.compression(model)}


class BUGOptimizer(OptimizerWrapper):
    """Each ``step(closure)`` is one step of the rank-adaptive augmented BUG integrator for ``strategy``'s layers.

    1. K-step: every basis holds ``K_i = U_i S_i``; ``closure()`` gives all ``dL/dK_i`` in one
       pass and ``optimizer`` steps only the ``K_i``.
    2. Augment: ``U_i <- orth([U_i | K_i^1]) = [U_i | orth((I - U_i U_i^T)(K_i^1 - K_i^0))]``, ``C`` padded
       with zeros; core moments transported or reset.
    3. Galerkin step: ``closure()`` again with the bases held constant (no basis gradients are
       computed); ``optimizer`` steps the cores and every other parameter.
    4. Truncate: HOSVD of the cores with tolerance ``tau``; core moments transported or reset.
    5. Reset the optimizer state of every basis parameter (moments and Adam's ``step``, in place).

    The ``K_i`` change coordinates every step: each K-step starts from new bases ``U_i`` and a new QR
    factor ``Q_i`` of the core, so moments gathered at one step would be applied in the wrong coordinates
    at the next. Their state is therefore reset after each truncation, whatever ``moments`` says (that
    policy is the cores'), and every K-step is the optimizer's first step on fresh state: for Adam a
    normalised-gradient step ``-lr g / (|g| + eps)``. DLRT trains this integrator with plain SGD, which
    has no moments, so the reset departs from nothing in the paper; it is our choice for stateful
    optimizers such as Adam. With Adam, prefer ``moments="reset"`` for the cores too: truncation rotates
    the core every step, and the square-root transport of ``v`` can then cancel to ~0 under a
    non-zero ``m``. ``optimizer`` keeps its parameter groups and state (:class:`OptimizerWrapper`).
    :class:`~lr_lightning.callbacks.LowRankCallback` installs this wrapper at fit start. The closure
    must zero the gradients and run backward, as Lightning's automatic optimization does (with
    ``accumulate_grad_batches=1``, which :meth:`TDLRT.check_run` requires at fit start; ``bf16-mixed`` works);
    a closure-less step (fp16 ``GradScaler``, also refused at fit start) is an error, except at
    learning rate 0, which only creates the optimizer's state (``torch.distributed.checkpoint`` does
    that when an FSDP2 run resumes). Each pass differentiates only what it steps (the K pass never
    touches the cores, the Galerkin pass holds the bases constant); the other parameters take part
    with a zero gradient, so DDP needs no ``find_unused_parameters``.
    """

    def __init__(self, optimizer: Optimizer, strategy: TDLRT, model: nn.Module) -> None:
        super().__init__(optimizer)
        self.strategy, self.model = strategy, model
        self.steps = 0
        """Integrator steps taken by this object (the ``step`` its truncations are told)."""

    @override
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if closure is None and all(float(group.get("lr", 0.0)) == 0 for group in self.param_groups):
            return self.optimizer.step()  # creates the state only (how FSDP2's checkpoint loading initialises it)
        if closure is None:
            raise RuntimeError("BUGOptimizer.step needs a closure (it evaluates the loss twice per step); "
                               "fp16 mixed precision steps without one: use precision '32-true' or 'bf16-mixed'")
        layers = [layer for _, layer in self.strategy.tucker_layers(self.model)]
        basis_parameters = [p for layer in layers for p in layer.basis_parameters()]
        bases = {id(p) for p in basis_parameters}
        self.strategy.integrating = True
        try:
            for layer in layers:
                layer.begin_k_step_()
            try:
                with torch.enable_grad():
                    loss = closure()
                self._step_only(lambda p: id(p) in bases)
            finally:
                stepped = [layer.end_k_step_(increments=True) for layer in layers]
            self._apply([self.strategy.moment_edit(layer, layer.augment_(k)) for layer, k in zip(layers, stepped)])
            for layer in layers:
                layer.bases_frozen = True
            with torch.enable_grad():
                closure()
            self._step_only(lambda p: id(p) not in bases)
            self.steps += 1
            self._apply(self.strategy.truncate(self.model, self.steps))
            self._apply([StateReset(basis_parameters, "full")])  # the next K-step has new coordinates
        finally:
            self.strategy.integrating = False
            for layer in layers:
                layer.bases_frozen = False
        return loss

    def _step_only(self, keep: Callable[[torch.Tensor], bool]) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if not keep(p):
                    p.grad = None
        self.optimizer.step()

    def _apply(self, edits: list[StateEdit]) -> None:
        for edit in edits:
            edit.apply_(self.optimizer)
