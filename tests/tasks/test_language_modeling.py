import lightning as L
import pytest
import torch
from conftest import RecordingAdamW
from torch.utils.data import DataLoader, TensorDataset

from lr_lightning.data import TextDataModule
from lr_lightning.layers import LoRALinear
from lr_lightning.strategies import FullRank, InRank, LoRA, ReLoRA, SVDTraining
from lr_lightning.tasks import LanguageModelingTask

TINY = {"vocab_size": 32, "block_size": 16, "n_layer": 2, "n_head": 2, "model_dim": 32, "warmup_steps": 2}


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (64, 17), generator=g)
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8)


def _trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, num_sanity_val_steps=0, **kw)


def test_task_converts_the_decoder_at_construction():
    task = LanguageModelingTask(strategy=LoRA(rank=4, target_modules=["*.mlp.*"]), **TINY)
    converted = [n for n, m in task.named_modules() if isinstance(m, LoRALinear)]
    assert converted == ["model.blocks.0.mlp.fc", "model.blocks.0.mlp.proj",
                         "model.blocks.1.mlp.fc", "model.blocks.1.mlp.proj"]
    assert isinstance(LanguageModelingTask(**TINY).strategy, FullRank)


def test_relora_schedule_rewarms_after_each_merge_inside_the_trainer(tmp_path):
    strategy = ReLoRA(rank=4, merge_every=4, restart_warmup_steps=2, reset="full")
    task = LanguageModelingTask(strategy=strategy, optimizer=RecordingAdamW, **TINY)
    _trainer(tmp_path, max_steps=12, enable_checkpointing=False).fit(task, _loader())
    factor = task.trainer.optimizers[0].optimizer.lrs(task.model.blocks[0].attn.qkv.lora_A)
    assert strategy.merges == 3  # after steps 4, 8 and 12
    assert factor[4] == 0.0 and factor[8] == 0.0  # first step after each merge
    assert 0 < factor[5] < factor[6] and 0 < factor[9] < factor[10]
    assert factor[3] > 0 and factor[7] > 0


def test_load_from_checkpoint_reapplies_the_strategy(tmp_path):
    strategy = ReLoRA(rank=4, merge_every=2, restart_warmup_steps=1)
    task = LanguageModelingTask(strategy=strategy, **TINY)
    trainer = _trainer(tmp_path, max_steps=3, enable_checkpointing=False)
    trainer.fit(task, _loader())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = LanguageModelingTask.load_from_checkpoint(tmp_path / "last.ckpt")
    assert isinstance(loaded.strategy, ReLoRA) and loaded.strategy.merge_every == 2
    assert isinstance(loaded.model.blocks[0].attn.qkv, LoRALinear)
    x = torch.randint(0, 32, (2, 16))
    torch.testing.assert_close(loaded.eval()(x), task.eval()(x))


@pytest.mark.parametrize("strategy", [
    pytest.param(lambda: SVDTraining(sparsify_at=1, prune_at=2, energy=0.2), id="svd-prune"),
    pytest.param(lambda: InRank(init_rank=2, buffer=2, max_rank=8, warmup_steps=0, check_every=1, switch_step=2,
                                switch_epoch=None), id="inrank-switch"),
])
def test_load_from_checkpoint_of_a_shrunk_model_allocates_the_compact_layers(strategy, tmp_path):
    task = LanguageModelingTask(strategy=strategy(), **TINY)
    trainer = _trainer(tmp_path, max_steps=3, enable_checkpointing=False)
    trainer.fit(task, _loader())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    shrunk = {name: layer.capacity for name, layer in task.strategy.layers(task)}
    assert all(shrunk[name] == layer.rank for name, layer in task.strategy.layers(task))
    assert min(shrunk.values()) < 16  # below every layer's capacity before the event
    loaded = LanguageModelingTask.load_from_checkpoint(tmp_path / "last.ckpt", strategy=strategy())
    assert {name: layer.capacity for name, layer in loaded.strategy.layers(loaded)} == shrunk
    x = torch.randint(0, 32, (2, 16))
    torch.testing.assert_close(loaded.eval()(x), task.eval()(x))


def test_resuming_with_another_strategy_is_an_error(tmp_path):
    task = LanguageModelingTask(strategy=LoRA(rank=4), **TINY)
    trainer = _trainer(tmp_path, max_steps=1, enable_checkpointing=False)
    trainer.fit(task, _loader())
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    other = LanguageModelingTask(strategy=LoRA(rank=2), **TINY)
    with pytest.raises(ValueError, match="the checkpoint was trained with lr_lightning.strategies.lora.LoRA"):
        _trainer(tmp_path, max_steps=2).fit(other, _loader(), ckpt_path=tmp_path / "lora.ckpt")


def test_vocabulary_smaller_than_the_tokenizer_is_a_clear_error(tmp_path):
    data = TextDataModule(seq_len=16, batch_size=4, max_chars=20_000)
    task = LanguageModelingTask(**TINY)
    with pytest.raises(ValueError, match=r"vocab_size=32 is smaller than the tokenizer's vocabulary \(256\)"):
        _trainer(tmp_path, max_steps=1).fit(task, datamodule=data)


def test_sequences_longer_than_the_context_are_a_clear_error(tmp_path):
    data = TextDataModule(seq_len=32, batch_size=4, max_chars=20_000)
    task = LanguageModelingTask(**{**TINY, "vocab_size": 256})
    with pytest.raises(ValueError, match="data seq_len=32 exceeds the model's block_size=16"):
        _trainer(tmp_path, max_steps=1).fit(task, datamodule=data)


def test_validation_reports_perplexity_as_exp_loss(tmp_path):
    task = LanguageModelingTask(**TINY)
    trainer = _trainer(tmp_path, max_steps=1)
    [metrics] = trainer.validate(task, _loader(), verbose=False)
    assert metrics["val/ppl"] == pytest.approx(torch.tensor(metrics["val/loss"]).exp().item(), rel=1e-3)
