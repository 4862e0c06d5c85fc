"""Every shipped config parses and runs; the README's main command trains; bad input fails early."""

import csv
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import translation_extra_error

from lr_lightning import cli
from lr_lightning.checkpoints import read_checkpoint
from lr_lightning.cli import RESOLVED_CONFIG_HEADER, main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
MISSING_TRANSLATION = translation_extra_error()
RUNNABLE_CONFIGS = [pytest.param(c, marks=pytest.mark.skipif(
    c.parent.name == "translation" and MISSING_TRANSLATION is not None, reason=str(MISSING_TRANSLATION)))
    for c in CONFIGS]
QUICK = ["--trainer.enable_progress_bar", "false", "--data.init_args.max_chars", "60000"]
QUICK_BY_TASK = {"lm": QUICK, "translation": ["--trainer.enable_progress_bar", "false", "--data.init_args.max_tokens",
                                              "512", "--model.init_args.beam_size", "2"]}


def test_every_strategy_has_a_language_modeling_config():
    import lr_lightning.strategies as strategies

    used = {line.split("lr_lightning.strategies.")[1].strip() for p in CONFIGS if p.parent.name == "lm"
            for line in p.read_text().splitlines() if "class_path: lr_lightning.strategies." in line}
    exported = {name for name in strategies.__all__ if isinstance(getattr(strategies, name), type)
                and issubclass(getattr(strategies, name), strategies.LowRankStrategy)} - {"LowRankStrategy"}
    assert exported == used


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_starts_with_its_launch_command(config):
    header = [line for line in config.read_text().splitlines() if line.startswith("#")]
    assert any(f"lr-lightning fit --config configs/{config.parent.name}/{config.name}" in h for h in header)


