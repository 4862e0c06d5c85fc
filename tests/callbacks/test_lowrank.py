import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TinyMLP
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lr_lightning.callbacks import LowRankCallback, RankMonitor
from lr_lightning.layers import LoRALinear
from lr_lightning.strategies import LoRA, ReLoRA


class PlainModule(L.LightningModule):
    """A user's module: builds its own optimizer from model.parameters(), knows nothing of strategies."""

    def __init__(self, optimizer_before_conversion: bool = False) -> None:
        super().__init__()
        self.net = TinyMLP()
        self.early_optimizer = torch.optim.SGD(self.parameters(), lr=0.1) if optimizer_before_conversion else None
        self.merge_steps: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return self.early_optimizer or torch.optim.AdamW(self.parameters(), lr=1e-2)


def _loader(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 11, (n, 5), generator=g), torch.randint(0, 11, (n, 5), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def _trainer(callbacks, logger=False, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kw)


class CountingReLoRA(ReLoRA):
    def merge(self, model, step):
        self.steps_seen = [*getattr(self, "steps_seen", []), step]
        return super().merge(model, step)


@pytest.mark.parametrize(("accumulate", "precision"), [(1, "32-true"), (4, "32-true"), (2, "bf16-mixed")])
def test_callback_converts_a_plain_module_and_merges_on_optimizer_steps(accumulate, precision, tmp_path):
    torch.manual_seed(0)
    module = PlainModule()
    strategy = CountingReLoRA(rank=4, merge_every=3, restart_warmup_steps=1, reset="random_prune", reset_fraction=0.9)
    logger = CSVLogger(tmp_path)
    _trainer([LowRankCallback(strategy, verbose=False)], logger, max_steps=7, accumulate_grad_batches=accumulate,
             max_epochs=-1, precision=precision).fit(module, _loader(64))
    assert isinstance(module.net.body[0], LoRALinear)
    assert strategy.steps_seen == [3, 6] and strategy.merges == 2
    logger.save()
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        zeroed = [float(r["lowrank/optimizer_state_zeroed"]) for r in csv.DictReader(f)
                  if r.get("lowrank/optimizer_state_zeroed")]
    assert len(zeroed) == 2 and all(0.85 < z < 0.95 for z in zeroed)


def test_strategy_metrics_are_logged_every_log_every_n_steps(tmp_path):
    logger = CSVLogger(tmp_path)
    _trainer([LowRankCallback(LoRA(rank=4), verbose=False)], logger, max_steps=6, log_every_n_steps=2).fit(
        PlainModule(), _loader())
    logger.save()
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("lowrank/total_rank")]
    assert steps == [0, 2, 4, 6]


class Snapshot(L.Callback):
    def __init__(self, step: int) -> None:
        self.step, self.weight = step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.weight is None:
            self.weight = pl_module.net.body[0].weight.detach().clone()


def test_warm_start_freezes_w0_in_a_users_own_optimizer():
    torch.manual_seed(0)
    module = PlainModule()
    initial = module.net.body[0].weight.detach().clone()
    snapshot = Snapshot(step=2)
    strategy = ReLoRA(rank=4, merge_every=3, restart_warmup_steps=1, warm_start_steps=2)
    _trainer([LowRankCallback(strategy, verbose=False), snapshot], max_steps=4).fit(module, _loader())
    assert not torch.equal(snapshot.weight, initial)  # trained (and merged) during the warm start
    torch.testing.assert_close(module.net.body[0].weight, snapshot.weight, rtol=0, atol=0)  # frozen after


def test_optimizer_built_before_conversion_is_a_clear_error():
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="optimizer does not hold .* low-rank parameters"):
        _trainer([LowRankCallback(LoRA(rank=2), verbose=False)], max_steps=1).fit(
            PlainModule(optimizer_before_conversion=True), _loader())


def test_callback_rejects_a_non_strategy():
    with pytest.raises(TypeError, match="strategy must be a LowRankStrategy"):
        LowRankCallback("LoRA")


def test_rank_monitor_records_and_plots(tmp_path):
    torch.manual_seed(0)
    plot = tmp_path / "ranks.png"
    monitor = RankMonitor(every_n_steps=2, spectra=True, plot_path=str(plot))
    _trainer([LowRankCallback(LoRA(rank=3), verbose=False), monitor], max_steps=4).fit(PlainModule(), _loader())
    assert set(monitor.history) == {"net.body.0", "net.body.2"}
    assert monitor.history["net.body.0"] == [(0, 3), (2, 3), (4, 3)]
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"
