"""SST against ReLoRA* at equal rank on real text (the paper's central comparison), small enough for CI."""

from pathlib import Path

import lightning as L
import pytest
import torch

from lr_lightning.data import TextDataModule
from lr_lightning.strategies import SST, ReLoRA
from lr_lightning.tasks import LanguageModelingTask

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare" / "input.txt"
STEPS, RANK, INTERVAL = 300, 8, 50
TARGETS = ["*.attn.*", "*.mlp.*"]


def validation_loss(strategy) -> float:
    """Byte-level GPT (2 layers, width 64) for ``STEPS`` AdamW steps on 400k characters of Shakespeare."""
    L.seed_everything(0, verbose=False)
    data = TextDataModule(path=str(SHAKESPEARE), seq_len=64, batch_size=16, max_chars=400_000)
    task = LanguageModelingTask(strategy=strategy, vocab_size=256, block_size=64, n_layer=2, n_head=2, model_dim=64,
                                warmup_steps=30, optimizer=lambda groups: torch.optim.AdamW(
                                    groups, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1))
    trainer = L.Trainer(accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=20,
                        val_check_interval=STEPS, num_sanity_val_steps=0)
    trainer.fit(task, data)
    return trainer.callback_metrics["val/loss"].item()


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="shared/data/tinyshakespeare not present")
def test_sst_reaches_lower_validation_loss_than_relora_star_at_equal_rank():
    # ReLoRA* (SST's definition): no warm start, full optimizer reset, merge interval = SST's draw interval.
    relora_star = validation_loss(ReLoRA(rank=RANK, merge_every=INTERVAL, reset="full", restart_warmup_steps=10,
                                         warm_start_steps=0, target_modules=TARGETS))
    sst = validation_loss(SST(rank=RANK, iteration_interval=INTERVAL, restart_warmup_steps=10, target_modules=TARGETS))
    # measured: ReLoRA* 2.92, SST 2.62 (nats per byte); the margin is well above seed-to-seed noise
    assert sst < relora_star - 0.1, (sst, relora_star)
