import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lr_lightning.callbacks import LowRankCallback
from lr_lightning.layers.tucker import TuckerConv2d, TuckerLinear, truncation_rank, tucker_to_tensor
from lr_lightning.optim import StateReset
from lr_lightning.optim_transport import CoreMomentTransport
from lr_lightning.strategies.base import strategy_from_config
from lr_lightning.strategies.tdlrt import TDLRT, BUGOptimizer


def low_rank_teacher(sigma: list[float], n: int = 24, seed: int = 0) -> torch.Tensor:
    """``T = A diag(sigma) B^T`` with random orthonormal ``A``, ``B`` (``n x k``)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.linalg.qr(torch.randn(n, len(sigma), generator=g))[0]
    b = torch.linalg.qr(torch.randn(n, len(sigma), generator=g))[0]
    return a @ torch.diag(torch.tensor(sigma)) @ b.T


def tucker_teacher(ranks: tuple[int, int, int, int], shape=(12, 10, 3, 3), seed: int = 0) -> torch.Tensor:
    """A ``C_out x C_in x 3 x 3`` kernel of exact Tucker ranks ``ranks``."""
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(ranks, generator=g)
    bases = [torch.linalg.qr(torch.randn(n, r, generator=g))[0] for n, r in zip(shape, ranks)]
    return tucker_to_tensor(core, bases)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions are dominated by thread start-up on a busy 2-core machine: run them on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(model: nn.Module, strategy: TDLRT, batch, steps: int, lr: float = 1e-2, optimizer=None):
    """The callback's schedule in a plain loop: ``before_optimizer_step``, step, then ``update`` if due."""
    optimizer = optimizer or torch.optim.Adam(strategy.param_groups(model), lr=lr)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x, y = batch(g)
        loss = (model(x) - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        for edit in strategy.before_optimizer_step(model, step):
            edit.apply_(optimizer)
        optimizer.step()
        if strategy.should_update(step + 1):
            for edit in strategy.update(model, step + 1):
                edit.apply_(optimizer)
    return optimizer, loss.item()


def matrix_problem(teacher: torch.Tensor, strategy: TDLRT, steps: int = 150):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 24, bias=False))
    strategy.apply(model)

    def batch(g):
        x = torch.randn(64, 24, generator=g)
        return x, x @ teacher.T

    _, loss = train(model, strategy, batch, steps)
    return model, loss


def orthonormality_error(layer) -> float:
    bases = [layer.basis(m).detach()[:, :r] for m, r in enumerate(layer.ranks) if layer.factored[m]]
    return max((u.T @ u - torch.eye(u.shape[1])).abs().max().item() for u in bases)


class Regression(L.LightningModule):
    """A user's module that knows nothing of TDLRT (``optimizer_wrapper`` shows the faithful opt-in)."""

    def __init__(self, optimizer_wrapper=None, sgd: bool = False, net: nn.Module | None = None,
                 sgd_lr: float = 0.2) -> None:
        super().__init__()
        self.net = net if net is not None else nn.Sequential(nn.Linear(24, 24, bias=False))
        self.optimizer_wrapper, self.sgd, self.sgd_lr = optimizer_wrapper, sgd, sgd_lr
        self.training_steps = 0

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        x, y = batch
        loss = (self.net(x) - y).square().mean()
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        if self.sgd:
            optimizer = torch.optim.SGD(self.parameters(), lr=self.sgd_lr)
        else:
            optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        return self.optimizer_wrapper(optimizer, self) if self.optimizer_wrapper else optimizer


def regression_loader(teacher: torch.Tensor) -> DataLoader:
    x = torch.randn(640, 24, generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(x, x @ teacher.T), batch_size=64, shuffle=True)


def fit(module: L.LightningModule, strategy: TDLRT, loader: DataLoader, steps: int) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[LowRankCallback(strategy, verbose=False)])
    trainer.fit(module, loader)
    return trainer


def test_ranks_adapt_to_a_rank_3_teacher_through_the_trainer_and_callback():
    torch.manual_seed(0)
    teacher = low_rank_teacher([3.0, 2.0, 1.5])
    strategy = TDLRT(tau=0.1, init_rank=8, max_rank=12, augment_every=10)
    module = Regression()
    trainer = fit(module, strategy, regression_loader(teacher), steps=150)
    layer = module.net[0]
    assert isinstance(layer, TuckerLinear) and layer.capacities == (24, 24)
    assert layer.ranks == (3, 3)  # started at 8, grew to 16 at augmentations, truncated to the teacher's rank
    assert trainer.callback_metrics["loss"] < 1e-2
    assert orthonormality_error(layer) < 1e-5
    torch.testing.assert_close(layer.dense_weight(), teacher, atol=0.05, rtol=0)


