"""The contract every strategy keeps, checked over one table of all seven methods (peft's TEST_CASES style)."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyMLP
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lr_lightning.callbacks import LowRankCallback
from lr_lightning.layers import LoRALinear, LowRankLayer
from lr_lightning.strategies import (
    SST,
    TDLRT,
    FullRank,
    InRank,
    LayerRow,
    LoRA,
    LowRankStrategy,
    ReLoRA,
    SVDTraining,
    strategy_from_config,
)
from lr_lightning.strategies.base import RunState

STEPS = 8
"""Optimizer steps of every schedule test: each method's operations all fall within them."""


@dataclass(frozen=True)
class Case:
    """One strategy configuration that fits ``TinyMLP`` (Linear 16 -> 32 and 32 -> 16) and what holds for it."""

    cls: type[LowRankStrategy]
    kwargs: dict[str, Any]
    keeps_function_at_init: bool
    """``apply`` leaves the function unchanged (else the test checks that it does change it)."""
    exported_numel: Callable[[LayerRow], int]
    """Parameters of a converted layer's ``export()``, from its report row."""
    factored_export: bool
    """The export is a chain of Linear maps through ``export_width(row)`` features (else one dense ``nn.Linear``);
    once the schedule has run, through ``row.rank``."""
    scheduled: frozenset[str]
    """The operations ``should_update`` names within ``STEPS`` steps (the rest run inside the optimizer step)."""
    run_state: dict[str, Any] = field(default_factory=dict)
    """Every ``RunState`` of the class, with a value other than its initial one."""
    resume_at: tuple[int, ...] = (4,)
    """Checkpoint steps of the resume test: the first has operations before and after it; a second one comes
    after the layers shrank."""
    export_width: Callable[[LayerRow], int] = lambda row: row.rank
    """Features between the exported Linear maps of a factored export."""


def dense_numel(row: LayerRow) -> int:
    return row.dense


def trainable_numel(row: LayerRow) -> int:
    return row.trainable


def active_columns(row: LayerRow) -> int:
    """InRank's forward uses ``r + buffer`` columns (trainable ``(r + buffer)(m + n) + m``); its rank is ``r``."""
    return (row.trainable - row.shape[0]) // sum(row.shape)


def trainable_but_spectrum(row: LayerRow) -> int:
    """SVD training's export folds ``|s|`` into ``C``: ``r (m + n) + m``, ``r`` fewer than ``r (m + n + 1) + m``."""
    return row.trainable - row.rank


INRANK_KWARGS = {"init_rank": 2, "buffer": 2, "max_rank": 0.5, "warmup_steps": 0, "check_every": 2, "switch_step": 6,
                 "switch_epoch": None}  # capacity 8; grows after steps 2, 4, 6, then switches and shrinks
