"""bench/lm_quality.py: equal-rank strategies from the configs, and a small run that writes the table and plot."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import lm_quality as bench  # noqa: E402
from lr_lightning.data.text import default_corpus  # noqa: E402
from lr_lightning.tasks import LanguageModelingTask  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(default_corpus()[:60_000])
    return path


def test_small_run_writes_a_table_with_one_row_per_strategy_and_a_plot(corpus, tmp_path):
    argv = ["--only", "full_rank", "lora", "--steps", "4", "--data", str(corpus), "--tokenizer", "byte",
            "--val-batches", "1", "--final-val-batches", "1", "--out", str(tmp_path), "--no-progress",
            "--threads", "1"]
    results = bench.main(argv)
    table = (tmp_path / "lm_quality.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0] == "| " + " | ".join(bench.TABLE_HEADER) + " |"
    assert [line.split(" | ")[0] for line in lines[1:]] == ["| full_rank", "| lora"]
    assert "rank 16; 4 steps x 16 x 128 = 8,192 tokens" in table and "torch.get_num_threads() = 1" in table
    assert (tmp_path / "lm_quality.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((tmp_path / "lm_quality.json").read_text())["results"][1]["name"] == "lora"
    full, lora = results
    assert [tokens for tokens, _ in full["curve"]] == [4 * 16 * 128]
    assert lora["trainable"] < full["trainable"] and lora["state"] < full["state"]
    assert (full["rank"], lora["rank"]) == (full["full_rank"], 16 * 16)  # 16 projections at rank 16


def test_learning_rate_sweep_reports_each_strategys_best_run_with_every_rate(corpus, tmp_path):
    argv = ["--only", "full_rank", "--lrs", "1e-4", "3e-2", "--steps", "3", "--data", str(corpus), "--tokenizer",
            "byte", "--val-batches", "1", "--final-val-batches", "1", "--out", str(tmp_path), "--no-progress",
            "--threads", "1", "--model-dim", "32", "--n-layer", "1", "--n-head", "2"]
    results = bench.main(argv)
    assert [r["lr"] for r in results] == [1e-4, 3e-2]
    best = min(results, key=lambda r: r["val_loss"])
    rows = [line for line in (tmp_path / "lm_quality.md").read_text().splitlines() if line.startswith("| full")]
    assert len(rows) == 1 and rows[0].split(" | ")[1] == f"{best['lr']:g}"
    assert f"0.0001: {math.exp(results[0]['val_loss']):.1f}, 0.03: {math.exp(results[1]['val_loss']):.1f}" in rows[0]
    assert results[0]["trainable"] < 100_000  # the 1-layer, 32-wide GPT, not the configs' 4 x 128


def test_best_runs_keep_the_lowest_loss_per_strategy_in_first_seen_order():
    runs = [{"name": "a", "val_loss": 3.0}, {"name": "b", "val_loss": 2.0}, {"name": "a", "val_loss": 2.5}]
    assert bench.best_runs(runs) == [runs[2], runs[1]]


def test_low_rank_strategies_share_the_rank_and_the_interval():
    rank, steps, interval = 8, 120, 20
    strategies = {name: bench.build_strategy(name, rank, steps, interval) for name in bench.STRATEGIES}
    assert strategies["lora"].rank == strategies["relora_star"].rank == strategies["sst"].rank == rank
    assert strategies["tdlrt"].max_rank == strategies["tdlrt"].init_rank == rank
    assert strategies["relora_star"].merge_every == strategies["sst"].iteration_interval == interval
    assert strategies["relora_star"].reset == "full" and strategies["relora_star"].warm_start_steps == 0
    assert strategies["inrank"].switch_step == steps // 2
    assert 0 < strategies["svd_training"].sparsify_at < strategies["svd_training"].prune_at < steps
    for name in ("lora", "relora_star", "sst", "tdlrt"):
        task = LanguageModelingTask(strategy=strategies[name], n_layer=1, model_dim=64, n_head=2)
        assert {row.rank for row in strategies[name].report(task).rows} == {rank}, name


def test_targets_report_the_share_of_the_gap_sst_closes_and_inrank_against_full_rank():
    def result(name, ppl, rank=0, full_rank=1):
        return {"name": name, "val_loss": math.log(ppl), "rank": rank, "full_rank": full_rank}

    lines = bench.target_lines([result("full_rank", 100), result("relora_star", 140), result("sst", 110),
                                result("inrank", 104, rank=300, full_rank=1000), result("sst", 180)])
    assert lines[0].startswith("- SST closes 75% of the perplexity gap") and lines[0].endswith(": met.")
    assert "+4.0% from full rank" in lines[1] and "at 30% of the full total rank" in lines[1]
    assert lines[1].endswith(": met.")
    missed = bench.target_lines([result("full_rank", 100), result("relora_star", 140), result("sst", 130)])
    assert missed == ["- SST closes 25% of the perplexity gap between ReLoRA* and full rank (target >= 50%): not met."]


def test_task_takes_the_config_optimizer_and_shape():
    budget = bench.Budget(steps=100)
    task = bench.build_task("sst", bench.build_strategy("sst", 16, 100, 20), 300, budget)
    assert (task.hparams.n_layer, task.hparams.model_dim, task.hparams.vocab_size) == (4, 128, 300)
    optimizer = task.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == 0.003


@pytest.mark.parametrize(("argv", "error"), [(["--data", "/no/such/folder"], FileNotFoundError),
                                             (["--steps", "0"], ValueError), (["--rank", "0"], ValueError)])
def test_bad_arguments_fail_before_training(argv, error, corpus):
    argv = argv if "--data" in argv else [*argv, "--data", str(corpus)]
    with pytest.raises(error, match="--"):
        bench.parse_args(argv)


def test_llama_run_trains_the_preset_from_the_llama_configs(corpus, tmp_path):
    argv = ["--architecture", "llama", "--size", "llama-tiny", "--only", "full_rank", "sst", "--steps", "2",
            "--data", str(corpus), "--tokenizer", "byte", "--val-batches", "1", "--final-val-batches", "1",
            "--out", str(tmp_path), "--no-progress", "--threads", "1"]
    full, sst = bench.main(argv)
    table = (tmp_path / "lm_quality.md").read_text()
    assert "LLaMA llama-tiny (2 layers, width 64); rank 8;" in table
    assert full["full_rank"] == sst["full_rank"] == 2 * 7 * 64  # 7 projections per layer, min(m, n) = 64
    assert sst["rank"] == 2 * 7 * 8 and sst["trainable"] < full["trainable"]


def test_llama_strategies_convert_the_llama_projection_names():
    strategy = bench.build_strategy("lora", 8, 100, 20, "llama")
    task = bench.build_task("lora", strategy, 300, bench.Budget(steps=100), size="llama-tiny")
    assert type(task.model).__name__ == "LlamaForCausalLM" and task.hparams.vocab_size == 300
    assert len(strategy.report(task).rows) == 14


@pytest.mark.parametrize(("argv", "message"), [
    (["--architecture", "llama", "--only", "tdlrt"], "no configs/lm/llama_<name>.yaml"),
    (["--architecture", "llama", "--size", "llama-7m"], "--size 'llama-7m' is no LLaMA preset"),
    (["--architecture", "llama", "--model-dim", "64"], "--model-dim shape the GPT only"),
    (["--size", "llama-9m"], "--size names a LLaMA preset: it needs --architecture llama"),
])
def test_bad_llama_arguments_fail_before_training(argv, message, corpus):
    with pytest.raises(ValueError, match=message):
        bench.parse_args([*argv, "--data", str(corpus)])
