"""The contract every factorized layer of the package fulfils."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import Optimizer

from lr_lightning.layers.tensors import full_tensor, local_tensor


@dataclass
class ParamMove:
    """``new = old[index]``: a Parameter reallocated smaller when a layer shrinks to its rank.

    As a :class:`lr_lightning.optim.StateEdit` it puts ``new`` where ``old`` was in the optimizer's groups and moves
    ``old``'s state to ``new``, each state tensor of ``old``'s shape sliced by ``index`` (the kept
    part's moments carry over; scalars such as Adam's ``step`` are kept).
    """

    old: torch.Tensor
    new: torch.Tensor
    index: tuple[slice | torch.Tensor, ...]

    def apply_(self, optimizer: Optimizer) -> tuple[int, int]:
        """Swap ``old`` for ``new`` in place; nothing is zeroed, so (0, 0)."""
        held = False
        for group in optimizer.param_groups:
            params = group["params"]
            for i, param in enumerate(params):
                if param is self.old:
                    params[i], held = self.new, True
        state = optimizer.state.pop(self.old, None)
        if held and state:
            optimizer.state[self.new] = {key: self._slice(value) for key, value in state.items()}
        return 0, 0

    def _slice(self, value: object) -> object:
        if not torch.is_tensor(value) or value.shape != self.old.shape:
            return value
        return full_tensor(value).detach()[self.index].clone().to(local_tensor(self.new).device)


class LowRankLayer(nn.Module):
    """A linear map ``y = W x + b`` whose ``W (m x n)`` is held in factorized form.

    Subclasses store their factors at a *capacity* that stays fixed while ranks move (so DDP buckets,
    FSDP2 shards and optimizer state stay valid) and expose the *active* rank as an int; layers whose
    rank a strategy fixes for good implement :meth:`shrink_` to drop the unused capacity. ``roles``
    tags each parameter with what it is (``"factor"``, ``"frozen"``, ``"basis"``, ``"spectrum"``,
    ``"bias"``) so a strategy can build optimizer groups without knowing the layer's internals.
    """

    in_features: int
    out_features: int
    roles: dict[str, str] = {}

    @property
    def rank(self) -> int:
        """Active rank of the factorized part."""
        raise NotImplementedError

    @property
    def capacity(self) -> int:
        """Allocated rank (the fixed size of the factor tensors)."""
        raise NotImplementedError

    def trainable_numel(self) -> int:
        """Trainable parameters at the active rank (what the optimizer really updates).

        The default counts every parameter that requires grad; layers whose capacity exceeds their
        active rank count the active part.
        """
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def dense_weight(self) -> torch.Tensor:
        """The effective ``W`` as an ``m x n`` tensor."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------- shrinking
    def shrink_(self) -> list[ParamMove]:
        """Reallocate the factors at the active rank (``capacity <- rank``), keeping the function.

        The factors become new, smaller Parameters; each returned :class:`ParamMove` says which
        slice of an old Parameter a new one holds, so the caller can move the optimizer state with
        it. Only layers whose rank a strategy has fixed for good are shrunk (after SVD training's
        prune, after InRank's switch).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot shrink to its active rank")

    def _keep_(self, name: str, index: tuple[slice | torch.Tensor, ...]) -> ParamMove:
        """Replace Parameter ``name`` by a new one holding ``old[index]`` (whole, gathered); say where it came from."""
        old = getattr(self, name)
        new = nn.Parameter(full_tensor(old).detach()[index].clone(), requires_grad=old.requires_grad)
        setattr(self, name, new)
        return ParamMove(old, new, index)

    def resize_(self, capacity: int) -> None:
        """Allocate the factors at ``capacity`` with unspecified values, ready for a ``load_state_dict``."""
        raise NotImplementedError(f"{type(self).__name__} cannot change its capacity")

    def saved_capacity(self, state_dict: dict[str, torch.Tensor], prefix: str) -> int | None:
        """The capacity the layer had when ``state_dict`` was saved (``None``: not said, or fixed)."""
        return None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001  (torch's signature)
        """Resize to the saved capacity first, so a checkpoint taken after a shrink loads into a fresh layer."""
        capacity = self.saved_capacity(state_dict, prefix)
        if capacity is not None and capacity != self.capacity:
            self.resize_(capacity)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def export(self) -> nn.Module:
        """A compact inference module at the exact active rank, computing the same function."""
        raise NotImplementedError

    def merged_linear(self) -> nn.Linear:
        """An ``nn.Linear`` holding ``dense_weight()`` and the bias: the same function, no factors."""
        weight = self.dense_weight().detach()
        bias = getattr(self, "bias", None)
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(full_tensor(bias))
        return linear

    def dense_numel(self) -> int:
        """Parameters of the equivalent dense ``nn.Linear`` (weight and bias)."""
        bias = getattr(self, "bias", None)
        return self.out_features * self.in_features + (bias.numel() if bias is not None else 0)
