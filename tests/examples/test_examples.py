"""The shipped examples run, and the custom strategy they show behaves as it claims."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch
from conftest import TinyMLP

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lora_fa_trains_only_b():
    LoRAFA = _load("custom_strategy").LoRAFA
    torch.manual_seed(0)
    model = TinyMLP()
    strategy = LoRAFA(rank=4)
    strategy.apply(model)
    a_before = model.body[0].lora_A.detach().clone()
    optimizer = torch.optim.AdamW(strategy.param_groups(model), lr=1e-2)
    x = torch.randint(0, 11, (4, 5))
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    assert torch.equal(model.body[0].lora_A, a_before) and model.body[0].lora_B.abs().sum() > 0
    assert [r.trainable for r in strategy.report(model).rows] == [4 * 32 + 32, 4 * 16 + 16]


def test_plug_into_existing_project_runs(tmp_path):
    plot = tmp_path / "ranks.png"
    proc = subprocess.run([sys.executable, str(EXAMPLES / "plug_into_existing_project.py"), "--max-steps", "110",
                           "--plot", str(plot)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "merges: 1" in proc.stdout and "plain nn.Linear layers" in proc.stdout
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_custom_strategy_example_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "custom_strategy.py"), "--max-steps", "4"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LoRA-FA trains" in proc.stdout
