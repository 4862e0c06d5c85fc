"""One faithful TDLRT step against a DLRT-Net-style three-pass step and a dense step, same layer and batch.

    OMP_NUM_THREADS=1 python bench/dlrt_reference.py --m 3072 --n 768 --rank 96 --tokens 1024

The reference is our own restatement of the DLRT integrator as DLRT-Net runs it (arXiv 2205.13571,
METHODS 4.1): a K pass (loss of ``K V^T``, ``K = U S``), an L pass (loss of ``U L^T``, ``L = V S^T``),
each a low-rank forward and backward followed by an AdamW step, then ``U <- orth([K^1 | U])``,
``V <- orth([L^1 | V])``, an S pass at rank ``2r`` and an SVD truncation back to ``r``. No dense
``m x n`` weight is formed anywhere. The TDLRT step is ``BUGOptimizer.step`` (one pass for all
K-steps, one Galerkin pass, truncation) on a ``TuckerLinear`` converted by ``TDLRT(variant="faithful")``.
Times are the best of ``--repeats`` after a warm-up step, the three steps taken in turn.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lr_lightning.strategies import TDLRT  # noqa: E402


class DLRTReference:
    """``W = U S V^T`` trained by the three-pass DLRT step with AdamW on ``K``, ``L`` and ``S``."""

    def __init__(self, m: int, n: int, rank: int) -> None:
        self.u = torch.linalg.qr(torch.randn(m, rank))[0]
        self.v = torch.linalg.qr(torch.randn(n, rank))[0]
        self.s = torch.diag(torch.rand(rank) + 0.5)
        self.bias = torch.zeros(m, requires_grad=True)
        self.rank = rank

    @staticmethod
    def _adamw_step(tensor: torch.Tensor, grad: torch.Tensor, lr: float = 1e-4) -> torch.Tensor:
        """A fresh AdamW step (first step: ``-lr sign(g)`` up to eps), as a new tensor."""
        optimizer = torch.optim.AdamW([tensor.requires_grad_()], lr=lr)
        tensor.grad = grad
        optimizer.step()
        return tensor.detach()

    def _pass(self, x: torch.Tensor, grad_out: torch.Tensor, left: torch.Tensor, core: torch.Tensor | None,
              right: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
        """Forward ``left (core) right^T x + b`` and backward; return ``dL/d trained``."""
        trained.requires_grad_()
        hidden = F.linear(x, right.T)
        out = F.linear(F.linear(hidden, core) if core is not None else hidden, left, self.bias)
        out.backward(grad_out)
        return trained.grad

    def step(self, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        k, l_ = (self.u @ self.s).requires_grad_(), (self.v @ self.s.T).requires_grad_()
        k1 = self._adamw_step(k.detach(), self._pass(x, grad_out, k, None, self.v, k))
        l1 = self._adamw_step(l_.detach(), self._pass(x, grad_out, self.u, None, l_, l_))
        u_hat = torch.linalg.qr(torch.cat([k1, self.u], dim=1))[0]
        v_hat = torch.linalg.qr(torch.cat([l1, self.v], dim=1))[0]
        s_hat = (u_hat.T @ self.u) @ self.s @ (self.v.T @ v_hat)
        s_hat = s_hat.requires_grad_()
        s1 = self._adamw_step(s_hat.detach(), self._pass(x, grad_out, u_hat, s_hat, v_hat, s_hat))
        p, sigma, qh = torch.linalg.svd(s1)
        r = self.rank
        self.u, self.v, self.s = u_hat @ p[:, :r], v_hat @ qh[:r].T, torch.diag(sigma[:r])


def interleaved_best(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds of each step after a warm-up, the steps taken in turn (load on a shared
    machine hits all of them alike)."""
    best = {name: math.inf for name in steps}
    for step in steps.values():
        step()
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def tdlrt_step(m: int, n: int, rank: int, x: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], object]:
    strategy = TDLRT(tau=0.0, init_rank=rank, max_rank=rank, variant="faithful")
    model = strategy.apply(nn.Sequential(nn.Linear(n, m)))
    optimizer = strategy.wrap_optimizer(torch.optim.AdamW(strategy.param_groups(model), lr=1e-4), model)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        out = model(x)
        out.backward(grad_out)
        return out

    return lambda: optimizer.step(closure)


def dense_step(m: int, n: int, x: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], object]:
    layer = nn.Linear(n, m)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad()
        layer(x).backward(grad_out)
        optimizer.step()

    return step


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=3072, help="output features")
    parser.add_argument("--n", type=int, default=768, help="input features")
    parser.add_argument("--rank", type=int, default=96, help="rank r (TDLRT: init_rank = max_rank = r)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens T per batch")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps (best is reported)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.n, requires_grad=True)
    grad_out = torch.randn(args.tokens, args.m) / math.sqrt(args.tokens * args.m)
    reference = DLRTReference(args.m, args.n, args.rank)
    times = interleaved_best({
        "dense step": dense_step(args.m, args.n, x, grad_out),
        "DLRT reference step (K, L, S passes)": lambda: reference.step(x, grad_out),
        "TDLRT faithful step": tdlrt_step(args.m, args.n, args.rank, x, grad_out),
    }, args.repeats)
    print(f"{args.n} -> {args.m}, rank {args.rank}, T = {args.tokens}, threads = {torch.get_num_threads()}")
    for name, seconds in times.items():
        print(f"{name:40s} {seconds * 1e3:8.1f} ms  {seconds / times['dense step']:.2f}x dense  "
              f"{seconds / times['DLRT reference step (K, L, S passes)']:.2f}x DLRT")
    return times


if __name__ == "__main__":
    main()
