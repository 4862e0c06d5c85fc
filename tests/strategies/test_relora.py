import pytest
import torch
from conftest import RecordingAdamW, TinyMLP
from torch.optim.lr_scheduler import LambdaLR

from lr_lightning.callbacks.lowrank import role_map
from lr_lightning.optim import RoleOptimizer, reset_state_
from lr_lightning.schedules import warmup_cosine
from lr_lightning.strategies import ReLoRA


def _trained(strategy: ReLoRA, steps: int = 5):
    torch.manual_seed(0)
    model = TinyMLP()
    strategy.apply(model)
    optimizer = torch.optim.AdamW(strategy.param_groups(model), lr=1e-2)
    x, y = torch.randint(0, 11, (8, 5)), torch.randint(0, 11, (8, 5))
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        optimizer.step()
    return model, optimizer, x


def test_merge_keeps_the_function_and_restarts_the_update():
    strategy = ReLoRA(rank=4, merge_every=5, reset="full", restart_warmup_steps=2)
    model, optimizer, x = _trained(strategy)
    layer = model.body[0]
    assert layer.lora_B.abs().sum() > 0
    before, w_before, a_before = model(x), layer.weight.clone(), layer.lora_A.clone()
    weight_object = layer.weight
    strategy.update(model, step=5)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    assert layer.weight is weight_object and not torch.equal(layer.weight, w_before)
    assert torch.count_nonzero(layer.lora_B) == 0 and not torch.equal(layer.lora_A, a_before)


def test_reinit_is_identical_for_two_replicas():
    a, b = (ReLoRA(rank=4, merge_every=5, restart_warmup_steps=2) for _ in range(2))
    model_a, _, _ = _trained(a)
    model_b, _, _ = _trained(b)
    torch.manual_seed(123)  # a different global RNG state must not matter
    a.update(model_a, 5)
    torch.manual_seed(456)
    b.update(model_b, 5)
    torch.testing.assert_close(model_a.body[0].lora_A, model_b.body[0].lora_A, rtol=0, atol=0)


@pytest.mark.parametrize(("mode", "fraction"), [("full", 1.0), ("random_prune", 0.9), ("magnitude_prune", 0.5)])
def test_merge_resets_only_the_lora_optimizer_state(mode, fraction):
    strategy = ReLoRA(rank=4, merge_every=5, reset=mode, reset_fraction=fraction, restart_warmup_steps=2)
    model, optimizer, _ = _trained(strategy)
    layer = model.body[0]
    exp_avg = optimizer.state[layer.lora_A]["exp_avg"]
    head_state = optimizer.state[model.head.weight]["exp_avg"].clone()
    magnitude = exp_avg.abs().clone()
    [reset] = strategy.update(model, step=5)
    zeroed, seen = reset_state_(optimizer, reset)
    assert optimizer.state[layer.lora_A]["exp_avg"] is exp_avg  # edited in place
    zero_fraction = (exp_avg == 0).float().mean().item()
    if mode == "full":
        assert zero_fraction == 1.0 and optimizer.state[layer.lora_A]["step"].item() == 0
    elif mode == "random_prune":
        assert 0.8 < zero_fraction < 0.97
    else:
        assert zero_fraction == pytest.approx(0.5, abs=0.02)
        assert exp_avg[exp_avg != 0].abs().min() >= magnitude[exp_avg == 0].max()
    assert seen == 2 * sum(p.numel() for p in reset.params)  # exp_avg and exp_avg_sq of every factor
    assert zeroed / seen == pytest.approx(fraction, abs=0.05)
    torch.testing.assert_close(optimizer.state[model.head.weight]["exp_avg"], head_state)


def test_learning_rate_rewarms_after_each_merge():
    strategy = ReLoRA(rank=4, merge_every=10, restart_warmup_steps=4)
    model, _, _ = _trained(strategy, steps=0)
    plain = RecordingAdamW(strategy.param_groups(model), lr=1.0)
    scheduler = LambdaLR(plain, lambda s: warmup_cosine(s, 2, 40, 0.1))
    optimizer = RoleOptimizer(plain, role_map(strategy, model), strategy.lr_multiplier, lambda: scheduler.last_epoch)
    for _ in range(40):
        optimizer.step()
        scheduler.step()
    lrs = plain.lrs(model.body[0].lora_A)
    envelope = [warmup_cosine(s, 2, 40, 0.1) for s in range(40)]
    assert lrs[:10] == pytest.approx(envelope[:10])
    for merge in (10, 20, 30):
        assert lrs[merge] == 0.0
        assert lrs[merge + 2] == pytest.approx(0.5 * envelope[merge + 2])
        assert lrs[merge + 4] == pytest.approx(envelope[merge + 4])


def test_warm_start_trains_w0_then_freezes_it():
    strategy = ReLoRA(rank=4, merge_every=10, restart_warmup_steps=2, warm_start_steps=3)
    model, optimizer, x = _trained(strategy, steps=0)
    weight = model.body[0].weight
    assert weight.requires_grad and any(g["lowrank_role"] == "base" for g in strategy.param_groups(model))
    assert [s for s in range(40) if strategy.should_update(s)] == [3, 13, 23, 33]
    y = torch.randint(0, 11, (8, 5))
    snapshots = []
    for step in range(6):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        strategy.before_optimizer_step(model, step)
        optimizer.step()
        if strategy.should_update(step + 1):
            for reset in strategy.update(model, step + 1):
                reset_state_(optimizer, reset)
        snapshots.append(weight.detach().clone())
    assert not torch.equal(snapshots[0], snapshots[1])  # the warm start trains W0
    assert weight not in optimizer.state  # its state is freed at the end of the warm start
    assert torch.equal(snapshots[3], snapshots[5])  # and it never steps again


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"reset": "zero"}, r"reset must be one of \('full', 'random_prune', 'magnitude_prune'\)"),
    ({"merge_every": 0}, "merge_every must be >= 1"),
    ({"merge_every": 10, "restart_warmup_steps": 10}, r"restart_warmup_steps must be in \[0, merge_every=10\)"),
    ({"reset_fraction": 0.0}, r"reset_fraction must be in \(0, 1\]"),
])
def test_bad_arguments_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReLoRA(**kwargs)
