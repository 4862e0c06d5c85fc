import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lr_lightning.layers import SVDConv2d, SVDLinear

CONVS = [
    pytest.param({"kernel_size": 3, "padding": 1}, id="3x3"),
    pytest.param({"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)}, id="strided"),
    pytest.param({"kernel_size": 3, "padding": "same"}, id="same"),
    pytest.param({"kernel_size": 1, "bias": False}, id="1x1"),
]


KINDS = ["linear", "conv-channel", "conv-spatial"]


def _case(kind: str):
    """A dense layer, a function converting it (keyword arguments go to the converter), an input."""
    torch.manual_seed(0)
    if kind == "linear":
        dense = nn.Linear(7, 5)
        return dense, lambda **kw: SVDLinear.from_linear(dense, **kw), torch.randn(3, 7)
    dense = nn.Conv2d(4, 6, 3, padding=1)
    return dense, lambda **kw: SVDConv2d.from_conv(dense, kind.split("-")[1], **kw), torch.randn(2, 4, 9, 8)


@pytest.mark.parametrize("decomposition", ["channel", "spatial"])
@pytest.mark.parametrize("kwargs", CONVS)
def test_dense_init_reproduces_the_conv_and_its_exact_svd(decomposition, kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **kwargs)
    layer = SVDConv2d.from_conv(conv, decomposition)
    x = torch.randn(2, 4, 9, 8)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=1e-5)
    matrix = layer.kernel_to_matrix(conv.weight.detach())
    assert matrix.shape == layer.matrix_shape
    torch.testing.assert_close(layer.s.detach(), torch.linalg.svdvals(matrix))
    eye = torch.eye(layer.capacity)
    torch.testing.assert_close(layer.N.T @ layer.N, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.C @ layer.C.T, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.dense_weight(), conv.weight.reshape(6, -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("decomposition", ["channel", "spatial"])
@pytest.mark.parametrize("kwargs", CONVS)
def test_two_stage_conv_equals_one_conv_with_the_factored_kernel(decomposition, kwargs):
    """With arbitrary (non-orthogonal) factors, the k x k-then-1x1 or k x 1-then-1 x k forward is the
    dense conv with kernel N diag(|s|) C folded back: the decomposition math, not just the init."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **kwargs)
    layer = SVDConv2d.from_conv(conv, decomposition, init="random", generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 4, 9, 8)
    expected = F.conv2d(x, layer.kernel(), layer.bias, conv.stride, conv.padding, conv.dilation)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.kernel_to_matrix(layer.kernel()), layer.matrix(), atol=1e-6, rtol=0)


def test_channel_and_spatial_matrices_have_the_papers_shapes():
    conv = nn.Conv2d(4, 6, (3, 5))
    assert SVDConv2d.from_conv(conv, "channel").matrix_shape == (6, 4 * 3 * 5)  # C_out x C_in k^2
    assert SVDConv2d.from_conv(conv, "spatial").matrix_shape == (4 * 3, 6 * 5)  # C_in kh x C_out kw
    assert SVDConv2d.from_conv(conv, "spatial").capacity == 12


def test_random_init_is_the_papers_and_identical_for_the_same_seed():
    linear = nn.Linear(300, 200)
    a, b = (SVDLinear.from_linear(linear, init="random", generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a.N, b.N) and torch.equal(a.s, b.s) and torch.equal(a.C, b.C)
    assert a.N.std().item() == pytest.approx((2 / 200) ** 0.5, rel=0.05)  # Kaiming normal, fan_in = r
    assert a.C.std().item() == pytest.approx((2 / 300) ** 0.5, rel=0.05)
    assert a.s.std().item() == pytest.approx(1.0, rel=0.15) and (a.s < 0).any()  # s ~ N(0, 1)


def test_energy_keep_matches_a_hand_computation():
    layer = SVDLinear(4, 4)
    with torch.no_grad():
        layer.s.copy_(torch.tensor([3.0, 0.1, -2.0, 1.0]))  # energies 9, 0.01, 4, 1 of 14.01
    assert layer.energy_keep(0.05).tolist() == [True, False, True, True]  # 13 < 0.95 * 14.01 <= 14
    assert layer.energy_keep(0.1).tolist() == [True, False, True, False]  # 13 >= 0.9 * 14.01
    assert layer.energy_keep(0.0).tolist() == [True, True, True, True]
    assert layer.energy_keep(0.99).tolist() == [True, False, False, False]  # at least one is kept
    with pytest.raises(ValueError, match=r"energy must be in \[0, 1\)"):
        layer.energy_keep(1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_pruned_values_stay_masked_in_place_and_get_no_gradient(kind):
    dense, convert, x = _case(kind)
    layer = convert()
    params = {n: p for n, p in layer.named_parameters()}
    keep = torch.ones(layer.capacity, dtype=torch.bool)
    keep[[1, 3]] = False
    with torch.no_grad():
        layer.s[[0, 3]] = 0.0  # a (kept or pruned) singular value at exactly zero must not make gradients NaN
    assert layer.prune_(keep) == 2 and layer.rank == layer.capacity - 2
    assert {n: p for n, p in layer.named_parameters()} == params  # same Parameter objects
    assert layer.s[~keep].eq(0).all() and layer.N[:, ~keep].eq(0).all() and layer.C[~keep].eq(0).all()
    layer(x).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    assert layer.s.grad[~keep].eq(0).all() and layer.N.grad[:, ~keep].eq(0).all() and layer.C.grad[~keep].eq(0).all()
    assert layer.s.grad[keep].abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_export_drops_pruned_values_and_keeps_the_outputs(kind):
    dense, convert, x = _case(kind)
    layer = convert(init="random", generator=torch.Generator().manual_seed(0))
    layer.prune_(layer.energy_keep(0.3))
    rank, (a, b) = layer.rank, layer.matrix_shape
    assert 0 < rank < layer.capacity
    compact = layer.export()
    assert sum(p.numel() for p in compact.parameters()) == rank * (a + b) + dense.bias.numel()
    assert layer.trainable_numel() == rank * (a + b + 1) + dense.bias.numel()
    assert not any(isinstance(m, type(layer)) for m in compact.modules())
    torch.testing.assert_close(compact(x), layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_standardize_keeps_the_function_and_orthonormalizes(kind):
    dense, convert, x = _case(kind)
    layer = convert(init="random", generator=torch.Generator().manual_seed(0))
    keep = torch.ones(layer.capacity, dtype=torch.bool)
    keep[0] = False
    layer.prune_(keep)
    before, rank, matrix = layer(x), layer.rank, layer.matrix().detach()
    twin = convert()
    twin.load_state_dict(layer.state_dict())
    layer.standardize_()
    twin.standardize_()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-4)
    assert layer.rank == rank and layer.active[:rank].all()  # kept values first
    n, s, c = layer.factors()
    torch.testing.assert_close(s, torch.linalg.svdvals(matrix)[:rank], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(n.T @ n, torch.eye(rank), atol=1e-5, rtol=0)
    torch.testing.assert_close(c @ c.T, torch.eye(rank), atol=1e-5, rtol=0)
    pivots = n.abs().argmax(dim=0)
    assert (n[pivots, torch.arange(rank)] > 0).all()  # sign fix: each column's largest entry is positive
    assert torch.equal(layer.N, twin.N) and torch.equal(layer.C, twin.C)  # deterministic


def test_bad_conv_arguments_name_the_parameter():
    with pytest.raises(ValueError, match=r"decomposition must be one of \('channel', 'spatial'\)"):
        SVDConv2d(4, 6, 3, decomposition="depth")
    with pytest.raises(ValueError, match="groups=1"):
        SVDConv2d.from_conv(nn.Conv2d(4, 6, 3, groups=2))
    with pytest.raises(ValueError, match=r"init must be one of \('dense', 'random'\)"):
        SVDLinear.from_linear(nn.Linear(3, 3), init="orthogonal")


def _adam_state_after_one_step(layer: nn.Module, x: torch.Tensor) -> torch.optim.Adam:
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer(x).square().sum().backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("kind", KINDS)
def test_shrink_drops_pruned_values_from_memory_and_keeps_function_and_state(kind):
    dense, convert, x = _case(kind)
    layer = convert(init="random", generator=torch.Generator().manual_seed(0))
    keep = torch.ones(layer.capacity, dtype=torch.bool)
    keep[[0, 2]] = False
    layer.prune_(keep)
    optimizer = _adam_state_after_one_step(layer, x)
    old = {"N": layer.N, "s": layer.s, "C": layer.C}
    old_state = {name: optimizer.state[p]["exp_avg"].clone() for name, p in old.items()}
    before = layer(x)

    moves = layer.shrink_()
    for move in moves:
        move.apply_(optimizer)

    (a, b), k = layer.matrix_shape, int(keep.sum())
    assert layer.rank == layer.capacity == k
    assert (layer.N.shape, layer.s.shape, layer.C.shape) == ((a, k), (k,), (k, b))
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=1e-6)
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert all(any(p is q for q in held) for p in (layer.N, layer.s, layer.C))
    assert not any(p is q for p in old.values() for q in held) and not any(p in optimizer.state for p in old.values())
    torch.testing.assert_close(optimizer.state[layer.N]["exp_avg"], old_state["N"][:, keep])
    torch.testing.assert_close(optimizer.state[layer.s]["exp_avg"], old_state["s"][keep])
    torch.testing.assert_close(optimizer.state[layer.C]["exp_avg"], old_state["C"][keep])
    layer(x).square().sum().backward()
    optimizer.step()  # the moved state has the new shapes


@pytest.mark.parametrize("kind", KINDS)
def test_a_shrunk_layers_state_dict_loads_into_a_fresh_full_capacity_layer(kind):
    dense, convert, x = _case(kind)
    layer = convert(init="random", generator=torch.Generator().manual_seed(0))
    layer.prune_(layer.energy_keep(0.3))
    layer.shrink_()
    fresh = convert()
    assert fresh.capacity > layer.capacity
    fresh.load_state_dict(layer.state_dict())
    assert (fresh.rank, fresh.capacity) == (layer.rank, layer.capacity)
    torch.testing.assert_close(fresh(x), layer(x))
