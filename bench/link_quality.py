"""Hyperbolic link prediction (HyboNet) with full rank, LoRA, ReLoRA* and SST at one small rank, on Disease-LP and Cora.

    python bench/link_quality.py --out bench/results/link

Trains ``configs/link/<strategy>.yaml`` on each dataset with HyboNet's per-dataset settings
(``gcn/run.<dataset>.lp.sh``), keeps the checkpoint of the best validation ``(ROC-AUC + AP) / 2`` (HyboNet's
selection), tests it, and writes a Markdown table (test ROC-AUC and AP, mean ± std over seeds, trainable
parameters, wall time), the gap to full rank that SST closes over ReLoRA*,
``(SST - ReLoRA*) / (full - ReLoRA*)``, and a PNG of test ROC-AUC; every run is appended to
``link_quality_runs.jsonl`` as it ends. The edge split is HGCN's (seed 1234) for
every run; ``--seeds`` seed the model, dropout and training negatives. Extra arguments after ``--`` go to every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "link"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STRATEGIES = ("full_rank", "lora", "relora_star", "sst")
RANKED = {"lora", "relora_star", "sst"}
MODEL_DIM = 16
DATASETS = {
    # run.disease.lp.sh: lr 0.005, no decay, margin 30, dropout 0, clip 0.5, features not normalized;
    # 5000 epochs with patience 500 there, 500 here (CPU time).
    "disease_lp": ["--data.init_args.dataset", "disease_lp", "--data.init_args.root", str(DATA / "hgcn"),
                   "--data.init_args.normalize_features", "false", "--model.init_args.in_features", "11",
                   "--model.init_args.margin", "30", "--model.init_args.dropout", "0.0",
                   "--model.init_args.optimizer.init_args.lr", "0.005",
                   "--model.init_args.optimizer.init_args.weight_decay", "0.0", "--trainer.max_epochs", "500"],
    # run.cora.lp.sh: lr 0.02, weight decay 0.001, margin 0.1, dropout 0.7, clip 0.5; 150 epochs here (CPU time).
    "cora": ["--data.init_args.dataset", "cora", "--data.init_args.root", str(DATA / "planetoid"),
             "--model.init_args.in_features", "1433", "--model.init_args.margin", "0.1",
             "--model.init_args.dropout", "0.7", "--model.init_args.optimizer.init_args.lr", "0.02",
             "--model.init_args.optimizer.init_args.weight_decay", "0.001", "--trainer.max_epochs", "150"],
}


def run(name: str, dataset: str, rank: int, seed: int, extra: list[str]) -> dict:
    """Fit one config on one dataset; test the best-validation checkpoint; return the figures."""
    from lr_lightning.cli import run_cli

    start = time.perf_counter()
    rank_args = ["--model.init_args.strategy.init_args.rank", str(rank)] if name in RANKED else []
    with tempfile.TemporaryDirectory() as checkpoints:
        cli = run_cli(save_config_callback=None, args=[
            "fit", "--config", str(CONFIGS / f"{name}.yaml"), *DATASETS[dataset], *rank_args,
            "--model.init_args.model_dim", str(MODEL_DIM), "--seed_everything", str(seed),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", checkpoints, "--trainer.logger", "false", *extra])
        result = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)[0]
    report = cli.model.strategy.report(cli.model)
    return {"name": name, "dataset": dataset, "seed": seed, "roc_auc": result["test/roc_auc"],
            "ap": result["test/ap"], "val": float(cli.trainer.checkpoint_callback.best_model_score),
            "trainable": report.model_trainable, "total": report.model_total,
            "seconds": time.perf_counter() - start}


def mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` in percent (population std over seeds; no ``±`` for one value)."""
    a = np.asarray(values, dtype=float) * 100
    return f"{a.mean():.1f} ± {a.std():.1f}" if len(a) > 1 else f"{a.mean():.1f}"


def gap_closure(full: float, relora_star: float, sst: float) -> float | None:
    """``(SST - ReLoRA*) / (full - ReLoRA*)``: the part of ReLoRA*'s gap to full rank that SST closes
    (``None`` when full rank does not beat ReLoRA*, so there is no gap to close)."""
    gap = full - relora_star
    return (sst - relora_star) / gap if gap > 0 else None


