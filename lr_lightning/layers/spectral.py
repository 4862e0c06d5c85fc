"""Sparse Spectral Training layer (Zhao et al., ICML 2025): ``W = U diag(s) V^T`` trained ``r`` vectors at a time."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lr_lightning.layers.base import LowRankLayer
from lr_lightning.layers.linalg import sign_fixed_svd
from lr_lightning.layers.tensors import full_tensor, local_tensor, write_full_


def _with_active(basis: torch.Tensor, columns: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """A fresh copy of ``basis`` in the dtype of ``columns``, with its columns ``active`` replaced by ``columns``."""
    return basis.to(columns.dtype, copy=True).index_copy_(1, active, columns)


class _SpectralMatmul(torch.autograd.Function):
    """``y = ((x V) * s) U^T`` with weight gradients only for the active columns of ``U`` and ``V``.

    ``U`` and ``V`` are the buffers with the active columns ``U_active``, ``V_active`` in place of
    theirs. With ``G = g^T x`` the weight gradient: ``dL/ds_i = u_i^T G v_i`` for every ``i``; for
    active ``i`` ``dU_i = G v_i`` and ``dV_i = G^T u_i``, times ``s_i`` unless ``enhanced`` (SST's
    enhanced gradient). Frozen columns get none, so backward costs ``O(T r (m + n))`` for the
    weights, not ``O(T m n)``. For backward it keeps ``x``, ``x V``, ``s``, the active columns and the
    buffers themselves (no copies): ``O(T (m + n) + r (m + n))`` numbers; the bases with the active
    columns in place are rebuilt where they are used and dropped right after.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, u_active: torch.Tensor, v_active: torch.Tensor, s: torch.Tensor,
                u: torch.Tensor, v: torch.Tensor, active: torch.Tensor, enhanced: bool) -> torch.Tensor:
        xv = x @ _with_active(v, v_active, active)
        ctx.save_for_backward(x, xv, s, u_active, v_active, u, v, active)
        ctx.enhanced = enhanced
        return (xv * s) @ _with_active(u, u_active, active).mT

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, xv, s, u_active, v_active, u, v, active = ctx.saved_tensors
        gu = grad @ _with_active(u, u_active, active)
        grad_x = (gu * s) @ _with_active(v, v_active, active).mT if ctx.needs_input_grad[0] else None
        flat_g, flat_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        flat_xv, flat_gu = xv.reshape(-1, xv.shape[-1]), gu.reshape(-1, gu.shape[-1])
        grad_s = (flat_xv * flat_gu).sum(0)
        scale = 1.0 if ctx.enhanced else s[active]
        grad_u = (flat_g.mT @ flat_xv[:, active]) * scale
        grad_v = (flat_x.mT @ flat_gu[:, active]) * scale
        return grad_x, grad_u, grad_v, grad_s, None, None, None, None


