"""One optimizer for models with points on a manifold: AdamW on Euclidean tensors, geoopt's RiemannianAdam on points.

One optimizer steps everything, so Lightning's automatic optimization, the strategies' in-place
optimizer-state resets and ReLoRA's or SST's per-group LR schedule work unchanged:
:class:`RiemannianAdamW` applies geoopt's ``RiemannianAdam`` step to every ``ManifoldParameter``
(class prototypes, embeddings on the hyperboloid) and AdamW's decoupled step to every other tensor.
Two optimizers would need manual optimization, where ``trainer.global_step`` counts both and shifts
every strategy's schedule; one ``RiemannianAdam`` over all tensors would give the Euclidean
weights coupled L2 decay instead of AdamW's and keep its step count as an int that a strategy's
state reset cannot zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import geoopt
import torch
from geoopt import ManifoldParameter, ManifoldTensor
from typing_extensions import override


def is_manifold_point(p: torch.Tensor) -> bool:
    """Whether ``p`` lives on a manifold that a Riemannian step must respect."""
    return isinstance(p, (ManifoldParameter, ManifoldTensor))


@contextmanager
def hidden_gradients(params: list[torch.Tensor]) -> Iterator[None]:
    """Set ``p.grad = None`` for ``params`` inside the block (optimizers skip them), restore afterwards."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad


class RiemannianAdamW(geoopt.optim.RiemannianAdam):
    """AdamW on Euclidean tensors, geoopt's RiemannianAdam on ``ManifoldParameter`` points, in one optimizer.

    Euclidean: ``p <- p - lr (m_hat / (sqrt(v_hat) + eps) + lambda p)`` (``torch.optim.Adam`` with
    decoupled decay). Points: ``g <- egrad2rgrad(p, grad)``, Adam moments, ``p <- retr(p, -lr d)``
    with the first moment transported, and every ``stabilize`` steps a projection back onto the
    manifold. Give the points' group ``weight_decay=0`` (``NodeClassificationTask`` does).

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate.
        betas: Adam's ``(beta_1, beta_2)``.
        eps: Adam's ``eps``.
        weight_decay: AdamW's decoupled decay ``lambda`` (Euclidean tensors).
        stabilize: Project the points onto their manifold every this many steps (``None``: never).
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, stabilize: int | None = 10) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, stabilize=stabilize,
                         decoupled_weight_decay=True)

    @override
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"]]
        with hidden_gradients([p for p in params if is_manifold_point(p)]):
            torch.optim.Adam.step(self)
        with hidden_gradients([p for p in params if not is_manifold_point(p)]):
            geoopt.optim.RiemannianAdam.step(self)
        return loss
