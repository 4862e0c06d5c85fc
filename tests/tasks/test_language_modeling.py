import lightning as L
import pytest
import torch
from conftest import RecordingAdamW
from torch.utils.data import DataLoader, TensorDataset

from lr_lightning.data import TextDataModule
from lr_lightning.layers import LoRALinear
from lr_lightning.strategies import SST, TDLRT, FullRank, InRank, LoRA, ReLoRA, SVDTraining
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


LLAMA = {"architecture": "llama", "size": "llama-tiny", "vocab_size": 32, "block_size": 16, "warmup_steps": 2}
PROJECTIONS = [f"model.model.layers.{i}.{part}" for i in range(2) for part in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj")]
EVERY_STRATEGY = {
    "full_rank": lambda: FullRank(),
    "lora": lambda: LoRA(rank=4),
    "relora": lambda: ReLoRA(rank=4, merge_every=2, restart_warmup_steps=1),
    "sst": lambda: SST(rank=4, iteration_interval=2, restart_warmup_steps=1),
    "inrank": lambda: InRank(init_rank=2, buffer=2, max_rank=8, warmup_steps=0, check_every=1, switch_step=2,
                             switch_epoch=None),
    "tdlrt": lambda: TDLRT(init_rank=4, max_rank=4, augment_every=2),
    "svd_training": lambda: SVDTraining(sparsify_at=1, prune_at=2, energy=0.2),
}


@pytest.mark.parametrize("name", EVERY_STRATEGY)
def test_every_strategy_trains_a_llama_converting_its_seven_projections_per_layer(name, tmp_path):
    task = LanguageModelingTask(strategy=EVERY_STRATEGY[name](), **LLAMA)
    assert type(task.model).__name__ == "LlamaForCausalLM"
    assert [row.name for row in task.strategy.report(task).rows] == PROJECTIONS
    if name != "full_rank":
        assert [n for n, _ in task.strategy.layers(task)] == PROJECTIONS
    assert type(task.model.lm_head) is torch.nn.Linear and type(task.model.model.embed_tokens) is torch.nn.Embedding
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    _trainer(tmp_path, max_steps=4, enable_checkpointing=False).fit(task, _loader())
    changed = {n for n, p in task.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert "model.lm_head.weight" in changed and any(".layers.1.mlp." in n for n in changed)
    assert torch.isfinite(task.trainer.callback_metrics["train/loss"])


def test_llama_defaults_to_the_published_vocabulary_and_context_of_its_preset():
    task = LanguageModelingTask(architecture="llama", size="llama-tiny")
    assert (task.hparams.vocab_size, task.hparams.block_size) == (32100, 1024)
    assert task.model.config.vocab_size == 32100 and task.hparams.n_layer is None


def test_llama_vocabulary_is_checked_against_the_tokenizer(tmp_path):
    data = TextDataModule(seq_len=16, batch_size=4, max_chars=20_000)
    with pytest.raises(ValueError, match=r"vocab_size=32 is smaller than the tokenizer's vocabulary \(256\)"):
        _trainer(tmp_path, max_steps=1).fit(LanguageModelingTask(**LLAMA), datamodule=data)


def test_llama_checkpoint_reloads_with_its_strategy(tmp_path):
    task = LanguageModelingTask(strategy=SST(rank=4, iteration_interval=2, restart_warmup_steps=1), **LLAMA)
    trainer = _trainer(tmp_path, max_steps=3, enable_checkpointing=False)
    trainer.fit(task, _loader())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = LanguageModelingTask.load_from_checkpoint(tmp_path / "last.ckpt")
    assert isinstance(loaded.strategy, SST) and loaded.hparams.size == "llama-tiny"
    x = torch.randint(0, 32, (2, 16))
    torch.testing.assert_close(loaded.eval()(x), task.eval()(x))


def test_a_gpt_size_preset_shapes_the_gpt_and_explicit_arguments_win():
    task = LanguageModelingTask(size="tiny", n_layer=3)
    assert (task.hparams.n_layer, task.hparams.model_dim, task.hparams.block_size) == (3, 64, 64)
    assert len(task.model.blocks) == 3 and len(task.blocks()) == 3


def _opt_config(tmp_path) -> str:
    from transformers import OPTConfig

    path = tmp_path / "config.json"
    path.write_text(OPTConfig(hidden_size=32, ffn_dim=64, num_attention_heads=2, num_hidden_layers=2, vocab_size=40,
                              max_position_embeddings=16, word_embed_proj_dim=32).to_json_string())
    return str(path)


def test_hf_builds_any_causal_lm_from_a_config_and_trains_a_step(tmp_path):
    task = LanguageModelingTask(architecture="hf", config_path=_opt_config(tmp_path), strategy=LoRA(rank=4),
                                warmup_steps=1)
    assert type(task.model).__name__ == "OPTForCausalLM" and (task.hparams.vocab_size, task.hparams.block_size) == (
        40, 16)
    converted = [n.removeprefix("model.model.decoder.layers.0.") for n, _ in task.strategy.layers(task)][:6]
    assert converted == ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1",
                         "fc2"]
    assert type(task.model.lm_head) is torch.nn.Linear
    assert [type(b).__name__ for b in task.blocks()] == ["OPTDecoderLayer"] * 2
    lora_b = task.model.model.decoder.layers[0].fc1.lora_B.detach().clone()
    _trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(task, _loader())
    assert not torch.equal(task.model.model.decoder.layers[0].fc1.lora_B, lora_b)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"architecture": "mamba"}, r"architecture must be one of \('gpt', 'llama', 'hf'\), got 'mamba'"),
    ({"architecture": "llama", "size": "llama-7m"}, "unknown LLaMA size 'llama-7m'; allowed: llama-tiny, llama-9m"),
    ({"size": "llama-9m"}, "size 'llama-9m' is no GPT preset; allowed for architecture='gpt': tiny, mini"),
    ({"architecture": "llama", "n_layer": 2}, "n_layer shape our GPT only"),
    ({"architecture": "llama", "config_path": "config.json"}, "config_path applies to architecture='hf' only"),
    ({"architecture": "hf"}, "architecture='hf' needs config_path"),
    ({"architecture": "hf", "config_path": "/no/such/config.json"}, "config_path '/no/such/config.json' is not"),
    ({"architecture": "hf", "config_path": "c.json", "size": "llama-9m"}, "size applies to architecture 'gpt'"),
    ({"architecture": "llama", "vocab_size": 0}, "vocab_size must be a positive int, got 0"),
])
def test_bad_architecture_arguments_are_value_errors_naming_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LanguageModelingTask(**kwargs)


def test_hf_gpt2_trains_its_conv1d_projections_as_linear_layers(tmp_path):
    from transformers import GPT2Config

    path = tmp_path / "config.json"
    path.write_text(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=32, n_positions=16).to_json_string())
    task = LanguageModelingTask(architecture="hf", config_path=str(path), strategy=LoRA(rank=4), warmup_steps=1)
    assert [n.removeprefix("model.transformer.h.0.") for n, _ in task.strategy.layers(task)][:4] == [
        "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert task.hparams.block_size == 16 and task.model.lm_head.weight is task.model.transformer.wte.weight
    _trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(task, _loader())
    assert torch.isfinite(task.trainer.callback_metrics["train/loss"])
