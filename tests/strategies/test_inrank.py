import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lr_lightning.callbacks import LowRankCallback, RankMonitor
from lr_lightning.layers.incremental import IncrementalLinear
from lr_lightning.models.gpt import GPT, GPTConfig
from lr_lightning.strategies.inrank import InRank, explained_ratio, select_rank

TEACHER_RANK = 4


class Regression(L.LightningModule):
    """``y = T x`` with one 32 x 32 linear layer, trained with Adam on MSE."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 32, bias=False))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _teacher_data(base: torch.Tensor | None = None, n: int = 512) -> TensorDataset:
    """``y = (W0 +) U diag(2, 1.5, 1.2, 1) Vᵀ x``: the (cumulative) map to learn has rank 4."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(32, TEACHER_RANK, generator=g))
    v, _ = torch.linalg.qr(torch.randn(32, TEACHER_RANK, generator=g))
    teacher = u @ torch.diag(torch.tensor([2.0, 1.5, 1.2, 1.0])) @ v.T
    if base is not None:
        teacher = teacher + base
    x = torch.randn(n, 32, generator=g)
    return TensorDataset(x, x @ teacher.T)


def _fit(strategy: InRank, steps: int, callbacks=(), accumulate: int = 1, module: Regression | None = None,
         data: TensorDataset | None = None, ckpt_path: str | None = None) -> Regression:
    torch.manual_seed(0)
    module = module or Regression()
    data = data or _teacher_data()
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, max_steps=steps, accumulate_grad_batches=accumulate,
              callbacks=[LowRankCallback(strategy, verbose=False), *callbacks]).fit(
        module, DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)),
        ckpt_path=ckpt_path)
    return module


class SpyInRank(InRank):
    """Records the optimizer steps at which operations ran and the ranks they left."""

    def run(self, model, operations, step):
        edits = super().run(model, operations, step)
        self.calls = [*getattr(self, "calls", []), (step, [layer.rank for _, layer in self.layers(model)])]
        return edits


def test_explained_ratios_match_the_reference_formulas():
    torch.manual_seed(0)
    weight = torch.randn(24, 5) @ torch.randn(5, 20)  # rank 5 inside 20 singular values
    full = torch.linalg.svdvals(weight)  # what the reference code computes: min(m, n) values
    for k in range(5):
        kept = full.clone()
        kept[k:] = 0
        code = 1 - torch.var(full - kept) / torch.var(full)  # in_rank_efficient._jit_compute_explained_variance
        assert explained_ratio(full[:5], k, size=20) == pytest.approx(code.item(), rel=1e-5)
    assert explained_ratio(torch.tensor([4.0, 3.0]), 1, size=20, kind="energy") == pytest.approx(16 / 25)
    assert explained_ratio(torch.zeros(3), 1, size=20) == 1.0  # nothing to explain: no growth


def test_select_rank_is_the_smallest_k_strictly_above_the_threshold_never_below_the_rank_and_capped():
    s = torch.tensor([5.0, 4.0, 3.0, 0.01, 0.01, 0.0])
    assert select_rank(s, 1, 6, 0.99, 20, "energy") == 3
    assert select_rank(s, 4, 6, 0.99, 20, "energy") == 4  # already past: stays
    assert select_rank(s, 1, 2, 0.99, 20, "energy") == 1  # the scan stops one short of the limit
    assert select_rank(s, 1, 5, 0.999999, 20, "energy") == 4  # nothing passes: limit - 1
    assert select_rank(s, 1, 6, 0.4, 20, "energy") == 1  # 25 / 50 of the energy
    assert select_rank(torch.tensor([4.0, 3.0]), 1, 3, 16 / 25, 20, "energy") == 2  # equal is not enough


def _reference_rank(layer: IncrementalLinear, threshold: float, max_modes: int) -> int:
    """The released code's ``_rank_determination`` on ``layer``: full ``svdvals`` of ``(B A)ᵀ``, the
    tail-variance ratio, ``k`` from ``r`` to ``min(r + b, R_max - b) - 1``, the first with a ratio ``> threshold``."""
    r, b = layer.rank, layer.buffer
    matrix = layer.A.detach()[:r + b].T @ layer.B.detach()[:, :r + b].T
    s = torch.linalg.svdvals(matrix.float())
    for index in range(r, min(r + b, max_modes - b)):
        kept = s.clone()
        kept[index:] = 0
        if 1 - torch.var(s - kept) / torch.var(s) > threshold:
            break
    return index


