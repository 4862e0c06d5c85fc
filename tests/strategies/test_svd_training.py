from dataclasses import dataclass

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyMLP
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lr_lightning.callbacks import LowRankCallback
from lr_lightning.layers import SVDConv2d, SVDLinear
from lr_lightning.optim import StateReset
from lr_lightning.strategies import SVDTraining, strategy_from_config


class SmallCNN(nn.Module):
    """An image stem (3 input channels), a strided conv, a depthwise conv, a hidden Linear, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 12, 3, padding=1, stride=2)
        self.depthwise = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.fc = nn.Linear(12 * 4 * 4, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.depthwise(F.relu(self.conv(F.relu(self.stem(x))))))
        return self.head(F.relu(self.fc(x.flatten(1))))


def _cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN()


# ----------------------------------------------------------------------------- conversion
def test_selection_skips_the_image_stem_grouped_convs_and_the_head():
    model = _cnn()
    assert [n for n, _ in SVDTraining().select(model)] == ["conv", "fc"]
    assert [n for n, _ in SVDTraining(input_convs=True).select(model)] == ["stem", "conv", "fc"]
    with pytest.raises(ValueError, match="unless input_convs=True"):
        SVDTraining(target_modules=["stem"]).select(model)


@pytest.mark.parametrize("decomposition", ["channel", "spatial"])
def test_dense_init_keeps_the_function_and_export_drops_pruned_values(decomposition):
    model = _cnn()
    x = torch.randn(5, 3, 8, 8)
    before = model(x)
    strategy = SVDTraining(decomposition=decomposition, energy=0.2, standardize=False)
    strategy.apply(model)
    assert isinstance(model.conv, SVDConv2d) and model.conv.decomposition == decomposition
    assert isinstance(model.fc, SVDLinear) and type(model.stem) is nn.Conv2d
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    strategy.prune(model, step=0)
    pruned = model(x)
    compact = strategy.export(model)
    layers = [model.conv, model.fc]
    assert all(0 < layer.rank < layer.capacity for layer in layers)
    factors = sum(layer.capacity * (sum(layer.matrix_shape) + 1) for layer in layers)  # N, s, C at capacity
    exported = sum(layer.rank * sum(layer.matrix_shape) for layer in layers)  # rank (a + b), |s| folded in
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in compact.parameters()) == total - factors + exported
    torch.testing.assert_close(compact(x), pruned, atol=1e-5, rtol=1e-5)


def test_config_round_trip_rebuilds_an_equal_strategy():
    strategy = SVDTraining(sparsity="l1", sparsity_weight=0.3, energy=0.1, sparsify_at=3, prune_at=7, unit="epoch",
                           decomposition="spatial", init="random", target_modules=["conv"])
    rebuilt = strategy_from_config(strategy.to_config())
    assert type(rebuilt) is SVDTraining and rebuilt.to_config() == strategy.to_config()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sparsity": "l2"}, r"sparsity must be one of \('hoyer', 'hoyer_square', 'l1'\)"),
    ({"unit": "batch"}, r"unit must be one of \('step', 'epoch'\)"),
    ({"decomposition": "depth"}, r"decomposition must be one of \('channel', 'spatial'\)"),
    ({"init": "orthogonal"}, r"init must be one of \('dense', 'random'\)"),
    ({"energy": 1.0}, r"energy must be in \[0, 1\)"),
    ({"orthogonality_weight": -1.0}, "orthogonality_weight must be >= 0"),
    ({"sparsity_weight": -0.1}, "sparsity_weight must be >= 0"),
    ({"sparsify_at": -1}, "sparsify_at must be an int >= 0"),
    ({"sparsify_at": 5, "prune_at": 3}, r"prune_at must be None or an int >= max\(sparsify_at, 1\) = 5"),
])
def test_bad_arguments_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SVDTraining(**kwargs)


# ----------------------------------------------------------------------------- regularizer
def _direct(layer, sparsity: str) -> tuple[float, float, dict[str, np.ndarray]]:
    """L_o, R_s and their gradients w.r.t. the full N, s, C, written out in float64 numpy."""
    keep = layer.active.numpy()
    n, s, c = (t.detach().double().numpy() for t in (layer.N[:, keep], layer.s[keep], layer.C[keep]))
    r = keep.sum()
    gram_n, gram_c = n.T @ n - np.eye(r), c @ c.T - np.eye(r)
    l1, l2sq = np.abs(s).sum(), (s**2).sum()
    values = {"l1": l1, "hoyer": l1 / np.sqrt(l2sq), "hoyer_square": l1**2 / l2sq}
    slopes = {"l1": np.sign(s), "hoyer": np.sign(s) / np.sqrt(l2sq) - l1 * s / l2sq**1.5,
              "hoyer_square": 2 * l1 * np.sign(s) / l2sq - 2 * l1**2 * s / l2sq**2}
    grads = {name: np.zeros(tuple(p.shape)) for name, p in (("N", layer.N), ("s", layer.s), ("C", layer.C))}
    grads["N"][:, keep] = 4 * n @ gram_n / r**2
    grads["C"][keep] = 4 * gram_c @ c / r**2
    grads["s"][keep] = slopes[sparsity]
    return ((gram_n**2).sum() + (gram_c**2).sum()) / r**2, values[sparsity], grads


@pytest.mark.parametrize("sparsity", ["hoyer", "hoyer_square", "l1"])
def test_regularizer_value_and_gradient_match_a_direct_computation(sparsity):
    model = _cnn()
    strategy = SVDTraining(orthogonality_weight=0.7, sparsity=sparsity, sparsity_weight=0.3, init="random")
    strategy.apply(model)
    keep = torch.ones(model.fc.capacity, dtype=torch.bool)
    keep[[2, 5]] = False
    model.fc.prune_(keep)  # only kept values enter the regularizer
    layers = [layer for _, layer in strategy.svd_layers(model)]
    direct = [_direct(layer, sparsity) for layer in layers]
    expected = sum(0.7 * lo + 0.3 * rs for lo, rs, _ in direct)
    assert strategy.regularizer(model).item() == pytest.approx(expected, rel=1e-5)
    task_grads = {}
    for layer in layers:
        for name in ("N", "s", "C"):
            task_grads[layer, name] = torch.randn_like(getattr(layer, name))
            getattr(layer, name).grad = task_grads[layer, name].clone()
    assert strategy.before_optimizer_step(model, step=0) == []
    for layer, (_, _, grads) in zip(layers, direct):
        for name in ("N", "s", "C"):
            weight = 0.3 if name == "s" else 0.7
            expected_grad = task_grads[layer, name] + weight * torch.from_numpy(grads[name]).float()
            torch.testing.assert_close(getattr(layer, name).grad, expected_grad, atol=1e-5, rtol=1e-4)
    assert model.fc.s.grad[~keep].eq(task_grads[model.fc, "s"][~keep]).all()  # nothing added to pruned values


def test_sparsity_is_off_before_sparsify_at_and_after_pruning():
    model = _cnn()
    strategy = SVDTraining(orthogonality_weight=0.5, sparsity_weight=2.0, sparsify_at=3, prune_at=5)
    strategy.apply(model)
    orthogonality, sparsity = strategy.penalties(model)
    assert sparsity > 0
    stages = []
    for step in range(1, 7):
        if strategy.should_update(step):
            strategy.update(model, step)
        stages.append((step, strategy.stage, strategy.regularizer(model).item()))
    orthogonality_after = strategy.penalties(model)[0]
    assert [s for s in range(20) if strategy.should_update(s)] == [3, 5]
    assert [s[1] for s in stages] == ["train", "train", "sparsify", "sparsify", "finetune", "finetune"]
    assert stages[0][2] == pytest.approx(0.5 * orthogonality.item(), rel=1e-5)
    assert stages[2][2] == pytest.approx(0.5 * orthogonality.item() + 2.0 * sparsity.item(), rel=1e-5)
    assert stages[5][2] == pytest.approx(0.5 * orthogonality_after.item(), rel=1e-5, abs=1e-7)


def test_epoch_unit_changes_stage_at_epoch_ends_only():
    model = _cnn()
    strategy = SVDTraining(sparsify_at=1, prune_at=3, unit="epoch", energy=0.2)
    strategy.apply(model)
    assert not any(strategy.should_update(s) for s in range(10))
    at_epoch_end = [strategy.should_update_at_epoch_end(epoch) for epoch in range(3)]
    assert at_epoch_end == [["sparsify"], [], ["prune"]]
    assert strategy.run(model, at_epoch_end[0], step=10) == [] and strategy.stage == "sparsify"
    assert strategy.run(model, at_epoch_end[1], step=20) == [] and strategy.stage == "sparsify"
    [reset] = strategy.run(model, at_epoch_end[2], step=30)
    assert strategy.stage == "finetune" and model.fc.rank < model.fc.capacity
    assert isinstance(reset, StateReset) and reset.mode == "full"
    factors = {id(p) for layer in (model.conv, model.fc) for p in (layer.N, layer.s, layer.C)}
    assert {id(p) for p in reset.params} == factors


def _orthogonality_after_training(weight: float) -> tuple[float, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24))
    strategy = SVDTraining(orthogonality_weight=weight, sparsity_weight=0.0, init="random")
    strategy.apply(model)
    start = strategy.penalties(model)[0].item()
    x = torch.randn(128, 16)
    y = x @ torch.randn(16, 24) / 4
    optimizer = torch.optim.Adam(strategy.param_groups(model), lr=3e-2)
    for step in range(150):
        optimizer.zero_grad()
        (model(x) - y).square().mean().backward()
        strategy.before_optimizer_step(model, step)
        optimizer.step()
    return start, strategy.penalties(model)[0].item()


def test_the_regularizer_makes_the_factors_orthonormal():
    start, with_regularizer = _orthogonality_after_training(1.0)
    _, without = _orthogonality_after_training(0.0)
    assert with_regularizer < 0.05 * start  # measured: 1.15 -> 0.017
    assert without > 0.5 * start  # measured: 1.15 -> 1.6


# ----------------------------------------------------------------------------- pruning
@dataclass
class Fit:
    rank: int
    loss_before_pruning: float
    loss_after_pruning: float
    teacher_error: float


def _fit_rank_k_teacher(sparsity: str, weight: float, k: int = 3, steps: int = 300) -> Fit:
    """Noisy regression on a rank-k teacher ``2 U V^T`` (24 x 16): L_o only for 100 steps, then
    sparsity, then energy pruning (energy 1e-3) at the last step. The noise gives the least-squares
    fit a tail of ~0.1-0.25 singular values, which sparsification must remove."""
    g = torch.Generator().manual_seed(1)
    u, v = torch.linalg.qr(torch.randn(24, k, generator=g))[0], torch.linalg.qr(torch.randn(16, k, generator=g))[0]
    teacher = 2 * u @ v.T
    x = torch.randn(256, 16, generator=g)
    y = x @ teacher.T + 0.3 * torch.randn(256, 24, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24, bias=False))
    strategy = SVDTraining(sparsity=sparsity, sparsity_weight=weight, energy=1e-3, sparsify_at=100, prune_at=steps)
    strategy.apply(model)
    optimizer = torch.optim.Adam(strategy.param_groups(model), lr=3e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - 0.9 * s / steps)
    loss = lambda: (model(x) - y).square().mean().item()  # noqa: E731
    for step in range(steps):
        optimizer.zero_grad()
        (model(x) - y).square().mean().backward()
        strategy.before_optimizer_step(model, step)
        optimizer.step()
        scheduler.step()
        if strategy.should_update(step + 1):
            before = loss()
            for edit in strategy.update(model, step + 1):
                edit.apply_(optimizer)
    layer = model[0]
    error = (layer.matrix().detach() - teacher).norm().item() / teacher.norm().item()
    return Fit(layer.rank, before, loss(), error)


def test_hoyer_then_energy_pruning_finds_the_teachers_rank_and_l1_does_no_better():
    control = _fit_rank_k_teacher("hoyer", 0.0)
    hoyer = _fit_rank_k_teacher("hoyer", 0.3)
    l1 = _fit_rank_k_teacher("l1", 0.3)
    assert control.rank > 6  # without sparsity, the noise tail holds more than 1e-3 of the energy
    assert hoyer.rank == 3
    assert hoyer.loss_after_pruning == pytest.approx(hoyer.loss_before_pruning, rel=0.01)
    # L1 at the same weight shrinks every singular value: it keeps at least as many, or it cuts
    # into the teacher's (measured: rank 1, 0.89 relative error vs Hoyer's 0.13).
    assert l1.rank >= hoyer.rank or l1.teacher_error > 2 * hoyer.teacher_error


def test_pruned_values_stay_zero_through_adamw_with_weight_decay():
    model = _cnn()
    strategy = SVDTraining(sparsity_weight=0.1, energy=0.2)
    strategy.apply(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # a user's plain optimizer
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for step in range(6):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        strategy.before_optimizer_step(model, step)
        optimizer.step()
        if step == 2:
            for edit in strategy.prune(model, step=0):
                edit.apply_(optimizer)
            ranks = [layer.rank for _, layer in strategy.svd_layers(model)]
            assert optimizer.state[model.fc.s]["exp_avg"].eq(0).all()
    for (_, layer), rank in zip(strategy.svd_layers(model), ranks):
        dropped = ~layer.active
        assert layer.rank == rank < layer.capacity
        assert layer.s[dropped].eq(0).all() and layer.N[:, dropped].eq(0).all() and layer.C[dropped].eq(0).all()
    metrics = strategy.metrics(model)
    assert metrics["svd/stage"] == 2.0 and metrics["lowrank/total_rank"] == sum(ranks)


# ----------------------------------------------------------------------------- Lightning paths
class PlainModule(L.LightningModule):
    """A user's module; with ``regularize_in_loss`` it converts itself and adds the regularizer to its loss."""

    def __init__(self, regularize_in_loss: SVDTraining | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyMLP()
        self.in_loss = regularize_in_loss
        if regularize_in_loss is not None:
            regularize_in_loss.apply(self)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x).flatten(0, 1).float(), y.flatten())
        return loss + self.in_loss.regularizer(self) if self.in_loss is not None else loss

    def configure_optimizers(self):  # no decay: the callback would drop it on N, s, C and the in-loss path would not
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.0)


