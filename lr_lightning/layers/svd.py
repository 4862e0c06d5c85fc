"""SVD-form layers (Yang et al., arXiv 2004.09031): ``W = N diag(|s|) C`` held at full rank.

``N`` (``a x r``), ``s`` (``r``) and ``C`` (``r x b``) are trained directly, with ``r = min(a, b)``;
nothing forces ``N`` and ``C`` to be orthonormal except the strategy's regularizer. Pruning masks
singular values: a boolean buffer ``active`` marks the kept ones, the pruned entries of ``s`` and
the matching columns of ``N`` and rows of ``C`` are zeroed, and the masked forward gives them zero
gradient, so they stay zero. ``shrink_()`` then drops them physically (new Parameters at the kept
rank, so memory, optimizer state and work follow the rank), as ``export()`` does for inference.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lr_lightning.layers.base import LowRankLayer, ParamMove
from lr_lightning.layers.linalg import sign_fixed_svd
from lr_lightning.layers.tensors import full_tensor, write_full_

SVDInit = Literal["dense", "random"]
SVD_INITS: tuple[str, ...] = ("dense", "random")
Decomposition = Literal["channel", "spatial"]
DECOMPOSITIONS: tuple[str, ...] = ("channel", "spatial")


class SVDLayer(LowRankLayer):
    """Shared part of the SVD-form layers: the factors of the ``a x b`` matrix ``M = N diag(|s|) C``.

    ``M`` is the weight itself for a linear layer and a reshaping of the kernel for a convolution.
    The forward computes ``N (|s| * (C x))``: the paper's ``N diag(sqrt|s|) . diag(sqrt|s|) C`` is the
    same function with the same gradients, but its ``1 / sqrt|s|`` factor makes autograd return NaN
    for a singular value at exactly zero. ``N`` and ``C`` have role ``basis`` (no weight decay, which
    would fight orthogonality), ``s`` role ``spectrum``.
    """

    roles = {"N": "basis", "s": "spectrum", "C": "basis", "bias": "bias"}

    def _allocate(self, a: int, b: int, bias_features: int | None, device: torch.device | None,
                  dtype: torch.dtype | None) -> None:
        self._allocate_factors(a, b, min(a, b), device, dtype)
        self.bias = nn.Parameter(torch.zeros(bias_features, device=device, dtype=dtype)) if bias_features else None

    def _allocate_factors(self, a: int, b: int, r: int, device: torch.device | None, dtype: torch.dtype | None) -> None:
        """Fresh ``N (a x r)``, ``s (r)``, ``C (r x b)`` and an all-kept ``active`` mask."""
        kw = {"device": device, "dtype": dtype}
        self.N = nn.Parameter(torch.empty(a, r, **kw))
        self.s = nn.Parameter(torch.empty(r, **kw))
        self.C = nn.Parameter(torch.empty(r, b, **kw))
        self.register_buffer("active", torch.ones(r, dtype=torch.bool, device=device))

    @property
    def rank(self) -> int:
        return int(self.active.sum())

    @property
    def capacity(self) -> int:
        return self.active.numel()

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(a, b)``, the shape of the factorized matrix ``M``."""
        return self.N.shape[0], self.C.shape[1]

    def trainable_numel(self) -> int:
        """``rank (a + b + 1)`` plus the bias: the factors at the kept singular values."""
        a, b = self.matrix_shape
        return self.rank * (a + b + 1) + (self.bias.numel() if self.bias is not None else 0)

    def spectrum(self) -> torch.Tensor:
        """``|s|`` with the pruned entries at zero (what the forward multiplies by)."""
        return self.s.abs() * self.active

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole ``N``, ``s``, ``C`` at the kept singular values only (gathers FSDP2 shards; differentiable).

        With every value kept (before the prune, and after :meth:`shrink_`) they are the tensors themselves.
        """
        n, s, c = full_tensor(self.N), full_tensor(self.s), full_tensor(self.C)
        if self.rank == self.capacity:
            return n, s, c
        keep = self.active
        return n[:, keep], s[keep], c[keep]

    def matrix(self) -> torch.Tensor:
        """``M = N diag(|s|) C`` as an ``a x b`` tensor."""
        n, s, c = self.factors()
        return (n * s.abs()) @ c

    # ----------------------------------------------------------------------------- initialisation
    @torch.no_grad()
    def set_from_matrix_(self, matrix: torch.Tensor) -> None:
        """``N, s, C <- U, S, V^T`` of an exact (sign-fixed) SVD of ``matrix``: the layer computes ``matrix``.

        All singular values become active.
        """
        u, s, v = sign_fixed_svd(matrix)
        write_full_(self.N, u)
        write_full_(self.s, s)
        write_full_(self.C, v.mT)
        self.active.fill_(True)

    @torch.no_grad()
    def random_init_(self, generator: torch.Generator | None = None) -> None:
        """The paper's init: Kaiming-normal ``N`` and ``C`` (``std = sqrt(2 / fan_in)``, fan_in their
        second dimension) and ``s ~ N(0, 1)``; drawn on the CPU from ``generator`` so replicas agree."""
        (a, r), b = self.N.shape, self.C.shape[1]
        write_full_(self.N, torch.randn(a, r, generator=generator) * math.sqrt(2 / r))
        write_full_(self.s, torch.randn(r, generator=generator))
        write_full_(self.C, torch.randn(r, b, generator=generator) * math.sqrt(2 / b))
        self.active.fill_(True)

    def _initialize(self, matrix: torch.Tensor, init: SVDInit, generator: torch.Generator | None) -> None:
        if init not in SVD_INITS:
            raise ValueError(f"init must be one of {SVD_INITS}, got {init!r}")
        if init == "dense":
            self.set_from_matrix_(matrix)
        else:
            self.random_init_(generator)

    # ----------------------------------------------------------------------------- pruning
    @torch.no_grad()
    def standardize_(self) -> None:
        """Re-SVD ``M = N diag(|s|) C`` (sign-fixed) and write it back at the current rank, kept values first.

        ``N`` and ``C`` become orthonormal and ``s`` the exact singular values; the function is kept,
        since ``M`` has rank at most ``rank``.
        """
        k = self.rank
        u, s, v = sign_fixed_svd(self.matrix())
        (a, r), b = self.N.shape, self.C.shape[1]
        write_full_(self.N, torch.cat([u[:, :k], u.new_zeros(a, r - k)], dim=1))
        write_full_(self.s, torch.cat([s[:k], s.new_zeros(r - k)]))
        write_full_(self.C, torch.cat([v.mT[:k], v.new_zeros(r - k, b)]))
        self.active.copy_(torch.arange(r, device=self.active.device) < k)

    def energy_keep(self, energy: float) -> torch.Tensor:
        """Mask of the fewest largest ``|s|`` whose energy ``sum s_i^2`` is ``>= (1 - energy)`` of the total.

        Only kept values are candidates, at least one is kept, and ties go to the lower index.
        """
        if not 0 <= energy < 1:
            raise ValueError(f"energy must be in [0, 1), got {energy}")
        with torch.no_grad():
            power = full_tensor(self.s).detach().double().square().cpu()
            power[~self.active.cpu()] = -1.0
            order = torch.sort(power, descending=True, stable=True).indices[: self.rank]
            cumulative = power[order].cumsum(0)
            k = int(torch.searchsorted(cumulative, (1 - energy) * cumulative[-1])) + 1
            keep = torch.zeros_like(self.active, device="cpu")
            keep[order[: min(max(k, 1), self.rank)]] = True
        return keep.to(self.active.device)

    @torch.no_grad()
    def prune_(self, keep: torch.Tensor) -> int:
        """Deactivate the singular values outside ``keep``; zero them and their ``N`` columns and ``C`` rows.

        Returns how many were pruned.
        """
        before = self.rank
        self.active &= keep.to(self.active.device)
        dropped = ~self.active
        write_full_(self.N, full_tensor(self.N).masked_fill(dropped[None, :], 0))
        write_full_(self.s, full_tensor(self.s).masked_fill(dropped, 0))
        write_full_(self.C, full_tensor(self.C).masked_fill(dropped[:, None], 0))
        return before - self.rank

    @torch.no_grad()
    def shrink_(self) -> list[ParamMove]:
        """``N, s, C <- N[:, kept], s[kept], C[kept]`` as new Parameters: the pruned values leave memory and work."""
        kept = self.active.nonzero().squeeze(1)
        moves = [self._keep_("N", (slice(None), kept)), self._keep_("s", (kept,)), self._keep_("C", (kept,))]
        self.active = torch.ones(len(kept), dtype=torch.bool, device=self.active.device)
        return moves

    def resize_(self, capacity: int) -> None:
        a, b = self.matrix_shape
        if not 1 <= capacity <= min(a, b):
            raise ValueError(f"capacity must be in 1..{min(a, b)} (min(a, b)), got {capacity}")
        self._allocate_factors(a, b, capacity, self.active.device, self.s.dtype)

    def saved_capacity(self, state_dict: dict[str, torch.Tensor], prefix: str) -> int | None:
        active = state_dict.get(prefix + "active")
        return None if active is None else active.numel()

    def _compact_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(N, diag(|s|) C)`` at the kept values and the bias, detached, for :meth:`export`."""
        n, s, c = (t.detach() for t in self.factors())
        bias = full_tensor(self.bias).detach() if self.bias is not None else None
        return n, s.abs()[:, None] * c, bias


