"""SVDTraining on 2 CPU processes (gloo): sparsity from step 2, energy pruning at step 6, under DDP and FSDP2.

The prune shrinks the layers, so each run stops there and goes on as stage 2 from the shrunk checkpoint."""

from pathlib import Path

import pytest
import torch
from conftest import assert_states_close

CONFIG = {"class_path": "lr_lightning.strategies.SVDTraining", "init_args": {
    "orthogonality_weight": 1.0, "sparsity": "hoyer", "sparsity_weight": 0.05, "energy": 0.1,
    "sparsify_at": 2, "prune_at": 6}}
BACKENDS = ["ddp", "fsdp2"]


@pytest.fixture(scope="module")
def results(tmp_path_factory, run_replicas) -> dict[str, tuple[dict, Path]]:
    out = {}
    for backend in BACKENDS:
        workdir = tmp_path_factory.mktemp(f"svd-{backend}")
        out[backend] = run_replicas(backend, CONFIG, workdir), workdir
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_replicas_agree_and_resume_through_the_prune(results, backend):
    result, _ = results[backend]
    assert result["straight_replicas_equal"] and result["resumed_replicas_equal"]
    assert result["step"] == 8 and result["second_half_moved"] > 1e-2
    assert result["resume_max_abs_diff"] < 1e-6  # the stage (sparsify at the step-4 checkpoint) was restored
    assert result["strategy_state"] == {"stage": "finetune"}
    assert min(result["ranks"]) < 32 and max(result["ranks"]) <= 32  # model_dim = 32: every layer's capacity
    assert result["capacities"] == result["ranks"]  # stage 2 ran at the pruned ranks: the layers were shrunk


def _weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor, with each SVD layer's ``N, s, C`` replaced by its ``W = N diag(|s|) C``.

    The prune's re-SVD may rotate singular vectors of nearly equal singular values differently on two
    backends whose sums round differently; the layer's weight is what must agree.
    """
    factored = {key[:-2] for key in state if key.endswith(".N")}
    out = {key: value for key, value in state.items() if key.rpartition(".")[0] not in factored
           or key.rpartition(".")[2] not in ("N", "s", "C")}
    for layer in factored:
        out[f"{layer}.W"] = (state[f"{layer}.N"] * state[f"{layer}.s"].abs()) @ state[f"{layer}.C"]
    return out


def test_fsdp2_trains_like_ddp(results):
    ddp = _weights(torch.load(results["ddp"][1] / "straight.pt"))
    fsdp2 = _weights(torch.load(results["fsdp2"][1] / "straight.pt"))
    assert_states_close(fsdp2, ddp, tol=1e-4)
