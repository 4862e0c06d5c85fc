"""2-process CPU (gloo) runs of every foundation strategy under DDP and FSDP2 (ModelParallelStrategy)."""

from pathlib import Path

import pytest
import torch
from conftest import assert_states_close

STRATEGIES = {
    "full": {"class_path": "lr_lightning.strategies.FullRank"},
    "lora": {"class_path": "lr_lightning.strategies.LoRA", "init_args": {"rank": 4, "alpha": 8.0}},
    "relora": {"class_path": "lr_lightning.strategies.ReLoRA", "init_args": {
        "rank": 4, "alpha": 8.0, "merge_every": 3, "reset": "full", "restart_warmup_steps": 1}},
}
RUNS = [(backend, method) for method in STRATEGIES for backend in ("ddp", "fsdp2")]


@pytest.fixture(scope="module")
def results(tmp_path_factory, run_replicas) -> dict[tuple[str, str], tuple[dict, Path]]:
    out = {}
    for backend, method in RUNS:
        workdir = tmp_path_factory.mktemp(f"{backend}-{method}")
        out[backend, method] = run_replicas(backend, STRATEGIES[method], workdir), workdir
    return out


@pytest.mark.parametrize(("backend", "method"), RUNS)
def test_replicas_hold_identical_weights(results, backend, method):
    result, _ = results[backend, method]
    assert result["straight_replicas_equal"] and result["resumed_replicas_equal"]


@pytest.mark.parametrize(("backend", "method"), RUNS)
def test_checkpoint_resumes_to_the_same_state(results, backend, method):
    result, _ = results[backend, method]
    assert result["step"] == 8
    assert result["second_half_moved"] > 1e-2  # the second half really trained
    assert result["resume_max_abs_diff"] < 1e-6
    if method == "relora":
        assert result["strategy_state"]["merges"] == 2  # merges at steps 3 and 6, the second one after the resume


@pytest.mark.parametrize("method", ["full", "lora", "relora"])
def test_fsdp2_trains_like_ddp(results, method):
    ddp = torch.load(results["ddp", method][1] / "straight.pt")
    fsdp2 = torch.load(results["fsdp2", method][1] / "straight.pt")
    assert_states_close(fsdp2, ddp, tol=1e-4)
