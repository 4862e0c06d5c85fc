import pytest
import torch
from conftest import TinyMLP
from torch import nn

from lr_lightning.layers import LoRALinear
from lr_lightning.strategies import FullRank, LoRA, ReLoRA, strategy_from_config

CASES = [
    pytest.param(FullRank, {}, id="full"),
    pytest.param(LoRA, {"rank": 4}, id="lora"),
    pytest.param(ReLoRA, {"rank": 4, "merge_every": 5, "restart_warmup_steps": 2}, id="relora"),
]


@pytest.mark.parametrize(("cls", "kwargs"), CASES)
def test_apply_leaves_function_unchanged_at_init(tiny_mlp, cls, kwargs):
    x = torch.randint(0, 11, (3, 7))
    before = tiny_mlp(x)
    cls(**kwargs).apply(tiny_mlp)
    torch.testing.assert_close(tiny_mlp(x), before)


@pytest.mark.parametrize(("cls", "kwargs"), CASES)
def test_apply_is_idempotent_and_keeps_the_head_dense(tiny_mlp, cls, kwargs):
    strategy = cls(**kwargs)
    strategy.apply(tiny_mlp)
    first = [id(m) for m in tiny_mlp.modules()]
    strategy.apply(tiny_mlp)
    assert [id(m) for m in tiny_mlp.modules()] == first
    assert type(tiny_mlp.head) is nn.Linear
    assert [n for n, _ in strategy.select(tiny_mlp)] == ["body.0", "body.2"]


@pytest.mark.parametrize(("cls", "kwargs"), CASES)
def test_config_round_trip_rebuilds_an_equal_strategy(cls, kwargs):
    strategy = cls(**kwargs, target_modules=["body.*"])
    rebuilt = strategy_from_config(strategy.to_config())
    assert type(rebuilt) is cls and rebuilt.to_config() == strategy.to_config()


@pytest.mark.parametrize(("cls", "kwargs"), CASES)
def test_export_computes_the_same_function(tiny_mlp, cls, kwargs):
    strategy = cls(**kwargs)
    strategy.apply(tiny_mlp)
    for p in tiny_mlp.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randint(0, 11, (3, 7))
    compact = strategy.export(tiny_mlp)
    assert not any(isinstance(m, LoRALinear) for m in compact.modules())
    torch.testing.assert_close(compact(x), tiny_mlp(x))


def test_report_counts_match_hand_computation(tiny_mlp):
    LoRA(rank=4).apply(tiny_mlp)
    report = LoRA(rank=4).report(tiny_mlp)
    # body.0: Linear(16 -> 32), body.2: Linear(32 -> 16); trainable = r(m + n) + bias
    assert [(r.name, r.shape, r.rank, r.capacity) for r in report.rows] == [
        ("body.0", (32, 16), 4, 4), ("body.2", (16, 32), 4, 4)]
    assert [r.trainable for r in report.rows] == [4 * (32 + 16) + 32, 4 * (16 + 32) + 16]
    assert [r.dense for r in report.rows] == [32 * 16 + 32, 16 * 32 + 16]
    assert report.ratio == pytest.approx((224 + 208) / (544 + 528))
    # embedding 11*16, head 16*11 + 11, plus the factors and biases above; W0 frozen
    assert report.model_trainable == 176 + 187 + 224 + 208
    assert report.model_total == report.model_trainable + 2 * 32 * 16
    table = str(report)
    assert "body.0" in table and "432" in table and "1,072" in table


def test_report_of_full_rank_counts_dense_layers(tiny_mlp):
    report = FullRank().report(tiny_mlp)
    assert [(r.rank, r.trainable, r.dense) for r in report.rows] == [(16, 544, 544), (16, 528, 528)]
    assert report.ratio == 1.0


def test_fractional_rank_is_relative_to_min_dimension(tiny_mlp):
    LoRA(rank=0.5).apply(tiny_mlp)
    assert tiny_mlp.body[0].rank == 8 and tiny_mlp.body[2].rank == 8


def test_rank_too_large_names_the_layer_and_leaves_model_untouched(tiny_mlp):
    with pytest.raises(ValueError, match=r"rank=17 is too large for layer 'body.0'.*1\.\.16"):
        LoRA(rank=17).apply(tiny_mlp)
    assert all(type(m) is not LoRALinear for m in tiny_mlp.modules())


def test_pattern_matching_nothing_is_an_error_with_suggestions(tiny_mlp):
    with pytest.raises(ValueError, match=r"'\*\.attn\.\*' matched no convertible module.*body\.0"):
        LoRA(rank=2, target_modules=["*.attn.*"]).apply(tiny_mlp)
    with pytest.raises(ValueError, match="matches \\['emb'\\], which LoRA cannot convert"):
        LoRA(rank=2, target_modules=["emb"]).apply(tiny_mlp)


def test_target_and_exclude_patterns_select_by_glob(tiny_mlp):
    strategy = LoRA(rank=2, target_modules=["body.*", "head"], exclude_modules=["body.2"])
    strategy.apply(tiny_mlp)
    assert [n for n, _ in strategy.layers(tiny_mlp)] == ["body.0", "head"]


def test_tied_output_projection_is_not_converted_by_default():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10))
    model[2].weight = model[0].weight
    strategy = LoRA(rank=2)
    assert [n for n, _ in strategy.select(model)] == ["1"]


@pytest.mark.parametrize("bad", [0, -3, 0.0, 1.5, "8", True])
def test_bad_rank_argument_is_rejected_at_construction(bad):
    with pytest.raises((ValueError, TypeError), match="rank must be an int >= 1 or a float in \\(0, 1\\]"):
        LoRA(rank=bad)


def test_param_groups_exclude_frozen_and_undecay_biases(tiny_mlp):
    strategy = LoRA(rank=2)
    strategy.apply(tiny_mlp)
    groups = {g["lowrank_role"]: g for g in strategy.param_groups(tiny_mlp, weight_decay=0.1)}
    assert set(groups) == {"dense", "bias", "factor"}
    assert groups["bias"]["weight_decay"] == 0.0 and groups["factor"]["weight_decay"] == 0.1
    held = {id(p) for g in groups.values() for p in g["params"]}
    assert id(tiny_mlp.body[0].weight) not in held
    assert id(tiny_mlp.body[0].lora_A) in held and id(tiny_mlp.body[0].lora_B) in held


class Projection(nn.Module):
    """A non-Linear module with a 2-D weight, as other libraries define projections."""

    def __init__(self, n: int, m: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(m, n))
        self.bias = nn.Parameter(torch.randn(m))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


def test_a_strategy_converts_the_module_types_it_declares():
    class ProjectionLoRA(LoRA):
        module_types = (nn.Linear, Projection)

    torch.manual_seed(0)
    model = nn.Sequential(Projection(6, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(3, 6)
    before = model(x)
    assert [n for n, _ in LoRA(rank=2).select(model)] == ["2"]
    strategy = ProjectionLoRA(rank=2)
    strategy.apply(model)
    assert isinstance(model[0], LoRALinear) and isinstance(model[2], LoRALinear)
    torch.testing.assert_close(model(x), before)
