"""Every shipped config parses and runs; the README's main command trains; bad input fails early."""

import csv
import subprocess
from pathlib import Path

import pytest
from conftest import translation_extra_error

from lr_lightning.cli import main

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

