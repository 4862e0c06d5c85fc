import lightning as L
import pytest
import torch
from conftest import RecordingAdamW
from torch.utils.data import DataLoader, TensorDataset

from lr_lightning.tasks import LanguageModelingTask

TINY = {"vocab_size": 32, "block_size": 16, "n_layer": 1, "n_head": 2, "warmup_steps": 2}


class StopAfter(L.Callback):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainer.should_stop = trainer.global_step >= self.steps


def _loader() -> DataLoader:
    tokens = torch.randint(0, 32, (32, 17), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8)


def _fit(task: LanguageModelingTask, **trainer_kwargs) -> list[float]:
    L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, **trainer_kwargs).fit(task, _loader())
    recorder = task.trainer.optimizers[0]
    return recorder.lrs(task.model.lm_head.weight)


def test_a_run_without_a_planned_end_warms_up_and_then_keeps_the_peak_rate():
    task = LanguageModelingTask(optimizer=RecordingAdamW, **TINY)
    lrs = _fit(task, max_epochs=-1, max_steps=-1, callbacks=[StopAfter(6)])
    assert lrs == pytest.approx([0.5e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3], rel=1e-12)


def test_a_planned_run_decays_to_min_lr_ratio_with_a_cosine():
    task = LanguageModelingTask(optimizer=RecordingAdamW, min_lr_ratio=0.1, **TINY)
    lrs = _fit(task, max_steps=12)
    assert lrs[:2] == pytest.approx([0.5e-3, 1e-3])
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))  # strictly decreasing once the cosine starts
    assert lrs[-1] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 9 / 10)).item())))
