"""LorentzTransformer: every block's output lies on the hyperboloid; masks hold; cached decoding = the full pass."""

import pytest
import torch
from conftest import require_translation_extra

from lr_lightning.models.hyperbolic import LorentzLinear, lorentz_residual

require_translation_extra()

from fairseq2.nn import BatchLayout, IncrementalStateBag  # noqa: E402

from lr_lightning.models.lorentz_transformer import (  # noqa: E402
    LorentzFeedForward,
    LorentzMultiheadAttention,
    LorentzPositions,
    LorentzProjection,
    LorentzTransformer,
    random_points,
)

K = 2.0


def on_hyperboloid(x: torch.Tensor, k: float = K) -> bool:
    return bool(lorentz_residual(x, k).abs().max() < 1e-4)


def points(*shape: int, k: float = K) -> torch.Tensor:
    """Points of ``H^(d-1)`` (``d = shape[-1]``) well away from the origin."""
    import geoopt

    x = random_points(int(torch.tensor(shape[:-1]).prod()), shape[-1], geoopt.Lorentz(k=k))
    return x.reshape(*shape)


def model(**kwargs) -> LorentzTransformer:
    torch.manual_seed(0)
    net = LorentzTransformer(**{**dict(vocab_size=40, model_dim=16, num_layers=2, num_heads=2, ffn_dim=24,
                                       max_seq_len=32, curvature=K), **kwargs})
    with torch.no_grad():  # move every map off its near-zero init so the tests see real mixing
        for module in net.modules():
            if isinstance(module, LorentzLinear):
                module.linear.weight.normal_(0, 0.3)
    return net.eval()


def full_layout(seqs: torch.Tensor) -> BatchLayout:
    return BatchLayout(seqs.shape, [seqs.size(1)] * seqs.size(0))


def test_projection_heads_ffn_and_positions_put_points_on_the_hyperboloid():
    torch.manual_seed(0)
    x = points(3, 5, 12)
    split = LorentzProjection(12, 12, out_heads=3, curvature=K)
    heads = split(x)
    assert heads.shape == (3, 5, 3, 4) and on_hyperboloid(heads)
    merged = LorentzProjection(12, 12, in_heads=3, bias=False, curvature=K)(heads, residual=x)
    assert merged.shape == (3, 5, 12) and on_hyperboloid(merged)
    assert on_hyperboloid(LorentzFeedForward(12, 20, curvature=K)(x))
    assert on_hyperboloid(LorentzPositions(12, 8, curvature=K)(x))
    attention = LorentzMultiheadAttention(12, 3, curvature=K)(x, None, torch.ones(3, 5, dtype=torch.bool))
    assert attention.shape == (3, 5, 3, 4) and on_hyperboloid(attention)


def test_the_residual_is_added_before_the_projection():
    torch.manual_seed(0)
    x, r = points(4, 8), torch.randn(4, 8)
    layer = LorentzProjection(8, 8, curvature=K)
    assert not torch.allclose(layer(x, residual=r), layer(x))
    assert torch.allclose(layer(x, residual=r), layer(x, residual=r))
    torch.testing.assert_close(layer(torch.zeros(4, 8), residual=layer.linear(x)), layer(x))


def test_encoder_and_decoder_points_lie_on_the_hyperboloid_and_logits_are_negative_squared_lorentz_distances():
    net = model()
    source, target = torch.randint(4, 40, (2, 7)), torch.randint(4, 40, (2, 5))
    memory, mask = net.encode(source, BatchLayout(source.shape, [7, 4]))
    decoded = net.decode(target, full_layout(target), memory, mask)
    assert on_hyperboloid(memory) and on_hyperboloid(decoded) and on_hyperboloid(net.embed_tokens)
    logits = net(source, BatchLayout(source.shape, [7, 4]), target, full_layout(target))
    difference = decoded.unsqueeze(-2) - net.output_points  # ||x - p||_L^2 = <x - p, x - p>_L = -2k - 2<x, p>_L
    squared_distance = lorentz_residual(difference, 0.0)
    torch.testing.assert_close(logits, -squared_distance + net.output_bias, atol=1e-3, rtol=1e-4)


def test_decoder_position_t_ignores_later_target_tokens():
    net = model()
    source, target = torch.randint(4, 40, (2, 7)), torch.randint(4, 40, (2, 6))
    changed = target.clone()
    changed[:, 3:] = torch.randint(4, 40, (2, 3))
    assert not torch.equal(changed, target)
    with torch.no_grad():
        before = net(source, full_layout(source), target, full_layout(target))
        after = net(source, full_layout(source), changed, full_layout(changed))
    torch.testing.assert_close(after[:, :3], before[:, :3])
    assert not torch.allclose(after[:, 3:], before[:, 3:])


def test_source_padding_is_ignored():
    net = model()
    source, target = torch.randint(4, 40, (1, 5)), torch.randint(4, 40, (1, 4))
    padded = torch.cat([source, torch.randint(4, 40, (1, 3))], dim=1)
    with torch.no_grad():
        alone = net(source, full_layout(source), target, full_layout(target))
        with_padding = net(padded, BatchLayout(padded.shape, [5]), target, full_layout(target))
        unmasked = net(padded, full_layout(padded), target, full_layout(target))
    torch.testing.assert_close(with_padding, alone)
    assert not torch.allclose(unmasked, alone)


def test_incremental_decoding_with_beam_reordering_equals_the_full_forward():
    net = model()
    source, target = torch.randint(4, 40, (3, 6)), torch.randint(4, 40, (3, 7))
    source_layout = BatchLayout(source.shape, [6, 4, 2])
    bag = IncrementalStateBag(16)
    order = torch.arange(3)
    reorder_at = {2: torch.tensor([2, 0, 0]), 4: torch.tensor([1, 2, 0])}
    steps = []
    with torch.no_grad():
        for t in range(target.size(1)):
            if t in reorder_at:  # a beam search step: surviving hypotheses continue other rows' prefixes
                bag.reorder(reorder_at[t])
                order = order[reorder_at[t]]
                target = target[reorder_at[t]]
            step = target[:, t: t + 1]
            steps.append(net(source, source_layout, step, full_layout(step), state_bag=bag)[:, 0])
            bag.increment_step_nr()
        full = net(source[order], BatchLayout(source.shape, [[6, 4, 2][i] for i in order]), target,
                   full_layout(target))
    # Rows of the last steps follow the final order; compare from the last reordering on.
    torch.testing.assert_close(torch.stack(steps[4:], dim=1), full[:, 4:], atol=1e-4, rtol=1e-4)
    assert len(bag._module_states) == 1 + 2 * 2  # encoder output + self/cross attention of each decoder layer


def test_bad_configuration_is_an_error():
    with pytest.raises(ValueError, match="curvature must be > 0"):
        LorentzTransformer(vocab_size=10, model_dim=8, num_heads=2, curvature=0.0)
    with pytest.raises(ValueError, match="model_dim"):
        LorentzTransformer(vocab_size=10, model_dim=8, num_heads=8)
    with pytest.raises(ValueError, match="out_heads=3 must divide"):
        LorentzProjection(8, 8, out_heads=3)
    with pytest.raises(ValueError, match="returns logits only"):
        model()(torch.ones(1, 2, dtype=torch.long), full_layout(torch.ones(1, 2)), torch.ones(1, 2, dtype=torch.long),
                full_layout(torch.ones(1, 2)), torch.ones(1, 2, dtype=torch.long))