def test_reference_growth_selects_the_released_codes_rank_at_every_check():
    """Spectra of the layer as the reference code would see them, check after check from a random init."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(96, 80))
    strategy = InRank(init_rank=2, buffer=8, warmup_steps=0, check_every=1, switch_epoch=None)
    strategy.apply(module)
    layer = module[0]
    assert layer.capacity == 40 and layer.A[10:].abs().min() > 0  # all of R_max = min(m, n) / 2 is random
    seen = []
    for step in range(1, 8):
        expected = _reference_rank(layer, 0.9, layer.capacity)
        strategy.grow(module, step)
        assert layer.rank == expected
        seen.append(expected)
    assert len(set(seen)) >= 4  # the checks really moved the rank


def test_reference_growth_keeps_raising_the_rank_of_the_tiny_gpt_from_its_random_init():
    """Turned on as they are, new random columns show in the next spectrum; zero-started ones never do."""
    ranks = {}
    for growth in ("reference", "zero"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=64))
        strategy = InRank(init_rank=2, buffer=8, warmup_steps=0, check_every=1, growth=growth,
                          target_modules=["*.mlp.*"], switch_epoch=None)
        strategy.apply(model)
        history = []
        for step in range(1, 5):
            strategy.grow(model, step)
            history.append([layer.rank for _, layer in strategy.layers(model)])
        ranks[growth] = history
    for before, after in zip(ranks["reference"], ranks["reference"][1:]):
        assert all(a > b for a, b in zip(after, before))
    assert all(r > 2 for r in ranks["zero"][0]) and ranks["zero"][-1] == ranks["zero"][0]


@pytest.mark.parametrize(("keep_base", "ratio"), [(False, "variance"), (True, "energy")])
def test_rank_grows_from_init_rank_to_the_teacher_rank_and_never_decreases(keep_base, ratio, tmp_path):
    """Within the buffer logic: r settles at exactly the teacher's rank, the forward uses r + buffer columns."""
    strategy = InRank(init_rank=2, buffer=4, max_rank=16, warmup_steps=20, check_every=5, ratio=ratio,
                      keep_base=keep_base, growth="zero" if keep_base else "reference", switch_epoch=None)
    monitor = RankMonitor(every_n_steps=5, plot_path=str(tmp_path / "ranks.png"))
    torch.manual_seed(0)
    module = Regression()
    data = _teacher_data(module.net[0].weight.detach().clone() if keep_base else None)
    _fit(strategy, 120, [monitor], module=module, data=data)
    ranks = [rank for _, rank in monitor.history["net.0"]]
    assert ranks[0] == 2 and ranks[-1] == TEACHER_RANK
    assert all(a <= b for a, b in zip(ranks, ranks[1:]))
    assert ranks[4] == 2  # no growth during the warmup (steps 0..20)
    layer = module.net[0]
    assert (layer.rank, layer.active_rank) == (TEACHER_RANK, TEACHER_RANK + 4)
    assert (tmp_path / "ranks.png").read_bytes()[:4] == b"\x89PNG"


def test_rank_monitor_records_the_rank_each_check_left_at_that_step():
    """A monitor that runs before the strategy's callback (as a trainer callback runs before a task's
    ``configure_callbacks``) must not lag a check by one record."""
    strategy = SpyInRank(init_rank=2, buffer=4, max_rank=16, warmup_steps=20, check_every=5, switch_epoch=None)
    monitor = RankMonitor(every_n_steps=5)
    torch.manual_seed(0)
    L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, max_steps=60,
              callbacks=[monitor, LowRankCallback(strategy, verbose=False)]).fit(
        Regression(), DataLoader(_teacher_data(), batch_size=32, shuffle=True))
    recorded = dict(monitor.history["net.0"])
    assert any(ranks[0] > 2 for _, ranks in strategy.calls)
    assert all(recorded[step] == ranks[0] for step, ranks in strategy.calls)