TDLRT_KWARGS = {"init_rank": 4, "max_rank": 8, "tau": 0.1}  # a rank-4 truncated SVD of a full-rank init
CASES = [
    pytest.param(Case(FullRank, {}, keeps_function_at_init=True, exported_numel=dense_numel, factored_export=False,
                      scheduled=frozenset()), id="full"),
    pytest.param(Case(LoRA, {"rank": 4}, keeps_function_at_init=True, exported_numel=dense_numel,
                      factored_export=False, scheduled=frozenset()), id="lora"),
    pytest.param(Case(ReLoRA, {"rank": 4, "merge_every": 3, "restart_warmup_steps": 1}, keeps_function_at_init=True,
                      exported_numel=dense_numel, factored_export=False, scheduled=frozenset({"merge"}),
                      run_state={"merges": 3}), id="relora"),
    pytest.param(Case(SST, {"rank": 4, "iteration_interval": 3, "round_length": 2, "restart_warmup_steps": 1},
                      keeps_function_at_init=True, exported_numel=dense_numel, factored_export=False,
                      scheduled=frozenset({"resvd", "resample"})), id="sst"),
    pytest.param(Case(InRank, INRANK_KWARGS, keeps_function_at_init=False, exported_numel=trainable_numel,
                      factored_export=True, scheduled=frozenset({"grow", "switch"}), run_state={"switched": True},
                      resume_at=(4, 7), export_width=active_columns), id="inrank"),
    pytest.param(Case(InRank, {**INRANK_KWARGS, "keep_base": True, "growth": "zero"}, keeps_function_at_init=True,
                      exported_numel=dense_numel, factored_export=False, scheduled=frozenset({"grow", "switch"}),
                      run_state={"switched": True}, resume_at=(4, 7)), id="inrank-base"),
    pytest.param(Case(TDLRT, {**TDLRT_KWARGS, "augment_every": 2}, keeps_function_at_init=False,
                      exported_numel=trainable_numel, factored_export=True, scheduled=frozenset({"truncate"}),
                      resume_at=(3,)), id="tdlrt"),
    pytest.param(Case(TDLRT, {**TDLRT_KWARGS, "variant": "faithful", "moments": "reset"}, keeps_function_at_init=False,
                      exported_numel=trainable_numel, factored_export=True, scheduled=frozenset(), resume_at=(3,)),
                 id="tdlrt-faithful"),
    pytest.param(Case(SVDTraining, {"sparsify_at": 2, "prune_at": 5, "energy": 0.3, "init": "dense"},
                      keeps_function_at_init=True, exported_numel=trainable_but_spectrum, factored_export=True,
                      scheduled=frozenset({"sparsify", "prune"}), run_state={"stage": "finetune"}, resume_at=(3, 6)),
                 id="svd"),
]


