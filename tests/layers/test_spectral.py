import pytest
import torch
from torch import nn

from lr_lightning.layers import SpectralLinear


def _layer(m: int = 12, n: int = 20, rank: int = 4, enhanced: bool = True,
           seed: int = 0) -> tuple[nn.Linear, SpectralLinear]:
    torch.manual_seed(seed)
    dense = nn.Linear(n, m)
    return dense, SpectralLinear.from_linear(dense, rank, enhanced_gradient=enhanced)


def _reference(layer: SpectralLinear, x: torch.Tensor):
    """``U diag(s) V^T x + b`` by plain autograd, on leaf copies of the active columns, ``s`` and ``x``."""
    leaves = [t.detach().clone().requires_grad_() for t in (layer.U_active, layer.V_active, layer.s, x)]
    u_act, v_act, s, x = leaves
    u = layer.U.index_copy(1, layer.active, u_act)
    v = layer.V.index_copy(1, layer.active, v_act)
    return ((x @ v) * s) @ u.mT + layer.bias, leaves


@pytest.mark.parametrize(("m", "n"), [(12, 20), (20, 12)])
def test_svd_init_reproduces_the_dense_layer(m, n):
    dense, layer = _layer(m, n)
    x = torch.randn(3, 5, n)
    torch.testing.assert_close(layer.dense_weight(), dense.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)
    assert layer.capacity == min(m, n) and layer.rank == 4
    assert torch.all(layer.s[:-1] >= layer.s[1:])  # sorted spectrum, non-negative
    assert layer.s.min() >= 0