@pytest.mark.parametrize("config", RUNNABLE_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_runs_with_fast_dev_run(config, tmp_path):
    main(["fit", "--config", str(config), "--trainer.fast_dev_run", "2",
          "--trainer.default_root_dir", str(tmp_path),
          *QUICK_BY_TASK.get(config.parent.name, ["--trainer.enable_progress_bar", "false"])])


@pytest.mark.parametrize("config", [c for c in RUNNABLE_CONFIGS if c.values[0].parent.name == "translation"
                                    and c.values[0].stem in ("full_rank", "hybonet_full_rank")],
                         ids=lambda p: p.stem)
def test_a_translation_run_stopped_between_validations_keeps_its_last_step(config, tmp_path):
    """Validation runs every 2 epochs; a run that stops at max_steps before one still saves its final weights."""
    main(["fit", "--config", str(config), "--trainer.max_steps", "3", "--trainer.logger", "false",
          "--trainer.default_root_dir", str(tmp_path), *QUICK_BY_TASK["translation"]])
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert [p.name for p in checkpoints] == ["last.ckpt"]
    assert torch.load(checkpoints[0], map_location="cpu", weights_only=False)["global_step"] == 3


def test_unknown_strategy_error_lists_the_strategies():
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.strategy=LoRa"])
    assert all(name in str(exit_info.value.code)
               for name in ("FullRank", "LoRA", "ReLoRA", "SST", "InRank", "TDLRT", "SVDTraining"))


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_validate_and_test_subcommands_report_perplexity(subcommand, tmp_path, capsys):
    config = Path(__file__).resolve().parents[1] / "configs" / "lm" / "relora.yaml"
    main([subcommand, "--config", str(config), "--trainer.default_root_dir", str(tmp_path),
          f"--trainer.limit_{'val' if subcommand == 'validate' else 'test'}_batches", "2", *QUICK])
    assert f"{'val' if subcommand == 'validate' else 'test'}/ppl" in capsys.readouterr().out


def _train_losses(metrics: Path) -> list[float]:
    with metrics.open() as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def test_readme_command_lowers_the_training_loss(tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / "lm" / "lora.yaml"
    proc = subprocess.run(
        ["lr-lightning", "fit", "--config", str(config), "--trainer.max_steps", "20",
         "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = _train_losses(next(tmp_path.rglob("metrics.csv")))
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


@pytest.mark.parametrize(("override", "message"), [
    (["--model.strategy", "NoSuchStrategy"], "unknown strategy 'NoSuchStrategy'; allowed: "),
    (["--model.strategy.rank", "1000"], "rank=1000 is too large for layer 'model.blocks.0.attn.qkv'"),
    (['--model.strategy.target_modules=["*.attention.*"]'], "pattern '*.attention.*' matched no convertible module"),
    (["--data.init_args.path", "/no/such/corpus.txt"], "path '/no/such/corpus.txt' does not exist"),
    (["--model.strategy.rank", "0"], "rank must be an int >= 1 or a float in (0, 1]"),
])
def test_bad_input_is_one_clear_error_before_training(override, message, tmp_path, capsys):
    config = Path(__file__).resolve().parents[1] / "configs" / "lm" / "lora.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path), *override])
    assert message in str(exit_info.value.code) + capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing half-written



LORA = Path(__file__).resolve().parents[1] / "configs" / "lm" / "lora.yaml"
TINY = ["--model.init_args.n_layer", "1", "--model.init_args.model_dim", "16", "--model.init_args.block_size", "16",
        "--data.init_args.seq_len", "16", "--data.init_args.max_chars", "20000", "--model.strategy.rank", "2",
        "--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_a_failed_run_leaves_the_config_file_it_was_given_as_it_was(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copy(LORA, "config.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "config.yaml", "--trainer.logger", "false", *TINY,
              "--model.init_args.vocab_size", "100"])
    assert str(exit_info.value.code) == ("lr-lightning: error: ValueError: model vocab_size=100 is smaller than the "
                                         "tokenizer's vocabulary (256): set --model.init_args.vocab_size 256")
    assert (tmp_path / "config.yaml").read_text() == LORA.read_text()
    assert _files(tmp_path) == {"config.yaml"}


def test_the_resolved_config_goes_next_to_the_checkpoints_and_never_over_a_config_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(LORA, "config.yaml")
    main(["fit", "--config", "config.yaml", "--trainer.logger", "false", *TINY])
    resolved = (tmp_path / "checkpoints" / "config.yaml").read_text()
    assert resolved.startswith(RESOLVED_CONFIG_HEADER) and "model_dim: 16" in resolved
    with pytest.warns(UserWarning, match="not written to .*config.yaml': it is a --config input"):
        main(["fit", "--config", "config.yaml", "--trainer.logger", "false", "--trainer.enable_checkpointing",
              "false", *TINY])  # the config would go to default_root_dir: the input itself
    assert (tmp_path / "config.yaml").read_text() == LORA.read_text()


def test_the_resolved_config_goes_to_the_loggers_folder(tmp_path):
    main(["fit", "--config", str(LORA), "--trainer.default_root_dir", str(tmp_path), *TINY])
    assert (tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text().startswith(RESOLVED_CONFIG_HEADER)


def test_stage_two_rewrites_the_config_its_stage_one_wrote(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stages = []

    def stop_once_at_a_shrink(trainer):  # as if stage 1 had stopped after step 1 to shrink
        stages.append(trainer.ckpt_path)
        return str(Path(trainer.checkpoint_callback.dirpath) / "epoch=0-step=1.ckpt") if len(stages) == 1 else None

    monkeypatch.setattr(cli, "stage_two_checkpoint", stop_once_at_a_shrink)
    main(["fit", "--config", str(LORA), "--trainer.logger", "false", *TINY, "--trainer.max_steps", "2",
          "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_top_k=-1",
          "--trainer.callbacks.every_n_train_steps=1"])
    assert stages[0] is None and stages[1].endswith("step=1.ckpt")
    assert f"ckpt_path: {stages[1]}" in (tmp_path / "checkpoints" / "config.yaml").read_text()


def _checkpoint_file(path: Path, **extra: object) -> Path:
    torch.save({"state_dict": {"weight": torch.arange(50_000, dtype=torch.float32)}, "epoch": 0, **extra}, path)
    return path


def _truncated(path: Path) -> Path:
    data = _checkpoint_file(path).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _corrupted(path: Path) -> Path:
    data = bytearray(_checkpoint_file(path, **{"pytorch-lightning_version": "2.6.6"}).read_bytes())
    header = data.index(f"{path.stem}/data/0".encode()) - 30  # the zip's local header of the tensor's bytes
    data[header : header + 4] = bytes(4)
    path.write_bytes(bytes(data))
    return path


def _random_bytes(path: Path) -> Path:
    path.write_bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    return path


def _unsafe(path: Path) -> Path:
    torch.save({"state_dict": torch.nn.Linear(2, 2)}, path)
    return path


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p, "FileNotFoundError: checkpoint '{path}' does not exist"),
    (_truncated, "ValueError: checkpoint '{path}' is truncated or not a PyTorch checkpoint ("),
    (_corrupted, "ValueError: checkpoint '{path}' is truncated or not a PyTorch checkpoint (RuntimeError: "),
    (_random_bytes, "ValueError: checkpoint '{path}' is truncated or not a PyTorch checkpoint (unreadable pickle"),
    (_unsafe, "ValueError: checkpoint '{path}' holds a Python object of type torch.nn.modules.linear.Linear, "
              "which a safe load refuses"),
    (_checkpoint_file, "ValueError: checkpoint '{path}' is a PyTorch file but not a Lightning checkpoint"),
], ids=["missing", "truncated", "corrupted", "random_bytes", "unsafe_pickle", "not_lightning"])
def test_bad_ckpt_path_is_one_line_naming_the_file_before_anything_runs(make, message, tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.chdir(tmp_path)
    path = make(tmp_path / "last.ckpt")
    before = _files(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(LORA), *TINY, "--ckpt_path", str(path)])
    line = str(exit_info.value.code)
    assert line.startswith("lr-lightning: error: " + message.format(path=path)) and "\n" not in line
    assert "weights_only=False" not in line + capsys.readouterr().err
    assert _files(tmp_path) == before


def test_read_checkpoint_reads_a_good_file_and_names_a_bad_one(tmp_path):
    good = _checkpoint_file(tmp_path / "good.ckpt")
    for mmap in (False, True):
        assert read_checkpoint(good, mmap=mmap)["epoch"] == 0
    with pytest.raises(ValueError, match=r"checkpoint '.*bad\.ckpt' is truncated or not a PyTorch checkpoint"):
        read_checkpoint(_truncated(tmp_path / "bad.ckpt"), mmap=True)
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match=r"checkpoint folder '.*folder' holds no meta\.pt"):
        read_checkpoint(tmp_path / "folder")


def _binary_corpus(folder: Path) -> list[str]:
    (folder / "corpus.bin").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(128, 256)))
    return ["--data.init_args.path", str(folder / "corpus.bin")]