def _with_extra(base: type[LowRankStrategy]) -> type[LowRankStrategy]:
    """A user subclass with its own argument that forwards everything else to ``base`` by keyword."""

    class WithExtra(base):  # type: ignore[valid-type, misc]
        def __init__(self, extra: int = 1, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.extra = extra

    return _importable(WithExtra, f"{base.__name__}WithExtra")


def _storing_elsewhere(base: type[LowRankStrategy]) -> type[LowRankStrategy]:
    """A user subclass that keeps its argument ``knob`` under another attribute name."""

    class StoringElsewhere(base):  # type: ignore[valid-type, misc]
        def __init__(self, knob: float = 0.5, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._knob_value = knob

    return _importable(StoringElsewhere, f"{base.__name__}StoringElsewhere")


def _importable(cls: type, name: str) -> type:
    """Name ``cls`` as a module-level class of this file, so ``strategy_from_config`` can import it."""
    cls.__name__ = cls.__qualname__ = name
    globals()[name] = cls
    return cls


SUBCLASSES = {cls: (_with_extra(cls), _storing_elsewhere(cls)) for cls in dict.fromkeys(p.values[0].cls for p in CASES)}


def _inputs() -> torch.Tensor:
    return torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _perturb_trainable_(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def _run_schedule_(strategy: LowRankStrategy, model: nn.Module, steps: int) -> None:
    """What LowRankCallback does after each of ``steps`` optimizer steps, without an optimizer: project, run the
    operations due, shrink the layers whose rank is final."""
    for step in range(1, steps + 1):
        strategy.after_optimizer_step(model, step)
        strategy.run(model, strategy.should_update(step), step)
        for _, layer in strategy.layers_to_shrink(model):
            layer.shrink_()


def _run_state_names(cls: type) -> set[str]:
    return {name for klass in cls.__mro__ for name, value in vars(klass).items() if isinstance(value, RunState)}


# --------------------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("case", CASES)
def test_apply_converts_exactly_the_selected_layers_idempotently_and_keeps_the_head_dense(tiny_mlp, case):
    strategy = case.cls(**case.kwargs)
    before = dict(tiny_mlp.named_modules())
    assert strategy.apply(tiny_mlp) is tiny_mlp
    assert [n for n, _ in strategy.select(tiny_mlp)] == ["body.0", "body.2"]
    converted = [n for n, m in tiny_mlp.named_modules() if isinstance(m, LowRankLayer)]
    if case.cls is FullRank:  # reports the layers at full rank and leaves them as they are
        assert converted == [] and strategy.layers(tiny_mlp) == []
        assert tiny_mlp.body[0] is before["body.0"] and tiny_mlp.body[2] is before["body.2"]
    else:
        assert converted == [n for n, _ in strategy.layers(tiny_mlp)] == ["body.0", "body.2"]
        assert [(m.out_features, m.in_features) for _, m in strategy.layers(tiny_mlp)] == [(32, 16), (16, 32)]
    assert tiny_mlp.head is before["head"] and type(tiny_mlp.head) is nn.Linear
    assert tiny_mlp.emb is before["emb"]
    modules = [(n, id(m)) for n, m in tiny_mlp.named_modules()]
    params = [id(p) for p in tiny_mlp.parameters()]
    strategy.apply(tiny_mlp)
    case.cls(**case.kwargs).apply(tiny_mlp)  # another instance finds the layers converted, too
    assert [(n, id(m)) for n, m in tiny_mlp.named_modules()] == modules
    assert [id(p) for p in tiny_mlp.parameters()] == params


@pytest.mark.parametrize("case", CASES)
def test_apply_keeps_the_function_exactly_where_the_method_is_distortion_free(tiny_mlp, case):
    x = _inputs()
    before = tiny_mlp(x)
    case.cls(**case.kwargs).apply(tiny_mlp)
    if case.keeps_function_at_init:
        torch.testing.assert_close(tiny_mlp(x), before)
    else:  # random re-init (InRank-Efficient) or a truncated SVD (TDLRT below full rank)
        assert (tiny_mlp(x) - before).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------- report and export
def _assert_export_agrees(strategy: LowRankStrategy, model: nn.Module, case: Case, trained: bool) -> None:
    layers = [n for n, _ in strategy.layers(model)]
    compact = strategy.export(model)

    assert not any(isinstance(m, LowRankLayer) for m in compact.modules())
    assert [n for n, _ in strategy.layers(model)] == layers  # the model itself is left as it was
    assert not {id(p) for p in compact.parameters()} & {id(p) for p in model.parameters()}
    x = _inputs()
    torch.testing.assert_close(compact(x), model(x))

    rows = strategy.report(model).rows
    assert [r.name for r in rows] == ["body.0", "body.2"]
    for row in rows:
        m, n = row.shape
        assert row.dense == m * n + m and 1 <= row.rank <= row.capacity <= min(m, n)
        exported = compact.get_submodule(row.name)
        linears = [exported] if isinstance(exported, nn.Linear) else list(exported.children())
        assert all(type(layer) is nn.Linear for layer in linears), exported
        assert (linears[0].in_features, linears[-1].out_features) == (n, m)
        assert sum(p.numel() for p in exported.parameters()) == case.exported_numel(row), row
        if case.factored_export:
            width = row.rank if trained else case.export_width(row)
            assert len(linears) > 1 and linears[0].out_features == linears[-1].in_features == width, row
        else:
            assert len(linears) == 1
    assert type(compact.head) is nn.Linear and torch.equal(compact.head.weight, model.head.weight)


@pytest.mark.parametrize("case", CASES)
def test_export_computes_the_function_and_agrees_with_the_report(tiny_mlp, case):
    strategy = case.cls(**case.kwargs)
    strategy.apply(tiny_mlp)
    _perturb_trainable_(tiny_mlp, seed=2)
    _assert_export_agrees(strategy, tiny_mlp, case, trained=False)
    _run_schedule_(strategy, tiny_mlp, STEPS)  # ranks grow, get pruned, truncated; layers shrink
    _perturb_trainable_(tiny_mlp, seed=3)
    _assert_export_agrees(strategy, tiny_mlp, case, trained=True)


# --------------------------------------------------------------------------------------------- config and repr
@pytest.mark.parametrize("case", CASES)
def test_config_round_trip_rebuilds_an_equal_strategy(case):
    targets = ["body.*"]
    strategy = case.cls(**case.kwargs, target_modules=targets)
    targets.append("head")  # the recorded arguments are a copy
    config = strategy.to_config()
    assert config["class_path"] == f"{case.cls.__module__}.{case.cls.__qualname__}"
    parameters = dict(list(inspect.signature(case.cls.__init__).parameters.items())[1:])
    given = {**case.kwargs, "target_modules": ["body.*"]}
    assert config["init_args"] == {name: given.get(name, p.default) for name, p in parameters.items()}
    rebuilt = strategy_from_config(copy.deepcopy(config))
    assert type(rebuilt) is case.cls and rebuilt.to_config() == config
    for name, value in given.items():
        assert getattr(rebuilt, name) == value, name


@pytest.mark.parametrize("case", CASES)
def test_config_round_trip_of_a_subclass_that_forwards_kwargs(case):
    sub = SUBCLASSES[case.cls][0]
    given = {**case.kwargs, "target_modules": ["body.*"]}
    strategy = sub(extra=2, **given)
    assert strategy.extra == 2 and all(getattr(strategy, k) == v for k, v in given.items())
    assert strategy.to_config()["init_args"] == {"extra": 2, **given}
    assert sub(**case.kwargs).to_config()["init_args"] == {"extra": 1, **case.kwargs}  # its own default, recorded
    rebuilt = strategy_from_config(strategy.to_config())
    assert type(rebuilt) is sub and rebuilt.to_config() == strategy.to_config() and rebuilt.extra == 2
    for name, value in given.items():
        assert getattr(rebuilt, name) == value, name
    text = repr(strategy)
    assert text.startswith(f"{sub.__name__}(extra=2") and text.endswith(")")
    assert all(f"{name}={value!r}" in text for name, value in given.items())


@pytest.mark.parametrize("case", CASES)
def test_config_and_repr_of_a_subclass_storing_an_argument_under_another_name(case):
    sub = SUBCLASSES[case.cls][1]
    strategy = sub(knob=0.25, **case.kwargs)
    assert strategy.to_config()["init_args"] == {"knob": 0.25, **case.kwargs}
    rebuilt = strategy_from_config(strategy.to_config())
    assert type(rebuilt) is sub and rebuilt._knob_value == 0.25 and rebuilt.to_config() == strategy.to_config()
    arguments = [("knob", 0.25), *case.kwargs.items()]
    assert repr(strategy) == f"{sub.__name__}({', '.join(f'{name}={value!r}' for name, value in arguments)})"


@pytest.mark.parametrize("case", CASES)
def test_repr_names_the_class_and_every_init_argument(case):
    strategy = case.cls(**case.kwargs)
    parameters = list(inspect.signature(case.cls.__init__).parameters.items())[1:]
    values = [(name, case.kwargs.get(name, p.default)) for name, p in parameters]
    assert repr(strategy) == f"{case.cls.__name__}({', '.join(f'{name}={value!r}' for name, value in values)})"


# --------------------------------------------------------------------------------------------- run state
@pytest.mark.parametrize("case", CASES)
def test_state_dict_holds_exactly_the_run_state_and_loads_into_a_fresh_instance(case):
    assert set(case.run_state) == _run_state_names(case.cls)
    strategy = case.cls(**case.kwargs)
    initial = strategy.state_dict()
    assert set(initial) == set(case.run_state)
    assert all(initial[name] != value for name, value in case.run_state.items())
    for name, value in case.run_state.items():
        setattr(strategy, name, value)
    saved = strategy.state_dict()
    assert saved == case.run_state

    fresh = case.cls(**case.kwargs)
    assert fresh.state_dict() == initial
    fresh.load_state_dict(copy.deepcopy(saved))
    assert fresh.state_dict() == saved and all(getattr(fresh, k) == v for k, v in saved.items())
    untouched = case.cls(**case.kwargs)
    untouched.load_state_dict({})  # what a checkpoint lacks keeps its value
    assert untouched.state_dict() == initial

    via_callback = LowRankCallback(case.cls(**case.kwargs), verbose=False)
    via_callback.load_state_dict(copy.deepcopy(LowRankCallback(strategy, verbose=False).state_dict()))
    assert via_callback.strategy.state_dict() == saved


@pytest.mark.parametrize("case", CASES)
def test_every_operation_due_is_one_the_strategy_names(tiny_mlp, case):
    strategy = case.cls(**case.kwargs)
    strategy.apply(tiny_mlp)
    known = strategy.operations(tiny_mlp)
    assert all(callable(getattr(strategy, name)) for name in known)
    assert all(period is None or isinstance(period, int) and period >= 1 for period in known.values())
    with pytest.raises(ValueError, match=f"{case.cls.__name__} has no operation 'bogus'"):
        strategy.run(tiny_mlp, ["bogus"], 1)
    seen: set[str] = set()
    for step in range(STEPS + 1):  # as the schedule advances (run state changes, layers shrink)
        state = strategy.state_dict()
        due = strategy.should_update(step)
        at_epoch_end = strategy.should_update_at_epoch_end(step)
        assert strategy.state_dict() == state  # deciding changes nothing
        assert set(due) | set(at_epoch_end) <= set(strategy.operations(tiny_mlp)), step
        seen |= {*due, *at_epoch_end}
        if step > 0:
            strategy.after_optimizer_step(tiny_mlp, step)
            strategy.run(tiny_mlp, due, step)
            for _, layer in strategy.layers_to_shrink(tiny_mlp):
                layer.shrink_()
    assert seen == case.scheduled


class TickingReLoRA(ReLoRA):
    """A user's method: ReLoRA plus its own operation and run state, with no hand-written state_dict."""

    ticks = RunState(0)

    def operations(self, model: nn.Module) -> dict[str, int | None]:
        return {**super().operations(model), "tick": 2}

    def should_update(self, step: int) -> list[str]:
        return [*super().should_update(step), *(["tick"] if step > 0 and step % 2 == 0 else [])]

    def tick(self, model: nn.Module, step: int) -> list:
        self.ticks += 1
        return []


def test_a_subclass_run_state_is_saved_with_the_inherited_one():
    strategy = TickingReLoRA(rank=4, merge_every=3, restart_warmup_steps=1)
    assert strategy.state_dict() == {"merges": 0, "ticks": 0}
    strategy.ticks, strategy.merges = 5, 2
    fresh = TickingReLoRA(rank=4, merge_every=3, restart_warmup_steps=1)
    assert fresh.state_dict() == {"merges": 0, "ticks": 0}  # set on an instance, not on the class
    fresh.load_state_dict(strategy.state_dict())
    assert (fresh.ticks, fresh.merges) == (5, 2)


# --------------------------------------------------------------------------------------------- resume
class PlainTask(L.LightningModule):
    """A user's LightningModule: TinyMLP, cross-entropy, AdamW over ``self.parameters()``; knows no strategy."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyMLP()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _loader() -> DataLoader:
    """One batch per epoch, so a checkpoint at any step ends an epoch and a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randint(0, 11, (8, 5), generator=g),
                                    torch.randint(0, 11, (8, 5), generator=g)), batch_size=8)


def _fit(strategy: LowRankStrategy, steps: int, ckpt_path: str | None = None,
         callbacks: tuple[L.Callback, ...] = ()) -> tuple[PlainTask, L.Trainer]:
    task = PlainTask()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        callbacks=[LowRankCallback(strategy, verbose=False), *callbacks])
    trainer.fit(task, _loader(), ckpt_path=ckpt_path)
    return task, trainer