def test_plain_gradient_matches_autograd_of_the_product():
    _, layer = _layer(enhanced=False)
    x = torch.randn(4, 3, 20, requires_grad=True)
    grad = torch.randn(4, 3, 12)
    layer(x).backward(grad)
    reference, (u_act, v_act, s, x_ref) = _reference(layer, x)
    reference.backward(grad)
    torch.testing.assert_close(layer.U_active.grad, u_act.grad)
    torch.testing.assert_close(layer.V_active.grad, v_act.grad)
    torch.testing.assert_close(layer.s.grad, s.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_enhanced_gradient_drops_the_singular_value_factor():
    _, layer = _layer(enhanced=True)
    x = torch.randn(6, 20)
    grad = torch.randn(6, 12)
    layer(x).backward(grad)
    reference, (u_act, v_act, s, _) = _reference(layer, x)
    reference.backward(grad)
    s_active = layer.s.detach()[layer.active]
    torch.testing.assert_close(layer.U_active.grad, u_act.grad / s_active)
    torch.testing.assert_close(layer.V_active.grad, v_act.grad / s_active)
    torch.testing.assert_close(layer.s.grad, s.grad)


def _bytes_saved_for_backward(layer: SpectralLinear, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward of ``layer(x)``: each storage once, the layer's own tensors free."""
    owned = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), *layer.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_keeps_no_copy_of_the_bases(dtype):
    m = n = 64
    tokens, rank = 32, 8
    _, layer = _layer(m, n, rank)
    x = torch.randn(tokens, n, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        saved = _bytes_saved_for_backward(layer, x)
    activations = x.nbytes + tokens * (n + layer.capacity) * dtype.itemsize  # x, x cast to dtype, x V
    active = (rank * (m + n) + layer.capacity) * dtype.itemsize + layer.active.nbytes  # U_active, V_active, s
    assert saved <= activations + active  # a copy of a whole basis would add m m' or n m' numbers


def test_enhanced_gradient_moves_a_vector_whose_singular_value_is_zero():
    _, layer = _layer()
    with torch.no_grad():
        layer.s[layer.active[0]] = 0.0
    layer(torch.randn(6, 20)).pow(2).sum().backward()
    assert layer.U_active.grad[:, 0].norm() > 0 and layer.V_active.grad[:, 0].norm() > 0


def test_resvd_restores_orthonormal_bases_and_keeps_the_function():
    _, layer = _layer()
    with torch.no_grad():  # what training does between re-SVDs: independent column updates
        layer.U_active.add_(0.1 * torch.randn_like(layer.U_active))
        layer.V_active.add_(0.1 * torch.randn_like(layer.V_active))
        layer.s.mul_(torch.rand_like(layer.s) + 0.5)
        layer.project_()
    x = torch.randn(7, 20)
    before, weight = layer(x), layer.dense_weight()
    u, v = layer.bases()
    assert (u.mT @ u - torch.eye(12)).abs().max() > 1e-3  # the drift that re-SVD repairs
    layer.resvd_()
    u, v = layer.bases()
    eye = torch.eye(12)
    assert (u.mT @ u - eye).abs().max() < 1e-5 and (v.mT @ v - eye).abs().max() < 1e-5
    torch.testing.assert_close(layer.dense_weight(), weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    assert torch.all(layer.s[:-1] >= layer.s[1:])


def test_select_keeps_the_function_and_swaps_the_active_columns():
    _, layer = _layer()
    x = torch.randn(5, 20)
    with torch.no_grad():
        layer.U_active.add_(0.05)  # a trained active column must survive being swapped out
    before = layer(x)
    trained = layer.U_active.detach().clone()
    old = layer.active.clone()
    layer.select_(torch.tensor([0, 5, 7, 11]))
    torch.testing.assert_close(layer(x), before)
    assert layer.active.tolist() == [0, 5, 7, 11]
    torch.testing.assert_close(layer.U[:, old], trained)
    torch.testing.assert_close(layer.U_active.detach(), layer.U[:, [0, 5, 7, 11]])


def test_sampling_is_seeded_distinct_and_follows_the_spectrum():
    _, layer = _layer(rank=4)
    first = layer.sample(torch.Generator().manual_seed(3))
    again = layer.sample(torch.Generator().manual_seed(3))
    assert first.tolist() == again.tolist() and len(set(first.tolist())) == 4
    with torch.no_grad():
        layer.s[:8] = 0.0
    for seed in range(20):  # magnitude-only sampling (arXiv v1) never picks a zero singular value
        assert layer.sample(torch.Generator().manual_seed(seed), uniform_mix=0.0).min() >= 8
    picked = torch.cat([layer.sample(torch.Generator().manual_seed(s), uniform_mix=1.0) for s in range(50)])
    assert (picked < 8).any()  # the uniform part reaches them


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of ``counts`` against ``probs``: ``P(chi2_{k-1} >= sum (c_i - N p_i)^2 / (N p_i))``."""
    expected = counts.sum() * probs
    statistic = ((counts - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((len(probs) - 1) / 2, dtype=torch.float64), statistic / 2))


@pytest.mark.parametrize("uniform_mix", [0.5, 0.0])
def test_single_draws_follow_the_mixed_spectrum_distribution(uniform_mix):
    """With ``r = 1`` a draw is categorical: ``P(i) = uniform_mix / m' + (1 - uniform_mix) s_i / sum_j s_j``."""
    _, layer = _layer(rank=1)
    s = torch.linspace(2.3, 0.1, layer.capacity, dtype=torch.float64)  # non-uniform, sorted as an SVD's
    with torch.no_grad():
        layer.s.copy_(s)
    probs = uniform_mix / layer.capacity + (1 - uniform_mix) * s / s.sum()
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([layer.sample(generator, uniform_mix) for _ in range(20000)])
    counts = torch.bincount(draws, minlength=layer.capacity).double()
    assert _chi_square_p_value(counts, probs) > 1e-3


def test_projection_clamps_the_spectrum_and_normalises_active_vectors():
    _, layer = _layer()
    with torch.no_grad():
        layer.s[0] = -1.0
        layer.U_active.mul_(3.0)
        layer.V_active.mul_(0.5)
    layer.project_()
    assert layer.s.min() == 0
    torch.testing.assert_close(layer.U_active.norm(dim=0), torch.ones(4))
    torch.testing.assert_close(layer.V_active.norm(dim=0), torch.ones(4))


def test_export_is_a_dense_linear_with_the_same_outputs():
    _, layer = _layer()
    with torch.no_grad():
        layer.s.add_(0.3)
    exported = layer.export()
    x = torch.randn(4, 20)
    assert isinstance(exported, nn.Linear)
    torch.testing.assert_close(exported(x), layer(x))


def test_bf16_autocast_forward_keeps_float32_gradients():
    _, layer = _layer()
    x = torch.randn(4, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.U_active.grad.dtype == torch.float32 and layer.s.grad.dtype == torch.float32


def test_rank_outside_the_spectrum_is_rejected():
    with pytest.raises(ValueError, match="rank must be in 1..12"):
        SpectralLinear(20, 12, rank=13)
