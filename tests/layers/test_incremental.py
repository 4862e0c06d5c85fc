import pytest
import torch
from torch import nn

from lr_lightning.layers.incremental import IncrementalLinear


def _layer(base: bool = False, capacity: int = 12, rank: int = 2, buffer: int = 3, trained: bool = True,
           seed: int = 0) -> IncrementalLinear:
    torch.manual_seed(seed)
    layer = IncrementalLinear.from_linear(nn.Linear(20, 24), capacity, rank, buffer, base=base,
                                          generator=torch.Generator().manual_seed(seed))
    if trained:  # stands for training: every active column of both factors non-zero
        with torch.no_grad():
            layer.B[:, :rank + buffer].normal_()
            layer.A[:rank + buffer].normal_()
    return layer


@pytest.mark.parametrize("deficient_a", [False, True])
@pytest.mark.parametrize("base", [False, True])
def test_spectrum_from_the_small_core_equals_the_full_svd(base, deficient_a):
    layer = _layer(base)
    if deficient_a:  # a repeated row of A: no Cholesky of A Aᵀ, the QR route gives the same values
        with torch.no_grad():
            layer.A[4] = layer.A[3]
    full = torch.linalg.svdvals(layer.update_weight().detach())
    s = layer.spectrum()
    assert s.shape == (5,)  # r + buffer values, never the capacity
    torch.testing.assert_close(s, full[:5], rtol=1e-5, atol=1e-4)
    assert full[5:].abs().max() < 1e-4  # the product has rank r + buffer


def test_conversion_starts_from_the_dense_map_with_a_base_and_from_a_random_product_without():
    torch.manual_seed(0)
    linear = nn.Linear(20, 24)
    x = torch.randn(7, 20)
    general = IncrementalLinear.from_linear(linear, 12, 2, 3, base=True)
    torch.testing.assert_close(general(x), linear(x))  # B = 0: W = W0
    assert not general.weight.requires_grad
    efficient = IncrementalLinear.from_linear(linear, 12, 2, 3, base=False)
    assert efficient.weight is None and torch.linalg.matrix_rank(efficient.update_weight().detach()) == 5
    for layer in (general, efficient):
        assert layer.A[5:].abs().sum() == 0 and layer.B[:, 5:].abs().sum() == 0  # inactive capacity is zero
        torch.testing.assert_close(layer.bias, linear.bias)
    with pytest.raises(ValueError, match="fill='random' needs base=False"):
        IncrementalLinear.from_linear(linear, 12, 2, 3, base=True, fill="random")


def test_random_fill_initialises_the_whole_capacity_and_growth_turns_columns_on_as_they_are():
    """The released code's layer: all ``R_max`` columns Kaiming-uniform, new columns used unchanged."""
    torch.manual_seed(0)
    layer = IncrementalLinear.from_linear(nn.Linear(20, 24), 12, 2, 3, fill="random",
                                          generator=torch.Generator().manual_seed(0))
    bound_a, bound_b = 1 / 20 ** 0.5, 1 / 12 ** 0.5
    assert 0 < layer.A.abs().min() and layer.A.abs().max() <= bound_a and layer.A[5:].abs().max() > 0.8 * bound_a
    assert 0 < layer.B.abs().min() and layer.B.abs().max() <= bound_b
    stored_a, stored_b = layer.A.detach().clone(), layer.B.detach().clone()
    layer.grow_(4)
    assert layer.active_rank == 7
    torch.testing.assert_close(layer.A, stored_a, rtol=0, atol=0)
    torch.testing.assert_close(layer.B, stored_b, rtol=0, atol=0)
    torch.testing.assert_close(layer.update_weight(), stored_b[:, :7] @ stored_a[:7])


def test_forward_uses_only_the_active_slice_and_weight_decay_leaves_the_rest_at_zero():
    layer = _layer()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        layer(torch.randn(8, 20)).square().sum().backward()
        assert layer.A.grad[5:].abs().sum() == 0 and layer.B.grad[:, 5:].abs().sum() == 0
        assert layer.A.grad[:5].abs().sum() > 0 and layer.B.grad[:, :5].abs().sum() > 0
        optimizer.step()
    assert layer.A[5:].abs().sum() == 0 and layer.B[:, 5:].abs().sum() == 0
    assert layer.trainable_numel() == 5 * (20 + 24) + 24


@pytest.mark.parametrize("base", [False, True])
def test_grow_keeps_the_function_and_activates_new_columns(base):
    layer = _layer(base)
    x = torch.randn(7, 20)
    before = layer(x)
    layer.grow_(4, torch.Generator().manual_seed(1))
    assert (layer.rank, layer.buffer, layer.active_rank) == (4, 3, 7)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    assert (layer.A[5:7].abs() > 0).all() and layer.B[:, 5:7].abs().sum() == 0  # new: A random, B zero
    assert layer.A[7:].abs().sum() == 0
    layer.grow_(3)  # the rank never decreases
    assert layer.rank == 4
    with pytest.raises(ValueError, match="rank \\+ buffer must be <= capacity=12"):
        layer.grow_(10)


