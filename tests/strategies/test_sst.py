import importlib
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import REPO, RecordingAdamW
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lr_lightning.callbacks import LowRankCallback
from lr_lightning.callbacks.lowrank import role_map
from lr_lightning.layers import SpectralLinear
from lr_lightning.strategies import SST, strategy_from_config
from lr_lightning.strategies.base import resolve_rank
from lr_lightning.tasks import LanguageModelingTask

TINY = {"vocab_size": 32, "block_size": 16, "n_layer": 2, "n_head": 2, "model_dim": 32, "warmup_steps": 2}
SST_CONFIGS = sorted((REPO / "configs").glob("*/sst.yaml"))


def _loader() -> DataLoader:
    tokens = torch.randint(0, 32, (64, 17), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8)


def _trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, default_root_dir=tmp_path, num_sanity_val_steps=0, **kw)


def _spectral(model) -> list[SpectralLinear]:
    return [m for m in model.modules() if isinstance(m, SpectralLinear)]


def test_apply_reproduces_every_dense_layer(tiny_mlp):
    dense = [tiny_mlp.body[0].weight.detach().clone(), tiny_mlp.body[2].weight.detach().clone()]
    x = torch.randint(0, 11, (4, 3))
    before = tiny_mlp(x)
    SST(rank=4).apply(tiny_mlp)
    layers = _spectral(tiny_mlp)
    assert len(layers) == 2  # the head stays dense
    for layer, weight in zip(layers, dense):
        torch.testing.assert_close(layer.dense_weight(), weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tiny_mlp(x), before, atol=1e-5, rtol=1e-5)


def test_one_step_moves_all_of_s_and_only_the_sampled_vectors(tiny_mlp):
    strategy = SST(rank=4)
    strategy.apply(tiny_mlp)
    layer = tiny_mlp.body[0]
    u0, v0 = (t.detach().clone() for t in layer.bases())
    s0 = layer.s.detach().clone()
    optimizer = torch.optim.AdamW(strategy.param_groups(tiny_mlp), lr=1e-2)
    tiny_mlp(torch.randint(0, 11, (8, 5))).logsumexp(-1).mean().backward()
    optimizer.step()
    strategy.after_optimizer_step(tiny_mlp, 1)
    u1, v1 = layer.bases()
    moved_u = (u1 - u0).abs().amax(0) > 0
    moved_v = (v1 - v0).abs().amax(0) > 0
    expected = torch.zeros(layer.capacity, dtype=torch.bool)
    expected[layer.active] = True
    assert torch.equal(moved_u, expected) and torch.equal(moved_v, expected)
    assert torch.all(layer.s != s0) and layer.s.min() >= 0


def test_optimizer_state_exists_only_for_active_vectors_and_s(tmp_path):
    strategy = SST(rank=4, target_modules=["*.mlp.*"])
    task = LanguageModelingTask(strategy=strategy, **TINY)
    _trainer(tmp_path, max_steps=3).fit(task, _loader())
    optimizer = task.trainer.optimizers[0]
    for layer in _spectral(task):
        state = sum(t.numel() for p in layer.parameters() for t in optimizer.state[p].values() if t.dim() > 0)
        m, n, r = layer.out_features, layer.in_features, layer.rank
        # AdamW keeps two moments per trained number: r (m + n) vector entries, m' = min(m, n) of s, m of bias
        assert state == 2 * (r * (m + n) + min(m, n) + m)
        assert layer.trainable_numel() == r * (m + n) + min(m, n) + m


def test_resample_resets_the_active_state_and_keeps_the_function(tiny_mlp):
    strategy = SST(rank=4, iteration_interval=5, round_length=100, restart_warmup_steps=2)
    strategy.apply(tiny_mlp)
    optimizer = torch.optim.AdamW(strategy.param_groups(tiny_mlp), lr=1e-2)
    tiny_mlp(torch.randint(0, 11, (8, 5))).logsumexp(-1).mean().backward()
    optimizer.step()
    strategy.after_optimizer_step(tiny_mlp, 1)
    x = torch.randint(0, 11, (4, 3))
    before = tiny_mlp(x)
    actives = [layer.active.clone() for layer in _spectral(tiny_mlp)]
    assert strategy.should_update(5) and not strategy.should_update(4)
    edits = strategy.update(tiny_mlp, 5)
    for edit in edits:
        edit.apply_(optimizer)
    torch.testing.assert_close(tiny_mlp(x), before)
    assert any(not torch.equal(a, layer.active) for a, layer in zip(actives, _spectral(tiny_mlp)))
    for layer in _spectral(tiny_mlp):
        assert all(optimizer.state[p]["exp_avg"].abs().max() == 0 for p in (layer.U_active, layer.V_active))
        assert optimizer.state[layer.s]["exp_avg"].abs().max() > 0  # s keeps its moments between re-SVDs