def tables(runs: list[dict], datasets: Sequence[str], names: Sequence[str]) -> str:
    """The results table and, with full rank, ReLoRA* and SST among ``names``, the gap-closure table."""
    rows, means = [], {}
    for dataset in datasets:
        for name in names:
            of = [r for r in runs if r["dataset"] == dataset and r["name"] == name]
            if not of:
                raise ValueError(f"no runs of {name!r} on {dataset!r}")
            means[dataset, name] = {k: float(np.mean([r[k] for r in of])) for k in ("roc_auc", "ap")}
            rows.append((dataset, name, mean_std([r["roc_auc"] for r in of]), mean_std([r["ap"] for r in of]),
                         f"{np.mean([r['val'] for r in of]) * 100:.1f}", f"{of[0]['trainable']:,} / {of[0]['total']:,}",
                         len(of), f"{np.mean([r['seconds'] for r in of]):.0f} s"))
    text = markdown_table(("dataset", "strategy", "test ROC-AUC", "test AP", "best val (AUC+AP)/2",
                           "trainable / total params", "seeds", "wall time / run"), rows)
    if not {"full_rank", "relora_star", "sst"} <= set(names):
        return text
    closure_rows, closures = [], {"roc_auc": [], "ap": []}
    for dataset in datasets:
        cells = []
        for metric in ("roc_auc", "ap"):
            closure = gap_closure(*(means[dataset, n][metric] for n in ("full_rank", "relora_star", "sst")))
            cells.append("no gap" if closure is None else f"{closure * 100:.1f}%")
            if closure is not None:
                closures[metric].append(closure)
        closure_rows.append((dataset, *cells))
    closure_rows.append(("average", *(f"{np.mean(c) * 100:.1f}%" if c else "no gap" for c in closures.values())))
    return text + "\n\nGap to full rank closed by SST over ReLoRA*, (SST - ReLoRA*) / (full - ReLoRA*):\n\n" + \
        markdown_table(("dataset", "ROC-AUC", "AP"), closure_rows)


def plot(runs: list[dict], datasets: Sequence[str], names: Sequence[str], rank: int, path: Path) -> None:
    """Bars of test ROC-AUC (mean, std as error bars) per strategy and dataset."""
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [[r["roc_auc"] * 100 for r in runs if r["dataset"] == d and r["name"] == name] for d in datasets]
        ax.bar(np.arange(len(datasets)) + i * width, [np.mean(v) for v in values], width,
               yerr=[np.std(v) for v in values], capsize=3, label=name)
    ax.set_xticks(np.arange(len(datasets)) + 0.4 - width / 2, datasets)
    ax.set_ylabel("test ROC-AUC (%)")
    ax.set_ylim(bottom=50)
    ax.set_title(f"HyboNet link prediction, rank {rank} of {MODEL_DIM}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's options and the extra arguments for every run; bad values stop with a usage error."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/link"))
    parser.add_argument("--only", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--rank", type=int, default=4, help=f"rank of LoRA, ReLoRA* and SST (of {MODEL_DIM})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args, extra = parser.parse_known_args(argv)
    if not 1 <= args.rank < MODEL_DIM:
        parser.error(f"--rank must be in [1, {MODEL_DIM - 1}] (the points are {MODEL_DIM} wide), got {args.rank}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    return args, [a for a in extra if a != "--"]


def main(argv: list[str] | None = None) -> None:
    args, extra = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "link_quality_runs.jsonl"
    log.write_text("")
    runs = []
    for dataset in args.datasets:
        for seed in args.seeds:  # every strategy of a seed before the next seed, so a cut-short log is comparable
            for name in args.only:
                runs.append(run(name, dataset, args.rank, seed, extra))
                with log.open("a") as f:
                    f.write(json.dumps(runs[-1]) + "\n")
    text = tables(runs, args.datasets, args.only)
    print(text)
    (args.out / "link_quality.md").write_text(text + "\n")
    plot(runs, args.datasets, args.only, args.rank, args.out / "link_quality.png")
    print(f"wrote {args.out / 'link_quality.md'} and {args.out / 'link_quality.png'}")


if __name__ == "__main__":
    main()