def _record_operations_(strategy: LowRankStrategy, calls: list[str]) -> None:
    """Make every operation of ``strategy`` append its name to ``calls`` (wherever it is called from: the
    callback, ``before_optimizer_step``, or TDLRT's integrator inside the optimizer step)."""
    def recording(name: str, operation: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(model: nn.Module, step: int) -> Any:
            calls.append(name)
            return operation(model, step)
        return recorded

    for name in strategy.operations(nn.Module()):
        setattr(strategy, name, recording(name, getattr(strategy, name)))


def _optimizer_state(trainer: L.Trainer) -> dict[int, dict[str, torch.Tensor]]:
    return trainer.optimizers[0].state_dict()["state"]


def _assert_bit_identical(got: dict, expected: dict, what: str) -> None:
    assert list(got) == list(expected), what
    for key, value in expected.items():
        if isinstance(value, dict):
            _assert_bit_identical(got[key], value, f"{what}[{key}]")
        else:
            assert torch.is_tensor(got[key]) and got[key].shape == value.shape and torch.equal(got[key], value), \
                f"{what}[{key}]"


_UNINTERRUPTED: dict[int, tuple[dict, dict, dict, list[int]]] = {}


def _uninterrupted(case: Case) -> tuple[dict, dict, dict, list[int]]:
    """``STEPS`` steps in one go: weights, run state, optimizer state and layer capacities (cached per case)."""
    if id(case) not in _UNINTERRUPTED:
        strategy = case.cls(**case.kwargs)
        task, trainer = _fit(strategy, STEPS)
        _UNINTERRUPTED[id(case)] = (task.state_dict(), strategy.state_dict(), _optimizer_state(trainer),
                                    [layer.capacity for _, layer in strategy.layers(task)])
    return _UNINTERRUPTED[id(case)]


def _initial_capacities(case: Case) -> list[int]:
    strategy = case.cls(**case.kwargs)
    return [layer.capacity for _, layer in strategy.layers(strategy.apply(TinyMLP()))]


RESUMES = [pytest.param(p.values[0], k, id=f"{p.id}-at{k}") for p in CASES for k in p.values[0].resume_at]


@pytest.mark.parametrize(("case", "k"), RESUMES)
def test_resuming_from_a_checkpoint_is_bit_identical_to_an_uninterrupted_run(tmp_path, case, k):
    weights, run_state, optimizer_state, capacities = _uninterrupted(case)

    before, after = [], []
    first = case.cls(**case.kwargs)
    _record_operations_(first, before)
    task, trainer = _fit(first, k)
    path = tmp_path / f"step{k}.ckpt"
    trainer.save_checkpoint(path)
    saved = (task.state_dict(), first.state_dict(), [layer.capacity for _, layer in first.layers(task)])

    resumed = case.cls(**case.kwargs)
    _record_operations_(resumed, after)
    seen = {}

    class AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step"], seen["weights"] = trainer.global_step, copy.deepcopy(pl_module.state_dict())
            seen["state"], seen["capacities"] = resumed.state_dict(), [m.capacity for _, m in resumed.layers(pl_module)]

    task, trainer = _fit(resumed, STEPS, ckpt_path=str(path), callbacks=(AtStart(),))
    assert seen["step"] == k and (seen["state"], seen["capacities"]) == saved[1:]
    _assert_bit_identical(seen["weights"], saved[0], "weights at the resume")

    if first.operations(task):
        if k == case.resume_at[0]:
            assert before and after, (before, after)  # operations ran on both sides of the checkpoint
        else:  # a checkpoint of shrunk layers: the fresh run allocated them at the saved capacities
            assert saved[2] == capacities and all(c < full for c, full in zip(capacities, _initial_capacities(case)))
    assert resumed.state_dict() == run_state
    assert [layer.capacity for _, layer in resumed.layers(task)] == capacities
    _assert_bit_identical(task.state_dict(), weights, "weights")
    _assert_bit_identical(_optimizer_state(trainer), optimizer_state, "optimizer state")


def test_a_subclass_run_state_survives_a_checkpoint(tmp_path):
    def strategy():
        return TickingReLoRA(rank=4, merge_every=3, restart_warmup_steps=1)

    first = strategy()
    _, trainer = _fit(first, 5)
    assert (first.ticks, first.merges) == (2, 1)  # ticks after steps 2 and 4, a merge after step 3
    trainer.save_checkpoint(tmp_path / "step5.ckpt")
    resumed = strategy()
    _fit(resumed, 8, ckpt_path=str(tmp_path / "step5.ckpt"))
    assert (resumed.ticks, resumed.merges) == (4, 2)  # 2 restored + ticks after 6 and 8; 1 + the merge after 6


# --------------------------------------------------------------------------------------------- hand-computed cases
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


class HistoryLoRA(LoRA):
    """A user's run state held in a list and appended to in place."""

    merged_at = RunState([])

    def note(self, step: int) -> None:
        self.merged_at.append(step)


def test_a_mutable_run_state_default_is_not_shared_between_instances():
    first, second = HistoryLoRA(rank=2), HistoryLoRA(rank=2)
    first.note(3)
    assert first.state_dict() == {"merged_at": [3]}
    assert second.state_dict() == {"merged_at": []} and HistoryLoRA(rank=2).merged_at == []
