"""The 2-process runner every distributed test uses."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("replicas.py")


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
