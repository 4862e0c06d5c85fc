"""The contract every factorized layer of the package fulfils."""

from __future__ import annotations

import torch
from torch import nn

from lr_lightning.layers.tensors import full_tensor


class LowRankLayer(nn.Module):
    """A linear map ``y = W x + b`` whose ``W (m x n)`` is held in factorized form.

    Subclasses store their factors at a fixed *capacity* (so parameter shapes never change during
    training) and expose the *active* rank as an int. ``roles`` tags each parameter with what it
    is (``"factor"``, ``"frozen"``, ``"basis"``, ``"spectrum"``, ``"bias"``) so a strategy can build
    optimizer groups without knowing the layer's internals.
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
