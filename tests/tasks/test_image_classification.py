"""ImageClassificationTask: every strategy trains LeNet-5 with the layers it converts; a dense LeNet learns digits;
the step schedule; FLOPs and conv compression checked against hand counts; the checks against the data."""

import copy
import math

import lightning as L
import pytest
import torch
from conftest import RecordingAdamW
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lr_lightning.data import ImageDataModule
from lr_lightning.layers import (
    IncrementalLinear,
    LoRALinear,
    LowRankLayer,
    SpectralLinear,
    SVDConv2d,
    SVDLinear,
    TuckerConv2d,
    TuckerLinear,
)
from lr_lightning.schedules import warmup_cosine
from lr_lightning.strategies import SST, TDLRT, FullRank, InRank, LoRA, ReLoRA, SVDTraining
from lr_lightning.tasks import ImageClassificationTask
from lr_lightning.tasks.image_classification import warmup_step_decay

LENET_FLOPS = 2 * (24 * 24 * 20 * 1 * 25 + 8 * 8 * 50 * 20 * 25 + 800 * 500 + 500 * 10)
"""Dense LeNet-5 on one 28x28 image: conv1 (24x24 outputs, 20 filters of 1x5x5), conv2 (8x8, 50 of 20x5x5), fc, head;
a multiply-add is 2 FLOPs."""
LENET_CONV_PARAMS = (20 * 1 * 25 + 20) + (50 * 20 * 25 + 50)


def _loader(n: int = 32, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 28, 28, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)


def _trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, default_root_dir=tmp_path, num_sanity_val_steps=0, **kw)


