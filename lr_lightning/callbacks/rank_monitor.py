"""``RankMonitor``: log per-layer ranks (and optionally spectra), plot rank over steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lr_lightning.layers.base import LowRankLayer


class RankMonitor(L.Callback):
    """Every ``every_n_steps`` optimizer steps, record each factorized layer's active rank.

    With ``spectra=True`` it also logs, per layer, the largest singular value of the effective
    weight and its effective rank ``exp(H(p))``, ``p_i = s_i / sum_j s_j`` (Roy & Vetterli 2007).
    With ``plot_path`` set, a PNG of rank over steps (one line per layer) is written at the end of
    fit. The history is kept in the callback state, so a resumed run continues the same plot.
    A step is recorded at the start of the next batch (or at the end of training), after every
    callback's end-of-step hook, so a rank change made at that step by the strategy shows at it.

    Args:
        every_n_steps: Optimizer steps between records.
        spectra: Also compute singular values (an SVD per layer per record).
        plot_path: Where to write the rank-over-steps PNG (``None``: no plot).
    """

    def __init__(self, every_n_steps: int = 50, spectra: bool = False, plot_path: str | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.spectra, self.plot_path = every_n_steps, spectra, plot_path
        self.history: dict[str, list[tuple[int, int]]] = {}

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history:
            self.record(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._record_due(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record_due(trainer, pl_module)

    def _record_due(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record completed step ``global_step`` once every callback's end-of-step hook has run on it."""
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step > self._last_recorded_step():
            self.record(trainer, pl_module)

    def _last_recorded_step(self) -> int:
        return max((points[-1][0] for points in self.history.values() if points), default=-1)

    def record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Store and log the current rank (and spectrum summary) of every factorized layer."""
        metrics = {}
        for name, layer in pl_module.named_modules():
            if not isinstance(layer, LowRankLayer):
                continue
            self.history.setdefault(name, []).append((trainer.global_step, layer.rank))
            metrics[f"rank/{name}"] = float(layer.rank)
            if self.spectra:
                with torch.no_grad():
                    weight = layer.dense_weight().float()
                    with torch.autocast(weight.device.type, enabled=False):
                        s = torch.linalg.svdvals(weight)
                p = s / s.sum().clamp_min(1e-12)
                metrics[f"spectrum/{name}/top"] = float(s[0])
                metrics[f"spectrum/{name}/effective_rank"] = float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))
        for logger in trainer.loggers if metrics else []:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.plot_path is not None and self.history:
            self.plot(self.plot_path)

    @rank_zero_only
    def plot(self, path: str) -> None:
        """Write the rank-over-steps figure to ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, points in self.history.items():
            steps, ranks = zip(*points)
            ax.step(steps, ranks, where="post", label=name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("active rank")
        ax.set_title("Rank over training")
        if len(self.history) <= 12:
            ax.legend(fontsize="small")
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: [tuple(p) for p in v] for k, v in state_dict["history"].items()}
