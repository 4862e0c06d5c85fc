"""Tucker layers for TDLRT / DLRT: ``W = C x_1 U_1 ... x_d U_d`` with orthonormal bases ``U_i``.

``TuckerLinear`` is the matrix case ``W = U S V^T`` (2 modes: out, in); ``TuckerConv2d`` keeps the
4-mode kernel ``C_out x C_in x k_h x k_w`` with bases on the channel modes and, optionally, on the
spatial modes. Factors are preallocated at a capacity (``min(2 * max_rank, n_i)`` per mode, so an
augmentation that doubles the rank fits) and the active Tucker ranks live in the buffer
``active_ranks``; the forward only reads the active slices. ``augment_`` and ``truncate_`` are the
two rank-changing steps of the rank-adaptive augmented BUG integrator (arXiv 2305.19059); both
edit the tensors in place, keep the bases orthonormal and return a :class:`TuckerChange` that says
how the core's coordinates moved (for transporting its optimizer moments).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from lr_lightning.layers.base import LowRankLayer
from lr_lightning.layers.linalg import sign_fixed_svd
from lr_lightning.layers.tensors import full_tensor, write_full_

COMPUTE_DTYPE = torch.float64
"""QR and SVD of bases and cores run in float64 (the matrices are small) with autocast off."""


# ------------------------------------------------------------------------------------------ tensor algebra
def mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """``tensor x_mode matrix``: mode ``mode`` (size ``k``) is replaced by ``matrix @ (.)`` (``matrix``: ``j x k``)."""
    return torch.movedim(torch.tensordot(matrix, tensor, dims=([1], [mode])), 0, mode)


def unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """``Mat_mode(tensor)``: the ``n_mode x prod_{j != mode} n_j`` unfolding."""
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def fold(matrix: torch.Tensor, mode: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`unfold`: ``Ten_mode(matrix)`` with ``shape[mode] = matrix.shape[0]``."""
    others = [n for j, n in enumerate(shape) if j != mode]
    return matrix.reshape(matrix.shape[0], *others).movedim(0, mode)


