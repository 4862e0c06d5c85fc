"""The TDLRT digits example trains LeNet-5 through ImageClassificationTask; its compact export classifies as the
trained model does and is smaller and cheaper than the dense network."""

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cnn_digits_tdlrt.py"


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in output:\n{text[-3000:]}"
    return float(match.group(1).replace(",", ""))


def test_cnn_digits_example_reaches_good_accuracy_with_compression(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--max-epochs", "3"], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    accuracy = _number(r"test accuracy: ([\d.]+)", out)
    exported = _number(r"exported model test accuracy: ([\d.]+)", out)
    # 3 epochs (96 steps of 128 digits) measure 0.908; chance is 0.10, and a run whose bases drift or whose cores
    # do not train stays far below 0.85.
    assert accuracy > 0.85
    assert abs(exported - accuracy) <= 0.002  # the export computes the same function (up to rounding)
    ranks = dict(re.findall(r"(conv1|conv2|fc) \(([\d, ]+)\)", out.split("ranks:")[1].splitlines()[0]))
    assert ranks.keys() == {"conv1", "conv2", "fc"}
    conv2 = [int(r) for r in ranks["conv2"].split(",")]
    fc = [int(r) for r in ranks["fc"].split(",")]
    assert 2 <= conv2[0] <= 25 and 2 <= conv2[1] <= 10 and conv2[2:] == [5, 5]  # max_rank 0.5 of (50, 20) channels
    assert 2 <= fc[0] == fc[1] <= 250
    conv_test = _number(r"conv compression: test ([-\d.]+)", out)
    assert 0 < conv_test < 1
    assert 0 < _number(r"FLOPs ratio: ([\d.]+)", out) < 1
    assert _number(r"network compression: test [-\d.]+ \(([\d,]+) of", out) < _number(r"of ([\d,]+) parameters", out)
