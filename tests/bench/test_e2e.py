"""bench/e2e.py at its --tiny size: one row per strategy and event, memory figures that mean what they say."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import e2e  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_run():
    """The --tiny benchmark (d = 64, 1 block, 64 tokens, 2 rounds), run once for every test here."""
    args = e2e.parse_args(["--tiny", "--threads", "1", "--device", "cpu"])
    setup = e2e.Setup(args.width, args.depth, args.tokens, args.batch, args.vocab,
                      args.width // args.rank_divisor, CPU)
    trainees = e2e.run(args.strategies, setup, args.rounds, log=lambda _: None)
    return setup, trainees, {t.label: t for t in trainees}


def test_the_table_has_a_row_per_strategy_and_two_for_svd_training_and_inrank(tiny_run):
    _, trainees, by_label = tiny_run
    rows = e2e.rows(trainees)
    assert len(rows) == len(e2e.STRATEGIES) + 2
    assert all(len(row) == len(e2e.HEADER) for row in rows)
    assert [row[0] for row in rows] == list(by_label)
    assert {"FullRank", "LoRA", "ReLoRA", "SST", "TDLRT", "InRank stage 1 (r + buffer)",
            "InRank after switch + shrink_", "SVDTraining before prune (full rank)",
            "SVDTraining after prune + shrink_"} == set(by_label)
    assert rows[0][3] == "1.00"  # FullRank against itself
    assert all(len(t.measured.times) == 2 and min(t.measured.times) > 0 for t in trainees)
    text = e2e.report(trainees, "header")
    assert text.startswith("header") and "| FullRank |" in text


def test_full_rank_converted_state_is_exactly_four_copies_of_the_dense_layers(tiny_run):
    setup, _, by_label = tiny_run
    d, measured = setup.width, by_label["FullRank"].measured
    per_block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)  # qkv, proj, fc, proj
    assert measured.ideal == 4 * 4 * setup.depth * per_block
    assert measured.converted == measured.ideal


def test_the_low_rank_ideal_is_r_times_m_plus_n_plus_the_bias_per_layer(tiny_run):
    setup, _, by_label = tiny_run
    d, r = setup.width, setup.rank
    shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]
    numel = setup.depth * sum(r * (m + n) + m for m, n in shapes)
    assert by_label["LoRA"].measured.ideal == 4 * 4 * numel
    # LoRA keeps W0 (frozen: no gradient, no moments), so its state is W0 plus the ideal's factors.
    lora = by_label["LoRA"].measured
    dense_weights = 4 * setup.depth * sum(m * n for m, n in shapes)
    assert lora.converted == dense_weights + lora.ideal


@pytest.mark.parametrize("label", ["SVDTraining after prune + shrink_", "InRank after switch + shrink_"])
def test_after_the_one_time_event_the_converted_state_is_within_the_target_of_its_ideal(tiny_run, label):
    if e2e.shrink_function() is None:
        pytest.fail("lr_lightning.callbacks.lowrank.shrink_ does not exist yet: the layers stay at capacity")
    _, _, by_label = tiny_run
    after = by_label[label].measured
    assert after.converted <= e2e.TARGET_RATIO * after.ideal
    assert "runs" not in by_label[label].rank_label()  # the forward runs at the found rank r


def test_the_events_lower_the_state_against_the_row_before_them(tiny_run):
    _, _, by_label = tiny_run
    pairs = [("SVDTraining before prune (full rank)", "SVDTraining after prune + shrink_"),
             ("InRank stage 1 (r + buffer)", "InRank after switch + shrink_")]
    for before, after in pairs:
        assert by_label[after].measured.converted < by_label[before].measured.converted
        assert by_label[after].measured.model < by_label[before].measured.model


def test_saved_for_backward_excludes_parameters_and_counts_activations(tiny_run):
    setup, trainees, by_label = tiny_run
    logits = 4 * setup.tokens * setup.vocab
    assert all(t.measured.saved >= logits for t in trainees)  # the logits (or their softmax) are kept
    assert all(t.measured.saved < t.measured.model + 64 * logits for t in trainees)
    # FullRank and LoRA save the same activations apart from LoRA's rank-r intermediates.
    full, lora = by_label["FullRank"].measured.saved, by_label["LoRA"].measured.saved
    assert full <= lora <= full + 4 * 4 * setup.depth * setup.tokens * (setup.rank + 4 * setup.width)


def test_saved_tensor_hooks_skip_parameters_and_count_each_storage_once():
    layer = torch.nn.Linear(8, 4)
    saved = e2e.SavedForBackward(layer)
    x = torch.randn(3, 8, requires_grad=True)
    with saved.hooks():
        y = layer(x)
        z = (y * y).sum() + (y * 2).sum()
    z.backward()
    assert saved.bytes == x.numel() * 4 + y.numel() * 4  # x (for W's grad) and y (for y * y), never W


def test_storage_bytes_counts_a_view_as_its_whole_storage_once():
    base = torch.zeros(10, 10)
    assert e2e.storage_bytes([base[:2], base[3:], None]) == 400


@pytest.mark.parametrize("argv", [["--tokens", "100", "--batch", "3"], ["--rounds", "0"], ["--width", "96"]])
def test_bad_arguments_raise_value_errors(argv):
    with pytest.raises(ValueError, match="--"):
        e2e.parse_args(argv)