def test_grow_draws_the_same_columns_whatever_the_global_seed():
    a, b = _layer(), _layer()
    torch.manual_seed(1)
    a.grow_(4, torch.Generator().manual_seed(7))
    torch.manual_seed(2)
    b.grow_(4, torch.Generator().manual_seed(7))
    torch.testing.assert_close(a.A, b.A, rtol=0, atol=0)


@pytest.mark.parametrize("base", [False, True])
def test_truncate_of_a_rank_r_product_keeps_the_function_and_shrinks_the_layer(base):
    layer = _layer(base)
    with torch.no_grad():
        layer.B[:, 2:5] = 0  # B A has rank r = 2: the buffer holds nothing yet
    x = torch.randn(7, 20)
    before = layer(x)
    layer.truncate_()
    assert (layer.rank, layer.buffer, layer.active_rank, layer.capacity) == (2, 0, 2, 12)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    assert layer.trainable_numel() == 2 * (20 + 24) + 24
    assert layer.A[2:].abs().sum() == 0 and layer.B[:, 2:].abs().sum() == 0


def test_truncate_is_the_best_rank_r_approximation_with_balanced_sign_fixed_factors():
    layer = _layer()
    weight = layer.update_weight().detach()
    s = torch.linalg.svdvals(weight)
    layer.truncate_(3)
    truncated = layer.update_weight().detach()
    error = (weight - truncated).square().sum()
    torch.testing.assert_close(error, s[3:].square().sum(), rtol=1e-4, atol=1e-4)  # Eckart-Young
    torch.testing.assert_close(layer.B[:, :3].norm(dim=0), s[:3].sqrt(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.A[:3].norm(dim=1), s[:3].sqrt(), rtol=1e-5, atol=1e-5)
    peaks = layer.B[:, :3].gather(0, layer.B[:, :3].abs().argmax(0, keepdim=True))
    assert (peaks > 0).all()
    with pytest.raises(ValueError, match="rank must be in 1..3"):
        layer.truncate_(4)


@pytest.mark.parametrize("base", [False, True])
def test_export_computes_the_same_function_at_the_active_rank(base):
    layer = _layer(base)
    compact = layer.export()
    x = torch.randn(7, 20)
    torch.testing.assert_close(compact(x), layer(x), rtol=1e-5, atol=1e-5)
    if not base:
        assert sum(p.numel() for p in compact.parameters()) == layer.trainable_numel()


def test_ranks_live_in_the_state_dict():
    layer = _layer()
    layer.grow_(4)
    copy = _layer(trained=False)
    copy.load_state_dict(layer.state_dict())
    assert (copy.rank, copy.active_rank) == (4, 7)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"capacity": 21}, r"capacity must be in 1..20 \(min\(m, n\)\), got 21"),
    ({"rank": 5, "buffer": 8}, "need rank >= 1, buffer >= 0 and rank \\+ buffer <= capacity=12"),
    ({"rank": 0}, "need rank >= 1"),
])
def test_bad_sizes_are_rejected(kwargs, message):
    args = {"in_features": 20, "out_features": 24, "capacity": 12, "rank": 2, "buffer": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        IncrementalLinear(**args)


@pytest.mark.parametrize("base", [False, True])
def test_shrink_after_truncate_holds_exactly_the_rank_and_moves_the_kept_state(base):
    layer = _layer(base)
    x = torch.randn(7, 20)
    layer.truncate_()
    optimizer = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    layer(x).square().sum().backward()
    optimizer.step()
    old_a, old_b = layer.A, layer.B
    state_a = optimizer.state[old_a]["exp_avg_sq"].clone()
    before = layer(x)
    for move in layer.shrink_():
        move.apply_(optimizer)
    assert (layer.rank, layer.capacity, layer.A.shape, layer.B.shape) == (2, 2, (2, 20), (24, 2))
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    assert old_a not in optimizer.state and old_b not in optimizer.state
    torch.testing.assert_close(optimizer.state[layer.A]["exp_avg_sq"], state_a[:2])
    state_elements = sum(v.numel() for s in optimizer.state.values() for v in s.values() if v.dim() > 0)
    assert state_elements == 2 * (2 * (20 + 24) + 24)  # two Adam moments of A, B and the bias


def test_a_shrunk_layer_loads_into_a_fresh_layer_at_its_capacity():
    layer = _layer()
    layer.truncate_()
    layer.shrink_()
    fresh = _layer(trained=False, seed=1)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 20)
    assert (fresh.capacity, fresh.rank, fresh.buffer) == (2, 2, 0)
    torch.testing.assert_close(fresh(x), layer(x))