@pytest.mark.parametrize(("spatial_rank", "expected"), [(None, (3, 2, 3, 3)), (3, (3, 2, 2, 2))])
def test_ranks_adapt_to_a_tucker_teacher_kernel(spatial_rank, expected):
    teacher = tucker_teacher((3, 2, 2, 2))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(10, 12, 3, padding=1, bias=False))
    strategy = TDLRT(tau=0.1, init_rank=6, max_rank=6, augment_every=10, spatial_rank=spatial_rank)
    strategy.apply(model)

    def batch(g):
        x = torch.randn(8, 10, 6, 6, generator=g)
        return x, F.conv2d(x, teacher, padding=1)

    train(model, strategy, batch, steps=150)
    layer = model[0]
    assert isinstance(layer, TuckerConv2d) and layer.ranks == expected  # from (6, 6, 3, 3)
    assert orthonormality_error(layer) < 1e-5


def test_larger_tau_gives_smaller_ranks_and_higher_compression():
    sigma = [4.0, 2.0, 1.0, 0.5, 0.25, 0.125]
    teacher = low_rank_teacher(sigma)
    taus = [0.04, 0.1, 0.2, 0.4]
    ranks, compressions = [], []
    for tau in taus:
        strategy = TDLRT(tau=tau, init_rank=8, max_rank=12, min_rank=1, augment_every=10)
        model, _ = matrix_problem(teacher, strategy)
        ranks.append(model[0].rank)
        compressions.append(strategy.compression(model))
    assert ranks == sorted(ranks, reverse=True) and ranks[0] > ranks[-1]
    assert compressions == sorted(compressions) and compressions[0] < compressions[-1]
    # each rank is what the tolerance gives on the teacher's own spectrum
    assert ranks == [truncation_rank(torch.tensor(sigma, dtype=torch.float64), tau) for tau in taus]


class WithHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_cheap_variant_augments_trains_cores_then_truncates_and_never_steps_the_bases():
    torch.manual_seed(0)
    model = WithHead()
    strategy = TDLRT(tau=0.1, init_rank=3, max_rank=6, augment_every=4)
    strategy.apply(model)
    layer = model.body
    # a user's optimizer over model.parameters(), with weight decay on everything
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(32, 16), torch.randn(32, 3)
    assert [s for s in range(13) if strategy.is_augment_step(s)] == [0, 4, 8, 12]
    assert [s for s in range(13) if strategy.should_update(s)] == [4, 8, 12]
    for step in range(8):
        bases = [b.detach().clone() for b in layer.basis_parameters()]
        core, head, ranks = layer.core.detach().clone(), model.head.weight.detach().clone(), layer.ranks
        out = model(x).detach()
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        edits = strategy.before_optimizer_step(model, step)
        if strategy.is_augment_step(step):
            assert [len(edits), layer.ranks] == [1, (2 * ranks[0], 2 * ranks[1])]  # the core's moment transport
            assert layer.core.grad is None
            torch.testing.assert_close(model(x), out, atol=1e-6, rtol=1e-6)  # augmentation keeps the function
        else:
            assert edits == [] and layer.ranks == ranks
        for edit in edits:
            edit.apply_(optimizer)
        augmented = [b.detach().clone() for b in layer.basis_parameters()], layer.core.detach().clone()
        optimizer.step()
        assert all(torch.equal(b, a) for b, a in zip(layer.basis_parameters(), augmented[0]))  # bases never step
        assert torch.equal(layer.core, augmented[1]) == strategy.is_augment_step(step)  # cores step between
        assert not torch.equal(model.head.weight, head)  # the rest of the model steps every time
        if not strategy.is_augment_step(step):
            assert all(torch.equal(b, a) for b, a in zip(layer.basis_parameters(), bases))
            assert not torch.equal(layer.core, core)
        if strategy.should_update(step + 1):
            strategy.update(model, step + 1)
            assert layer.rank < 2 * ranks[0]
        assert orthonormality_error(layer) < 1e-5
    # the bases never had a gradient at an optimizer step, so they hold no optimizer state
    assert all(not optimizer.state.get(b) for b in layer.basis_parameters())