class GradientCapture(L.Callback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()})


def _loader(n: int = 32, same: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 11, (n, 5), generator=g), torch.randint(0, 11, (n, 5), generator=g)
    if same:
        x, y = x[:1].expand(n, 5), y[:1].expand(n, 5)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def _trainer(callbacks, precision, **kw) -> L.Trainer:
    plugins = {}
    if precision == "16-mixed-gradscaler":  # Trainer(precision="16-mixed") on CPU silently becomes bf16-mixed
        plugins = {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1024.0))]}
    else:
        plugins = {"precision": precision}
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=callbacks, **plugins, **kw)


def _strategy() -> SVDTraining:
    return SVDTraining(orthogonality_weight=0.5, sparsity_weight=0.2, init="random")


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed-gradscaler"])
def test_callback_only_path_gives_the_gradients_of_the_regularized_loss(precision):
    via_callback, via_loss = GradientCapture(), GradientCapture()
    _trainer([LowRankCallback(_strategy(), verbose=False), via_callback], precision, max_steps=3).fit(
        PlainModule(), _loader())
    _trainer([via_loss], precision, max_steps=3).fit(PlainModule(regularize_in_loss=_strategy()), _loader())
    assert len(via_callback.grads) == len(via_loss.grads) == 3
    for got, expected in zip(via_callback.grads, via_loss.grads):
        assert got.keys() == expected.keys() and "net.body.0.s" in got
        for name in got:
            torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.filterwarnings("ignore:You.re resuming from a checkpoint that ended before the epoch ended")