class SVDLinear(SVDLayer):
    """``y = N (|s| * (C x)) + b``: a linear layer in SVD form, ``N`` (``out x r``), ``C`` (``r x in``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._allocate(out_features, in_features, out_features if bias else None, device, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Module, init: SVDInit = "dense",
                    generator: torch.Generator | None = None) -> SVDLinear:
        """Factorize a dense layer: ``init="dense"`` by exact SVD of its weight (same function, so a
        trained model converts losslessly), ``"random"`` by the paper's init. The bias is copied."""
        weight = linear.weight
        layer = cls(weight.shape[1], weight.shape[0], bias=getattr(linear, "bias", None) is not None,
                    device=weight.device, dtype=weight.dtype)
        layer._initialize(full_tensor(weight).detach(), init, generator)
        if layer.bias is not None:
            write_full_(layer.bias, full_tensor(linear.bias).detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.C) * self.spectrum(), self.N, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.matrix()

    def export(self) -> nn.Sequential:
        """``Linear(in -> rank, no bias)`` with weight ``diag(|s|) C``, then ``Linear(rank -> out)`` with ``N``."""
        n, sc, bias = self._compact_factors()
        first = nn.Linear(self.in_features, self.rank, bias=False, device=n.device, dtype=n.dtype)
        second = nn.Linear(self.rank, self.out_features, bias=bias is not None, device=n.device, dtype=n.dtype)
        with torch.no_grad():
            first.weight.copy_(sc)
            second.weight.copy_(n)
            if bias is not None:
                second.bias.copy_(bias)
        return nn.Sequential(first, second)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"capacity={self.capacity}")


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


