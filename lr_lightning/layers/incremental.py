"""InRank's layer (Zhao et al. 2023): ``W = [W0 +] B[:, :k] A[:k]`` with ``k = r + buffer`` active columns."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lr_lightning.layers.base import LowRankLayer, ParamMove
from lr_lightning.layers.tensors import full_tensor, write_full_


class IncrementalLinear(LowRankLayer):
    """``y = [W0 x +] B[:, :k] A[:k] x + b``, ``k = r + buffer``, inside factors allocated at ``capacity``.

    ``r`` (:attr:`rank`) is the rank found so far and ``buffer`` the extra columns in which new
    directions can appear; both live in module buffers (``current_rank``, ``buffer_size``) so they
    checkpoint and broadcast, and only the first ``k`` rows of ``A`` / columns of ``B`` take part in
    the forward (the rest gets zero gradients and zero Adam moments). :meth:`grow_` activates more
    columns in one of two ways: as they are (the released code: with ``fill="random"`` the whole
    capacity is Kaiming-initialised at conversion, so new columns bring new random directions) or
    redrawn (new rows of ``A`` Kaiming-uniform, new columns of ``B`` zero: the function is kept; with
    ``fill="zero"`` the unused capacity is zero until then). With ``base=True`` the layer is the
    paper's general InRank, ``W = W0 + B A`` with ``W0`` frozen and ``B A`` the cumulative update;
    without, it is InRank-Efficient's ``W = B A`` (the released code: no ``W0``).
    """

    roles = {"weight": "frozen", "bias": "bias", "A": "factor", "B": "factor"}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        capacity: int,
        rank: int,
        buffer: int,
        bias: bool = True,
        base: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= capacity <= min(in_features, out_features):
            raise ValueError(f"capacity must be in 1..{min(in_features, out_features)} (min(m, n)), got {capacity}")
        if rank < 1 or buffer < 0 or rank + buffer > capacity:
            raise ValueError(f"need rank >= 1, buffer >= 0 and rank + buffer <= capacity={capacity}, "
                             f"got rank={rank}, buffer={buffer}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, **kw), requires_grad=False) if base else None
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.A = nn.Parameter(torch.zeros(capacity, in_features, **kw))
        self.B = nn.Parameter(torch.zeros(out_features, capacity, **kw))
        self.register_buffer("current_rank", torch.tensor(rank, device=device))
        self.register_buffer("buffer_size", torch.tensor(buffer, device=device))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        capacity: int,
        rank: int,
        buffer: int,
        base: bool = False,
        generator: torch.Generator | None = None,
        fill: Literal["zero", "random"] = "zero",
    ) -> IncrementalLinear:
        """Replace a dense layer; its bias is kept, its weight becomes ``W0`` (``base``) or is dropped.

        ``A``'s first ``rank + buffer`` rows are Kaiming-uniform. ``B``'s active columns are zero with
        ``base`` (the update starts at 0, ``W = W0``) and Kaiming-uniform over ``capacity`` without it
        (the reference code's random ``W = B A``). ``fill`` sets the unused capacity: ``zero``, or
        ``random`` (Kaiming-uniform like the active part, as the released code initialises all
        ``R_max`` columns; not with ``base``, whose update must start at 0).
        """
        if fill not in ("zero", "random"):
            raise ValueError(f"fill must be 'zero' or 'random', got {fill!r}")
        if fill == "random" and base:
            raise ValueError("fill='random' needs base=False: with a frozen W0 the update B A starts at 0")
        weight = linear.weight
        layer = cls(weight.shape[1], weight.shape[0], capacity, rank, buffer,
                    bias=getattr(linear, "bias", None) is not None, base=base,
                    device=weight.device, dtype=weight.dtype)
        drawn = capacity if fill == "random" else rank + buffer
        with torch.no_grad():
            if layer.bias is not None:
                layer.bias.copy_(linear.bias)
            if base:
                layer.weight.copy_(weight)
            a = torch.zeros(layer.A.shape)
            a[:drawn] = _kaiming_uniform((drawn, layer.in_features), layer.in_features, generator)
            write_full_(layer.A, a)
            if not base:
                b = torch.zeros(layer.B.shape)
                b[:, :drawn] = _kaiming_uniform((layer.out_features, drawn), capacity, generator)
                write_full_(layer.B, b)
        return layer

    @property
    def rank(self) -> int:
        """``r``, the rank found so far (the forward uses ``r + buffer`` columns)."""
        return int(self.current_rank)

    @property
    def buffer(self) -> int:
        """Extra active columns beyond ``r`` (0 after :meth:`truncate_`)."""
        return int(self.buffer_size)

    @property
    def active_rank(self) -> int:
        """``k = r + buffer``, the columns the forward uses."""
        return self.rank + self.buffer

    @property
    def capacity(self) -> int:
        return self.A.shape[0]

    def trainable_numel(self) -> int:
        bias = self.bias.numel() if self.bias is not None else 0
        return self.active_rank * (self.in_features + self.out_features) + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.active_rank
        a, b = (self.A, self.B) if k == self.capacity else (self.A[:k], self.B[:, :k])
        out = F.linear(F.linear(x, a), b, self.bias)
        return out + F.linear(x, self.weight) if self.weight is not None else out

    def update_weight(self) -> torch.Tensor:
        """``B A`` over the active columns, as an ``m x n`` tensor."""
        k = self.active_rank
        return full_tensor(self.B)[:, :k] @ full_tensor(self.A)[:k]

    def dense_weight(self) -> torch.Tensor:
        update = self.update_weight()
        return full_tensor(self.weight) + update if self.weight is not None else update

    @torch.no_grad()
    def spectrum(self) -> torch.Tensor:
        """Singular values of ``B A`` (descending, ``k`` of them, float32) without forming ``B A``.

        With ``A Aᵀ = L Lᵀ`` (Cholesky; ``A = Lᵀ Q`` for an orthonormal ``Q``), ``B A`` has the singular
        values of ``B Lᵀ``: their squares are the eigenvalues of the ``k x k`` matrix ``Lᵀ (Bᵀ B) L``.
        Two Gram products and small ``k x k`` work: O((m + n) k² + k³) instead of O(m n min(m, n)). If
        ``A`` is rank-deficient, ``L`` comes from a QR of ``Aᵀ`` instead. The float32 Grams resolve
        singular values down to about ``1e-4`` of the largest, far below what the explained ratio weighs.
        """
        k = self.active_rank
        b = full_tensor(self.B).detach()[:, :k].float()
        a = full_tensor(self.A).detach()[:k].float()
        with torch.autocast(b.device.type, enabled=False):
            chol, info = torch.linalg.cholesky_ex(a @ a.T)
            if info.item() != 0:
                chol = torch.linalg.qr(a.T, mode="r").R.T
            power = torch.linalg.eigvalsh(chol.T @ (b.T @ b) @ chol)
            return power.clamp_min(0).sqrt().flip(0)

    @torch.no_grad()
    def grow_(self, rank: int, redraw: torch.Generator | None = None) -> None:
        """``r <- rank`` (never lower): the forward uses ``rank - r`` more columns.

        Without ``redraw`` the columns are turned on as they are (the released code). With it, the
        newly active rows of ``A`` are drawn Kaiming-uniform on the CPU from ``redraw`` (the same on
        every process) and the newly active columns of ``B`` are zeroed, so ``B A`` is unchanged.
        """
        if rank <= self.rank:
            return
        if rank + self.buffer > self.capacity:
            raise ValueError(f"rank + buffer must be <= capacity={self.capacity}, "
                             f"got rank={rank}, buffer={self.buffer}")
        if redraw is not None:
            old_active, new_active = self.active_rank, rank + self.buffer
            draw = _kaiming_uniform((new_active - old_active, self.in_features), self.in_features, redraw)
            a, b = full_tensor(self.A).detach().clone(), full_tensor(self.B).detach().clone()
            a[old_active:new_active] = draw.to(a)
            b[:, old_active:new_active] = 0
            write_full_(self.A, a)
            write_full_(self.B, b)
        self.current_rank.fill_(rank)

    @torch.no_grad()
    def truncate_(self, rank: int | None = None) -> None:
        """Re-factor ``B A`` at ``rank`` (default ``r``) by SVD and drop the buffer (InRank-Efficient's stage 2).

        With ``B A = P diag(s) Qᵀ`` (sign-fixed): ``B <- P_r diag(√s_r)``, ``A <- diag(√s_r) Q_rᵀ``, the
        best rank-``r`` approximation with balanced factors; the rest of the capacity is zeroed.
        """
        rank = self.rank if rank is None else rank
        if not 1 <= rank <= self.active_rank:
            raise ValueError(f"rank must be in 1..{self.active_rank} (the active rank), got {rank}")
        q_b, core, q_a = self._reduced_factors()
        with torch.autocast(core.device.type, enabled=False):
            u, s, vh = torch.linalg.svd(core, full_matrices=False)
            left, right = q_b @ u[:, :rank], vh[:rank] @ q_a.T
            sign = torch.where(left.gather(0, left.abs().argmax(0, keepdim=True)) < 0, -1.0, 1.0)
            root = s[:rank].sqrt()
            b = torch.zeros(self.B.shape, dtype=left.dtype, device=left.device)
            a = torch.zeros(self.A.shape, dtype=left.dtype, device=left.device)
            b[:, :rank] = left * (sign * root)
            a[:rank] = right * (sign * root).T
        write_full_(self.B, b)
        write_full_(self.A, a)
        self.current_rank.fill_(rank)
        self.buffer_size.fill_(0)

    @torch.no_grad()
    def shrink_(self) -> list[ParamMove]:
        """``A <- A[:k]``, ``B <- B[:, :k]`` (``k = r + buffer``) as new Parameters: capacity becomes ``k``.

        After :meth:`truncate_` (buffer 0) the layer holds, trains and stores exactly ``r (m + n)`` factor entries.
        """
        k = self.active_rank
        return [self._keep_("A", (slice(0, k),)), self._keep_("B", (slice(None), slice(0, k)))]

    def resize_(self, capacity: int) -> None:
        if not 1 <= capacity <= min(self.in_features, self.out_features):
            raise ValueError(f"capacity must be in 1..{min(self.in_features, self.out_features)} (min(m, n)), "
                             f"got {capacity}")
        kw = {"device": self.A.device, "dtype": self.A.dtype}
        self.A = nn.Parameter(torch.zeros(capacity, self.in_features, **kw))
        self.B = nn.Parameter(torch.zeros(self.out_features, capacity, **kw))

    def saved_capacity(self, state_dict: dict[str, torch.Tensor], prefix: str) -> int | None:
        a = state_dict.get(prefix + "A")
        return None if a is None else a.shape[0]

    def _reduced_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Q_b, R_b R_aᵀ, Q_a)`` in float32 with ``B A = Q_b (R_b R_aᵀ) Q_aᵀ`` over the active columns."""
        k = self.active_rank
        b = full_tensor(self.B).detach()[:, :k].float()
        a = full_tensor(self.A).detach()[:k].float()
        with torch.autocast(b.device.type, enabled=False):
            q_b, r_b = torch.linalg.qr(b)
            q_a, r_a = torch.linalg.qr(a.T)
            return q_b, r_b @ r_a.T, q_a

    def export(self) -> nn.Module:
        """``nn.Linear`` with ``W0 + B A`` merged (general InRank), else ``Linear(n, k) -> Linear(k, m)``."""
        if self.weight is not None:
            return self.merged_linear()
        kw = {"device": self.A.device, "dtype": self.A.dtype}
        k = self.active_rank
        down = nn.Linear(self.in_features, k, bias=False, **kw)
        up = nn.Linear(k, self.out_features, bias=self.bias is not None, **kw)
        with torch.no_grad():
            down.weight.copy_(full_tensor(self.A)[:k])
            up.weight.copy_(full_tensor(self.B)[:, :k])
            if self.bias is not None:
                up.bias.copy_(full_tensor(self.bias))
        return nn.Sequential(down, up)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"buffer={self.buffer}, capacity={self.capacity}, base={self.weight is not None}")


def _kaiming_uniform(shape: tuple[int, int], fan_in: int, generator: torch.Generator | None) -> torch.Tensor:
    """``U(-1/√fan_in, 1/√fan_in)``, PyTorch's ``nn.Linear`` default (``kaiming_uniform_(a=√5)``), on the CPU."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)