def test_stage_and_masks_survive_a_checkpoint(tmp_path):
    def strategy():
        return SVDTraining(sparsity_weight=0.5, sparsify_at=2, prune_at=4, energy=0.3)

    straight_strategy = strategy()
    straight = PlainModule()
    _trainer([LowRankCallback(straight_strategy, verbose=False)], "32-true", max_steps=6).fit(
        straight, _loader(same=True))

    first = PlainModule()
    first_trainer = _trainer([LowRankCallback(strategy(), verbose=False)], "32-true", max_steps=3)
    first_trainer.fit(first, _loader(same=True))
    first_trainer.save_checkpoint(tmp_path / "step3.ckpt")  # in the sparsity stage, before the prune
    resumed_strategy = strategy()
    assert resumed_strategy.stage == "train"
    resumed = PlainModule()
    _trainer([LowRankCallback(resumed_strategy, verbose=False)], "32-true", max_steps=6).fit(
        resumed, _loader(same=True), ckpt_path=tmp_path / "step3.ckpt")

    assert resumed_strategy.stage == straight_strategy.stage == "finetune"
    ranks = [layer.rank for _, layer in straight_strategy.svd_layers(straight)]
    assert [layer.rank for _, layer in resumed_strategy.svd_layers(resumed)] == ranks
    assert ranks[0] == straight.net.body[0].capacity < min(straight.net.body[0].matrix_shape)  # shrunk at the prune
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)