# (strategy, {layer name: the class it must become}); LoRA, ReLoRA, SST and InRank leave the convolutions dense.
LINEAR_ONLY = {"conv1": nn.Conv2d, "conv2": nn.Conv2d, "classifier": nn.Linear}
CASES = {
    "full_rank": (FullRank(), {"conv1": nn.Conv2d, "conv2": nn.Conv2d, "fc": nn.Linear, "classifier": nn.Linear}),
    "lora": (LoRA(rank=4), {**LINEAR_ONLY, "fc": LoRALinear}),
    "relora": (ReLoRA(rank=4, merge_every=3, restart_warmup_steps=1, warm_start_steps=2), {**LINEAR_ONLY,
                                                                                          "fc": LoRALinear}),
    "relora_star": (ReLoRA(rank=4, merge_every=3, reset="full", restart_warmup_steps=1),
                    {**LINEAR_ONLY, "fc": LoRALinear}),
    "sst": (SST(rank=4, iteration_interval=3, restart_warmup_steps=1), {**LINEAR_ONLY, "fc": SpectralLinear}),
    "inrank": (InRank(init_rank=2, buffer=2, max_rank=8, warmup_steps=1, check_every=1, switch_step=4,
                      switch_epoch=None), {**LINEAR_ONLY, "fc": IncrementalLinear}),
    "tdlrt": (TDLRT(tau=0.1, init_rank=4, max_rank=4, augment_every=3),
              {"conv1": TuckerConv2d, "conv2": TuckerConv2d, "fc": TuckerLinear, "classifier": nn.Linear}),
    "svd_training": (SVDTraining(input_convs=True, sparsify_at=2, prune_at=4, energy=0.2),
                     {"conv1": SVDConv2d, "conv2": SVDConv2d, "fc": SVDLinear, "classifier": nn.Linear}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_strategy_trains_lenet5_with_the_layers_it_converts(name, tmp_path):
    strategy, expected = CASES[name]
    torch.manual_seed(0)
    task = ImageClassificationTask(strategy=copy.deepcopy(strategy), optimizer=torch.optim.AdamW)
    before = {n: p.detach().clone() for n, p in task.named_parameters() if p.requires_grad}
    _trainer(tmp_path, max_steps=6).fit(task, _loader())
    assert math.isfinite(task.trainer.callback_metrics["train/loss"])
    for layer, cls in expected.items():
        module = task.model.get_submodule(layer)
        assert type(module) is cls, (layer, type(module))
    assert (name == "full_rank") == (not any(isinstance(m, LowRankLayer) for m in task.modules()))
    moved = [n for n, p in task.named_parameters() if n in before and p.shape == before[n].shape
             and not torch.equal(p, before[n])]
    assert any(n.startswith("model.conv2") for n in moved) and any(n.startswith("model.fc") for n in moved)
    report = task.compression_report()
    assert 0 < report.flops_test and all(r >= 1 for r in report.ranks.values())
    if expected["conv2"] is nn.Conv2d:  # convs dense: their train and test parameters are the dense ones
        assert report.conv_train == report.conv_test == report.conv_dense == LENET_CONV_PARAMS


def test_a_dense_lenet5_learns_embedded_mnist_digits_well_above_chance(tmp_path):
    torch.manual_seed(0)
    data = ImageDataModule(batch_size=32)
    task = ImageClassificationTask(optimizer=torch.optim.AdamW)
    trainer = _trainer(tmp_path, max_steps=30, limit_val_batches=2, limit_test_batches=4)
    trainer.fit(task, data)
    result = trainer.test(task, data, verbose=False)[0]
    assert result["test/acc"] > 0.6  # chance is 0.1; 30 steps of 32 digits
    assert result["test/flops_ratio"] == 1.0
    assert result["test/conv_compression_train"] == result["test/conv_compression_test"] == 0.0
    assert (result["test/rank/conv1"], result["test/rank/conv2"], result["test/rank/fc"]) == (20.0, 50.0, 500.0)
    assert task.last_compression_report.flops_dense == LENET_FLOPS


def test_the_step_schedule_multiplies_the_lr_by_gamma_at_each_milestone(tmp_path):
    task = ImageClassificationTask(optimizer=lambda groups: RecordingAdamW(groups, lr=0.1), schedule="step",
                                   milestones=[0.5, 0.75], gamma=0.1)
    _trainer(tmp_path, max_steps=8).fit(task, _loader(n=64))
    optimizer = task.trainer.optimizers[0]
    optimizer = getattr(optimizer, "optimizer", optimizer)
    lrs = optimizer.lrs(task.model.fc.weight)
    assert lrs == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)


def test_step_and_cosine_schedule_factors():
    factors = [warmup_step_decay(s, warmup_steps=2, total_steps=10, milestones=(0.5, 0.8), gamma=0.5)
               for s in range(10)]
    assert factors == [0.5, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert warmup_step_decay(10**6, 0, None, (0.5,), 0.1) == 1.0  # no planned end: no milestone is reached
    task = ImageClassificationTask(warmup_steps=3, min_lr_ratio=0.2)
    task.total_steps = lambda: 20
    assert [task.lr_schedule()(s) for s in range(20)] == [warmup_cosine(s, 3, 20, 0.2) for s in range(20)]


def _tucker_flops(r_out: int, r_in: int, c_in: int, c_out: int, side_in: int, side_out: int) -> int:
    """A Tucker conv exported as 1x1 (c_in -> r_in), 5x5 (r_in -> r_out), 1x1 (r_out -> c_out)."""
    return 2 * (side_in**2 * c_in * r_in + side_out**2 * r_in * r_out * 25 + side_out**2 * r_out * c_out)


def test_flops_of_a_small_rank_tdlrt_lenet_against_the_dense_network():
    dense = ImageClassificationTask().compression_report()
    assert dense.flops_dense == dense.flops_test == LENET_FLOPS and dense.flops_ratio == 1.0
    report = ImageClassificationTask(strategy=TDLRT(init_rank=2, max_rank=2)).compression_report()
    assert report.mode_ranks == {"conv1": (2, 1, 5, 5), "conv2": (2, 2, 5, 5), "fc": (2, 2)}
    expected = (_tucker_flops(2, 1, 1, 20, 28, 24) + _tucker_flops(2, 2, 20, 50, 12, 8)
                + 2 * (800 * 2 + 2 * 2 + 2 * 500) + 2 * 500 * 10)
    assert report.flops_dense == LENET_FLOPS and report.flops_test == expected
    assert report.flops_ratio == pytest.approx(expected / LENET_FLOPS) and report.flops_ratio < 0.05


def test_conv_compression_counts_the_convolutions_parameters_only():
    report = ImageClassificationTask(strategy=TDLRT(init_rank=2, max_rank=2)).compression_report()
    # Exported: 1x1 (1 -> 1), 5x5 (1 -> 2), 1x1 (2 -> 20) + bias; 1x1 (20 -> 2), 5x5 (2 -> 2), 1x1 (2 -> 50) + bias.
    test = (1 + 1 * 2 * 25 + 2 * 20 + 20) + (20 * 2 + 2 * 2 * 25 + 2 * 50 + 50)
    # Trained: cores at capacity min(2 max_rank, n) = (4, 1) and (4, 4) with bases 20x4, 1x1 and 50x4, 20x4.
    train = (4 * 1 * 25 + 20 * 4 + 1 * 1 + 20) + (4 * 4 * 25 + 50 * 4 + 20 * 4 + 50)
    assert (report.conv_dense, report.conv_test, report.conv_train) == (LENET_CONV_PARAMS, test, train)
    assert report.conv_compression_test == pytest.approx(1 - 401 / 25_570)
    assert report.conv_compression_train == pytest.approx(1 - 931 / 25_570)
    fc_test = 800 * 2 + 2 * 2 + 2 * 500 + 500  # the exported U S V^T and bias: not a conv parameter
    assert report.params_test == test + fc_test + 500 * 10 + 10
    # LoRA shrinks the trained part of the network, but not of its (dense) convolutions.
    lora = ImageClassificationTask(strategy=LoRA(rank=4)).compression_report()
    assert lora.compression_train > 0.8 and lora.conv_compression_train == lora.conv_compression_test == 0.0
    assert lora.ranks == {"conv1": 20, "conv2": 50, "fc": 4}  # the dense convolutions at full rank


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"in_channels": 3}, "the data has in_channels=1 but the model was built with in_channels=3: "
                         "set --model.init_args.in_channels 1"),
    ({"image_size": 32}, "the data has image_size=28 but the model was built with image_size=32: "
                         "set --model.init_args.image_size 28"),
    ({"num_classes": 5}, r"the data has labels_found=10 \(its largest training label \+ 1\) but the model was "
                         "built with num_classes=5: set --model.init_args.num_classes 10"),
])
def test_model_and_data_must_match_before_training(kwargs, message, tmp_path):
    task = ImageClassificationTask(**kwargs)
    trainer = _trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=message):
        trainer.fit(task, ImageDataModule(batch_size=8))
    assert trainer.global_step == 0


