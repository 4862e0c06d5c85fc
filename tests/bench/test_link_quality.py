"""bench/link_quality.py: the gap closure, the tables of mean ± std over seeds, and argument errors (no training)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import link_quality as bench  # noqa: E402


def _runs() -> list[dict]:
    """Fake results: ROC-AUC per (strategy, seed) on two datasets; AP is ROC-AUC - 0.02."""
    auc = {"full_rank": (0.90, 0.92), "lora": (0.80, 0.82), "relora_star": (0.84, 0.86), "sst": (0.89, 0.89)}
    return [{"name": name, "dataset": dataset, "seed": seed, "roc_auc": values[seed] + shift,
             "ap": values[seed] + shift - 0.02, "val": 0.5, "trainable": 100, "total": 120, "seconds": 3.0}
            for dataset, shift in (("disease_lp", 0.0), ("cora", -0.1)) for name, values in auc.items()
            for seed in (0, 1)]


def test_gap_closure_is_the_share_of_relora_stars_gap_that_sst_closes():
    assert bench.gap_closure(full=0.9, relora_star=0.8, sst=0.875) == pytest.approx(0.75)
    assert bench.gap_closure(full=0.9, relora_star=0.8, sst=0.95) == pytest.approx(1.5)  # SST beats full rank
    assert bench.gap_closure(full=0.8, relora_star=0.8, sst=0.9) is None
    assert bench.gap_closure(full=0.7, relora_star=0.8, sst=0.9) is None


def test_tables_give_mean_and_std_over_seeds_and_the_gap_closure():
    text = bench.tables(_runs(), ["disease_lp", "cora"], list(bench.STRATEGIES))
    rows = {tuple(c.strip() for c in line.strip("|").split(" | ")[:4]) for line in text.splitlines()
            if line.startswith("| disease_lp") or line.startswith("| cora")}
    assert ("disease_lp", "full_rank", "91.0 ± 1.0", "89.0 ± 1.0") in rows
    assert ("cora", "sst", "79.0 ± 0.0", "77.0 ± 0.0") in rows
    # full 0.91, ReLoRA* 0.85, SST 0.89 on both datasets and metrics: (0.89 - 0.85) / (0.91 - 0.85) = 66.7%
    closure = [line for line in text.splitlines() if line.startswith(("| disease_lp | 66", "| cora | 66", "| average"))]
    assert closure == ["| disease_lp | 66.7% | 66.7% |", "| cora | 66.7% | 66.7% |", "| average | 66.7% | 66.7% |"]


def test_tables_without_the_three_strategies_have_no_gap_closure_and_missing_runs_are_named():
    assert "Gap to full rank" not in bench.tables(_runs(), ["cora"], ["full_rank", "sst"])
    with pytest.raises(ValueError, match="no runs of 'sst' on 'airport'"):
        bench.tables(_runs(), ["airport"], ["sst"])


@pytest.mark.parametrize("argv, message", [
    (["--rank", "16"], "--rank must be in [1, 15]"),
    (["--rank", "0"], "--rank must be in [1, 15]"),
    (["--seeds", "1", "1"], "--seeds must be distinct"),
    (["--only", "gcn"], "invalid choice: 'gcn'"),
    (["--datasets", "pubmed"], "invalid choice: 'pubmed'"),
])
def test_bad_arguments_stop_with_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_extra_arguments_after_the_separator_go_to_every_run():
    args, extra = bench.parse_args(["--seeds", "3", "--", "--trainer.max_epochs", "5"])
    assert args.seeds == [3] and args.rank == 4 and extra == ["--trainer.max_epochs", "5"]
