import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lr_lightning.layers.tucker import (
    TuckerConv2d,
    TuckerLinear,
    mode_product,
    truncation_rank,
    tucker_to_tensor,
    unfold,
)


def _active_bases(layer) -> list[torch.Tensor]:
    return [layer.basis(mode).detach()[:, :r] for mode, r in enumerate(layer.ranks) if layer.factored[mode]]


def _orthonormality_error(layer) -> float:
    return max((u.T @ u - torch.eye(u.shape[1])).abs().max().item() for u in _active_bases(layer))


def _inactive_is_zero(layer) -> bool:
    core = layer.core.detach().clone()
    core[tuple(slice(0, r) for r in layer.ranks)] = 0
    spare = [layer.basis(mode).detach()[:, r:] for mode, r in enumerate(layer.ranks) if layer.factored[mode]]
    return not core.any() and not any(s.any() for s in spare)


LAYERS = {
    "linear": lambda: TuckerLinear.from_linear(nn.Linear(20, 12), rank=3, max_rank=6),
    "conv": lambda: TuckerConv2d.from_conv2d(nn.Conv2d(6, 8, 3, stride=2, padding=1), rank=(3, 2), max_rank=(4, 3)),
    "conv_spatial": lambda: TuckerConv2d.from_conv2d(nn.Conv2d(6, 8, 3, padding=1, dilation=2), rank=(3, 2),
                                                     max_rank=(4, 3), spatial_rank=2),
}


def _input(layer) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(4, 20, generator=g) if isinstance(layer, TuckerLinear) else torch.randn(2, 6, 9, 9, generator=g)