def test_more_classes_than_the_data_holds_are_accepted(tmp_path):
    task = ImageClassificationTask(num_classes=12)
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(task, ImageDataModule(batch_size=8))
    assert trainer.global_step == 1


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"architecture": "alexnet"}, r"architecture must be one of \('lenet5', 'vgg11', .*'resnet18'\), got 'alexnet'"),
    ({"schedule": "linear"}, r"schedule must be one of \('cosine', 'step'\), got 'linear'"),
    ({"milestones": [0.75, 0.5]}, "milestones must be fractions of the run, strictly increasing in"),
    ({"milestones": [0.5, 0.5]}, "milestones must be fractions of the run, strictly increasing in"),
    ({"milestones": [0.5, 1.0]}, "milestones must be fractions of the run, strictly increasing in"),
    ({"milestones": [0.0]}, "milestones must be fractions of the run, strictly increasing in"),
    ({"milestones": []}, "milestones must be fractions of the run, strictly increasing in"),
    ({"gamma": 0.0}, r"gamma must be in \(0, 1\], got 0.0"),
    ({"gamma": 1.5}, r"gamma must be in \(0, 1\], got 1.5"),
    ({"num_classes": 1}, "num_classes must be >= 2, got 1"),
    ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\), got 1.0"),
])
def test_bad_constructor_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageClassificationTask(**kwargs)


def test_gamma_one_and_a_single_milestone_are_valid():
    task = ImageClassificationTask(schedule="step", milestones=[0.3], gamma=1.0)
    assert task.hparams.milestones == [0.3]


def test_load_from_checkpoint_reapplies_the_strategy(tmp_path):
    torch.manual_seed(0)
    task = ImageClassificationTask(strategy=TDLRT(tau=0.1, init_rank=4, max_rank=4, augment_every=2),
                                   schedule="step", milestones=[0.4, 0.9])
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(task, _loader())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = ImageClassificationTask.load_from_checkpoint(tmp_path / "last.ckpt")
    assert isinstance(loaded.strategy, TDLRT) and isinstance(loaded.model.conv2, TuckerConv2d)
    assert loaded.hparams.milestones == [0.4, 0.9] and loaded.model.conv2.ranks == task.model.conv2.ranks
    images = next(iter(_loader()))[0]
    torch.testing.assert_close(loaded.eval()(images), task.eval()(images))
