"""``lr-lightning export``: dense Hugging Face folders, compact folders, standalone GPTs, and refusals."""

import json

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM

from lr_lightning.cli import main
from lr_lightning.export import MANIFEST, export_checkpoint, load_exported
from lr_lightning.models import GPT
from lr_lightning.strategies import SST, InRank, LoRA, SVDTraining
from lr_lightning.tasks import LanguageModelingTask

LLAMA = {"architecture": "llama", "size": "llama-tiny", "vocab_size": 32, "block_size": 16, "warmup_steps": 2}
GPT_TINY = {"vocab_size": 32, "block_size": 16, "n_layer": 2, "n_head": 2, "model_dim": 32, "warmup_steps": 2}
STRATEGIES = {
    "lora": lambda: LoRA(rank=4),
    "sst": lambda: SST(rank=4, iteration_interval=2, restart_warmup_steps=1),
    "inrank": lambda: InRank(init_rank=2, buffer=2, max_rank=8, warmup_steps=0, check_every=1, switch_step=2,
                             switch_epoch=None),
    "svd_training": lambda: SVDTraining(sparsify_at=1, prune_at=2, energy=0.2),
}


def _trained(tmp_path, strategy, **kwargs) -> tuple[LanguageModelingTask, str]:
    """A task trained 4 steps on random tokens and its checkpoint."""
    tokens = torch.randint(0, 32, (64, 17), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8)
    task = LanguageModelingTask(strategy=strategy, **kwargs)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, max_steps=4, default_root_dir=tmp_path)
    trainer.fit(task, loader)
    path = str(tmp_path / "last.ckpt")
    trainer.save_checkpoint(path)
    return task.eval(), path


X = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", STRATEGIES)
def test_dense_export_loads_with_from_pretrained_computing_the_trained_models_logits(name, tmp_path):
    task, ckpt = _trained(tmp_path, STRATEGIES[name](), **LLAMA)
    out = export_checkpoint(ckpt, tmp_path / "dense")
    assert {"config.json", "model.safetensors", MANIFEST} <= {p.name for p in out.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert all(type(model.get_submodule(n.removeprefix("model."))) is nn.Linear for n, _ in task.strategy.layers(task))
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, task(X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", STRATEGIES)
def test_compact_export_round_trips_with_the_factorized_layers_at_their_ranks(name, tmp_path):
    task, ckpt = _trained(tmp_path, STRATEGIES[name](), **LLAMA)
    out = export_checkpoint(ckpt, tmp_path / "compact", "compact")
    model = load_exported(out)
    q_proj = model.model.layers[0].self_attn.q_proj
    if name in ("inrank", "svd_training"):  # the exact-rank Linear(n, r) -> Linear(r, m)
        rank = task.model.model.layers[0].self_attn.q_proj.rank
        assert isinstance(q_proj, nn.Sequential) and q_proj[0].out_features == rank < 64
    else:  # LoRA and SST export their merged dense layer
        assert type(q_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, task(X), atol=1e-5, rtol=1e-5)
    assert json.loads((out / MANIFEST).read_text())["global_step"] == 4


@pytest.mark.parametrize("form", ["compact", "dense"])
def test_gpt_export_is_a_standalone_model_without_the_trainer_state(form, tmp_path):
    task, ckpt = _trained(tmp_path, SVDTraining(sparsify_at=1, prune_at=2, energy=0.2), **GPT_TINY)
    out = export_checkpoint(ckpt, tmp_path / form, form)
    model = load_exported(out)
    assert isinstance(model, GPT) and sum(1 for _ in out.iterdir()) == 2
    assert isinstance(model.blocks[0].attn.qkv, nn.Sequential if form == "compact" else nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(X), task(X), atol=1e-5, rtol=1e-5)


def test_the_command_defaults_to_dense_for_llama_and_refuses_a_non_empty_folder(tmp_path, capsys):
    _, ckpt = _trained(tmp_path, LoRA(rank=4), **LLAMA)
    main(["export", "--ckpt_path", ckpt, "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["form"] == "dense"
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    with pytest.raises(SystemExit) as error:
        main(["export", "--ckpt_path", ckpt, "--out", str(tmp_path / "out"), "--compact"])
    assert "--out" in str(error.value.code) and "is not an empty folder" in str(error.value.code)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before


def test_a_missing_checkpoint_is_one_line_and_writes_nothing(tmp_path):
    with pytest.raises(SystemExit) as error:
        main(["export", "--ckpt_path", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "out")])
    assert str(error.value.code).startswith("lr-lightning: error: FileNotFoundError: checkpoint")
    assert list(tmp_path.iterdir()) == []


def test_dense_and_compact_together_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        main(["export", "--ckpt_path", "x.ckpt", "--out", str(tmp_path / "out"), "--dense", "--compact"])
    assert error.value.code == 2 and "not allowed with argument --dense" in capsys.readouterr().err


def test_a_checkpoint_of_another_task_is_refused_by_name(tmp_path):
    torch.save({"pytorch-lightning_version": "2.6.0", "hyper_parameters": {"num_classes": 10}, "state_dict": {}},
               tmp_path / "image.ckpt")
    with pytest.raises(ValueError, match=r"is not a LanguageModelingTask's .*\['num_classes'\]"):
        export_checkpoint(tmp_path / "image.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gpt2_dense_export_writes_its_conv1d_layout_back(tmp_path):
    from transformers import GPT2Config
    from transformers.pytorch_utils import Conv1D

    config = tmp_path / "config.json"
    config.write_text(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=32, n_positions=16).to_json_string())
    task, ckpt = _trained(tmp_path, LoRA(rank=4), architecture="hf", config_path=str(config), warmup_steps=2)
    model = AutoModelForCausalLM.from_pretrained(export_checkpoint(ckpt, tmp_path / "dense")).eval()
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, task(X), atol=1e-5, rtol=1e-5)
    compact = load_exported(export_checkpoint(ckpt, tmp_path / "compact", "compact"))
    with torch.no_grad():
        torch.testing.assert_close(compact(X).logits, task(X), atol=1e-5, rtol=1e-5)
