"""InRank on 2 gloo processes: every process holds the same ranks and weights after growth, and resumes."""

import pytest
import torch
from conftest import assert_states_close

CONFIG = {"class_path": "lr_lightning.strategies.InRank", "init_args": {
    "init_rank": 1, "buffer": 2, "max_rank": 16, "warmup_steps": 1, "check_every": 2, "switch_step": 6}}
BACKENDS = ["ddp", "fsdp2"]


@pytest.fixture(scope="module")
def results(tmp_path_factory, run_replicas) -> dict:
    """Rank checks after steps 2, 4 and 6 (the first grows every layer), a checkpoint at step 4, the switch
    after step 6, 8 steps in all."""
    out = {}
    for backend in BACKENDS:
        workdir = tmp_path_factory.mktemp(f"{backend}-inrank")
        out[backend] = run_replicas(backend, CONFIG, workdir), workdir
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_replicas_hold_the_same_ranks_and_weights_after_growth(results, backend):
    result, _ = results[backend]
    assert result["straight_replicas_equal"] and result["resumed_replicas_equal"]  # the rank buffers included
    assert len(result["ranks"]) == 8 and min(result["ranks"]) > 1  # every layer grew from init_rank 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_after_growth_resumes_with_the_grown_ranks(results, backend):
    result, _ = results[backend]
    assert result["step"] == 8 and result["second_half_moved"] > 1e-2
    assert result["resume_max_abs_diff"] < 1e-6  # weights and rank buffers equal those of the straight run
    assert result["strategy_state"] == {"switched": True}  # the switch ran after the resume
    assert result["capacities"] == result["ranks"]  # and stage 2 ran with the layers shrunk to their ranks


def test_fsdp2_grows_like_ddp(results):
    ddp = torch.load(results["ddp"][1] / "straight.pt")
    fsdp2 = torch.load(results["fsdp2"][1] / "straight.pt")
    assert_states_close(fsdp2, ddp, tol=1e-3)
