"""TranslationTask on 2 CPU processes (gloo) under DDP and FSDP2 (ModelParallelStrategy): every layer sharded with
the embedding still tied to the output projection, replicas agree, FSDP2 trains like DDP, beam search finishes."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_states_close, require_translation_extra

require_translation_extra()

SCRIPT = Path(__file__).with_name("translation_replicas.py")
BACKENDS = ("ddp", "fsdp2")


def run(backend: str, workdir: Path) -> dict:
    """translation_replicas.py on 2 gloo processes; its summary. On a timeout the whole process group is killed:
    a hung collective would otherwise leave the second process behind."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--backend", backend, "--workdir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"{backend}: no result within 300 s (a hung collective?)\n{err[-4000:]}")
    assert proc.returncode == 0, err[-4000:]
    return json.loads((workdir / "result.json").read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    out = {}
    for backend in BACKENDS:
        workdir = tmp_path_factory.mktemp(backend)
        out[backend] = run(backend, workdir), workdir
    return out


def test_fsdp2_shards_every_layer_and_keeps_the_embedding_tied(results):
    fsdp2, ddp = results["fsdp2"][0], results["ddp"][0]
    assert fsdp2["sharded"] and fsdp2["tied"]
    assert not ddp["sharded"] and ddp["tied"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_replicas_hold_identical_weights_after_training_and_validation(results, backend):
    result, _ = results[backend]
    assert result["step"] == 4 and result["moved"] > 1e-3
    assert result["replicas_equal"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_beam_search_finishes_when_the_processes_decode_unequal_lengths(results, backend):
    first, second = results[backend][0]["decoded"]
    assert first and second and first != second
    assert 0 <= results[backend][0]["val/bleu"] <= 100


def test_fsdp2_trains_and_validates_like_ddp(results):
    ddp = torch.load(results["ddp"][1] / "weights.pt")
    fsdp2 = torch.load(results["fsdp2"][1] / "weights.pt")
    # A key bias adds q . b_k to every logit of a query, which softmax ignores: its gradient is rounding noise,
    # which Adam scales to full steps, so it differs with the reduction order. Everything else must agree.
    key_biases = [key for key in ddp if key.endswith("k_proj.bias")]
    assert key_biases
    assert_states_close(*({k: v for k, v in state.items() if k not in key_biases} for state in (fsdp2, ddp)), tol=1e-4)
    for metric in ("val/loss", "val/nll", "val/bleu"):
        assert results["fsdp2"][0][metric] == pytest.approx(results["ddp"][0][metric], rel=1e-4, abs=1e-4), metric