def test_round_end_re_factors_with_orthonormal_bases(tiny_mlp):
    strategy = SST(rank=4, iteration_interval=1, round_length=3, restart_warmup_steps=0)
    strategy.apply(tiny_mlp)
    optimizer = torch.optim.SGD(strategy.param_groups(tiny_mlp), lr=0.5)
    x = torch.randint(0, 11, (4, 3))
    for step in range(1, 4):
        optimizer.zero_grad()
        tiny_mlp(torch.randint(0, 11, (8, 5))).logsumexp(-1).mean().backward()
        optimizer.step()
        strategy.after_optimizer_step(tiny_mlp, step)
        if step == 3:
            drift = max((u.mT @ u - torch.eye(u.shape[1])).abs().max() for layer in _spectral(tiny_mlp)
                        for u in layer.bases())
            before = tiny_mlp(x)
        strategy.update(tiny_mlp, step)
    assert drift > 1e-4  # the sampled columns moved independently
    for layer in _spectral(tiny_mlp):
        for basis in layer.bases():
            assert (basis.mT @ basis - torch.eye(basis.shape[1])).abs().max() < 1e-5
    torch.testing.assert_close(tiny_mlp(x), before, atol=1e-5, rtol=1e-5)


def _adam_steps(model, strategy: SST, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        optimizer.zero_grad()
        model(torch.randint(0, 11, (8, 5))).logsumexp(-1).mean().backward()
        optimizer.step()
        strategy.after_optimizer_step(model, step)


def test_round_end_resets_the_moments_of_s_and_other_draws_keep_them(tiny_mlp):
    """A re-SVD re-sorts ``s``, so Adam's ``m``, ``v`` and step of ``s`` restart at 0; a plain draw keeps them."""
    strategy = SST(rank=4, iteration_interval=2, round_length=2, restart_warmup_steps=0)
    strategy.apply(tiny_mlp)
    optimizer = torch.optim.Adam(strategy.param_groups(tiny_mlp), lr=1e-2)
    _adam_steps(tiny_mlp, strategy, optimizer, range(1, 3))
    states = [optimizer.state[layer.s] for layer in _spectral(tiny_mlp)]
    kept = [{key: value.clone() for key, value in state.items()} for state in states]
    for edit in strategy.resvd(tiny_mlp, 2):  # draw 1 of a 2-draw round: no re-SVD
        edit.apply_(optimizer)
    for state, before in zip(states, kept):
        assert state["exp_avg"].abs().max() > 0 and state["exp_avg_sq"].max() > 0
        assert all(torch.equal(state[key], value) for key, value in before.items())
    _adam_steps(tiny_mlp, strategy, optimizer, range(3, 5))
    for edit in strategy.resvd(tiny_mlp, 4):  # draw 2: the round ends
        edit.apply_(optimizer)
    for state in states:
        assert state["exp_avg"].abs().max() == 0 and state["exp_avg_sq"].abs().max() == 0
        assert float(state["step"]) == 0


def _max_drift(layer: SpectralLinear) -> float:
    """``max |B^T B - I|`` over both bases: 0 right after a re-SVD."""
    return max(float((b.mT @ b - torch.eye(b.shape[1])).abs().max()) for b in map(torch.Tensor.detach, layer.bases()))


@pytest.mark.parametrize(("in_features", "out_features", "rank", "draws"), [
    (128, 256, 16, 8),  # m' = 128 = 8 r
    (30, 20, 6, 4),  # m' = 20: ceil(20 / 6) = 4, not floor 3
])
def test_default_round_re_factors_after_ceil_capacity_over_rank_draws(in_features, out_features, rank, draws):
    """``round_length=None``: a layer re-factors every ``T2 = ceil(m' / r)`` draws, at no draw before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features))
    strategy = SST(rank=rank, iteration_interval=10, restart_warmup_steps=0)
    strategy.apply(model)
    layer = model[0]
    assert strategy.rounds_of(layer) == draws
    assert strategy.operations(model)["resvd"] == 10 * draws
    with torch.no_grad():  # what training does between re-SVDs: the active columns move independently
        layer.U_active.add_(0.1 * torch.randn_like(layer.U_active))
        layer.V_active.add_(0.1 * torch.randn_like(layer.V_active))
    layer.project_()
    drifted = [b.clone() for b in layer.bases()]
    assert _max_drift(layer) > 1e-3
    for draw in range(1, draws):
        strategy.resvd(model, 10 * draw)
        assert all(torch.equal(a, b) for a, b in zip(layer.bases(), drifted))
    strategy.resvd(model, 10 * draws)
    assert _max_drift(layer) < 1e-5


def _planned_steps(config: dict) -> int:
    """The run's optimizer steps: ``max_steps``, else ``max_epochs`` times the batches per epoch of its data."""
    trainer = config["trainer"]
    if trainer.get("max_steps", -1) > 0:
        return trainer["max_steps"]
    data = config["data"]
    module, _, name = data["class_path"].rpartition(".")
    batches = len(getattr(importlib.import_module(module), name)(**data.get("init_args", {})).train_dataloader())
    return trainer["max_epochs"] * batches // trainer.get("accumulate_grad_batches", 1)


@pytest.mark.parametrize("path", SST_CONFIGS, ids=lambda p: p.parent.name)
def test_shipped_config_re_factors_twice_with_training_after_each(path: Path):
    """``2 T3 T2 < planned steps``, ``T2`` the draws per round of the longest round: a ``model_dim x model_dim``
    layer's for the sequence models (built without their optional extras), the built model's otherwise."""
    config = yaml.safe_load(path.read_text())
    init_args = config["model"]["init_args"]
    strategy = strategy_from_config(init_args["strategy"])
    if "model_dim" in init_args:
        width = init_args["model_dim"]  # every converted layer maps to or from model_dim, so its m' <= model_dim
        widest = SpectralLinear(width, width, resolve_rank(strategy.rank, width, width, "widest"))
        period = strategy.iteration_interval * strategy.rounds_of(widest)
    else:
        module, _, name = config["model"]["class_path"].rpartition(".")
        task_args = {k: v for k, v in init_args.items() if k not in ("strategy", "optimizer")}
        task = getattr(importlib.import_module(module), name)(strategy=strategy, **task_args)
        period = strategy.operations(task)["resvd"]
    assert 2 * period < _planned_steps(config)


def test_equal_seeds_draw_equal_samples_on_separate_processes_of_a_run(tiny_mlp):
    twin = type(tiny_mlp)()
    twin.load_state_dict(tiny_mlp.state_dict())
    first, second = SST(rank=4, seed=7), SST(rank=4, seed=7)
    first.apply(tiny_mlp)
    second.apply(twin)
    first.update(tiny_mlp, 200)
    second.update(twin, 200)
    for a, b in zip(_spectral(tiny_mlp), _spectral(twin)):
        assert torch.equal(a.active, b.active)


def test_basis_learning_rate_rewarms_after_each_draw_inside_the_trainer(tmp_path):
    task = LanguageModelingTask(strategy=SST(rank=4, iteration_interval=4, restart_warmup_steps=2),
                                optimizer=RecordingAdamW, **TINY)
    _trainer(tmp_path, max_steps=9).fit(task, _loader())
    recorder = task.trainer.optimizers[0].optimizer
    roles = role_map(task.strategy, task)
    lrs = {role: [steps[next(i for i, r in roles.items() if r == role)][0] for steps in recorder.stepped]
           for role in ("basis", "spectrum")}
    assert lrs["basis"][4] == 0.0 and lrs["basis"][8] == 0.0
    assert 0 < lrs["basis"][5] < lrs["basis"][6]
    assert lrs["spectrum"][4] > 0  # s keeps training through a draw
    assert {g["weight_decay"] for g in task.trainer.optimizers[0].param_groups
            if g["lowrank_role"] in ("basis", "spectrum")} == {0.0}


def test_callback_runs_sst_on_a_plain_lightning_module(tmp_path, tiny_mlp):
    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_mlp

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x).flatten(0, 1), y.flatten())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    strategy = SST(rank=4, iteration_interval=3, round_length=2, restart_warmup_steps=1)
    tokens = torch.randint(0, 11, (32, 6), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(tokens, (tokens + 1) % 11), batch_size=4)
    module = Plain()
    _trainer(tmp_path, max_steps=6, callbacks=[LowRankCallback(strategy, verbose=False)]).fit(module, loader)
    for layer in _spectral(module):
        for basis in layer.bases():  # re-SVD at step 6 (second draw of a 2-draw round)
            assert (basis.mT @ basis - torch.eye(basis.shape[1])).abs().max() < 1e-5
        assert layer.s.min() >= 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rank": 0}, "rank must be"),
    ({"iteration_interval": 0}, "iteration_interval must be >= 1"),
    ({"round_length": 0}, "round_length must be >= 1 or None"),
    ({"uniform_mix": 1.5}, r"uniform_mix must be in \[0, 1\]"),
    ({"iteration_interval": 10, "restart_warmup_steps": 10},
     r"restart_warmup_steps must be in \[0, iteration_interval=10\)"),
])
def test_bad_arguments_name_the_parameter(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        SST(**kwargs)


def test_strategy_round_trips_through_its_config():
    from lr_lightning.strategies import strategy_from_config

    strategy = SST(rank=8, iteration_interval=50, restart_warmup_steps=10, uniform_mix=0.0, target_modules=["*.mlp.*"])
    rebuilt = strategy_from_config(strategy.to_config())
    assert rebuilt.to_config() == strategy.to_config()
