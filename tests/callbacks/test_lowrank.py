import csv
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import RecordingAdamW, TinyMLP
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lr_lightning.callbacks import LowRankCallback, RankMonitor
from lr_lightning.callbacks.lowrank import DivergenceError
from lr_lightning.layers import LoRALinear, SpectralLinear
from lr_lightning.optim import RoleOptimizer
from lr_lightning.strategies import SST, InRank, LoRA, ReLoRA, SVDTraining


class PlainModule(L.LightningModule):
    """A user's module: builds its own optimizer from model.parameters(), knows nothing of strategies."""

    def __init__(self, optimizer_before_conversion: bool = False, step_lr: bool = False) -> None:
        super().__init__()
        self.net = TinyMLP()
        self.early_optimizer = torch.optim.SGD(self.parameters(), lr=0.1) if optimizer_before_conversion else None
        self.step_lr = step_lr
        self.merge_steps: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        if self.early_optimizer is not None:
            return self.early_optimizer
        optimizer = RecordingAdamW(self.parameters(), lr=1e-2)  # torch's AdamW, weight decay 0.01, one group
        if not self.step_lr:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=5, gamma=0.5), "interval": "step"}}


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


@pytest.mark.parametrize(("round_length", "warns"), [(None, True), (1, False)])
def test_an_operation_the_planned_run_never_reaches_is_warned_about_at_fit_start(round_length, warns):
    """SST on 16-wide layers at rank 2 re-factors after ceil(16 / 2) = 8 draws of 5 steps: not in a 16-step run."""
    strategy = SST(rank=2, iteration_interval=5, round_length=round_length, restart_warmup_steps=1)
    trainer = _trainer([LowRankCallback(strategy, verbose=False)], max_steps=16)
    if warns:
        with pytest.warns(UserWarning, match="plans 16 optimizer steps, so resvd every 40 steps never runs"):
            trainer.fit(PlainModule(), _loader())
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*never runs")
            trainer.fit(PlainModule(), _loader())


def test_warm_start_freezes_w0_in_a_users_own_optimizer():
    torch.manual_seed(0)
    module = PlainModule()
    initial = module.net.body[0].weight.detach().clone()
    snapshot = Snapshot(step=2)
    strategy = ReLoRA(rank=4, merge_every=3, restart_warmup_steps=1, warm_start_steps=2)
    _trainer([LowRankCallback(strategy, verbose=False), snapshot], max_steps=4).fit(module, _loader())
    assert not torch.equal(snapshot.weight, initial)  # trained (and merged) during the warm start
    torch.testing.assert_close(module.net.body[0].weight, snapshot.weight, rtol=0, atol=0)  # frozen after


def _recorder(trainer: L.Trainer) -> RecordingAdamW:
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, RoleOptimizer)
    return optimizer.optimizer