class SVDConv2d(SVDLayer):
    """A ``Conv2d`` (``groups=1``, zero padding) in SVD form, decomposed channel-wise or spatial-wise.

    - ``channel``: ``M`` is the kernel as ``C_out x (C_in kh kw)``; ``C`` is a ``kh x kw`` conv with
      ``r`` filters, ``N`` a ``1 x 1`` conv to ``C_out``.
    - ``spatial`` (VH): ``M[(i, h), (o, w)] = W[o, i, h, w]``, ``(C_in kh) x (C_out kw)``; ``N`` is a
      ``kh x 1`` conv (stride and padding along H), ``C`` a ``1 x kw`` conv (along W).

    ``out_features = C_out`` and ``in_features = C_in kh kw``, so ``dense_weight()`` is the unfolded
    kernel (``y = W unfold(x) + b``); :meth:`matrix` is the factorized ``M``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, bias: bool = True, decomposition: Decomposition = "channel",
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if decomposition not in DECOMPOSITIONS:
            raise ValueError(f"decomposition must be one of {DECOMPOSITIONS}, got {decomposition!r}")
        self.in_channels, self.out_channels, self.decomposition = in_channels, out_channels, decomposition
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        kh, kw = self.kernel_size
        self.in_features, self.out_features = in_channels * kh * kw, out_channels
        channel_wise = decomposition == "channel"
        a, b = (out_channels, in_channels * kh * kw) if channel_wise else (in_channels * kh, out_channels * kw)
        self._allocate(a, b, out_channels if bias else None, device, dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, decomposition: Decomposition = "channel", init: SVDInit = "dense",
                  generator: torch.Generator | None = None) -> SVDConv2d:
        """Factorize a dense ``Conv2d``: ``init="dense"`` by exact SVD of its kernel matrix, ``"random"`` by the
        paper's init. The bias is copied."""
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"SVDConv2d needs groups=1 and padding_mode='zeros', got groups={conv.groups}, "
                             f"padding_mode={conv.padding_mode!r}")
        weight = conv.weight
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, decomposition=decomposition, device=weight.device, dtype=weight.dtype)
        layer._initialize(layer.kernel_to_matrix(full_tensor(weight).detach()), init, generator)
        if layer.bias is not None:
            write_full_(layer.bias, full_tensor(conv.bias).detach())
        return layer

    def kernel_to_matrix(self, kernel: torch.Tensor) -> torch.Tensor:
        """The ``a x b`` matrix ``M`` of a ``C_out x C_in x kh x kw`` kernel."""
        if self.decomposition == "channel":
            return kernel.reshape(self.out_channels, -1)
        return kernel.permute(1, 2, 0, 3).reshape(self.in_channels * self.kernel_size[0], -1)

    def matrix_to_kernel(self, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`kernel_to_matrix`."""
        (kh, kw), c_in, c_out = self.kernel_size, self.in_channels, self.out_channels
        if self.decomposition == "channel":
            return matrix.reshape(c_out, c_in, kh, kw)
        return matrix.reshape(c_in, kh, c_out, kw).permute(2, 0, 1, 3)

    def kernel(self) -> torch.Tensor:
        """The effective ``C_out x C_in x kh x kw`` kernel."""
        return self.matrix_to_kernel(self.matrix())

    def dense_weight(self) -> torch.Tensor:
        return self.kernel().reshape(self.out_channels, -1)

    def _stages(self, first: torch.Tensor, second: torch.Tensor) -> tuple[dict, dict]:
        """``F.conv2d`` arguments of the two convolutions; ``first`` and ``second`` are ``C`` and ``N``
        (channel-wise) or ``N`` and ``C`` (spatial-wise), at any rank."""
        (kh, kw), c_in, c_out = self.kernel_size, self.in_channels, self.out_channels
        if self.decomposition == "channel":
            rank = first.shape[0]
            return ({"weight": first.reshape(rank, c_in, kh, kw), "stride": self.stride, "padding": self.padding,
                     "dilation": self.dilation},
                    {"weight": second.reshape(c_out, rank, 1, 1)})
        rank, pad = first.shape[1], self.padding
        return ({"weight": first.t().reshape(rank, c_in, kh, 1), "stride": (self.stride[0], 1),
                 "padding": pad if isinstance(pad, str) else (pad[0], 0), "dilation": (self.dilation[0], 1)},
                {"weight": second.reshape(rank, c_out, kw).transpose(0, 1).unsqueeze(2), "stride": (1, self.stride[1]),
                 "padding": pad if isinstance(pad, str) else (0, pad[1]), "dilation": (1, self.dilation[1])})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = (self.C, self.N) if self.decomposition == "channel" else (self.N, self.C)
        conv1, conv2 = self._stages(first, second)
        hidden = F.conv2d(x, **conv1) * self.spectrum()[:, None, None]
        return F.conv2d(hidden, bias=self.bias, **conv2)

    def export(self) -> nn.Sequential:
        """Two ``Conv2d`` at the kept rank, ``|s|`` folded into ``C``: the layer's function, compact."""
        n, sc, bias = self._compact_factors()
        conv1, conv2 = self._stages(*((sc, n) if self.decomposition == "channel" else (n, sc)))
        layers = []
        for kwargs, c_in, c_out, with_bias in ((conv1, self.in_channels, self.rank, False),
                                               (conv2, self.rank, self.out_channels, bias is not None)):
            weight = kwargs.pop("weight")
            conv = nn.Conv2d(c_in, c_out, tuple(weight.shape[2:]), bias=with_bias, device=weight.device,
                             dtype=weight.dtype, **kwargs)
            with torch.no_grad():
                conv.weight.copy_(weight)
                if with_bias:
                    conv.bias.copy_(bias)
            layers.append(conv)
        return nn.Sequential(*layers)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, decomposition={self.decomposition}, rank={self.rank}, "
                f"capacity={self.capacity}")