class SpectralLinear(LowRankLayer):
    """``y = U diag(s) V^T x + b`` with ``U (m x m')``, ``V (n x m')`` orthonormal, ``s >= 0``, ``m' = min(m, n)``.

    All of ``s`` trains every step; of the singular vectors only the ``r`` active pairs (indices in
    the ``active`` buffer) do. They are the Parameters ``U_active (m x r)`` and ``V_active (n x r)``;
    the whole bases ``U`` and ``V`` are buffers, so gradients and optimizer state cover
    ``r (m + n) + m'`` numbers, not ``m n``. The active columns override those of the buffers in the
    forward. The layer is a drop-in for an ``nn.Linear`` inside any module (a fairseq2 projection,
    the linear map inside a hyperbolic Lorentz layer): only ``forward(x)`` is used.
    """

    roles = {"U_active": "basis", "V_active": "basis", "s": "spectrum", "bias": "bias"}

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 enhanced_gradient: bool = True, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        full = min(in_features, out_features)
        if not 1 <= rank <= full:
            raise ValueError(f"rank must be in 1..{full} (min(m, n)), got {rank}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.enhanced_gradient = enhanced_gradient
        self.register_buffer("U", torch.zeros(out_features, full, **kw))
        self.register_buffer("V", torch.zeros(in_features, full, **kw))
        self.register_buffer("active", torch.arange(rank, device=device))
        self.U_active = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.V_active = nn.Parameter(torch.zeros(in_features, rank, **kw))
        self.s = nn.Parameter(torch.zeros(full, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int, enhanced_gradient: bool = True) -> SpectralLinear:
        """Factor a dense layer exactly: ``[U, s, V] = SVD(W)`` (zero distortion), bias kept."""
        weight = linear.weight
        layer = cls(weight.shape[1], weight.shape[0], rank, bias=getattr(linear, "bias", None) is not None,
                    enhanced_gradient=enhanced_gradient, device=weight.device, dtype=weight.dtype)
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            u, s, v = sign_fixed_svd(full_tensor(weight).detach())
            layer.U.copy_(u)
            layer.V.copy_(v)
            layer.s.copy_(s)
            layer.load_active_(torch.arange(rank))
            if layer.bias is not None:
                layer.bias.copy_(full_tensor(linear.bias))
        return layer

    @property
    def rank(self) -> int:
        return self.U_active.shape[1]

    @property
    def capacity(self) -> int:
        return self.s.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            y = _SpectralMatmul.apply(x.to(dtype), self.U_active.to(dtype), self.V_active.to(dtype),
                                      self.s.to(dtype), self.U, self.V, self.active, self.enhanced_gradient)
            return y + self.bias.to(dtype) if self.bias is not None else y

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole ``U`` and ``V`` with the active columns in place."""
        active = self.active
        return (self.U.index_copy(1, active, full_tensor(self.U_active).to(self.U.dtype)),
                self.V.index_copy(1, active, full_tensor(self.V_active).to(self.V.dtype)))

    def dense_weight(self) -> torch.Tensor:
        u, v = self.bases()
        return (u * full_tensor(self.s)) @ v.mT

    @torch.no_grad()
    def project_(self) -> None:
        """The projection after each optimizer step: ``s <- max(s, 0)``, active ``u_i, v_i`` to unit norm."""
        local_tensor(self.s).clamp_(min=0)
        for factor in (self.U_active, self.V_active):
            full = full_tensor(factor)
            write_full_(factor, full / full.norm(dim=0, keepdim=True).clamp_min(torch.finfo(full.dtype).tiny))

    @torch.no_grad()
    def select_(self, indices: torch.Tensor) -> None:
        """Store the active pairs into the bases, then make ``indices`` the active set."""
        u, v = self.bases()
        self.U.copy_(u)
        self.V.copy_(v)
        self.load_active_(indices)

    @torch.no_grad()
    def load_active_(self, indices: torch.Tensor) -> None:
        """Make ``indices`` the active set, copying those columns of the bases into the Parameters."""
        indices = indices.to(self.active.device)
        self.active.copy_(indices)
        write_full_(self.U_active, self.U[:, indices])
        write_full_(self.V_active, self.V[:, indices])

    def sample(self, generator: torch.Generator, uniform_mix: float = 0.5) -> torch.Tensor:
        """``r`` distinct indices drawn from ``p_i = uniform_mix / m' + (1 - uniform_mix) s_i / sum(s)``, sorted."""
        s = full_tensor(self.s).detach().double().cpu().clamp_min(0)
        total = s.sum()
        probs = torch.full_like(s, 1.0 / s.numel())
        if total > 0:
            probs = uniform_mix * probs + (1 - uniform_mix) * s / total
        return torch.multinomial(probs, self.rank, replacement=False, generator=generator).sort().values

    @torch.no_grad()
    def resvd_(self) -> None:
        """``[U, s, V] <- SVD(U diag(s) V^T)`` via QR of each basis and the SVD of the small core.

        ``U diag(s) V^T = Q_u (R_u diag(s) R_v^T) Q_v^T``, so the SVD costs ``O((m + n) m'^2)``; the
        function is unchanged, the bases are orthonormal again and ``s`` is sorted.
        """
        with torch.autocast(self.s.device.type, enabled=False):
            u, v = self.bases()
            q_u, r_u = torch.linalg.qr(u.double())
            q_v, r_v = torch.linalg.qr(v.double())
            p, sigma, q = sign_fixed_svd((r_u * full_tensor(self.s).double()) @ r_v.mT)
            self.U.copy_(q_u @ p)
            self.V.copy_(q_v @ q)
            write_full_(self.s, sigma)
            self.load_active_(self.active.clone())

    def export(self) -> nn.Linear:
        """The merged dense layer (SST has no inference overhead)."""
        return self.merged_linear()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank} of {self.capacity}"
