"""Deterministic factorizations shared by the layers."""

from __future__ import annotations

import torch


@torch.no_grad()
def sign_fixed_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin ``M = U diag(s) V^T`` in float64, autocast off, each pair signed so ``U``'s largest ``|U_ij|`` is positive.

    Returns ``(U, s, V)`` (``V``, not ``V^T``). The sign rule makes the result a function of ``M``
    alone for distinct singular values, so every process that factors the same matrix gets the same
    factors.
    """
    with torch.autocast(matrix.device.type, enabled=False):
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    signs = torch.sign(u.gather(0, u.abs().argmax(dim=0, keepdim=True)).squeeze(0))
    signs[signs == 0] = 1
    return u * signs, s, vh.mT * signs
