"""bench/image_quality.py: a few-step run writes one table row per setting and every run to the JSON; the pipeline
mode trains ResNet-20 (SVD training) and VGG-11 (TDLRT) on generated CIFAR-10-format data."""

import json
import pickle
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import image_quality as bench  # noqa: E402
from lr_lightning.data import ImageDataModule  # noqa: E402
from lr_lightning.strategies import SVDTraining  # noqa: E402


def _table(path: Path) -> list[list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


def test_a_small_run_writes_the_table_and_the_json(tmp_path):
    argv = ["--seeds", "0", "--only", "full_rank", "tdlrt", "--taus", "0.09", "0.45", "--steps", "3",
            "--test-batches", "1", "--threads", "1", "--out", str(tmp_path)]
    results = bench.main(argv)
    table = _table(tmp_path / "image_quality.md")
    assert table[0] == list(bench.TABLE_HEADER)
    assert [row[:2] for row in table[1:]] == [["full_rank", "dense"], ["tdlrt", "tau 0.09"], ["tdlrt", "tau 0.45"]]
    full, *tdlrt = table[1:]
    assert full[3] == "[20, 50, 500]" and full[4] == "0.0% / 0.0%" and full[6] == "1.000"
    for row in tdlrt:
        ranks = [int(r) for r in row[3].strip("[]").split(",")]
        assert all(1 <= r <= f for r, f in zip(ranks, (10, 25, 250)))  # max_rank 0.5 of each layer
        assert 0 < float(row[6]) < 1
    text = (tmp_path / "image_quality.md").read_text()
    assert "DLRT (Schotthoefer et al., NeurIPS 2022" in text and "[10, 23, 62]" in text and "98.82 ± 0.06" in text
    saved = json.loads((tmp_path / "image_quality.json").read_text())
    assert [(r["method"], r["setting"], r["seed"], r["steps"]) for r in saved["results"]] == [
        ("full_rank", "dense", 0, 3), ("tdlrt", "tau 0.09", 0, 3), ("tdlrt", "tau 0.45", 0, 3)]
    assert saved["results"] == json.loads(json.dumps(results))
    assert saved["results"][1]["overrides"] == {"tau": 0.09}
    for run in saved["results"]:
        assert run["flops_dense"] == 4_586_000 and 0 <= run["test_acc"] <= 1
        assert run["conv_compression_test"] == pytest.approx(1 - run["conv_test"] / run["conv_dense"])


def test_svd_training_stages_are_placed_in_steps_of_the_run():
    task = bench.build_task("svd_training", {"sparsity_weight": 0.1}, total_steps=100)
    strategy = task.strategy
    assert isinstance(strategy, SVDTraining) and strategy.sparsity_weight == 0.1
    assert (strategy.unit, strategy.sparsify_at, strategy.prune_at) == ("step", 20, 70)
    assert task.hparams.schedule == "step"  # from configs/image/svd_training.yaml


def test_the_generated_cifar_folder_reads_as_cifar10(tmp_path):
    root = bench.write_cifar10_folder(tmp_path, per_batch=20)
    data = ImageDataModule(dataset="cifar10", root=str(root), batch_size=4)
    data.setup("fit")
    assert (data.in_channels, data.image_size, data.num_classes, data.labels_found) == (3, 32, 10, 10)
    assert len(data.datasets["train"]) + len(data.datasets["val"]) == 100 and len(data.datasets["test"]) == 20
    batch = pickle.loads((root / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert batch["data"].shape == (20, 3072)


def test_pipeline_mode_trains_resnet20_with_svd_training_and_vgg11_with_tdlrt(tmp_path):
    argv = ["--pipeline", "--pipeline-steps", "2", "--pipeline-images", "16", "--pipeline-batch-size", "8",
            "--test-batches", "1", "--threads", "1", "--seeds", "0", "--out", str(tmp_path)]
    resnet, vgg = bench.main(argv)
    assert (resnet["architecture"], resnet["method"], vgg["architecture"], vgg["method"]) == (
        "resnet20", "svd_training", "vgg11", "tdlrt")
    assert resnet["steps"] == vgg["steps"] == 2
    assert resnet["converted"] == 18  # every 3x3 conv but the 3-channel stem; option-A shortcuts have no conv
    assert resnet["ranks"]["conv1"] == 16  # the stem stays dense
    assert vgg["converted"] == 8 and vgg["flops_ratio"] < 1
    table = _table(tmp_path / "image_pipeline.md")
    assert table[0] == list(bench.PIPELINE_HEADER) and [row[:2] for row in table[1:]] == [
        ["resnet20", "svd_training"], ["vgg11", "tdlrt"]]
    assert len(json.loads((tmp_path / "image_pipeline.json").read_text())["results"]) == 2