def _trained_linear(moments: str):
    torch.manual_seed(0)
    model = WithHead()
    strategy = TDLRT(tau=0.2, init_rank=4, max_rank=6, augment_every=5, moments=moments)
    strategy.apply(model)
    x, y = torch.randn(32, 16), torch.randn(32, 3)
    optimizer, _ = train(model, strategy, lambda g: (x, y), steps=4)  # augmented at 0, three core steps
    return model, strategy, optimizer


def test_core_moments_are_transported_in_place_at_truncation_and_augmentation():
    model, strategy, optimizer = _trained_linear("transport")
    layer = model.body
    state = optimizer.state[layer.core]
    m, v, step = state["exp_avg"], state["exp_avg_sq"], state["step"].item()
    for operation in ("truncate", "augment"):
        r_out, r_in = layer.ranks
        u_old, v_old = layer.basis_out.detach()[:, :r_out].clone(), layer.basis_in.detach()[:, :r_in].clone()
        m_old, v_old_moment = m[:r_out, :r_in].clone().double(), state["exp_avg_sq"][:r_out, :r_in].clone().double()
        if operation == "truncate":
            edits = strategy.update(model, 5)
        else:
            F.mse_loss(model(torch.randn(8, 16)), torch.randn(8, 3)).backward()
            edits = strategy.before_optimizer_step(model, 5)
        edit = edits[-1]
        assert isinstance(edit, CoreMomentTransport)
        changed, seen = edit.apply_(optimizer)
        assert seen == 2 * layer.core.numel() and (changed > 0) == (operation == "truncate")  # augment pads
        n_out, n_in = layer.ranks
        big_m = (layer.basis_out.detach()[:, :n_out].T @ u_old).double()  # M = U_new^T U_old
        big_n = (layer.basis_in.detach()[:, :n_in].T @ v_old).double()
        assert state["exp_avg"] is m and state["exp_avg_sq"] is v  # edited in place
        torch.testing.assert_close(m[:n_out, :n_in].double(), big_m @ m_old @ big_n.T, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(v[:n_out, :n_in].double(), (big_m @ v_old_moment.sqrt() @ big_n.T).square(),
                                   atol=1e-9, rtol=1e-4)
        outside = m.clone()
        outside[:n_out, :n_in] = 0
        assert not outside.any() and state["step"].item() == step


def test_reset_policy_zeroes_the_core_state():
    model, strategy, optimizer = _trained_linear("reset")
    [edit] = strategy.update(model, 5)
    assert isinstance(edit, StateReset) and edit.params == [model.body.core]
    edit.apply_(optimizer)
    state = optimizer.state[model.body.core]
    assert not state["exp_avg"].any() and not state["exp_avg_sq"].any() and state["step"].item() == 0
    assert optimizer.state[model.head.weight]["exp_avg"].any()


def test_faithful_variant_runs_two_passes_per_step_and_adapts_the_rank():
    teacher = low_rank_teacher([3.0, 2.0, 1.5])
    strategy = TDLRT(tau=0.1, init_rank=8, max_rank=12, variant="faithful")
    torch.manual_seed(0)
    module = Regression(optimizer_wrapper=strategy.wrap_optimizer, sgd=True)  # DLRT's optimizer: SGD
    trainer = fit(module, strategy, regression_loader(teacher), steps=100)
    assert isinstance(trainer.optimizers[0], BUGOptimizer)
    assert module.training_steps == 2 * 100  # K-step pass and Galerkin pass
    layer = module.net[0]
    assert layer.ranks == (3, 3)  # truncated every step, from 8
    assert trainer.callback_metrics["loss"] < 0.1  # from 0.75
    assert orthonormality_error(layer) < 1e-5


def test_the_callback_installs_the_integrator_in_a_users_own_optimizer():
    strategy = TDLRT(init_rank=4, max_rank=8, variant="faithful")
    module = Regression()
    trainer = fit(module, strategy, regression_loader(low_rank_teacher([1.0])), steps=2)
    assert isinstance(trainer.optimizers[0], BUGOptimizer) and module.training_steps == 2 * 2


def test_faithful_variant_stepped_without_the_integrator_is_a_clear_error():
    strategy = TDLRT(init_rank=4, max_rank=8, variant="faithful")
    model = strategy.apply(nn.Sequential(nn.Linear(8, 8)))
    with pytest.raises(RuntimeError, match="wrap_optimizer"):
        strategy.before_optimizer_step(model, 0)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16 * 4 * 4, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.depthwise(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return self.head(F.relu(self.fc(x.flatten(1))))


@pytest.mark.parametrize("spatial_rank", [None, 2])
def test_report_compression_matches_the_exported_parameter_count(spatial_rank):
    torch.manual_seed(0)
    model = SmallCNN()
    strategy = TDLRT(tau=0.2, init_rank=0.25, max_rank=0.5, augment_every=3, spatial_rank=spatial_rank)
    strategy.apply(model)
    assert [name for name, _ in strategy.layers(model)] == ["conv1", "conv2", "fc"]  # grouped conv and head stay
    x, y = torch.randn(8, 3, 8, 8), torch.randn(8, 10)
    train(model, strategy, lambda g: (x, y), steps=3)
    report = strategy.report(model)
    compact = strategy.export(model)
    exported = {name: sum(p.numel() for p in compact.get_submodule(name).parameters())
                for name in ("conv1", "conv2", "fc")}
    assert [row.trainable for row in report.rows] == list(exported.values())
    assert [row.dense for row in report.rows] == [8 * 3 * 9 + 8, 16 * 8 * 9 + 16, 256 * 32 + 32]
    assert strategy.compression(model) == pytest.approx(1 - sum(exported.values()) / report.dense)
    torch.testing.assert_close(compact(x), model(x), atol=1e-5, rtol=1e-5)


def test_param_groups_leave_out_the_never_stepped_bases_and_decay_the_core():
    torch.manual_seed(0)
    model = WithHead()
    strategy = TDLRT(init_rank=2, max_rank=4)
    strategy.apply(model)
    groups = {g["lowrank_role"]: g for g in strategy.param_groups(model, weight_decay=0.1)}
    assert "basis" not in groups  # cheap variant: the bases never step
    assert groups["core"]["weight_decay"] == 0.1 and groups["core"]["params"] == [model.body.core]
    assert "weight_decay" not in {g["lowrank_role"]: g for g in strategy.param_groups(model)}["core"]
    faithful = TDLRT(init_rank=2, max_rank=4, variant="faithful")
    faithful_groups = {g["lowrank_role"]: g for g in faithful.param_groups(model, weight_decay=0.1)}
    assert faithful_groups["basis"]["weight_decay"] == 0.0 and len(faithful_groups["basis"]["params"]) == 2


def test_cheap_variant_keeps_optimizer_state_only_for_what_steps():
    """AdamW on ``param_groups``: two moments per core and bias element, none for the bases
    (before: ``2 (m + n) cap`` more, 1,048,576 of 1,181,696 elements at 1024 x 1024, rank 128)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48))
    strategy = TDLRT(init_rank=8, max_rank=8, augment_every=3)
    strategy.apply(model)
    layer = model[0]
    batch = lambda g: (torch.randn(16, 64, generator=g), torch.randn(16, 48, generator=g))  # noqa: E731
    optimizer = torch.optim.AdamW(strategy.param_groups(model), lr=1e-2)
    train(model, strategy, batch, steps=7, optimizer=optimizer)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(b) not in held and b.grad is None for b in layer.basis_parameters())
    elements = sum(v.numel() for state in optimizer.state.values() for v in state.values() if v.dim() > 0)
    assert elements == 2 * (layer.core.numel() + layer.bias.numel()) == 2 * (16 * 16 + 48)


def test_ranks_resolve_per_layer_and_the_config_round_trips(one_thread):
    torch.manual_seed(0)
    model = SmallCNN()
    strategy = TDLRT(tau=0.05, init_rank=3, max_rank=0.5, min_rank=1, spatial_rank=2)
    strategy.apply(model)
    # conv1 (8 x 3 x 3 x 3): max_rank = 0.5 of (8, 3) rounds to (4, 2), and init_rank=3 is capped by it
    assert model.conv1.ranks == (3, 2, 2, 2) and model.conv1.max_ranks == (4, 2, 3, 3)
    assert model.conv1.capacities == (8, 3, 3, 3) and model.fc.capacities == (32, 32)
    rebuilt = strategy_from_config(strategy.to_config())
    assert isinstance(rebuilt, TDLRT) and rebuilt.to_config() == strategy.to_config()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tau": 1.0}, r"tau must be a relative tolerance in \[0, 1\)"),
    ({"init_rank": 8, "max_rank": 4}, "init_rank must be <= max_rank"),
    ({"min_rank": 0}, "min_rank must be an int >= 1"),
    ({"variant": "exact"}, r"variant must be one of \('cheap', 'faithful'\)"),
    ({"augment_every": 1}, "augment_every must be an int >= 2"),
    ({"moments": "keep"}, r"moments must be one of \('transport', 'reset'\)"),
    ({"spatial_rank": 0}, "spatial_rank must be None"),
    ({"max_rank": 1.5}, r"max_rank must be an int >= 1 or a float in \(0, 1\]"),
])
def test_bad_arguments_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TDLRT(**kwargs)


def test_faithful_step_equals_the_dense_weight_dlrt_step():
    """One ``BUGOptimizer`` step with SGD is DLRT's step computed from dense weights and gradients (float64):
    ``K^1 = U S - lr G V``, ``L^1 = V S^T - lr G^T U``, ``U' = orth([U | K^1])``, ``V' = orth([V | L^1])``,
    ``S' = U'^T W V' - lr U'^T G' V'`` (``G'`` the gradient at ``U' U'^T W V' V'^T``), then the truncated SVD."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12, bias=False))
    strategy = TDLRT(tau=0.05, init_rank=3, max_rank=6, variant="faithful")
    strategy.apply(model)
    layer, lr = model[0], 0.5
    x, y = torch.randn(32, 16), torch.randn(32, 12)

    def gradient(weight: torch.Tensor) -> torch.Tensor:
        weight = weight.clone().requires_grad_()
        F.mse_loss(x.double() @ weight.T, y.double()).backward()
        return weight.grad

    core, (u, v) = layer.active_factors()
    core, u, v = core.double(), u.double(), v.double()
    weight = u @ core @ v.T
    g = gradient(weight)
    u_hat = torch.linalg.qr(torch.cat([u, u @ core - lr * g @ v], dim=1))[0]
    v_hat = torch.linalg.qr(torch.cat([v, v @ core.T - lr * g.T @ u], dim=1))[0]
    galerkin = u_hat @ u_hat.T @ weight @ v_hat @ v_hat.T
    stepped = galerkin - lr * u_hat @ u_hat.T @ gradient(galerkin) @ v_hat @ v_hat.T
    p, sigma, qh = torch.linalg.svd(stepped)
    rank = max(truncation_rank(sigma[: 2 * 3], 0.05), 2)
    expected = p[:, :rank] @ torch.diag(sigma[:rank]) @ qh[:rank]

    optimizer = strategy.wrap_optimizer(torch.optim.SGD(strategy.param_groups(model), lr=lr), model)

    def closure():
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert layer.ranks == (rank, rank)
    torch.testing.assert_close(layer.dense_weight().double(), expected, atol=1e-5, rtol=1e-4)
    assert orthonormality_error(layer) < 1e-5


def _trainer(strategy: TDLRT, steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[LowRankCallback(strategy, verbose=False)], **kwargs)


def test_faithful_variant_refuses_gradient_accumulation_at_fit_start():
    """Each integrator step evaluates the loss twice on one batch; the gradients Lightning accumulated over
    the earlier micro-batches cannot enter it (only the last micro-batch's would reach the other parameters)."""
    strategy = TDLRT(init_rank=4, max_rank=8, variant="faithful")
    module = Regression()
    trainer = _trainer(strategy, steps=2, accumulate_grad_batches=2)
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=1 .*got accumulate_grad_batches=2"):
        trainer.fit(module, regression_loader(low_rank_teacher([1.0])))
    assert module.training_steps == 0  # refused before any step


def test_cheap_variant_with_gradient_accumulation_equals_the_large_batch():
    """Two micro-batches of 32 accumulated give the same run as batches of 64, through augmentations
    (from the accumulated basis gradients), core steps and truncations. The teacher has full rank: with a
    low-rank one the new directions ``(I - U U^T) dL/dU`` are rank-deficient, and augmentation fills the
    rest with arbitrary orthonormal columns, which rounding alone changes."""
    teacher = low_rank_teacher(torch.linspace(3.0, 0.5, 24).tolist())
    x = torch.randn(384, 24, generator=torch.Generator().manual_seed(1))
    data = TensorDataset(x, x @ teacher.T)
    weights = {}
    for batch_size, accumulate in ((64, 1), (32, 2)):
        strategy = TDLRT(tau=0.1, init_rank=8, max_rank=12, augment_every=3)
        torch.manual_seed(0)
        module = Regression()
        _trainer(strategy, steps=6, accumulate_grad_batches=accumulate).fit(
            module, DataLoader(data, batch_size=batch_size))
        assert module.training_steps == 6 * accumulate
        weights[accumulate] = module.net[0].ranks, module.net[0].dense_weight().detach()
    assert weights[1][0] == weights[2][0]
    torch.testing.assert_close(weights[2][1], weights[1][1], atol=1e-5, rtol=1e-5)


class ConvRegression(Regression):
    """A Conv2d (factored spatial modes with ``spatial_rank``) fitting a Tucker teacher kernel."""

    def __init__(self) -> None:
        super().__init__(sgd=True, net=nn.Sequential(nn.Conv2d(10, 12, 3, padding=1, bias=False)), sgd_lr=0.5)


def _mean_loss(module, loader) -> float:
    with torch.no_grad():
        return torch.stack([(module.net(x) - y).square().mean() for x, y in loader]).mean().item()


@pytest.mark.parametrize("variant", ["faithful", "cheap"])
def test_both_variants_train_a_linear_and_a_spatially_factored_conv_under_bf16_mixed(variant):
    """``precision="bf16-mixed"`` (the faithful error message's advice for fp16): bfloat16 activations meet
    float32 bases and cores in the factored forward, the K pass's backward-only terms and the spatial mode
    products. The runs train as the float32 runs do, and the parameters stay float32 with orthonormal bases."""
    x = torch.randn(64, 10, 6, 6, generator=torch.Generator().manual_seed(1))
    problems = {"linear": (Regression, regression_loader(low_rank_teacher([3.0, 2.0, 1.5])), 60),
                "conv": (ConvRegression, DataLoader(TensorDataset(x, F.conv2d(x, tucker_teacher((3, 2, 2, 2)),
                                                                               padding=1)), batch_size=16), 20)}
    for name, (module_type, loader, steps) in problems.items():
        losses = {}
        for precision in ("32-true", "bf16-mixed"):
            torch.manual_seed(0)
            module = module_type(sgd=True) if module_type is Regression else module_type()
            strategy = TDLRT(tau=0.1, init_rank=6, max_rank=8, variant=variant, augment_every=5, spatial_rank=2)
            strategy.apply(module)  # to measure the converted model's loss first (the callback's apply is a no-op)
            before = _mean_loss(module, loader)
            _trainer(strategy, steps=steps, precision=precision).fit(module, loader)
            assert module.training_steps == (2 if variant == "faithful" else 1) * steps
            losses[precision] = _mean_loss(module, loader)
            assert losses[precision] < 0.5 * before, (name, precision)
            layer = module.net[0]
            assert all(p.dtype == torch.float32 for p in layer.parameters())
            assert orthonormality_error(layer) < 1e-5
        assert losses["bf16-mixed"] == pytest.approx(losses["32-true"], rel=0.05), name


def test_faithful_variant_refuses_fp16_mixed_precision_at_fit_start():
    """``16-mixed`` steps through a ``GradScaler``, without the closure the integrator evaluates twice."""
    from lightning.pytorch.plugins.precision import MixedPrecision  # fp16 AMP on CPU needs an explicit plugin

    strategy = TDLRT(init_rank=4, max_rank=8, variant="faithful")
    module = Regression()
    scaler = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match=r"precision='16-mixed'.*'bf16-mixed'"):
        _trainer(strategy, steps=2, plugins=[scaler]).fit(module, regression_loader(low_rank_teacher([1.0])))
    assert module.training_steps == 0
    cheap = TDLRT(init_rank=4, max_rank=8)
    _trainer(cheap, steps=2, plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]).fit(
        Regression(), regression_loader(low_rank_teacher([1.0])))


def test_a_closure_less_faithful_step_is_a_clear_error():
    strategy = TDLRT(init_rank=4, max_rank=8, variant="faithful")
    model = strategy.apply(nn.Sequential(nn.Linear(8, 8)))
    optimizer = strategy.wrap_optimizer(torch.optim.SGD(strategy.param_groups(model), lr=0.1), model)
    with pytest.raises(RuntimeError, match="needs a closure.*'bf16-mixed'"):
        optimizer.step()


class ConvNet(nn.Module):
    """A Conv2d (four bases with ``spatial_rank``) and a Linear to factor, and a head (kept dense)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(F.relu(self.fc(F.relu(self.conv(x)).flatten(1))))


@pytest.mark.parametrize("moments", ["transport", "reset"])
def test_every_faithful_k_step_is_adams_first_step_and_only_the_bases_state_is_reset(moments):
    """The ``K_i`` change coordinates every integrator step, so their Adam state is reset after each one: during
    every K-step (not only the first) the bases' state is Adam's first step on that step's gradient ``g``
    (``step = 1``, ``m = (1 - beta1) g``, ``v = (1 - beta2) g^2``) and ``K^1 - K^0`` is the update a fresh Adam
    applies to ``g``; after every step the bases' state is zero, while the cores keep their ``moments`` policy
    and the dense head its moments."""
    torch.manual_seed(0)
    model = ConvNet()
    strategy = TDLRT(tau=0.1, init_rank=2, max_rank=4, variant="faithful", spatial_rank=2, moments=moments)
    strategy.apply(model)  # the head stays dense
    layers = [layer for _, layer in strategy.tucker_layers(model)]
    bases = [b for layer in layers for b in layer.basis_parameters()]
    assert len(bases) == 4 + 2
    lr, betas, eps = 1e-2, (0.9, 0.999), 1e-8
    optimizer = strategy.wrap_optimizer(torch.optim.Adam(strategy.param_groups(model), lr=lr, betas=betas, eps=eps),
                                        model)
    increments = {}  # basis -> K^1 - K^0 of the current step

    def recording(layer):
        end_k_step = layer.end_k_step_

        def end_k_step_(**kwargs):
            stepped = end_k_step(**kwargs)
            increments.update({layer.basis(mode): k for mode, k in enumerate(stepped) if k is not None})
            return stepped
        return end_k_step_

    for layer in layers:
        layer.end_k_step_ = recording(layer)
    x, y = torch.randn(4, 3, 4, 4), torch.randn(4, 2)
    passes, gradients, k_states = [], {}, {}

    def closure():
        if passes and passes[-1] == "K":  # the Galerkin pass: the K-step has stepped, the bases are restored
            k_states.update({b: {k: v.clone() for k, v in optimizer.state[b].items()} for b in bases})
        passes.append("G" if passes and passes[-1] == "K" else "K")
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if passes[-1] == "K":
            gradients.update({b: b.grad.clone() for b in bases})
        return loss

    for step in range(1, 4):
        increments.clear(), gradients.clear(), k_states.clear()
        optimizer.step(closure)
        assert passes == ["K", "G"] * step
        for basis in bases:
            g, state = gradients[basis], k_states[basis]
            assert state["step"].item() == 1  # without the reset: the step number
            torch.testing.assert_close(state["exp_avg"], (1 - betas[0]) * g, atol=1e-7, rtol=1e-5)
            torch.testing.assert_close(state["exp_avg_sq"], (1 - betas[1]) * g.square(), atol=1e-10, rtol=1e-5)
            fresh = torch.zeros_like(g, requires_grad=True)
            fresh.grad = g.clone()
            torch.optim.Adam([fresh], lr=lr, betas=betas, eps=eps).step()
            increment = increments[basis]
            assert increment.abs().max() > 0.5 * lr  # a normalised-gradient step, about lr per entry
            torch.testing.assert_close(increment, fresh.detach()[:, : increment.shape[1]], atol=1e-6, rtol=1e-4)
            state = optimizer.state[basis]  # after the truncation: reset in place
            assert state["step"].item() == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
            assert state["exp_avg"] is not k_states[basis]["exp_avg"]
        for layer in layers:
            core = optimizer.state[layer.core]
            if moments == "transport":  # kept through the step's augmentation and truncation
                assert core["step"].item() == step and core["exp_avg"].any() and core["exp_avg_sq"].any()
            else:
                assert core["step"].item() == 0 and not core["exp_avg"].any()
        head = optimizer.state[model.head.weight]
        assert head["step"].item() == step and head["exp_avg"].any()


def test_a_run_stopped_inside_a_cheap_cycle_is_finished_by_its_truncation():
    """Augmented before step 5 of a 4-step cycle, stopped after step 6: the pending truncation finishes it."""
    cheap = TDLRT(augment_every=4)
    assert cheap.operations_to_finish(6) == ["truncate"]
    assert cheap.operations_to_finish(8) == []  # the cycle's own truncation already ran after step 8
    assert TDLRT(variant="faithful").operations_to_finish(6) == []  # truncates inside every step