def tucker_to_tensor(core: torch.Tensor, bases: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``C x_1 U_1 ... x_d U_d``; a ``None`` basis is the identity (an unfactored mode)."""
    for mode, basis in enumerate(bases):
        if basis is not None:
            core = mode_product(core, basis, mode)
    return core


def orthonormal_augmentation(basis: torch.Tensor, directions: torch.Tensor, rank: int) -> torch.Tensor:
    """The first ``rank`` columns of ``orth([U | D])`` by Householder QR, signs fixed so ``diag(R) >= 0``.

    With orthonormal ``U`` the first ``r`` columns reproduce ``U``; a ``D`` that is zero or inside
    ``span(U)`` still yields orthonormal (arbitrary) extra columns.
    """
    q, r = torch.linalg.qr(torch.cat([basis, directions], dim=1))
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return (q * signs)[:, :rank]


def truncation_rank(sigma: torch.Tensor, tau: float) -> int:
    """Smallest ``j`` with ``||sigma_{j:}||_2 < tau ||sigma||_2`` (DLRT's relative criterion), else ``len(sigma)``."""
    tails = torch.cat([sigma.flip(0).square().cumsum(0).flip(0), sigma.new_zeros(1)]).sqrt()
    below = torch.nonzero(tails < tau * tails[0]).flatten()
    return int(below[0]) if below.numel() else sigma.numel()


@dataclass(frozen=True)
class TuckerChange:
    """How an operation moved the core: ``C_new = C_old x_1 A_1 ... x_d A_d`` on the active blocks.

    ``maps[i]`` is ``A_i`` (``new_ranks[i] x old_ranks[i]``, float64), ``None`` for an unchanged mode.
    """

    old_ranks: tuple[int, ...]
    new_ranks: tuple[int, ...]
    maps: tuple[torch.Tensor | None, ...]


@dataclass
class _KStep:
    """A faithful K-step's frozen bases ``U_i^0`` and cores ``Ten_i(Q_i^T)``, where ``Mat_i(C)^T = Q_i S_i^T``."""

    bases: list[torch.Tensor | None]
    q_cores: list[torch.Tensor | None]


# ------------------------------------------------------------------------------------------ layers
class TuckerLayer(LowRankLayer):
    """A weight tensor held as ``W = C x_1 U_1 ... x_d U_d`` with orthonormal ``U_i`` (``n_i x r_i``).

    Modes with ``factored[i]`` have a basis ``basis_<name>`` (role ``basis``: never weight-decayed)
    and an adaptive rank in ``[1, max_ranks[i]]``; the other modes stay at full size in the core.
    The core (role ``core``) is ``cap_1 x ... x cap_d``; the active block is ``r_1 x ... x r_d``
    and everything outside it is zero. Subclasses define ``mode_names`` and ``forward``.
    """

    mode_names: tuple[str, ...] = ()

    def __init__(
        self,
        mode_sizes: Sequence[int],
        factored: Sequence[bool],
        ranks: Sequence[int],
        max_ranks: Sequence[int],
        bias_size: int | None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.mode_sizes = tuple(int(n) for n in mode_sizes)
        self.factored = tuple(bool(f) for f in factored)
        self.max_ranks = tuple(int(m) if f else n for m, f, n in zip(max_ranks, factored, self.mode_sizes))
        ranks = [int(r) if f else n for r, f, n in zip(ranks, factored, self.mode_sizes)]
        for name, n, r, m in zip(self.mode_names, self.mode_sizes, ranks, self.max_ranks):
            if not 1 <= r <= m <= n:
                raise ValueError(f"ranks of mode '{name}' must satisfy 1 <= rank <= max_rank <= {n} "
                                 f"(the mode size), got rank={r}, max_rank={m}")
        capacities = [min(2 * m, n) if f else n for m, f, n in zip(self.max_ranks, self.factored, self.mode_sizes)]
        self.roles = {"core": "core", "bias": "bias"}
        for mode, name in enumerate(self.mode_names):
            if self.factored[mode]:
                basis = nn.Parameter(torch.zeros(self.mode_sizes[mode], capacities[mode], **kw))
                self.register_parameter(f"basis_{name}", basis)
                self.roles[f"basis_{name}"] = "basis"
        self.core = nn.Parameter(torch.zeros(*capacities, **kw))
        self.bias = nn.Parameter(torch.zeros(bias_size, **kw)) if bias_size else None
        self.register_buffer("active_ranks", torch.tensor(ranks, dtype=torch.long, device=device))
        self._k_step: _KStep | None = None

    # ---------------------------------------------------------------------------------- shape and size
    @property
    def ranks(self) -> tuple[int, ...]:
        """Active Tucker ranks, one per mode (an unfactored mode counts at its full size)."""
        return tuple(int(r) for r in self.active_ranks.tolist())

    @property
    def capacities(self) -> tuple[int, ...]:
        """Allocated size of each mode of the core."""
        return tuple(self.core.shape)

    @property
    def rank(self) -> int:
        """The largest active rank among the factored modes."""
        return max(r for r, f in zip(self.ranks, self.factored) if f)

    @property
    def capacity(self) -> int:
        return max(c for c, f in zip(self.capacities, self.factored) if f)

    def basis(self, mode: int) -> nn.Parameter | None:
        """The basis parameter of ``mode`` (``None`` for an unfactored mode)."""
        return getattr(self, f"basis_{self.mode_names[mode]}") if self.factored[mode] else None

    def basis_parameters(self) -> list[nn.Parameter]:
        """The basis parameters of the factored modes."""
        return [self.basis(mode) for mode in range(len(self.mode_sizes)) if self.factored[mode]]

    def trainable_numel(self) -> int:
        """``sum_i n_i r_i`` over factored modes ``+ prod_i r_i + bias``: the compact form's parameter count."""
        bases = sum(n * r for n, r, f in zip(self.mode_sizes, self.ranks, self.factored) if f)
        return bases + math.prod(self.ranks) + (self.bias.numel() if self.bias is not None else 0)

    def _active(self, core: torch.Tensor, bases: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, list]:
        ranks = self.ranks
        return core[tuple(slice(0, r) for r in ranks)], [None if b is None else b[:, :r] for b, r in zip(bases, ranks)]

    def active_factors(self) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Active core and bases as whole tensors (gathered if sharded), in the compute dtype."""
        bases = [None if self.basis(i) is None else full_tensor(self.basis(i)).detach().to(COMPUTE_DTYPE)
                 for i in range(len(self.mode_sizes))]
        return self._active(full_tensor(self.core).detach().to(COMPUTE_DTYPE), bases)

    def weight_tensor(self) -> torch.Tensor:
        """The ``d``-mode weight ``C x_i U_i`` from the active slices (differentiable)."""
        if self._k_step is not None:
            return self._k_step_tensor()
        core, bases = self._active(self.core, [self.basis(i) for i in range(len(self.mode_sizes))])
        return tucker_to_tensor(core, bases)

    def dense_weight(self) -> torch.Tensor:
        core, bases = self.active_factors()
        return tucker_to_tensor(core, bases).to(self.core.dtype).reshape(self.out_features, -1)

    def compact(self) -> TuckerLayer:
        """A copy whose capacities equal the active ranks (same function, no spare columns)."""
        compact = copy.deepcopy(self)
        bases = [None if self.basis(i) is None else full_tensor(self.basis(i)).detach()
                 for i in range(len(self.mode_sizes))]
        core, bases = self._active(full_tensor(self.core).detach(), bases)
        compact.core = nn.Parameter(core.clone())
        for mode, basis in enumerate(bases):
            if basis is not None:
                setattr(compact, f"basis_{self.mode_names[mode]}", nn.Parameter(basis.clone()))
        if self.bias is not None:
            compact.bias = nn.Parameter(full_tensor(self.bias).detach().clone())
        return compact

    # ---------------------------------------------------------------------------------- writing factors
    @torch.no_grad()
    def _write_(self, core: torch.Tensor, bases: Sequence[torch.Tensor | None]) -> None:
        """Store an active core and bases (any dtype) into the preallocated tensors, zero elsewhere."""
        ranks = tuple(core.shape)
        padded = core.new_zeros(self.capacities)
        padded[tuple(slice(0, r) for r in ranks)] = core
        write_full_(self.core, padded)
        for mode, basis in enumerate(bases):
            if basis is not None:
                full = basis.new_zeros(self.mode_sizes[mode], self.capacities[mode])
                full[:, : basis.shape[1]] = basis
                write_full_(self.basis(mode), full)
        self.active_ranks.copy_(torch.tensor(ranks, dtype=torch.long))

    @torch.no_grad()
    def init_from_weight_(self, weight: torch.Tensor) -> None:
        """``W ~ C x_i U_i`` by a truncated HOSVD of ``weight`` at the active ranks (sign-fixed)."""
        with torch.autocast(weight.device.type, enabled=False):
            tensor = weight.detach().to(COMPUTE_DTYPE).reshape(self.mode_sizes)
            bases: list[torch.Tensor | None] = []
            for mode, rank in enumerate(self.ranks):
                bases.append(sign_fixed_svd(unfold(tensor, mode))[0][:, :rank] if self.factored[mode] else None)
            core = tucker_to_tensor(tensor, [None if b is None else b.T for b in bases])
        self._write_(core, bases)

    # ---------------------------------------------------------------------------------- integrator steps
    @torch.no_grad()
    def augment_(self, directions: Sequence[torch.Tensor | None]) -> TuckerChange:
        """``U_i <- orth([U_i | D_i])`` (rank ``min(r_i + cols(D_i), capacity)``), ``C <- C x_i (U_i_new^T U_i)``.

        The function is unchanged; ``directions[i]`` is ``None`` for a mode left as it is.
        """
        old_ranks = self.ranks
        core, bases = self.active_factors()
        maps: list[torch.Tensor | None] = []
        with torch.autocast(self.core.device.type, enabled=False):
            for mode, direction in enumerate(directions):
                if bases[mode] is None or direction is None:
                    maps.append(None)
                    continue
                direction = direction.detach().to(device=core.device, dtype=COMPUTE_DTYPE)
                rank = min(old_ranks[mode] + direction.shape[1], self.capacities[mode])
                augmented = orthonormal_augmentation(bases[mode], direction, rank)
                maps.append(augmented.T @ bases[mode])
                core = mode_product(core, maps[-1], mode)
                bases[mode] = augmented
        self._write_(core, bases)
        return TuckerChange(old_ranks, self.ranks, tuple(maps))

    @torch.no_grad()
    def truncate_(self, tau: float, min_rank: int = 2) -> TuckerChange:
        """HOSVD of the core: ``Mat_i(C) = P_i Sigma_i Q_i^T``; keep the smallest ``r_i`` whose discarded
        singular values have norm ``< tau ||Sigma_i||``, clamped to ``[min_rank, max_rank_i]``;
        ``U_i <- U_i P_i``, ``C <- C x_i P_i^T``.
        """
        old_ranks = self.ranks
        core, bases = self.active_factors()
        maps: list[torch.Tensor | None] = []
        with torch.autocast(self.core.device.type, enabled=False):
            for mode, basis in enumerate(bases):
                if basis is None:
                    maps.append(None)
                    continue
                left, sigma, _ = sign_fixed_svd(unfold(core, mode))
                rank = max(truncation_rank(sigma, tau), min(min_rank, self.mode_sizes[mode]))
                rank = min(rank, self.max_ranks[mode], left.shape[1])
                maps.append(left[:, :rank].T)
            core = tucker_to_tensor(core, maps)
            bases = [None if b is None else b @ p.T for b, p in zip(bases, maps)]
        self._write_(core, bases)
        return TuckerChange(old_ranks, self.ranks, tuple(maps))

    @torch.no_grad()
    def begin_k_step_(self) -> None:
        """Put ``K_i = U_i S_i`` into every basis, where ``Mat_i(C)^T = Q_i S_i^T`` (QR).

        Until :meth:`end_k_step_`, the forward computes the unchanged ``W`` as
        ``C x_j U_j^0 + sum_i (T_i - T_i.detach())`` with ``T_i = Ten_i(K_i V_i^T)``,
        ``V_i^T = Q_i^T (x_{j != i} U_j^0)^T``, so one backward gives every ``dL/dK_i = Mat_i(dL/dW) V_i``
        (the K-steps of all modes are independent) and no inverse of the core is needed.
        """
        core, bases = self.active_factors()
        q_cores: list[torch.Tensor | None] = []
        ks: list[torch.Tensor | None] = []
        with torch.autocast(self.core.device.type, enabled=False):
            for mode, basis in enumerate(bases):
                if basis is None:
                    q_cores.append(None)
                    ks.append(None)
                    continue
                q, s_transposed = torch.linalg.qr(unfold(core, mode).T)
                shape = list(core.shape)
                shape[mode] = q.shape[1]
                q_cores.append(fold(q.T, mode, shape).to(self.core.dtype))
                ks.append(basis @ s_transposed.T)
        self._k_step = _KStep([None if b is None else b.to(self.core.dtype) for b in bases], q_cores)
        for mode, k in enumerate(ks):
            if k is not None:
                full = k.new_zeros(self.mode_sizes[mode], self.capacities[mode])
                full[:, : k.shape[1]] = k
                write_full_(self.basis(mode), full)

    @torch.no_grad()
    def end_k_step_(self) -> list[torch.Tensor | None]:
        """Restore the bases ``U_i^0`` and return the stepped ``K_i^1`` (one per mode, ``None`` if unfactored)."""
        if self._k_step is None:
            raise RuntimeError("end_k_step_() called without begin_k_step_()")
        bases, q_cores = self._k_step.bases, self._k_step.q_cores
        stepped = [None if q is None else full_tensor(self.basis(mode)).detach()[:, : q.shape[mode]].clone()
                   for mode, q in enumerate(q_cores)]
        self._k_step = None
        self._write_(self.active_factors()[0], bases)
        return stepped

    def _k_step_tensor(self) -> torch.Tensor:
        bases, q_cores = self._k_step.bases, self._k_step.q_cores
        core, _ = self._active(self.core, bases)
        weight = tucker_to_tensor(core, bases)
        for mode, q_core in enumerate(q_cores):
            if q_core is None:
                continue
            k = self.basis(mode)[:, : q_core.shape[mode]]
            term = tucker_to_tensor(q_core, [k if j == mode else b for j, b in enumerate(bases)])
            weight = weight + (term - term.detach())
        return weight

    def extra_repr(self) -> str:
        return (f"ranks={self.ranks}, capacities={self.capacities}, max_ranks={self.max_ranks}, "
                f"bias={self.bias is not None}")


def _channel_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, Sequence) and len(value) == 2)):
        raise TypeError(f"{name} must be an int or an (out, in) pair of ints, got {value!r}")
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class TuckerLinear(TuckerLayer):
    """``y = U S V^T x + b`` with orthonormal ``U`` (``m x r``), ``V`` (``n x r``) and core ``S`` (``r x r``).

    The forward is ``((x V) S^T) U^T``, ``O(r (m + n + r))`` per token. Capacity is
    ``min(2 * max_rank, n_i)`` per mode. This is DLRT's matrix case (arXiv 2205.13571).

    Args:
        in_features: ``n``.
        out_features: ``m``.
        rank: Initial rank ``r`` (at most ``max_rank``).
        max_rank: Largest rank truncation may keep (default ``rank``); at most ``min(m, n)``.
        bias: Learn an additive bias.
    """

    mode_names = ("out", "in")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        max_rank: int | None = None,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.in_features, self.out_features = in_features, out_features
        max_rank = rank if max_rank is None else max_rank
        bound = min(in_features, out_features)
        if not 1 <= rank <= max_rank <= bound:
            raise ValueError(f"TuckerLinear needs 1 <= rank <= max_rank <= min(m, n) = {bound}, "
                             f"got rank={rank}, max_rank={max_rank}")
        super().__init__((out_features, in_features), (True, True), (rank, rank), (max_rank, max_rank),
                         out_features if bias else None, device, dtype)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Factor a weight drawn as ``nn.Linear`` draws it; the bias as ``nn.Linear``'s."""
        weight = torch.empty(self.out_features, self.in_features, device=self.core.device, dtype=self.core.dtype)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.init_from_weight_(weight)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            write_full_(self.bias, torch.empty(self.out_features).uniform_(-bound, bound))

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, max_rank: int | None = None) -> TuckerLinear:
        """Factor ``linear``'s weight by a truncated SVD at ``rank``; its bias is kept."""
        weight = linear.weight
        layer = cls(weight.shape[1], weight.shape[0], rank, max_rank, bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
        layer.init_from_weight_(weight)
        if linear.bias is not None:
            write_full_(layer.bias, linear.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._k_step is not None:
            return F.linear(x, self.weight_tensor(), self.bias)
        out_rank, in_rank = self.ranks
        u, v, s = self.basis_out[:, :out_rank], self.basis_in[:, :in_rank], self.core[:out_rank, :in_rank]
        return F.linear(F.linear(F.linear(x, v.T), s), u, self.bias)

    def export(self) -> nn.Sequential:
        """``Linear(n, r, V^T) -> Linear(r, r, S) -> Linear(r, m, U, bias)``: ``r (m + n + r) + m`` parameters."""
        core, (u, v) = self.active_factors()
        dtype = self.core.dtype
        layers = [nn.Linear(v.shape[0], v.shape[1], bias=False), nn.Linear(core.shape[1], core.shape[0], bias=False),
                  nn.Linear(u.shape[1], u.shape[0], bias=self.bias is not None)]
        with torch.no_grad():
            for layer, weight in zip(layers, (v.T, core, u)):
                layer.to(device=self.core.device, dtype=dtype).weight.copy_(weight)
            if self.bias is not None:
                layers[-1].bias.copy_(full_tensor(self.bias))
        return nn.Sequential(*layers)


class TuckerConv2d(TuckerLayer):
    """``y = conv2d(x, C x_1 U_out x_2 U_in [x_3 U_h x_4 U_w]) + b``: a Tucker-factored ``k_h x k_w`` convolution.

    The channel modes are always factored and rank-adaptive; the spatial modes are kept at full
    kernel size (``spatial_rank=None``, as in the TDLRT reference code) or factored and adaptive
    too. The forward rebuilds the small ``C_out x C_in x k_h x k_w`` kernel and runs one
    convolution (cheaper than the 1x1 -> kxk -> 1x1 chain for small channel counts). As a matrix
    the layer is ``C_out x (C_in k_h k_w)``: ``out_features = C_out``, ``in_features = C_in k_h k_w``.

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        kernel_size: ``k`` or ``(k_h, k_w)``.
        rank: Initial channel ranks: an int for both, or ``(r_out, r_in)``.
        max_rank: Largest channel ranks (default ``rank``).
        spatial_rank: ``None`` keeps the spatial modes unfactored; an int (or pair) factors them,
            starting at that rank, adaptive up to the kernel size.
        stride: As ``nn.Conv2d``.
        padding: As ``nn.Conv2d`` (zeros padding).
        dilation: As ``nn.Conv2d``.
        groups: Must be 1 (grouped convolutions are not factored).
        bias: Learn an additive bias.
    """

    mode_names = ("out", "in", "height", "width")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: int | tuple[int, int],
        max_rank: int | tuple[int, int] | None = None,
        spatial_rank: int | tuple[int, int] | None = None,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if groups != 1:
            raise ValueError(f"TuckerConv2d supports groups=1 only, got groups={groups}")
        kernel = _pair(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.in_features, self.out_features = in_channels * kernel[0] * kernel[1], out_channels
        ranks = _channel_pair(rank, "rank")
        max_ranks = ranks if max_rank is None else _channel_pair(max_rank, "max_rank")
        spatial = None if spatial_rank is None else _channel_pair(spatial_rank, "spatial_rank")
        super().__init__(
            (out_channels, in_channels, *kernel), (True, True, spatial is not None, spatial is not None),
            (*ranks, *(spatial or kernel)), (*max_ranks, *kernel), out_channels if bias else None, device, dtype)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Factor a kernel drawn as ``nn.Conv2d`` draws it; the bias as ``nn.Conv2d``'s."""
        weight = torch.empty(self.mode_sizes, device=self.core.device, dtype=self.core.dtype)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.init_from_weight_(weight)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            write_full_(self.bias, torch.empty(self.out_channels).uniform_(-bound, bound))

    @classmethod
    def from_conv2d(
        cls,
        conv: nn.Conv2d,
        rank: int | tuple[int, int],
        max_rank: int | tuple[int, int] | None = None,
        spatial_rank: int | tuple[int, int] | None = None,
    ) -> TuckerConv2d:
        """Factor ``conv``'s kernel by a truncated HOSVD; stride, padding, dilation and bias are kept."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"TuckerConv2d supports padding_mode='zeros' only, got padding_mode={conv.padding_mode!r}")
        weight = conv.weight
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, rank, max_rank, spatial_rank,
                    conv.stride, conv.padding, conv.dilation, conv.groups, bias=conv.bias is not None,
                    device=weight.device, dtype=weight.dtype)
        layer.init_from_weight_(weight)
        if conv.bias is not None:
            write_full_(layer.bias, conv.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight_tensor(), self.bias, self.stride, self.padding, self.dilation)

    def export(self) -> nn.Module:
        """Unfactored spatial modes: ``Conv1x1(C_in, r_in) -> Conv kxk(r_in, r_out) -> Conv1x1(r_out, C_out, bias)``;
        factored spatial modes: :meth:`compact`. Either way ``trainable_numel()`` parameters.
        """
        if self.factored[2]:
            return self.compact()
        core, (u_out, u_in, _, _) = self.active_factors()
        r_out, r_in = core.shape[:2]
        layers = [nn.Conv2d(self.in_channels, r_in, 1, bias=False),
                  nn.Conv2d(r_in, r_out, self.kernel_size, self.stride, self.padding, self.dilation, bias=False),
                  nn.Conv2d(r_out, self.out_channels, 1, bias=self.bias is not None)]
        with torch.no_grad():
            for layer, weight in zip(layers, (u_in.T[:, :, None, None], core, u_out[:, :, None, None])):
                layer.to(device=self.core.device, dtype=self.core.dtype).weight.copy_(weight)
            if self.bias is not None:
                layers[-1].bias.copy_(full_tensor(self.bias))
        return nn.Sequential(*layers)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, {super().extra_repr()}")
