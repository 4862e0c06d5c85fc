"""Pieces the benchmarks share: the machine line, optimizer-state counts, Markdown tables, curve plots."""

from __future__ import annotations

import platform
from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_summary(device: torch.device) -> str:
    """One line naming the device, the CPU, torch's version and its intra-op thread count."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return (f"{where}; CPU {cpu_model()}; torch {torch.__version__}; "
            f"torch.get_num_threads() = {torch.get_num_threads()}")


def optimizer_state_numel(optimizers: Iterable[torch.optim.Optimizer]) -> int:
    """Elements of the optimizers' state tensors that have a dimension (Adam's moments, not its step counters)."""
    return sum(t.numel() for opt in optimizers for state in opt.state.values()
               for t in state.values() if torch.is_tensor(t) and t.dim() > 0)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub Markdown table with ``header`` and one line per row (cells formatted with ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(curves: dict[str, Sequence[tuple[float, float]]], xlabel: str, ylabel: str, path: Path,
                title: str | None = None) -> Path:
    """Write a PNG with one line (with markers) per named ``(x, y)`` curve; return ``path``."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def emit(text: str, out: Path | None) -> None:
    """Print a benchmark's report and, with ``out``, also write it to that Markdown file."""
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