def _empty_corpus(folder: Path) -> list[str]:
    (folder / "empty.txt").write_text("")
    return ["--data.init_args.path", str(folder / "empty.txt")]


@pytest.mark.parametrize(("override", "message"), [
    (lambda _: ["--model.init_args.vocab_size", "100"],
     "ValueError: model vocab_size=100 is smaller than the tokenizer's vocabulary (256)"),
    (lambda _: ["--data.init_args.seq_len", "32"], "ValueError: data seq_len=32 exceeds the model's block_size=16"),
    (_binary_corpus, "ValueError: '{folder}/corpus.bin' is not UTF-8 text (byte 0, line 1: invalid start byte)"),
    (_empty_corpus, "ValueError: the train split has 0 tokens, fewer than seq_len + 1 = 17"),
], ids=["vocab_size", "seq_len", "binary_corpus", "empty_corpus"])
def test_setup_error_is_one_line_and_leaves_no_log_folder(override, message, tmp_path, capsys):
    data, logs = tmp_path / "data", tmp_path / "logs"
    data.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(LORA), "--trainer.default_root_dir", str(logs), *TINY, *override(data)])
    line = str(exit_info.value.code)
    assert line.startswith("lr-lightning: error: " + message.format(folder=data)) and "\n" not in line
    assert "Traceback" not in capsys.readouterr().err
    assert not logs.exists()


def test_resuming_with_another_strategy_is_one_line_and_leaves_no_new_log_folder(tmp_path):
    main(["fit", "--config", str(LORA), "--trainer.default_root_dir", str(tmp_path), *TINY])
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    before = _files(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(LORA), "--trainer.default_root_dir", str(tmp_path), *TINY,
              "--trainer.max_steps", "2", "--model.strategy", "ReLoRA", "--ckpt_path", str(checkpoint)])
    assert str(exit_info.value.code).startswith("lr-lightning: error: ValueError: the checkpoint was trained with "
                                                "lr_lightning.strategies.lora.LoRA")
    assert _files(tmp_path) == before and not (tmp_path / "lightning_logs" / "version_1").exists()


def test_an_error_raised_in_training_keeps_its_traceback(tmp_path, monkeypatch):
    from lr_lightning.tasks import LanguageModelingTask

    def training_step(self, batch, batch_idx):
        raise ValueError("a bug in training_step")

    monkeypatch.setattr(LanguageModelingTask, "training_step", training_step)
    with pytest.raises(ValueError, match="a bug in training_step"):
        main(["fit", "--config", str(LORA), "--trainer.default_root_dir", str(tmp_path), *TINY,
              "--trainer.num_sanity_val_steps", "0"])


LLAMA_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "lm").glob("llama_*.yaml"))
LLAMA_TINY = ["--model.init_args.size", "llama-tiny", "--model.init_args.block_size", "32", "--data.init_args.seq_len",
              "32", "--data.init_args.max_chars", "20000", "--data.init_args.bpe_vocab_size", "300",
              "--model.init_args.vocab_size", "300", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
              "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false"]


@pytest.mark.parametrize("config", LLAMA_CONFIGS, ids=lambda p: p.stem)
def test_llama_configs_train_a_llama_whose_projections_their_strategy_selects(config, tmp_path):
    assert {p.stem for p in LLAMA_CONFIGS} >= {f"llama_{s}" for s in ("full_rank", "lora", "relora_star", "sst",
                                                                     "inrank")}
    cli_run = cli.run_cli(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path), *LLAMA_TINY])
    task = cli_run.model
    assert type(task.model).__name__ == "LlamaForCausalLM" and task.trainer.global_step == 2
    selected = [row.name.split(".", 4)[-1] for row in task.strategy.report(task).rows]
    projections = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    if "inrank" not in config.stem:  # InRank converts the MLP only, as its paper
        projections = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", *projections]
    assert selected == projections * 2
    assert type(task.model.lm_head) is torch.nn.Linear
