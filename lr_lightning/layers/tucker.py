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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from lr_lightning.layers.base import LowRankLayer
from lr_lightning.layers.linalg import sign_fixed_svd
from lr_lightning.layers.tensors import full_tensor, write_full_


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """QR and SVD of bases and cores (autocast off): float64 parameters stay float64, all others run in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------ tensor algebra
def mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """``tensor x_mode matrix``: mode ``mode`` (size ``k``) is replaced by ``matrix @ (.)`` (``matrix``: ``j x k``).

    Mixed dtypes are promoted first, as a matmul would take them: under autocast a product comes out in the
    autocast dtype (``tensordot`` runs a matmul) while the next factor is still a float32 parameter, and
    ``tensordot`` itself accepts one dtype only. Under autocast the product then runs in the autocast dtype.
    """
    if tensor.dtype != matrix.dtype:
        dtype = torch.promote_types(tensor.dtype, matrix.dtype)
        tensor, matrix = tensor.to(dtype), matrix.to(dtype)
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


def orthonormal_complement(basis: torch.Tensor, directions: torch.Tensor, columns: int,
                           passes: int = 3) -> torch.Tensor:
    """``Q_perp``: ``columns`` orthonormal columns spanning ``(I - U U^T) D``, orthogonal to ``U``.

    ``D_perp = D - U (U^T D)`` and its Householder QR; the projection and QR are repeated (at most
    ``passes`` times in all) while the probe ``max |U^T Q_perp z|`` (``z = 1 / sqrt(c)``) is above
    rounding level. The repeat keeps float32 bases orthonormal, and turns a ``D`` that is zero or
    inside ``span(U)`` (whose first QR only sees rounding noise) into arbitrary orthonormal columns
    orthogonal to ``U``. Signs are fixed so the diagonal of the product of the ``R`` factors is
    ``>= 0`` (the columns of ``orth([U | D])``).
    """
    tolerance = 32 * torch.finfo(basis.dtype).eps
    q = directions[:, :columns]
    probe = q.new_full((q.shape[1],), max(q.shape[1], 1) ** -0.5)
    signs = q.new_ones(q.shape[1])
    for _ in range(passes):
        q, r = torch.linalg.qr(q - basis @ (basis.T @ q))
        signs = signs * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
        if q.numel() == 0 or (basis.T @ (q @ probe)).abs().max() <= tolerance:
            break
    return q * signs


def reorthonormalized(basis: torch.Tensor, tolerance: float = 1e-6) -> torch.Tensor:
    """``U (3 I - U^T U) / 2`` (a Newton-Schulz step to the nearest orthonormal ``U``) when ``U`` has drifted.

    Products ``U P`` in float32 add ~1e-7 of non-orthogonality per truncation; the drift is caught
    by the probe ``||U^T U z - z||_inf > tolerance`` (``z = 1 / sqrt(r)``, four ``n x r`` passes) and
    one step takes an error ``E`` to ``O(E^2)``, so the bases stay orthonormal to ``tolerance`` over any run.
    """
    probe = basis.new_full((basis.shape[1],), basis.shape[1] ** -0.5)
    if basis.numel() == 0 or (basis.T @ (basis @ probe) - probe).abs().max() <= tolerance:
        return basis
    gram = basis.T @ basis
    return basis @ (1.5 * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device) - 0.5 * gram)


def signed_columns(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` with each column's sign flipped so its largest ``|entry|`` is positive."""
    signs = torch.sign(matrix.gather(0, matrix.abs().argmax(dim=0, keepdim=True)).squeeze(0))
    return matrix * torch.where(signs == 0, 1.0, signs).to(matrix.dtype)


