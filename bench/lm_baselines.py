"""Train the language-modeling configs of every strategy side by side and tabulate them.

    python bench/lm_baselines.py --max-steps 600 --out bench/results

Prints a Markdown table (validation loss and perplexity, trainable parameters, optimizer-state
elements, wall time) and writes a PNG of validation loss over optimizer steps per strategy.
Extra arguments after ``--`` go to every run, e.g. ``-- --data.init_args.path ../shared/data/wikitext-2``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table, optimizer_state_numel, plot_curves  # noqa: E402
from lr_lightning.cli import run_cli  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "lm"
STRATEGIES = ("full_rank", "lora", "relora", "relora_star", "sst", "inrank", "tdlrt", "svd_training")


def run(name: str, max_steps: int, out: Path, extra: list[str]) -> dict:
    """Fit one config; return its figures and validation curve."""
    start = time.perf_counter()
    cli = run_cli(save_config_callback=None, args=[
        "fit", "--config", str(CONFIGS / f"{name}.yaml"), "--trainer.max_steps", str(max_steps),
        "--trainer.val_check_interval", str(max(1, max_steps // 6)), "--trainer.check_val_every_n_epoch", "null",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(out),
        "--trainer.logger.name", name, *extra])
    seconds = time.perf_counter() - start
    rows = list(csv.DictReader(Path(cli.trainer.logger.log_dir, "metrics.csv").open()))
    curve = [(int(r["step"]), float(r["val/loss"])) for r in rows if r.get("val/loss")]
    report = cli.model.strategy.report(cli.model)
    state = optimizer_state_numel(cli.trainer.optimizers)
    return {"name": name, "val_loss": curve[-1][1], "trainable": report.model_trainable,
            "total": report.model_total, "state": state, "seconds": seconds, "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--only", nargs="*", default=list(STRATEGIES), choices=STRATEGIES)
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    results = [run(name, args.max_steps, args.out, extra) for name in args.only]

    header = ("strategy", "val loss", "val ppl (per token)", "trainable params", "optimizer state", "wall time")
    table = markdown_table(header, [(r["name"], f"{r['val_loss']:.3f}", f"{math.exp(r['val_loss']):.2f}",
                                     f"{r['trainable']:,} / {r['total']:,}", f"{r['state']:,}",
                                     f"{r['seconds']:.0f} s") for r in results])
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lm_baselines.md").write_text(table + "\n")
    plot_curves({r["name"]: r["curve"] for r in results}, "optimizer step", "validation loss",
                args.out / "lm_baselines.png")
    print(f"wrote {args.out / 'lm_baselines.md'} and {args.out / 'lm_baselines.png'}")


if __name__ == "__main__":
    main()
