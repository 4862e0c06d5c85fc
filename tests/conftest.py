"""Shared fixtures: reset global torch state after every test; paths to the shared data; the 2-process runner;
the skip for tests that need the translation extra (fairseq2)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TRANSLATION_EXTRA = ("fairseq2", "sacrebleu", "sentencepiece")


def translation_extra_error() -> str | None:
    """Why the ``[translation]`` extra cannot be imported here (fairseq2 not installed, or its native part missing
    libsndfile, ...), else ``None``."""
    for name in TRANSLATION_EXTRA:
        try:
            importlib.import_module(name)
        except (ImportError, OSError) as error:
            return f"{name} is unavailable: {type(error).__name__}: {error}"
    return None


def require_translation_extra() -> None:
    """Skip the calling test, or the whole test module when called at its import, where fairseq2 (with sacrebleu and
    sentencepiece) is unavailable; ``pytest.importorskip`` would let a missing libsndfile's ``OSError`` through."""
    reason = translation_extra_error()
    if reason is not None:
        pytest.skip(reason, allow_module_level=True)


@pytest.fixture(autouse=True)
def _restore_torch_state():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def assert_states_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tol: float) -> None:
    """``got`` holds the same tensor names as ``expected``, each equal to it within ``tol`` (absolute and relative)."""
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key].to(expected[key].dtype), expected[key], atol=tol, rtol=tol, msg=key)


class RecordingAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` that records, at every step, the learning rate and weight decay of each parameter."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stepped: list[dict[int, tuple[float, float]]] = []

    def step(self, closure=None):
        self.stepped.append({id(p): (float(g["lr"]), float(g["weight_decay"]))
                             for g in self.param_groups for p in g["params"]})
        return super().step(closure)

    def lrs(self, param: torch.Tensor) -> list[float]:
        """The learning rate ``param`` stepped with at each step."""
        return [step[id(param)][0] for step in self.stepped]


class TinyMLP(nn.Module):
    """Embedding -> two hidden Linear layers -> head, with a tied-free head named ``head``."""

    def __init__(self, vocab: int = 11, width: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.body = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.emb(x)))


@pytest.fixture
def tiny_mlp() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP()


SCRIPT = REPO / "tests" / "distributed" / "replicas.py"


def _run_replicas(backend: str, config: dict, workdir: Path, half: int = 4) -> dict:
    """Run replicas.py for ``config`` (``strategy.to_config()``) on 2 gloo processes; return its summary."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--backend", backend, "--strategy", json.dumps(config),
                           "--half", str(half), "--workdir", str(workdir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((workdir / "result.json").read_text())


@pytest.fixture(scope="session")
def run_replicas() -> Callable[..., dict]:
    """``run_replicas(backend, config, workdir, half=4)``: see ``replicas.py`` for what it returns."""
    return _run_replicas