def signed_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin ``M = P diag(sigma) Q^T`` in ``matrix``'s dtype; ``P`` and ``Q`` each by :func:`signed_columns`.

    Returns ``(P, sigma, Q)``. The sign rule makes ``P`` (the left vectors of ``M``) and ``Q`` (the
    left vectors of ``M^T``) functions of ``M`` alone for distinct singular values, so every process
    gets the same factors and the pair equals two separate SVDs of ``M`` and ``M^T``.
    """
    p, sigma, qh = torch.linalg.svd(matrix, full_matrices=False)
    return signed_columns(p), sigma, signed_columns(qh.mT)


def truncation_rank(sigma: torch.Tensor, tau: float) -> int:
    """Smallest ``j`` with ``||sigma_{j:}||_2 < tau ||sigma||_2`` (DLRT's relative criterion), else ``len(sigma)``."""
    tails = torch.cat([sigma.flip(0).square().cumsum(0).flip(0), sigma.new_zeros(1)]).sqrt()
    below = torch.nonzero(tails < tau * tails[0]).flatten()
    return int(below[0]) if below.numel() else sigma.numel()


@dataclass(frozen=True)
class TuckerChange:
    """How an operation moved the core: ``C_new = C_old x_1 A_1 ... x_d A_d`` on the active blocks.

    ``maps[i]`` is ``A_i`` (``new_ranks[i] x old_ranks[i]``, in :func:`compute_dtype`), ``None`` for an unchanged mode.
    """

    old_ranks: tuple[int, ...]
    new_ranks: tuple[int, ...]
    maps: tuple[torch.Tensor | None, ...]


@dataclass
class _KStep:
    """A faithful K-step's frozen bases ``U_i^0``, cores ``Ten_i(Q_i^T)`` and starting points ``K_i^0 = U_i S_i``,
    where ``Mat_i(C)^T = Q_i S_i^T``."""

    bases: list[torch.Tensor | None]
    q_cores: list[torch.Tensor | None]
    starts: list[torch.Tensor | None]


class _BackwardOnly(torch.autograd.Function):
    """``y`` in value, the backward of ``y + A h - (A h).detach()``: ``g`` to ``y``, ``A^T g = adjoint(g)`` to ``h``.

    The backward runs ``adjoint`` under the autocast state of the forward, as autograd runs the backward of
    an autocast op: under ``bf16-mixed`` ``g`` is bfloat16 and ``A`` a float32 basis, and ``A^T g`` is the
    bfloat16 product that ``A h`` itself would have differentiated to.
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, h: torch.Tensor,
                adjoint: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.adjoint, device_type = adjoint, y.device.type
        ctx.autocast = None
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            ctx.autocast = (device_type, torch.get_autocast_dtype(device_type))
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        if ctx.autocast is None:
            return grad, ctx.adjoint(grad), None
        device_type, dtype = ctx.autocast
        with torch.autocast(device_type, dtype=dtype):
            return grad, ctx.adjoint(grad), None


def with_zero_gradient(out: torch.Tensor, unused: Sequence[torch.Tensor]) -> torch.Tensor:
    """``out`` in value, with a zero gradient for each of ``unused``.

    A pass of the faithful integrator differentiates only what it steps; DDP (without
    ``find_unused_parameters``) waits for a gradient of every parameter, so the others take part as 0.
    """
    return out + sum(t.sum() for t in unused) * 0


# ------------------------------------------------------------------------------------------ layers
class TuckerLayer(LowRankLayer):
    """A weight tensor held as ``W = C x_1 U_1 ... x_d U_d`` with orthonormal ``U_i`` (``n_i x r_i``).

    Modes with ``factored[i]`` have a basis ``basis_<name>`` (role ``basis``: never weight-decayed)
    and an adaptive rank in ``[1, max_ranks[i]]``; the other modes stay at full size in the core.
    The core (role ``core``) is ``cap_1 x ... x cap_d``; the active block is ``r_1 x ... x r_d``
    and everything outside it is zero. Subclasses define ``mode_names``, ``inner_map``, ``output_map``
    and ``output_adjoint`` (mode 0, the output, is always factored).
    While ``bases_frozen`` is set, the forward treats the bases as constants (a Galerkin pass:
    gradients for the core only).
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
        self.bases_frozen = False

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
        """Copies of the active core and bases (gathered if sharded), in :func:`compute_dtype`."""
        dtype = compute_dtype(self.core.dtype)
        bases = [None if self.basis(i) is None else full_tensor(self.basis(i)).detach()
                 for i in range(len(self.mode_sizes))]
        core, bases = self._active(full_tensor(self.core).detach(), bases)
        return core.to(dtype, copy=True), [None if b is None else b.to(dtype, copy=True) for b in bases]

    def inner_map(self, x: torch.Tensor, core: torch.Tensor, bases: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """``h = Mat_1(core x_{i > 1} bases_i) x``: everything but the output basis, in ``r_1`` coordinates."""
        raise NotImplementedError

    def output_map(self, h: torch.Tensor, basis: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``U_1 h + b``: the output basis applied to :meth:`inner_map`'s result."""
        raise NotImplementedError

    def output_adjoint(self, grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """``U_1^T g``: the adjoint of :meth:`output_map` (without bias)."""
        raise NotImplementedError

    def tucker_map(self, x: torch.Tensor, core: torch.Tensor, bases: Sequence[torch.Tensor | None],
                   bias: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's operator with weight ``core x_i bases_i`` (plus ``bias``), applied factor by factor."""
        return self.output_map(self.inner_map(x, core, bases), bases[0], bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``W x + b`` through the factors at the active ranks (the K-step form between :meth:`begin_k_step_`
        and :meth:`end_k_step_`)."""
        if self._k_step is not None:
            return with_zero_gradient(self._k_step_forward(x), [self.core])
        bases = [self.basis(i) for i in range(len(self.mode_sizes))]
        if self.bases_frozen:
            core, frozen = self._active(self.core, [None if b is None else b.detach() for b in bases])
            return with_zero_gradient(self.tucker_map(x, core, frozen, self.bias), self.basis_parameters())
        core, bases = self._active(self.core, bases)
        return self.tucker_map(x, core, bases, self.bias)

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
        """``W ~ C x_i U_i`` by a truncated HOSVD of ``weight`` at the active ranks (float64, once, sign-fixed)."""
        with torch.autocast(weight.device.type, enabled=False):
            tensor = weight.detach().to(torch.float64).reshape(self.mode_sizes)
            bases: list[torch.Tensor | None] = []
            for mode, rank in enumerate(self.ranks):
                bases.append(sign_fixed_svd(unfold(tensor, mode))[0][:, :rank] if self.factored[mode] else None)
            core = tucker_to_tensor(tensor, [None if b is None else b.T for b in bases])
        self._write_(core, bases)

    # ---------------------------------------------------------------------------------- integrator steps
    @torch.no_grad()
    def augment_(self, directions: Sequence[torch.Tensor | None]) -> TuckerChange:
        """``U_i <- [U_i | Q_i]``, ``Q_i = orth((I - U_i U_i^T) D_i)`` (rank ``min(r_i + cols(D_i), capacity)``),
        ``C <- C`` padded with zeros (``U_i_new^T U_i = [I; 0]``).

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
                basis = bases[mode]
                direction = direction.detach().to(device=basis.device, dtype=basis.dtype)
                columns = min(old_ranks[mode] + direction.shape[1], self.capacities[mode]) - old_ranks[mode]
                bases[mode] = torch.cat([basis, orthonormal_complement(basis, direction, columns)], dim=1)
                maps.append(torch.eye(bases[mode].shape[1], old_ranks[mode], dtype=basis.dtype, device=basis.device))
        padded = core.new_zeros([r if m is None else m.shape[0] for r, m in zip(old_ranks, maps)])
        padded[tuple(slice(0, r) for r in old_ranks)] = core
        self._write_(padded, bases)
        return TuckerChange(old_ranks, self.ranks, tuple(maps))

    @torch.no_grad()
    def truncate_(self, tau: float, min_rank: int = 2) -> TuckerChange:
        """HOSVD of the core: ``Mat_i(C) = P_i Sigma_i Q_i^T``; keep the smallest ``r_i`` whose discarded
        singular values have norm ``< tau ||Sigma_i||``, clamped to ``[min_rank, max_rank_i]``;
        ``U_i <- U_i P_i``, ``C <- C x_i P_i^T``.

        A matrix core ``S = P Sigma Q^T`` needs one SVD: ``Mat_1(S) = S^T`` has left vectors ``Q``.
        """
        old_ranks = self.ranks
        core, bases = self.active_factors()
        with torch.autocast(self.core.device.type, enabled=False):
            if core.dim() == 2 and all(b is not None for b in bases):
                left, sigma, right = signed_svd(core)
                rank = self._truncation_rank(sigma, tau, min_rank, 0)
                rank = min(rank, self._truncation_rank(sigma, tau, min_rank, 1))
                maps: list[torch.Tensor | None] = [left[:, :rank].T, right[:, :rank].T]
                core = maps[0] @ core @ maps[1].T
            else:
                maps = []
                for mode, basis in enumerate(bases):
                    if basis is None:
                        maps.append(None)
                        continue
                    left, sigma, _ = signed_svd(unfold(core, mode))
                    maps.append(left[:, : self._truncation_rank(sigma, tau, min_rank, mode)].T)
                core = tucker_to_tensor(core, maps)
            bases = [None if b is None else reorthonormalized(b @ p.T) for b, p in zip(bases, maps)]
        self._write_(core, bases)
        return TuckerChange(old_ranks, self.ranks, tuple(maps))

    def _truncation_rank(self, sigma: torch.Tensor, tau: float, min_rank: int, mode: int) -> int:
        rank = max(truncation_rank(sigma, tau), min(min_rank, self.mode_sizes[mode]))
        return min(rank, self.max_ranks[mode], sigma.numel())

    @torch.no_grad()
    def begin_k_step_(self) -> None:
        """Put ``K_i = U_i S_i`` into every basis, where ``Mat_i(C)^T = Q_i S_i^T`` (QR).

        Until :meth:`end_k_step_`, the forward computes the unchanged ``W x`` as
        ``T_1 x + sum_{i > 1} (T_i x' - (T_i x').detach())`` (``x'`` = ``x`` detached) with
        ``T_i = Ten_i(K_i V_i^T) = Ten_i(Q_i^T) x_i K_i x_{j != i} U_j^0``, each term through the factors,
        never as a dense weight. One backward gives every ``dL/dK_i = Mat_i(dL/dW) V_i`` (the
        K-steps of all modes are independent), ``dL/dx`` once, and no inverse of the core is needed.
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
        self._k_step = _KStep([None if b is None else b.to(self.core.dtype) for b in bases], q_cores, ks)
        for mode, k in enumerate(ks):
            if k is not None:
                full = k.new_zeros(self.mode_sizes[mode], self.capacities[mode])
                full[:, : k.shape[1]] = k
                write_full_(self.basis(mode), full)

    @torch.no_grad()
    def end_k_step_(self, increments: bool = False) -> list[torch.Tensor | None]:
        """Restore the bases ``U_i^0`` and return the stepped ``K_i^1`` (one per mode, ``None`` if unfactored),
        or with ``increments`` the steps ``K_i^1 - K_i^0``: since ``K_i^0 = U_i S_i`` lies in ``span(U_i)``,
        ``orth([U_i | K_i^1 - K_i^0])`` is ``orth([U_i | K_i^1])``, and the projection out of ``span(U_i)``
        loses no accuracy to cancellation.
        """
        if self._k_step is None:
            raise RuntimeError("end_k_step_() called without begin_k_step_()")
        bases, q_cores, starts = self._k_step.bases, self._k_step.q_cores, self._k_step.starts
        stepped = [None if q is None else full_tensor(self.basis(mode)).detach()[:, : q.shape[mode]].clone()
                   for mode, q in enumerate(q_cores)]
        if increments:
            stepped = [None if k is None else k - k0.to(k.dtype) for k, k0 in zip(stepped, starts)]
        self._k_step = None
        self._write_(self.active_factors()[0], bases)
        return stepped

    def _k_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``T_1 x + b`` in value; the terms ``i > 1`` enter only the backward, as ``U_1^0 h_i`` with
        ``h_i = inner_map(x', Ten_i(Q_i^T), K_i)``, so ``U_1^0 h_i`` itself is never evaluated."""
        bases, q_cores = self._k_step.bases, self._k_step.q_cores
        factors = [self.basis(0)[:, : q_cores[0].shape[0]], *bases[1:]]
        out = self.tucker_map(x, q_cores[0], factors, self.bias)
        for mode in range(1, len(q_cores)):
            if q_cores[mode] is None:
                continue
            k = self.basis(mode)[:, : q_cores[mode].shape[mode]]
            hidden = self.inner_map(x.detach(), q_cores[mode], [k if j == mode else b for j, b in enumerate(bases)])
            out = _BackwardOnly.apply(out, hidden, partial(self.output_adjoint, basis=bases[0]))
        return out

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

    def inner_map(self, x: torch.Tensor, core: torch.Tensor, bases: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """``(x V) S^T`` with ``bases = (U, V)``, ``core = S``."""
        return F.linear(F.linear(x, bases[1].T), core)

    def output_map(self, h: torch.Tensor, basis: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``h U^T + b``."""
        return F.linear(h, basis, bias)

    def output_adjoint(self, grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """``g U``."""
        return F.linear(grad, basis.T)

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
    too. The forward runs the factor chain at the active ranks: a 1x1 convolution ``C_in -> r_in``,
    the ``k_h x k_w`` core convolution ``r_in -> r_out`` (stride, padding, dilation) and a 1x1
    convolution ``r_out -> C_out``; the full kernel is never built. As a matrix
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

    def inner_map(self, x: torch.Tensor, core: torch.Tensor, bases: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """``conv_kxk(C x_3 U_h x_4 U_w) o conv1x1(U_in^T)``; with :meth:`output_map` tltorch's Tucker
        convolution, ``HW (C_in r_in + r_out r_in k_h k_w + r_out C_out)`` multiply-adds per image."""
        _, u_in, u_h, u_w = bases
        kernel = tucker_to_tensor(core, [None, None, u_h, u_w])
        x = F.conv2d(x, u_in.T[:, :, None, None])
        return F.conv2d(x, kernel, None, self.stride, self.padding, self.dilation)

    def output_map(self, h: torch.Tensor, basis: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``conv1x1(U_out) h + b``."""
        return F.conv2d(h, basis[:, :, None, None], bias)

    def output_adjoint(self, grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """``conv1x1(U_out^T) g``."""
        return F.conv2d(grad, basis.T[:, :, None, None])

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