def _state_elements(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() for state in optimizer.state.values() for v in state.values() if v.dim() > 0)


@pytest.mark.filterwarnings("ignore:You.re resuming from a checkpoint that ended before the epoch ended")
def test_after_the_prune_the_training_state_is_that_of_the_compact_layers_and_resumes_exactly(tmp_path):
    def strategy():
        return SVDTraining(sparsity_weight=0.5, sparsify_at=2, prune_at=4, energy=0.3)

    straight_strategy, straight = strategy(), PlainModule()
    straight_trainer = _trainer([LowRankCallback(straight_strategy, verbose=False)], "32-true", max_steps=8)
    straight_trainer.fit(straight, _loader(same=True))
    layers = [layer for _, layer in straight_strategy.svd_layers(straight)]
    assert all(layer.rank == layer.capacity for layer in layers) and layers[0].rank < min(layers[0].matrix_shape)
    params = list(straight.parameters())
    held = [p for group in straight_trainer.optimizers[0].param_groups for p in group["params"]]
    assert len(held) == len(params) and all(any(p is q for q in params) for p in held)
    compact = sum(p.numel() for p in params)
    assert compact == sum(layer.trainable_numel() for layer in layers) + straight.net.head.weight.numel() + \
        straight.net.head.bias.numel() + straight.net.emb.weight.numel()
    assert _state_elements(straight_trainer.optimizers[0]) == 2 * compact  # Adam's two moments, nothing more

    first = PlainModule()
    first_trainer = _trainer([LowRankCallback(strategy(), verbose=False)], "32-true", max_steps=6)
    first_trainer.fit(first, _loader(same=True))
    first_trainer.save_checkpoint(tmp_path / "step6.ckpt")  # after the prune: compact layers
    resumed_strategy, resumed = strategy(), PlainModule()
    _trainer([LowRankCallback(resumed_strategy, verbose=False)], "32-true", max_steps=8).fit(
        resumed, _loader(same=True), ckpt_path=tmp_path / "step6.ckpt")
    assert resumed_strategy.stage == "finetune"
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
