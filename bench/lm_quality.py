"""Train the same small GPT on WikiText-2 with every strategy at one rank and token budget; tabulate quality.

    python bench/lm_quality.py --tiny          # 7 strategies, 300 steps each: under 10 min on 2 CPU cores
    python bench/lm_quality.py                 # the full budget (1000 steps each)
    python bench/lm_quality.py --only full_rank sst --steps 100 --data ../shared/data/wikitext-2
    python bench/lm_quality.py --tiny --lrs 1e-3 3e-3 1e-2   # a learning-rate sweep per strategy
    python bench/lm_quality.py --only full_rank sst --lrs 3e-3 1e-2 --steps 3000 --model-dim 64 --n-layer 2
    python bench/lm_quality.py --architecture llama --tiny --only full_rank sst   # the llama-9m LLaMA

Each strategy starts from its shipped ``configs/lm/<name>.yaml`` (optimizer, method hyperparameters,
model shape) with these overrides, so the comparison is at **equal rank** ``r`` (``--rank``, default
``model_dim / 8``) and an equal **token budget** (steps x batch x sequence length):

- ``lora``, ``relora_star``, ``sst``: rank ``r``; ReLoRA*'s merge interval equals SST's draw interval
  (``--interval``, default steps / 6), as in the SST paper, with the re-warmup at a fifth of it. SST
  re-factors every 2 draws: the paper's round of ``d / r`` draws would not end inside the budget.
- ``tdlrt``: ``init_rank = max_rank = r`` (capacity ``2 r``; truncation by ``tau`` may go lower).
- ``inrank``: rank-adaptive from its config (MLP layers only, as the paper); the switch to the fixed
  rank happens after half the budget (``switch_step``), since an epoch of WikiText-2 is the budget.
- ``svd_training``: full rank; sparsity from a third of the budget, energy pruning at two thirds.

With ``--lrs`` every strategy is trained at each learning rate (the config's otherwise); the table
gives each strategy's best run (lowest final validation loss) with its learning rate and the
perplexity at every rate, and the plot the best runs' curves. ``--model-dim``, ``--n-layer`` and
``--n-head`` change the GPT's shape for every strategy (a smaller model for longer).

``--architecture llama`` trains ``transformers``' LLaMA of preset ``--size`` (default ``llama-9m``) instead, from the
``configs/lm/llama_<name>.yaml`` configs (full_rank, lora, relora_star, sst, inrank), whose strategies convert the
seven projections of every decoder layer (InRank: the MLP's three); its vocabulary is the local BPE's and the
default rank is its hidden size / 8.

The corpus is tokenized once (byte-level BPE with a locally trained vocabulary, cached) and shared by
every run. The Markdown table (``lm_quality.md``) gives validation loss and perplexity on the
first ``final_val_batches`` validation batches, trainable parameters, optimizer-state elements, wall
time and the final ranks from ``strategy.report``; ``lm_quality.png`` plots validation loss over
training tokens per strategy.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_summary, markdown_table, optimizer_state_numel, plot_curves  # noqa: E402
from lr_lightning.data import TextDataModule  # noqa: E402
from lr_lightning.models.llama import LLAMA_SIZES  # noqa: E402
from lr_lightning.strategies import LowRankStrategy, strategy_from_config  # noqa: E402
from lr_lightning.tasks import LanguageModelingTask  # noqa: E402
from lr_lightning.tasks.language_modeling import DEFAULT_LLAMA_SIZE  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "lm"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
STRATEGIES = ("full_rank", "lora", "relora_star", "sst", "inrank", "tdlrt", "svd_training")
LLAMA_STRATEGIES = ("full_rank", "lora", "relora_star", "sst", "inrank")
"""The strategies with a ``configs/lm/llama_<name>.yaml``."""
TABLE_HEADER = ("strategy", "lr", "val loss", "val ppl", "ppl per lr", "trainable params", "optimizer state",
                "wall time", "final ranks (total / full)")


@dataclass(frozen=True)
class Budget:
    """Training length and evaluation of one run."""

    steps: int
    batch_size: int = 16
    seq_len: int = 128
    val_every: int = 50
    val_batches: int = 10
    final_val_batches: int = 40

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step


TINY = Budget(steps=300, val_every=50, val_batches=10, final_val_batches=40)
FULL = Budget(steps=1000, val_every=100, val_batches=20, final_val_batches=155)


def load_config(name: str, architecture: str = "gpt") -> dict[str, Any]:
    """``configs/lm/<name>.yaml`` (``llama_<name>.yaml`` for ``architecture="llama"``) as a dict."""
    path = CONFIGS / (f"llama_{name}.yaml" if architecture == "llama" else f"{name}.yaml")
    if not path.is_file():
        allowed = LLAMA_STRATEGIES if architecture == "llama" else STRATEGIES
        raise FileNotFoundError(f"no config {path}; allowed strategies: {allowed}")
    return yaml.safe_load(path.read_text())


def strategy_overrides(name: str, rank: int, steps: int, interval: int) -> dict[str, Any]:
    """The ``init_args`` that put strategy ``name`` at rank ``rank`` and schedule it for ``steps`` steps."""
    rewarm = interval // 5
    return {
        "full_rank": {},
        "lora": {"rank": rank},
        "relora_star": {"rank": rank, "merge_every": interval, "restart_warmup_steps": rewarm},
        "sst": {"rank": rank, "iteration_interval": interval, "restart_warmup_steps": rewarm, "round_length": 2},
        "inrank": {"switch_step": max(steps // 2, 1), "switch_epoch": None,
                   "warmup_steps": min(50, steps // 6), "check_every": max(1, min(10, steps // 30))},
        "tdlrt": {"init_rank": rank, "max_rank": rank},
        "svd_training": {"sparsify_at": steps // 3, "prune_at": max(2 * steps // 3, 1)},
    }[name]


def build_strategy(name: str, rank: int, steps: int, interval: int, architecture: str = "gpt") -> LowRankStrategy:
    """Strategy ``name`` from its config with :func:`strategy_overrides` applied."""
    config = load_config(name, architecture)["model"]["init_args"]["strategy"]
    init_args = {**config.get("init_args", {}), **strategy_overrides(name, rank, steps, interval)}
    return strategy_from_config({"class_path": config["class_path"], "init_args": init_args})


def build_task(name: str, strategy: LowRankStrategy, vocab_size: int, budget: Budget, lr: float | None = None,
               shape: dict[str, int] | None = None, size: str | None = None) -> LanguageModelingTask:
    """The config's GPT and AdamW around ``strategy``, with the vocabulary of the tokenizer; ``lr`` and
    ``shape`` (``n_layer``, ``n_head``, ``model_dim``) replace the config's where given. With ``size``, the
    ``llama_<name>.yaml`` config's LLaMA at that preset instead."""
    architecture = "gpt" if size is None else "llama"
    model_args = load_config(name, architecture)["model"]["init_args"]
    optimizer = model_args["optimizer"]
    if optimizer["class_path"] != "torch.optim.AdamW":
        raise ValueError(f"configs/lm/{name}.yaml: the benchmark expects torch.optim.AdamW, "
                         f"got {optimizer['class_path']}")
    kwargs = dict(optimizer.get("init_args", {}))
    kwargs["betas"] = tuple(kwargs.get("betas", (0.9, 0.999)))
    if lr is not None:
        kwargs["lr"] = lr
    model = ({"architecture": "llama", "size": size} if size is not None else
             {**{k: model_args[k] for k in ("n_layer", "n_head", "model_dim") if k in model_args}, **(shape or {})})
    return LanguageModelingTask(strategy=strategy, optimizer=lambda groups: torch.optim.AdamW(groups, **kwargs),
                                vocab_size=vocab_size, block_size=budget.seq_len,
                                warmup_steps=min(model_args.get("warmup_steps", 50), budget.steps // 10), **model)


class ValidationCurve(L.Callback):
    """Records ``(tokens seen, val/loss)`` after every validation run (not the sanity check)."""

    def __init__(self, tokens_per_step: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.points: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if not trainer.sanity_checking and loss is not None:
            self.points.append((trainer.global_step * self.tokens_per_step, float(loss)))


def rank_summary(strategy: LowRankStrategy, task: LanguageModelingTask) -> tuple[int, int]:
    """``(sum of the targeted layers' ranks, sum of their full ranks min(m, n))``."""
    rows = strategy.report(task).rows
    return sum(r.rank for r in rows), sum(min(r.shape) for r in rows)


def train(name: str, data: TextDataModule, budget: Budget, rank: int, interval: int, seed: int,
          progress: bool, lr: float | None = None, shape: dict[str, int] | None = None,
          size: str | None = None) -> dict[str, Any]:
    """Fit strategy ``name`` for ``budget`` on ``data`` (a LLaMA of preset ``size`` if given); return its figures
    and validation curve."""
    L.seed_everything(seed, verbose=False)
    architecture = "gpt" if size is None else "llama"
    strategy = build_strategy(name, rank, budget.steps, interval, architecture)
    task = build_task(name, strategy, data.tokenizer_vocab_size, budget, lr, shape, size)
    curve = ValidationCurve(budget.tokens_per_step)
    common = {"accelerator": "auto", "devices": 1, "logger": False, "enable_checkpointing": False,
              "enable_model_summary": False, "enable_progress_bar": progress}
    trainer = L.Trainer(max_steps=budget.steps, val_check_interval=min(budget.val_every, budget.steps),
                        check_val_every_n_epoch=None, limit_val_batches=budget.val_batches,
                        num_sanity_val_steps=0, callbacks=[curve], **common)
    start = time.perf_counter()
    trainer.fit(task, data)
    seconds = time.perf_counter() - start
    state = optimizer_state_numel(trainer.optimizers)
    final = L.Trainer(limit_val_batches=budget.final_val_batches, **common).validate(task, data, verbose=False)[0]
    report = strategy.report(task)
    total_rank, full_rank = rank_summary(strategy, task)
    lr = lr if lr is not None else load_config(name, architecture)["model"]["init_args"]["optimizer"]["init_args"]["lr"]
    return {"name": name, "lr": lr, "val_loss": final["val/loss"], "trainable": report.model_trainable,
            "total": report.model_total, "state": state, "seconds": seconds, "rank": total_rank,
            "full_rank": full_rank, "curve": curve.points}


def best_runs(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each strategy's run with the lowest final validation loss, in the order strategies first appear."""
    best: dict[str, dict[str, Any]] = {}
    for r in results:
        if r["name"] not in best or r["val_loss"] < best[r["name"]]["val_loss"]:
            best[r["name"]] = r
    return list(best.values())


def table_rows(results: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """One row per strategy (its best run) in :data:`TABLE_HEADER`'s columns."""
    rows = []
    for r in best_runs(results):
        sweep = ", ".join(f"{o['lr']:g}: {math.exp(o['val_loss']):.1f}" for o in results if o["name"] == r["name"])
        rows.append((r["name"], f"{r['lr']:g}", f"{r['val_loss']:.3f}", f"{math.exp(r['val_loss']):.1f}", sweep,
                     f"{r['trainable']:,} / {r['total']:,}", f"{r['state']:,}", f"{r['seconds']:.0f} s",
                     f"{r['rank']} / {r['full_rank']} ({r['rank'] / max(r['full_rank'], 1):.0%})"))
    return rows


def target_lines(results: list[dict[str, Any]]) -> list[str]:
    """The issue's quality targets on each strategy's best run, evaluated where the strategies they compare were run.

    SST closes ``(ppl(ReLoRA*) - ppl(SST)) / (ppl(ReLoRA*) - ppl(full))`` of the gap (target >= 50%);
    InRank's perplexity is within ``ppl(InRank) / ppl(full) - 1`` of full rank (target <= 5%) at a
    total rank of ``rank / full rank`` (target < 40%).
    """
    results = best_runs(results)
    ppl = {r["name"]: math.exp(r["val_loss"]) for r in results}
    lines = []
    if {"full_rank", "relora_star", "sst"} <= ppl.keys():
        gap = ppl["relora_star"] - ppl["full_rank"]
        closed = (ppl["relora_star"] - ppl["sst"]) / gap if gap > 0 else float("nan")
        beyond = " (over 100%: SST ends below full rank)" if closed > 1 else ""
        lines.append(f"- SST closes {closed:.0%} of the perplexity gap between ReLoRA* and full rank{beyond} "
                     f"(target >= 50%): {'met' if closed >= 0.5 else 'not met'}.")
    if {"full_rank", "inrank"} <= ppl.keys():
        inrank = next(r for r in results if r["name"] == "inrank")
        excess, share = ppl["inrank"] / ppl["full_rank"] - 1, inrank["rank"] / max(inrank["full_rank"], 1)
        lines.append(f"- InRank's perplexity is {excess:+.1%} from full rank (target <= +5%) at {share:.0%} of the "
                     f"full total rank (target < 40%): {'met' if excess <= 0.05 and share < 0.4 else 'not met'}.")
    return lines


def write_results(results: list[dict[str, Any]], out: Path, notes: list[str]) -> tuple[Path, Path]:
    """Write ``lm_quality.md`` (notes, the table, the targets), ``lm_quality.json`` (every run with its
    curve, for re-plotting runs made separately) and ``lm_quality.png`` (the best runs' curves) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_quality.json").write_text(json.dumps({"notes": notes, "results": results}, indent=1))
    table = markdown_table(TABLE_HEADER, table_rows(results))
    markdown = out / "lm_quality.md"
    markdown.write_text("\n".join(notes) + "\n\n" + table + "\n\n" + "\n".join(target_lines(results)) + "\n")
    curves = {f"{r['name']} (lr {r['lr']:g})": r["curve"] for r in best_runs(results)}
    plot = plot_curves(curves, "training tokens", "validation loss",
                       out / "lm_quality.png", title="\n".join(textwrap.wrap(notes[0], 80)) if notes else None)
    return markdown, plot


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help=f"the small budget ({TINY.steps} steps per strategy)")
    parser.add_argument("--steps", type=int, help="optimizer steps per strategy (overrides the budget's)")
    parser.add_argument("--rank", type=int, help="rank of every low-rank method (default model_dim / 8)")
    parser.add_argument("--interval", type=int, help="SST draw interval = ReLoRA* merge interval (default steps / 6)")
    parser.add_argument("--lrs", nargs="+", type=float,
                        help="learning rates to sweep per strategy (default: the config's)")
    parser.add_argument("--model-dim", type=int, help="GPT width of every strategy (default: the configs')")
    parser.add_argument("--n-layer", type=int, help="GPT depth of every strategy (default: the configs')")
    parser.add_argument("--n-head", type=int, help="attention heads of every strategy (default: the configs')")
    parser.add_argument("--only", nargs="+", choices=STRATEGIES,
                        help="strategies to run (default: every one with a config for --architecture)")
    parser.add_argument("--architecture", choices=("gpt", "llama"), default="gpt",
                        help="our GPT (configs/lm/<name>.yaml) or a LLaMA (configs/lm/llama_<name>.yaml)")
    parser.add_argument("--size", help=f"LLaMA preset of --architecture llama (default {DEFAULT_LLAMA_SIZE}; "
                                       f"one of {', '.join(LLAMA_SIZES)})")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="WikiText-style folder or a text file")
    parser.add_argument("--tokenizer", choices=("bpe", "byte"), default="bpe")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    parser.add_argument("--max-chars", type=int, help="keep only the first characters of each split")
    parser.add_argument("--val-batches", type=int, help="batches per validation during training")
    parser.add_argument("--final-val-batches", type=int, help="validation batches of the final figures")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bar")
    args = parser.parse_args(argv)
    for name in ("steps", "rank", "interval", "vocab_size", "max_chars", "val_batches", "final_val_batches",
                 "threads", "model_dim", "n_layer", "n_head"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.lrs is not None and min(args.lrs) <= 0:
        raise ValueError(f"--lrs must all be > 0, got {args.lrs}")
    if args.architecture == "llama":
        args.size = args.size or DEFAULT_LLAMA_SIZE
        if args.size not in LLAMA_SIZES:
            raise ValueError(f"--size {args.size!r} is no LLaMA preset; allowed: {', '.join(LLAMA_SIZES)}")
        shaped = [f"--{k.replace('_', '-')}" for k in ("model_dim", "n_layer", "n_head") if getattr(args, k)]
        if shaped:
            raise ValueError(f"{', '.join(shaped)} shape the GPT only; --architecture llama takes its shape "
                             f"from --size")
        missing = [name for name in args.only or () if name not in LLAMA_STRATEGIES]
        if missing:
            raise ValueError(f"--only {' '.join(missing)}: no configs/lm/llama_<name>.yaml; allowed with "
                             f"--architecture llama: {', '.join(LLAMA_STRATEGIES)}")
    elif args.size is not None:
        raise ValueError("--size names a LLaMA preset: it needs --architecture llama")
    args.only = args.only or list(LLAMA_STRATEGIES if args.architecture == "llama" else STRATEGIES)
    if not args.data.exists():
        raise FileNotFoundError(f"--data {args.data} does not exist (WikiText-2 lies in ../shared/data/wikitext-2)")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = TINY if args.tiny else FULL
    overrides = {"steps": args.steps, "val_batches": args.val_batches, "final_val_batches": args.final_val_batches}
    budget = replace(budget, **{k: v for k, v in overrides.items() if v is not None})
    shape = {k: getattr(args, k) for k in ("n_layer", "n_head", "model_dim") if getattr(args, k) is not None}
    size = args.size if args.architecture == "llama" else None
    model_args = {**load_config("full_rank")["model"]["init_args"], **shape}
    width = LLAMA_SIZES[size]["hidden_size"] if size else model_args["model_dim"]
    rank = args.rank or width // 8
    interval = args.interval or max(budget.steps // 6, 1)
    data = TextDataModule(path=str(args.data), tokenizer=args.tokenizer, bpe_vocab_size=args.vocab_size,
                          seq_len=budget.seq_len, batch_size=budget.batch_size, max_chars=args.max_chars)
    data.prepare_data()
    data.setup("fit")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = (f"LLaMA {size} ({LLAMA_SIZES[size]['num_hidden_layers']} layers, width {width})" if size else
             f"GPT {model_args['n_layer']} layers, width {model_args['model_dim']}")
    notes = [f"WikiText-2-style corpus {args.data.name}, {args.tokenizer} vocabulary {data.tokenizer_vocab_size}; "
             f"{model}; rank {rank}; "
             f"{budget.steps} steps x {budget.batch_size} x {budget.seq_len} = {budget.tokens:,} tokens",
             f"Command: `python bench/lm_quality.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
             f"Machine: {machine_summary(device)}",
             f"SST draw interval = ReLoRA* merge interval = {interval} steps; validation on "
             f"{budget.final_val_batches} batches of {budget.batch_size} x {budget.seq_len} tokens at the end."]
    print("\n".join(notes), flush=True)
    results, start = [], time.perf_counter()
    for name in args.only:
        for lr in args.lrs or [None]:
            print(f"--- {name}" + ("" if lr is None else f" lr {lr:g}"), flush=True)
            results.append(train(name, data, budget, rank, interval, args.seed, progress=not args.no_progress,
                                 lr=lr, shape=shape, size=size))
            markdown, plot = write_results(results, args.out, notes)
    notes.append(f"Total wall time: {(time.perf_counter() - start) / 60:.1f} min for {len(results)} runs.")
    markdown, plot = write_results(results, args.out, notes)
    print(markdown.read_text())
    print(f"wrote {markdown} and {plot}")
    return results


if __name__ == "__main__":
    main()
