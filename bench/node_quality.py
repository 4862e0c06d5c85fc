"""Hyperbolic node classification (HyboNet) with every strategy at one small rank, on Cora and Disease.

    python bench/node_quality.py --out bench/results/node

Trains ``configs/node/<strategy>.yaml`` on each dataset with HyboNet's per-dataset settings (``gcn``
is the dense Euclidean GCN baseline), keeps the checkpoint of the best validation accuracy (as HGCN
and HyboNet select), tests it, and writes a Markdown table (test accuracy and macro-F1, trainable
parameters, wall time) and a PNG of test accuracy per strategy and dataset. Extra arguments after
``--`` go to every run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table  # noqa: E402
from lr_lightning.cli import run_cli  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "node"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STRATEGIES = ("full_rank", "lora", "relora_star", "sst", "gcn", "relora", "inrank", "tdlrt", "svd_training")
RANKED = {"lora", "relora", "relora_star", "sst"}
DATASETS = {
    # HyboNet's run.cora.nc.sh uses dropout 0.9; with our AdamW-style decay 0.5 validates better.
    "cora": ["--data.init_args.dataset", "cora", "--data.init_args.root", str(DATA / "planetoid"),
             "--model.init_args.in_features", "1433", "--model.init_args.num_classes", "7",
             "--model.init_args.dropout", "0.5", "--model.init_args.loss", "margin", "--model.init_args.margin", "1.0",
             "--trainer.max_epochs", "200"],
    # HyboNet's run.disease.nc.sh: 3 convolutions, lr 0.005, dropout 0.1, no decay, margin 2, clip 0.5;
    # identity features (the feature file is not available offline); HGCN's split (leak-free on 2 classes).
    "disease": ["--data.init_args.dataset", "disease", "--data.init_args.root", str(DATA / "hgcn"),
                "--data.init_args.features", "identity", "--data.init_args.split", "paper",
                "--model.init_args.in_features", "1044", "--model.init_args.num_classes", "2",
                "--model.init_args.num_layers", "3", "--model.init_args.dropout", "0.1",
                "--model.init_args.loss", "margin", "--model.init_args.margin", "2.0",
                "--model.init_args.optimizer.init_args.lr", "0.005",
                "--model.init_args.optimizer.init_args.weight_decay", "0.0",
                "--trainer.gradient_clip_val", "0.5", "--trainer.max_epochs", "300"],
}


def run(name: str, dataset: str, rank: int, seed: int, extra: list[str]) -> dict:
    """Fit one config on one dataset; test the best-validation checkpoint; return the figures.

    ``gcn`` is ``full_rank.yaml`` with the Euclidean GCN and cross-entropy, the baseline of the others.
    """
    start = time.perf_counter()
    rank_args = ["--model.init_args.strategy.init_args.rank", str(rank)] if name in RANKED else []
    euclidean = ["--model.init_args.architecture", "gcn", "--model.init_args.loss", "cross_entropy"]
    config = CONFIGS / f"{'full_rank' if name == 'gcn' else name}.yaml"
    with tempfile.TemporaryDirectory() as checkpoints:
        cli = run_cli(save_config_callback=None, args=[
            "fit", "--config", str(config), *DATASETS[dataset], *rank_args, *(euclidean if name == "gcn" else []),
            "--seed_everything", str(seed), "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", checkpoints, "--trainer.logger", "false", *extra])
        result = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)[0]
    report = cli.model.strategy.report(cli.model)
    return {"name": name, "dataset": dataset, "seed": seed, "acc": result["test/acc"], "f1": result["test/f1"],
            "val": float(cli.trainer.checkpoint_callback.best_model_score), "trainable": report.model_trainable,
            "total": report.model_total, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/node"))
    parser.add_argument("--only", nargs="*", default=list(STRATEGIES[:5]), choices=STRATEGIES)
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--rank", type=int, default=4, help="rank of LoRA, ReLoRA(*) and SST (of 16)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    runs = [run(name, dataset, args.rank, seed, extra)
            for dataset in args.datasets for name in args.only for seed in args.seeds]

    rows = []
    summary: dict[tuple[str, str], float] = {}
    for dataset in args.datasets:
        for name in args.only:
            runs_of = [r for r in runs if r["dataset"] == dataset and r["name"] == name]
            acc, f1, val = (np.array([r[k] for r in runs_of]) * 100 for k in ("acc", "f1", "val"))
            spread = (lambda a: f" ± {a.std():.1f}") if len(runs_of) > 1 else (lambda a: "")
            summary[dataset, name] = acc.mean()
            rows.append((dataset, name, f"{acc.mean():.1f}{spread(acc)}", f"{f1.mean():.1f}{spread(f1)}",
                         f"{val.mean():.1f}", f"{runs_of[0]['trainable']:,} / {runs_of[0]['total']:,}",
                         f"{np.mean([r['seconds'] for r in runs_of]):.0f} s"))
    table = markdown_table(("dataset", "strategy", "test acc", "test macro-F1", "best val acc",
                            "trainable / total params", "wall time"), rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "node_quality.md").write_text(table + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(args.only)
    for i, name in enumerate(args.only):
        xs = np.arange(len(args.datasets)) + i * width
        ax.bar(xs, [summary[d, name] for d in args.datasets], width, label=name)
    ax.set_xticks(np.arange(len(args.datasets)) + 0.4 - width / 2, args.datasets)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(bottom=50)
    ax.set_title(f"HyboNet, rank {args.rank} of 16")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "node_quality.png", dpi=120)
    print(f"wrote {args.out / 'node_quality.md'} and {args.out / 'node_quality.png'}")


if __name__ == "__main__":
    main()