def test_full_rank_factorization_reproduces_the_dense_layers():
    torch.manual_seed(0)
    linear, conv = nn.Linear(20, 12), nn.Conv2d(6, 8, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    x, image = torch.randn(4, 20), torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(TuckerLinear.from_linear(linear, 12)(x), linear(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(TuckerConv2d.from_conv2d(conv, (8, 6))(image), conv(image), atol=1e-5, rtol=1e-5)
    spatial = TuckerConv2d.from_conv2d(conv, (8, 6), spatial_rank=(3, 2))
    torch.testing.assert_close(spatial(image), conv(image), atol=1e-5, rtol=1e-5)
    assert spatial.dense_weight().shape == (8, 6 * 3 * 2)


def test_truncated_factorization_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    linear = nn.Linear(20, 12)
    layer = TuckerLinear.from_linear(linear, rank=4)
    sigma = torch.linalg.svdvals(linear.weight.detach())
    error = torch.linalg.matrix_norm(layer.dense_weight().detach() - linear.weight.detach())
    torch.testing.assert_close(error, sigma[4:].norm(), atol=1e-5, rtol=1e-5)  # Eckart-Young


@pytest.mark.parametrize("kind", LAYERS)
def test_bases_stay_orthonormal_and_the_function_is_kept_through_augment_and_truncate(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    x = _input(layer)
    params = {name: p for name, p in layer.named_parameters()}
    shapes = {name: p.shape for name, p in params.items()}
    g = torch.Generator().manual_seed(1)
    for cycle in range(4):
        before = layer(x).detach()
        old = layer.ranks
        directions = []
        for mode, (n, r) in enumerate(zip(layer.mode_sizes, old)):
            if not layer.factored[mode]:
                directions.append(None)
            elif cycle == 1:  # a zero direction: QR of a rank-deficient [U | 0]
                directions.append(torch.zeros(n, r))
            elif cycle == 2:  # a direction inside span(U)
                directions.append(layer.basis(mode).detach()[:, :r] @ torch.randn(r, r, generator=g))
            else:
                directions.append(torch.randn(n, r, generator=g))
        change = layer.augment_(directions)
        assert change.old_ranks == old
        assert all(new == min(2 * r, c) or not f
                   for new, r, c, f in zip(layer.ranks, old, layer.capacities, layer.factored))
        assert _orthonormality_error(layer) < 1e-5 and _inactive_is_zero(layer)
        torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)  # new core entries are zero
        with torch.no_grad():  # a training step on the augmented core
            core = layer.core[tuple(slice(0, r) for r in layer.ranks)]
            core.add_(0.3 * torch.randn(core.shape, generator=g))
        layer.truncate_(tau=0.3, min_rank=1)
        assert _orthonormality_error(layer) < 1e-5 and _inactive_is_zero(layer)
    assert {name: p.shape for name, p in layer.named_parameters()} == shapes
    assert all(p is params[name] for name, p in layer.named_parameters())  # edited in place


@pytest.mark.parametrize("kind", LAYERS)
def test_truncation_that_drops_only_zero_singular_values_keeps_the_function(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    x = _input(layer)
    ranks, before = layer.ranks, layer(x).detach()
    g = torch.Generator().manual_seed(3)
    layer.augment_([None if not f else torch.randn(n, r, generator=g)
                    for f, n, r in zip(layer.factored, layer.mode_sizes, layer.ranks)])
    assert layer.ranks != ranks
    with torch.no_grad():  # mix the core within the old multilinear rank: C <- C x_i (B_i B_i^T) keeps it
        core = layer.core[tuple(slice(0, r) for r in layer.ranks)]
        mixed = core.clone()
        for mode, (f, r) in enumerate(zip(layer.factored, ranks)):
            if f:
                basis = torch.linalg.qr(torch.randn(core.shape[mode], r, generator=g))[0]
                mixed = mode_product(mixed, basis @ basis.T, mode)
        core.copy_(mixed)
    before = layer(x).detach()
    layer.truncate_(tau=1e-6, min_rank=1)
    assert layer.ranks == ranks  # exactly the zero singular values were dropped
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)


def test_truncation_rank_follows_the_relative_tail_criterion():
    sigma = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    tails = [sigma[j:].norm() / sigma.norm() for j in range(5)]  # 1, .50, .24, .11, 0
    assert [truncation_rank(sigma, tau) for tau in (0.0, 0.05, 0.2, 0.3, 0.6, 0.99)] == [4, 4, 3, 2, 1, 1]
    assert all(tails[truncation_rank(sigma, tau)] < tau for tau in (0.05, 0.2, 0.3, 0.6))


@pytest.mark.parametrize("kind", LAYERS)
def test_export_computes_the_same_function_with_trainable_numel_parameters(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    g = torch.Generator().manual_seed(2)
    layer.augment_([None if not f else torch.randn(n, 1, generator=g)
                    for f, n in zip(layer.factored, layer.mode_sizes)])
    x = _input(layer)
    compact = layer.export()
    torch.testing.assert_close(compact(x), layer(x), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in compact.parameters()) == layer.trainable_numel()
    expected = sum(n * r for n, r, f in zip(layer.mode_sizes, layer.ranks, layer.factored) if f)
    expected += torch.Size(layer.ranks).numel() + layer.bias.numel()
    assert layer.trainable_numel() == expected


def _dense_gradient(layer, x, target) -> torch.Tensor:
    weight = tucker_to_tensor(*layer.active_factors()).float().requires_grad_()
    y = F.linear(x, weight, layer.bias) if isinstance(layer, TuckerLinear) else F.conv2d(
        x, weight, layer.bias, layer.stride, layer.padding, layer.dilation)
    (y - target).square().sum().backward()
    return weight.grad


@pytest.mark.parametrize("kind", LAYERS)
def test_k_step_is_the_projected_gradient_step_of_every_mode(kind):
    """``K_i^1 = K_i - lr dL/dK_i`` with ``K_i = U_i S_i`` is DLRT's K-step up to the rotation ``Q_i``:
    ``K_i^1 K_i^1T = (B - lr A P)(B - lr A P)^T`` with ``B = U_i Mat_i(C)``, ``A = Mat_i(G x_{j != i} U_j^T)``
    (``G = dL/dW``) and ``P`` the projector on the row space of ``Mat_i(C)``.
    """
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    x = _input(layer)
    target = torch.randn_like(layer(x))
    core, bases = layer.active_factors()
    core, bases = core.double(), [None if b is None else b.double() for b in bases]
    gradient = _dense_gradient(layer, x, target).double()
    before = layer(x).detach()
    layer.begin_k_step_()
    y = layer(x)
    torch.testing.assert_close(y, before, atol=1e-5, rtol=1e-5)  # same function in K-step form
    (y - target).square().sum().backward()
    lr = 0.01
    with torch.no_grad():
        for basis in layer.basis_parameters():
            basis.sub_(lr * basis.grad)
    stepped = layer.end_k_step_()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)  # the bases U_i are restored
    for mode, k in enumerate(stepped):
        if k is None:
            continue
        m = unfold(core, mode)
        b = bases[mode] @ m
        projections = [None if j == mode or u is None else u.T for j, u in enumerate(bases)]
        a = unfold(tucker_to_tensor(gradient, projections), mode)
        dlrt = b - lr * a @ torch.linalg.pinv(m) @ m
        torch.testing.assert_close(k.double() @ k.double().T, dlrt @ dlrt.T, atol=1e-5, rtol=1e-4)


def test_grouped_convolution_is_an_error_naming_groups():
    with pytest.raises(ValueError, match="groups=1 only, got groups=2"):
        TuckerConv2d(4, 4, 3, rank=2, groups=2)
    with pytest.raises(ValueError, match="padding_mode='zeros' only"):
        TuckerConv2d.from_conv2d(nn.Conv2d(4, 4, 3, padding_mode="circular"), rank=2)
    with pytest.raises(ValueError, match=r"1 <= rank <= max_rank <= min\(m, n\) = 4"):
        TuckerLinear(4, 6, rank=3, max_rank=5)


@pytest.mark.parametrize("kind", ["conv", "conv_spatial"])
def test_factor_chain_convolution_equals_the_full_kernel_convolution(kind):
    """Output and every gradient of the 1x1 -> kxk -> 1x1 chain match ``conv2d`` with ``W = C x_i U_i``."""
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    x = _input(layer).requires_grad_()
    target = torch.randn_like(layer(x))
    (layer(x) - target).square().sum().backward()
    chain = {name: p.grad.clone() for name, p in layer.named_parameters()}
    x_grad = x.grad.clone()
    layer.zero_grad()
    x.grad = None
    core, bases = layer._active(layer.core, [layer.basis(i) for i in range(4)])
    kernel = tucker_to_tensor(core, bases)
    y = F.conv2d(x, kernel, layer.bias, layer.stride, layer.padding, layer.dilation)
    (y - target).square().sum().backward()
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_grad, x.grad, atol=1e-5, rtol=1e-5)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(chain[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kind", LAYERS)
def test_factored_k_step_gradients_equal_the_dense_weight_computation(kind):
    """``dL/dK_i = Mat_i(G x_{j != i} U_j^T) Mat_i(Ten_i(Q_i^T))^T`` with ``G = dL/dW`` from the dense weight,
    and ``dL/dx`` is the dense layer's, though no ``m x n`` weight is formed."""
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    x = _input(layer).requires_grad_()
    target = torch.randn_like(layer(x))
    gradient = _dense_gradient(layer, x, target).double()
    dense_x_grad = x.grad.clone()
    x.grad = None
    _, bases = layer.active_factors()
    layer.begin_k_step_()
    (layer(x) - target).square().sum().backward()
    torch.testing.assert_close(x.grad, dense_x_grad, atol=1e-5, rtol=1e-5)
    for mode, q_core in enumerate(layer._k_step.q_cores):
        if q_core is None:
            continue
        projections = [None if j == mode or u is None else u.double().T for j, u in enumerate(bases)]
        expected = unfold(tucker_to_tensor(gradient, projections), mode) @ unfold(q_core.double(), mode).T
        k_grad = layer.basis(mode).grad[:, : q_core.shape[mode]].double()
        torch.testing.assert_close(k_grad, expected, atol=1e-5, rtol=1e-4)
    assert not layer.core.grad.any()  # the K pass does not differentiate the core: it takes part as 0 (DDP)
    layer.end_k_step_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_augmentation_spans_orth_of_u_and_d_and_stays_orthonormal(dtype):
    """``[U | orth((I - U U^T) D)]`` spans ``orth([U | D])`` (float64 QR) and is orthonormal to rounding
    (float32: 1e-5), also for a ``D`` that is zero or inside ``span(U)``."""
    g = torch.Generator().manual_seed(0)
    layer = TuckerLinear(96, 80, rank=12, max_rank=24, bias=False).to(dtype)
    u = layer.basis_out.detach()[:, :12].double()
    directions = {"random": torch.randn(80, 12, generator=g), "zero": torch.zeros(80, 12),
                  "inside": u.float() @ torch.randn(12, 12, generator=g)}
    for name, d in directions.items():
        layer.init_from_weight_(torch.randn(80, 96, generator=g))
        u = layer.basis_out.detach()[:, :12].double()
        layer.augment_([d.to(dtype), None])
        new = layer.basis_out.detach()[:, :24].double()
        gram = new.T @ new - torch.eye(24, dtype=torch.float64)
        assert gram.abs().max() < (1e-5 if dtype == torch.float32 else 1e-12), name
        torch.testing.assert_close(new[:, :12], u)  # U itself is kept
        if name == "random":
            reference = torch.linalg.qr(torch.cat([u, d.double()], dim=1))[0]
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            torch.testing.assert_close(new @ new.T, reference @ reference.T, atol=tol, rtol=0)


def _float64_hosvd_truncation(layer, tau: float, min_rank: int):
    """The previous float64 path: one SVD per mode unfolding, ``U_i <- U_i P_i``, ``C <- C x_i P_i^T``."""
    core, bases = layer.active_factors()
    core, maps = core.double(), []
    for mode, basis in enumerate(bases):
        if basis is None:
            maps.append(None)
            continue
        left, sigma, _ = torch.linalg.svd(unfold(core, mode), full_matrices=False)
        rank = min(max(truncation_rank(sigma, tau), min_rank), layer.max_ranks[mode])
        maps.append(left[:, :rank].T)
    bases = [None if b is None else b.double() @ p.T for b, p in zip(bases, maps)]
    return tuple(p.shape[0] if p is not None else n for p, n in zip(maps, core.shape)), \
        tucker_to_tensor(tucker_to_tensor(core, maps), bases)


@pytest.mark.parametrize("kind", LAYERS)
def test_float32_truncation_equals_the_float64_hosvd(kind):
    """Same ranks and the same truncated weight within 1e-5 relative to ``||W||`` (float32 SVD of the core;
    one SVD for a matrix core, whose two unfoldings ``S`` and ``S^T`` share singular vectors)."""
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    g = torch.Generator().manual_seed(4)
    layer.augment_([None if not f else torch.randn(n, r, generator=g)
                    for f, n, r in zip(layer.factored, layer.mode_sizes, layer.ranks)])
    with torch.no_grad():
        core = layer.core[tuple(slice(0, r) for r in layer.ranks)]
        core.add_(0.2 * torch.randn(core.shape, generator=g))
    ranks, reference = _float64_hosvd_truncation(layer, tau=0.2, min_rank=1)
    layer.truncate_(tau=0.2, min_rank=1)
    assert layer.ranks == ranks
    weight = tucker_to_tensor(*layer.active_factors()).double()
    assert (weight - reference).norm() <= 1e-5 * reference.norm()


def test_mode_products_of_mixed_dtypes_follow_autocast():
    """Under autocast the first mode product comes out in bfloat16 while the next basis is float32: the chain
    runs (as a matmul would), in the autocast dtype, and matches the float32 product to bfloat16 precision."""
    g = torch.Generator().manual_seed(0)
    core, bases = torch.randn(3, 2, 2, 2, generator=g), [torch.randn(n, 2, generator=g) for n in (3, 3)]
    expected = tucker_to_tensor(core, [None, None, *bases])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = tucker_to_tensor(core, [None, None, *bases])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.05, rtol=0.02)
    torch.testing.assert_close(mode_product(core.bfloat16(), bases[0], 2), mode_product(core, bases[0], 2),
                               atol=0.05, rtol=0.02, check_dtype=False)


@pytest.mark.parametrize("k_step", [False, True], ids=["factored", "k_step"])
@pytest.mark.parametrize("kind", LAYERS)
def test_forward_and_backward_run_under_bf16_autocast(kind, k_step):
    """The factored forward and the K-step form (whose other-mode terms enter only the backward) run under
    ``torch.autocast(bfloat16)``; every gradient is float32 and close to the float32 one."""
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    x = _input(layer)
    target = torch.randn_like(layer(x))
    grads = {}
    for autocast in (False, True):
        if k_step:
            layer.begin_k_step_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
        layer.zero_grad()
        (y.float() - target).square().mean().backward()
        grads[autocast] = {name: p.grad.clone() for name, p in layer.named_parameters()}
        if k_step:
            layer.end_k_step_()
    for name, grad in grads[True].items():
        assert grad.dtype == torch.float32
        scale = grads[False][name].abs().max().item()
        torch.testing.assert_close(grad, grads[False][name], atol=0.03 * scale + 1e-6, rtol=0, msg=name)