@pytest.mark.parametrize("step_lr", [False, True], ids=["no-scheduler", "chained-StepLR"])
def test_relora_rewarms_a_users_plain_adamw_after_each_merge(step_lr):
    torch.manual_seed(0)
    module = PlainModule(step_lr=step_lr)
    strategy = ReLoRA(rank=4, merge_every=4, restart_warmup_steps=2, reset="full")
    trainer = _trainer([LowRankCallback(strategy, verbose=False)], max_steps=12)
    trainer.fit(module, _loader(64))
    recorder = _recorder(trainer)
    base = [1e-2 * (0.5 ** (t // 5) if step_lr else 1.0) for t in range(12)]
    ramp = [1, 1, 1, 1, 0, 0.5, 1, 1, 0, 0.5, 1, 1]  # 0 at each merge (after steps 4, 8), 1 after 2 steps
    for param in (module.net.body[0].lora_A, module.net.head.weight):  # the factors and the user's own layers
        assert recorder.lrs(param) == pytest.approx([b * r for b, r in zip(base, ramp)], rel=1e-12)
    assert strategy.merges == 3  # after steps 4, 8 and 12
    assert recorder.param_groups[0]["lr"] == pytest.approx(1e-2 * (0.5 ** (12 // 5) if step_lr else 1.0))


def test_sst_rewarms_the_bases_and_drops_their_decay_in_a_users_single_group():
    torch.manual_seed(0)
    module = PlainModule()
    strategy = SST(rank=4, iteration_interval=4, restart_warmup_steps=2)
    trainer = _trainer([LowRankCallback(strategy, verbose=False)], max_steps=10)
    trainer.fit(module, _loader(64))
    recorder = _recorder(trainer)
    layer = module.net.body[0]
    assert isinstance(layer, SpectralLinear) and len(recorder.param_groups) == 1
    assert recorder.lrs(layer.U_active) == pytest.approx([1e-2 * r for r in [1, 1, 1, 1, 0, 0.5, 1, 1, 0, 0.5]])
    assert recorder.lrs(layer.s) == recorder.lrs(module.net.head.weight) == [1e-2] * 10  # s is not re-warmed
    decays = {name: {step[id(p)][1] for step in recorder.stepped}
              for name, p in [("U", layer.U_active), ("s", layer.s), ("head", module.net.head.weight)]}
    assert decays == {"U": {0.0}, "s": {0.0}, "head": {0.01}}  # bases and spectra take no decay
    assert recorder.param_groups[0]["weight_decay"] == 0.01  # the user's group is left as it was


def test_decay_rules_follow_the_layers_through_a_shrink():
    torch.manual_seed(0)
    module = PlainModule()
    strategy = SVDTraining(sparsify_at=1, prune_at=3, energy=0.3, sparsity_weight=0.5)
    trainer = _trainer([LowRankCallback(strategy, verbose=False)], max_steps=6)
    trainer.fit(module, _loader(64))
    layer = module.net.body[0]
    assert layer.capacity < 16  # shrunk at the prune: N, s, C are new Parameters
    recorder = _recorder(trainer)
    assert [step[id(layer.N)][1] for step in recorder.stepped[3:]] == [0.0] * 3
    assert {step[id(module.net.head.weight)][1] for step in recorder.stepped} == {0.01}


def test_a_strategy_without_lr_factor_or_decay_conflict_leaves_the_optimizer_as_built():
    torch.manual_seed(0)
    trainer = _trainer([LowRankCallback(LoRA(rank=2), verbose=False)], max_steps=2)
    trainer.fit(PlainModule(), _loader())
    assert type(trainer.optimizers[0]) is RecordingAdamW


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


class SaveAfterBatch(L.Callback):
    """Saves a checkpoint in ``on_train_batch_end`` after optimizer step ``step``, as
    ``ModelCheckpoint(every_n_train_steps)`` does: on an epoch's last batch that is before ``on_train_epoch_end``."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def _epoch_strategies():
    return [
        pytest.param(lambda: InRank(init_rank=2, buffer=2, max_rank=8, warmup_steps=0, check_every=1,
                                    switch_epoch=0), "switched", id="inrank-switch_epoch"),
        pytest.param(lambda: SVDTraining(sparsify_at=1, prune_at=2, unit="epoch", energy=0.3, sparsity_weight=0.5),
                     "stage", id="svd-unit-epoch"),
    ]


@pytest.mark.parametrize(("make_strategy", "state"), _epoch_strategies())
@pytest.mark.parametrize("stop_at", [4, 8])  # the last batch of epoch 0, of epoch 1
def test_resume_from_an_epochs_last_batch_replays_its_epoch_end_operations(make_strategy, state, stop_at, tmp_path):
    def fit(max_steps, ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        module, strategy = PlainModule(), make_strategy()
        trainer = _trainer([LowRankCallback(strategy, verbose=False), *callbacks], max_steps=max_steps, max_epochs=-1,
                           default_root_dir=tmp_path)
        trainer.fit(module, _loader(16), ckpt_path=ckpt_path)  # 4 batches per epoch
        return module, strategy

    straight, straight_strategy = fit(12)
    fit(stop_at, callbacks=[SaveAfterBatch(stop_at, tmp_path / "last-batch.ckpt")])
    resumed, resumed_strategy = fit(12, ckpt_path=str(tmp_path / "last-batch.ckpt"))
    assert getattr(resumed_strategy, state) == getattr(straight_strategy, state)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


class DivergingModule(PlainModule):
    """A user's module whose loss turns NaN at optimizer step ``nan_at`` (as with a learning rate of 10)."""

    def __init__(self, nan_at: int) -> None:
        super().__init__()
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step + 1 >= self.nan_at else loss


@pytest.mark.parametrize(("make_strategy", "state"), [
    pytest.param(lambda: ReLoRA(rank=4, merge_every=4, restart_warmup_steps=1), {"merges": 0}, id="relora-merge"),
    pytest.param(lambda: SVDTraining(sparsify_at=1, prune_at=4, energy=0.3), {"stage": "sparsify"}, id="svd-prune"),
])
def test_a_non_finite_loss_stops_training_before_an_operation_spreads_it(make_strategy, state):
    torch.manual_seed(0)
    module, strategy = DivergingModule(nan_at=4), make_strategy()
    with pytest.raises(DivergenceError, match="the loss.* not finite after optimizer step 4; stopped before"):
        _trainer([LowRankCallback(strategy, verbose=False)], max_steps=8).fit(module, _loader(64))
    assert strategy.state_dict() == state  # the merge, the prune due at step 4 never ran
    if isinstance(strategy, ReLoRA):
        assert module.net.body[0].weight.isfinite().all()  # W0 never received the NaN factors


def test_a_non_finite_layer_is_never_operated_on():
    torch.manual_seed(0)
    strategy = SST(rank=4, iteration_interval=2, restart_warmup_steps=1)

    class Poison(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:  # after the step's loss, before the callback's check
                with torch.no_grad():
                    pl_module.net.body[2].s[0] = float("inf")  # the step's loss was finite; a layer is not

    with pytest.raises(DivergenceError, match="diverged: net.body.2 not finite after optimizer step 2; stopped before"):
        _trainer([Poison(), LowRankCallback(strategy, verbose=False)], max_steps=4).fit(PlainModule(), _loader(64))