def test_checks_run_on_optimizer_steps_whatever_the_gradient_accumulation():
    steps_seen = []
    for accumulate in (1, 4):
        strategy = SpyInRank(init_rank=2, buffer=4, max_rank=16, warmup_steps=4, check_every=3, switch_epoch=None)
        _fit(strategy, 12, accumulate=accumulate)
        steps_seen.append([step for step, _ in strategy.calls])
    assert steps_seen[0] == steps_seen[1] == [6, 9, 12]


def test_switch_refactors_at_the_found_rank_drops_the_buffer_and_resets_the_factor_state():
    strategy = SpyInRank(init_rank=2, buffer=4, max_rank=16, warmup_steps=20, check_every=5, switch_step=100,
                         switch_epoch=None)
    numel = {}

    class Numel(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            numel.setdefault(trainer.global_step, pl_module.net[0].trainable_numel())

    module = _fit(strategy, 104, [Numel()])
    layer = module.net[0]
    assert strategy.switched and [step for step, _ in strategy.calls][-1] == 100
    assert (layer.rank, layer.buffer, layer.active_rank) == (TEACHER_RANK, 0, TEACHER_RANK)
    assert numel[99] == (TEACHER_RANK + 4) * 64 and layer.trainable_numel() == TEACHER_RANK * 64
    assert layer.capacity == TEACHER_RANK and layer.A.numel() + layer.B.numel() == TEACHER_RANK * 64  # shrunk
    optimizer = module.trainer.optimizers[0]
    assert optimizer.state[layer.A]["step"].item() == 4  # reset at step 100, then 4 more steps
    moments = [v for state in optimizer.state.values() for v in state.values() if v.dim() > 0]
    assert sum(v.numel() for v in moments) == 2 * TEACHER_RANK * 64  # Adam state of the compact factors only
    assert all(step <= 100 for step, _ in strategy.calls)  # no checks after the switch
    loss = nn.functional.mse_loss(module.net(_teacher_data().tensors[0]), _teacher_data().tensors[1])
    assert loss < 1e-3


def test_switch_keeps_the_function_up_to_the_dropped_buffer_spectrum():
    strategy = InRank(init_rank=2, buffer=4, max_rank=16, warmup_steps=20, check_every=5, switch_epoch=None)
    module = _fit(strategy, 100)
    layer = module.net[0]
    x = torch.randn(64, 32)
    weight, s = layer.dense_weight().detach(), layer.spectrum()
    before = module.net(x).detach()
    [reset] = strategy.switch(module, step=100)
    assert reset.mode == "full" and {id(p) for p in reset.params} == {id(layer.A), id(layer.B)}
    u, sv, vh = torch.linalg.svd(weight)
    best = u[:, :TEACHER_RANK] @ torch.diag(sv[:TEACHER_RANK]) @ vh[:TEACHER_RANK]
    torch.testing.assert_close(layer.dense_weight().detach(), best, rtol=1e-4, atol=1e-5)
    change = (module.net(x) - before).norm(dim=1).max()
    assert change <= s[TEACHER_RANK] * x.norm(dim=1).max() + 1e-5  # only the tiny buffer directions are dropped


def test_switch_at_the_end_of_the_first_epoch_by_default():
    strategy = InRank(init_rank=2, buffer=4, max_rank=16, warmup_steps=2, check_every=2)
    assert strategy.switch_epoch == 0 and strategy.switch_step is None
    module = _fit(strategy, 24, data=_teacher_data(n=320))  # 10 steps per epoch
    layer = module.net[0]
    assert strategy.switched and layer.buffer == 0
    assert module.trainer.optimizers[0].state[layer.A]["step"].item() == 14  # reset at step 10


def test_checkpoint_after_growth_resumes_with_the_grown_ranks(tmp_path):
    strategy = InRank(init_rank=2, buffer=4, max_rank=16, warmup_steps=20, check_every=5, switch_epoch=None)
    module = _fit(strategy, 64)  # 4 epochs of 16 steps
    grown = module.net[0].rank
    assert grown > 2
    path = tmp_path / "grown.ckpt"
    module.trainer.save_checkpoint(path)
    seen = {}

    class AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["rank"], seen["step"] = pl_module.net[0].rank, trainer.global_step
            seen["weight"] = pl_module.net[0].dense_weight().detach().clone()

    _fit(InRank(init_rank=2, buffer=4, max_rank=16, warmup_steps=20, check_every=5, switch_epoch=None), 65,
         [AtStart()], ckpt_path=str(path))
    assert seen["rank"] == grown and seen["step"] == 64
    torch.testing.assert_close(seen["weight"], module.net[0].dense_weight().detach(), rtol=0, atol=0)


def test_checkpoint_after_the_switch_resumes_the_compact_layer_exactly(tmp_path):
    def strategy():
        return InRank(init_rank=2, buffer=4, max_rank=16, warmup_steps=20, check_every=5, switch_step=40,
                      switch_epoch=None)

    data = _teacher_data(n=32)  # one batch per epoch: every run sees the same batches whatever the resume point
    straight = _fit(strategy(), 56, data=data)
    first = _fit(strategy(), 48, data=data)
    path = tmp_path / "switched.ckpt"
    first.trainer.save_checkpoint(path)
    resumed = _fit(strategy(), 56, data=data, ckpt_path=str(path))
    layer = resumed.net[0]
    assert layer.capacity == layer.rank == straight.net[0].capacity < 16
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("growth", ["reference", "zero"])
def test_growth_is_identical_for_two_replicas(growth, tiny_mlp):
    strategies = [InRank(init_rank=1, buffer=2, max_rank=8, warmup_steps=0, check_every=1, growth=growth)
                  for _ in range(2)]
    models = []
    for strategy, global_seed in zip(strategies, (1, 2)):
        model = strategy.apply(copy.deepcopy(tiny_mlp))
        torch.manual_seed(global_seed)  # a different global RNG state must not matter
        assert strategy.grow(model, step=3) == []
        models.append(model)
    assert models[0].body[0].rank > 1
    for a, b in zip(*(m.state_dict().values() for m in models)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_converts_the_selected_layers_and_logs_total_ranks(tiny_mlp):
    default = InRank(init_rank=1, buffer=2).apply(copy.deepcopy(tiny_mlp))
    assert default.body[0].capacity == 8  # min(16, 32) / 2, the reference code's R_max
    strategy = InRank(init_rank=2, buffer=3, max_rank=8, target_modules=["body.*"])
    strategy.apply(tiny_mlp)
    assert isinstance(tiny_mlp.body[0], IncrementalLinear) and isinstance(tiny_mlp.head, nn.Linear)
    assert tiny_mlp.body[0].capacity == 8 and tiny_mlp.body[0].weight is None
    assert strategy.metrics(tiny_mlp) == {"lowrank/total_rank": 4.0, "inrank/total_active_rank": 10.0,
                                          "inrank/switched": 0.0}


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"ratio": "entropy"}, ValueError, r"ratio must be one of \('variance', 'energy'\)"),
    ({"buffer": 0}, ValueError, "buffer must be an int >= 1"),
    ({"init_rank": 1.5}, TypeError, "init_rank must be an int >= 1"),
    ({"check_every": 0}, ValueError, "check_every must be an int >= 1"),
    ({"threshold": 1.5}, ValueError, r"threshold must be in \(0, 1\]"),
    ({"max_rank": 0}, ValueError, "max_rank must be an int >= 1"),
    ({"switch_step": 0}, ValueError, "switch_step must be an int >= 1 or None"),
    ({"switch_epoch": -1}, ValueError, "switch_epoch must be an int >= 0 or None"),
    ({"growth": "random"}, ValueError, r"growth must be one of \('reference', 'zero'\)"),
    ({"keep_base": True}, ValueError, "keep_base=True .* needs growth='zero'"),
])
def test_bad_arguments_name_the_parameter(kwargs, error, message):
    with pytest.raises(error, match=message):
        InRank(**kwargs)


def test_buffer_larger_than_a_layers_capacity_names_the_layer(tiny_mlp):
    with pytest.raises(ValueError, match="init_rank \\+ buffer = 18 exceeds the capacity 8 of layer 'body.0'"):
        InRank(init_rank=2, buffer=16).apply(tiny_mlp)
