"""TDLRT (cheap variant) on 2 CPU processes: replicas agree on ranks and weights after truncations; resume is exact."""

from pathlib import Path

import pytest
import torch

INIT_RANK = 8
CONFIG = {"class_path": "lr_lightning.strategies.TDLRT", "init_args": {
    "tau": 0.3, "init_rank": INIT_RANK, "max_rank": INIT_RANK, "augment_every": 4}}
BACKENDS = ("ddp", "fsdp2")


@pytest.fixture(scope="module")
def results(tmp_path_factory, run_replicas) -> dict[str, tuple[dict, Path]]:
    out = {}
    for backend in BACKENDS:
        workdir = tmp_path_factory.mktemp(f"{backend}-tdlrt")
        out[backend] = run_replicas(backend, CONFIG, workdir), workdir
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_replicas_hold_identical_ranks_and_weights_after_truncation(results, backend):
    result, _ = results[backend]
    assert result["step"] == 8  # augmented at steps 0 and 4, truncated after steps 4 and 8
    assert result["straight_replicas_equal"] and result["resumed_replicas_equal"]  # weights and rank buffers
    ranks = result["ranks"]
    assert len(ranks) == 8 and all(2 <= r <= INIT_RANK for r in ranks)  # truncated back from 2 * 8
    assert min(ranks) < INIT_RANK  # tau removed directions somewhere


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_resumes_to_the_same_state(results, backend):
    result, _ = results[backend]
    assert result["second_half_moved"] > 1e-2
    assert result["resume_max_abs_diff"] < 1e-5


def test_fsdp2_trains_like_ddp(results):
    ddp = torch.load(results["ddp"][1] / "straight.pt")
    fsdp2 = torch.load(results["fsdp2"][1] / "straight.pt")
    assert ddp.keys() == fsdp2.keys()
    for key in ddp:
        if key.endswith("active_ranks"):
            assert torch.equal(fsdp2[key], ddp[key]), key
        else:
            torch.testing.assert_close(fsdp2[key], ddp[key], atol=1e-4, rtol=1e-4, msg=key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_faithful_integrator_trains_and_resumes_under_plain_ddp_and_fsdp2(backend, tmp_path, run_replicas):
    """Each faithful pass differentiates only what it steps, yet DDP needs no find_unused_parameters; an FSDP2
    resume initialises the optimizer state through a closure-less step at learning rate 0."""
    config = {"class_path": "lr_lightning.strategies.TDLRT", "init_args": {
        "tau": 0.3, "init_rank": INIT_RANK, "max_rank": INIT_RANK, "variant": "faithful", "moments": "reset"}}
    result = run_replicas(backend, config, tmp_path)
    assert result["step"] == 8 and result["straight_replicas_equal"] and result["resumed_replicas_equal"]
    assert result["resume_max_abs_diff"] < 1e-6 and min(result["ranks"]) < INIT_RANK
