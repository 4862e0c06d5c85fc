"""bench/layers.py: the FLOP-count ideal, the memory accounting and the tables it prints."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import layers as bench  # noqa: E402

CPU = torch.device("cpu")


def test_ideal_flops_match_a_hand_count():
    t, m, n, r = 2, 3, 5, 1
    assert bench.dense_flops(t, m, n) == 180  # 3 matmuls of 2*2*3*5
    assert bench.lora_flops(t, m, n, r) == 120 + 96  # W0 forward + input grad; B A all three
    assert bench.sst_flops(t, m, n, r) == 4 * 2 * 3 * 8 + 2 * 2 * 1 * 8
    assert bench.factor_flops(t, m, n, r) == 96
    assert bench.tucker_flops(t, m, n, r) == 6 * 2 * 1 * 9


@pytest.mark.parametrize(("name", "rank"), [("dense", 24), ("lora", 4), ("sst", 4), ("inrank", 4), ("inrank2", 4),
                                            ("reference", 4), ("tdlrt", 4), ("svd", 24)])
def test_ideal_flops_equal_the_matmuls_the_layer_runs(name, rank):
    """torch's FLOP counter over one forward + backward of the real layer gives exactly the formula."""
    kind = bench.KINDS[name]
    trainee = bench.make_trainee(kind, 24, 40, rank, 8, CPU)
    trainee.forward_backward()
    trainee.update(0)  # TDLRT augments to 2 r here, the rank it trains at
    with FlopCounterMode(display=False) as counter:
        trainee.forward_backward()
    assert counter.get_total_flops() == kind.flops(8, 24, 40, bench.active_rank(trainee.layer))


def test_memory_counts_weights_trainable_grads_and_adamw_state_of_a_lora_layer():
    m, n, r = 24, 40, 4
    trainee = bench.make_trainee(bench.KINDS["lora"], m, n, r, 8, CPU)
    timing = bench.time_steps(trainee, 1, CPU)
    trained = r * (m + n) + m  # A, B and the bias; W0 is frozen
    step_counters = 3 * torch.tensor(0.0).element_size()
    assert timing.memory.weights == 4 * (m * n + trained)
    assert timing.memory.grads == 4 * trained
    assert timing.memory.state == 4 * 2 * trained + step_counters


def test_dense_memory_is_four_copies_of_the_layer():
    timing = bench.time_steps(bench.make_trainee(bench.KINDS["dense"], 16, 8, 8, 4, CPU), 1, CPU)
    numel = 16 * 8 + 16
    assert (timing.memory.weights, timing.memory.grads) == (4 * numel, 4 * numel)
    assert timing.memory.state == 8 * numel + 2 * torch.tensor(0.0).element_size()


def test_tables_have_one_row_per_layer_shape_and_rank_and_name_every_periodic_operation():
    shapes, fractions = [(32, 32), (16, 48)], [4, 8]
    results = bench.run(shapes, fractions, list(bench.LAYERS), tokens=8, repeats=1, device=CPU, log=lambda _: None)
    rows = bench.speed_rows(results)
    ranked = 6 * len(fractions) + (len(fractions) + 1)  # lora sst inrank inrank2 reference tdlrt; svd full + pruned
    assert len(rows) == len(shapes) * (1 + ranked)
    assert all(len(row) == len(bench.SPEED_HEADER) for row in rows)
    assert {row[1] for row in rows} == {"32x32", "16x48"}
    dense = [row for row in rows if row[0] == "dense"]
    assert all(row[4] == row[5] == row[6] == "1.00" for row in dense)
    ops = {row[3] for row in bench.ops_rows(results)}
    assert {"ReLoRA merge", "SST resample", "SST resvd", "InRank grow", "InRank switch", "TDLRT truncate",
            "TDLRT augment", "SVDTraining prune"} <= ops
    text = bench.report(results, "header")
    assert text.startswith("header") and "6Tr(m+n+r)" in text


def test_periodic_operations_are_amortised_over_their_interval_and_one_offs_are_not():
    assert bench.PeriodicOp("x", 2.0, 200).per_step == pytest.approx(0.01)
    assert bench.PeriodicOp("x", 2.0, None).per_step == 0.0


def test_tokens_for_a_five_percent_share_scale_the_batch_by_share_over_target():
    assert bench.tokens_for_share(1024, 0.20) == 4096
    assert bench.tokens_for_share(1024, 0.01) == 1024


def test_periodic_operations_run_on_copies_leave_the_timed_layer_unchanged():
    trainee = bench.make_trainee(bench.KINDS["inrank"], 32, 32, 8, 8, CPU)
    bench.time_steps(trainee, 1, CPU)
    before = trainee.layer.active_rank
    ops = bench.periodic_ops(trainee, 1, CPU)
    assert [op.every for op in ops] == [trainee.strategy.check_every, None]
    assert trainee.layer.active_rank == before and trainee.layer.buffer > 0


def test_svd_cases_below_full_rank_are_pruned_and_shrunk_to_that_rank():
    result = bench.run_case(bench.KINDS["svd"], 32, 32, 8, 4, 1, CPU, with_ops=False)
    assert result.rank == 8
    assert result.ideal_ratio == pytest.approx(bench.factor_flops(4, 32, 32, 8) / bench.dense_flops(4, 32, 32))
    trained = 8 * (32 + 32 + 1) + 32  # N, s, C at rank 8 and the bias
    assert result.timing.memory.grads == 4 * trained


def test_inrank_stage_two_holds_what_the_reference_layer_holds():
    stage2 = bench.run_case(bench.KINDS["inrank2"], 32, 48, 8, 4, 1, CPU, with_ops=False)
    reference = bench.run_case(bench.KINDS["reference"], 32, 48, 8, 4, 1, CPU, with_ops=False)
    assert stage2.rank == reference.rank == 8
    assert stage2.timing.memory.grads == reference.timing.memory.grads == 4 * (8 * (32 + 48) + 32)
    assert stage2.timing.memory.state == reference.timing.memory.state


@pytest.mark.parametrize(("spec", "shape"), [("512", (512, 512)), ("1024x4096", (1024, 4096))])
def test_shapes_parse(spec, shape):
    assert bench.parse_shape(spec) == shape


@pytest.mark.parametrize("argv", [["--shapes", "12y4"], ["--tokens", "0"], ["--rank-fractions", "0"]])
def test_bad_arguments_raise_value_errors(argv):
    with pytest.raises(ValueError, match="--"):
        bench.parse_args(argv)
