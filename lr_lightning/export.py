"""``lr-lightning export``: a trained language model's checkpoint as a standalone model folder.

    lr-lightning export --ckpt_path run/checkpoints/last.ckpt --out exported/            # dense for llama / hf
    lr-lightning export --ckpt_path run/checkpoints/last.ckpt --out exported/ --compact  # factorized layers kept

Two forms, both with the weights in ``model.safetensors`` and a manifest ``lr_lightning_export.json`` (the form,
the architecture, the strategy and the step it was trained to):

- ``--dense`` (the default for ``llama`` and ``hf``): every factorized layer merged into an ``nn.Linear`` holding
  its effective ``W`` (``dense_weight``). For ``llama`` and ``hf`` the folder is a Hugging Face model
  (``save_pretrained``: ``config.json`` and ``model.safetensors``) that ``AutoModelForCausalLM.from_pretrained``
  loads, computing what the trained model computes (``Conv1D`` layers, which the task trains as ``nn.Linear``,
  written back as ``Conv1D``).
- ``--compact`` (the default for our GPT): each factorized layer as ``strategy.export`` gives it, the exact-rank
  form of its method (``Linear(n, r) -> Linear(r, m)`` for SVD training and InRank, the merged ``nn.Linear`` for
  LoRA and SST, ...); the manifest records each layer's structure and the model's config (a Hugging Face model's
  ``Conv1D`` layers stay ``nn.Linear``, as trained).

:func:`load_exported` rebuilds either form (a GPT or a Hugging Face model) without Lightning or the checkpoint's
trainer state. A strategy's operations that complete a cycle the run stopped inside of
(``operations_to_finish``: TDLRT's pending truncation) run before the export.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Literal

from safetensors.torch import load_model, save_model
from torch import nn

from lr_lightning.checkpoints import read_checkpoint
from lr_lightning.cli import error_line
from lr_lightning.models import GPT, GPTConfig
from lr_lightning.models.llama import build_causal_lm, conv1d_names, linear_as_conv1d
from lr_lightning.strategies import LowRankStrategy
from lr_lightning.tasks import LanguageModelingTask

Form = Literal["dense", "compact"]
MANIFEST = "lr_lightning_export.json"
WEIGHTS = "model.safetensors"
FORMAT = "lr_lightning.export/1"


def task_from_checkpoint(ckpt_path: str | os.PathLike) -> tuple[LanguageModelingTask, int]:
    """The :class:`LanguageModelingTask` saved at ``ckpt_path`` (its strategy re-applied, on the CPU) and the number
    of optimizer steps it was trained for. ``ValueError`` for a checkpoint of another task."""
    if Path(ckpt_path).is_dir():
        raise ValueError(f"--ckpt_path {str(ckpt_path)!r} is a distributed checkpoint folder; export reads one file: "
                         f"consolidate it first (python -m lightning.pytorch.utilities.consolidate_checkpoint FOLDER)")
    checkpoint = read_checkpoint(ckpt_path, mmap=True)
    hparams = checkpoint.get("hyper_parameters")
    allowed = set(inspect.signature(LanguageModelingTask.__init__).parameters)
    unknown = sorted(k for k in (hparams or {}) if not k.startswith("_") and k not in allowed)
    if not hparams or unknown:
        raise ValueError(f"checkpoint {str(ckpt_path)!r} is not a LanguageModelingTask's "
                         f"(hyperparameters it does not take: {unknown or 'none saved'}); export handles language "
                         f"models")
    task = LanguageModelingTask.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    return task.eval(), int(checkpoint.get("global_step", 0))


def dense_model(model: nn.Module, strategy: LowRankStrategy) -> nn.Module:
    """A copy of ``model`` with every factorized layer replaced by the ``nn.Linear`` of its ``W`` and bias."""
    dense = copy.deepcopy(model)
    for name, layer in strategy.layers(dense):
        parent, _, leaf = name.rpartition(".")
        setattr(dense.get_submodule(parent), leaf, layer.merged_linear())
    return dense


def linear_structure(module: nn.Module) -> list[list[int]]:
    """``[[in, out, has_bias], ...]`` of an ``nn.Linear`` or an ``nn.Sequential`` of them (an exported layer)."""
    linears = list(module) if isinstance(module, nn.Sequential) else [module]
    if not all(type(m) is nn.Linear for m in linears):
        raise TypeError(f"an exported layer must be an nn.Linear or an nn.Sequential of them, got {module}")
    return [[m.in_features, m.out_features, int(m.bias is not None)] for m in linears]


def build_linear_structure(structure: list[list[int]], sequential: bool) -> nn.Module:
    """The (uninitialised) module :func:`linear_structure` describes."""
    linears = [nn.Linear(n, m, bias=bool(bias)) for n, m, bias in structure]
    return nn.Sequential(*linears) if sequential else linears[0]


def model_config(task: LanguageModelingTask) -> dict[str, Any]:
    """What rebuilds the task's (dense) model: GPTConfig's fields, or the Hugging Face config's dictionary."""
    if task.hparams.architecture == "gpt":
        return dataclasses.asdict(task.model.config)
    return task.model.config.to_dict()


def export_checkpoint(ckpt_path: str | os.PathLike, out: str | os.PathLike, form: Form | None = None) -> Path:
    """Write the model of the checkpoint at ``ckpt_path`` to the new folder ``out`` in ``form`` (default: ``dense``
    for ``llama`` / ``hf``, ``compact`` for ``gpt``); return ``out``.

    Nothing is written unless everything is: the folder is filled under a temporary name and renamed at the end.
    Raises ``FileNotFoundError`` for a missing checkpoint and ``ValueError`` for a non-empty ``out``, an unknown
    ``form`` or a checkpoint of another task, before anything is written.
    """
    out = Path(out).expanduser()
    if form is not None and form not in ("dense", "compact"):
        raise ValueError(f"form must be 'dense' or 'compact', got {form!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {str(out)!r} exists and is not an empty folder: export writes a new folder and "
                         f"never over existing files")
    task, step = task_from_checkpoint(ckpt_path)
    strategy = task.strategy
    finish = strategy.operations_to_finish(step)
    if finish:
        strategy.run(task, finish, step)
    architecture = task.hparams.architecture
    form = form or ("compact" if architecture == "gpt" else "dense")
    manifest: dict[str, Any] = {"format": FORMAT, "form": form, "architecture": architecture,
                                "strategy": strategy.to_config(), "global_step": step,
                                "checkpoint": str(Path(ckpt_path).resolve()), "model_config": model_config(task)}
    if form == "dense":
        model = dense_model(task.model, strategy)
        if architecture != "gpt":
            linear_as_conv1d(model, conv1d_names(model.config))
    else:
        model = strategy.export(task.model)
        names = [name for name, _ in strategy.layers(task.model)]
        manifest["layers"] = {name: {"sequential": isinstance(model.get_submodule(name), nn.Sequential),
                                     "linears": linear_structure(model.get_submodule(name))} for name in names}
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        if form == "dense" and architecture != "gpt":
            model.save_pretrained(partial, safe_serialization=True)
        else:
            save_model(model, str(partial / WEIGHTS))
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():
            out.rmdir()
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an exported folder; ``ValueError`` if ``path`` holds none."""
    file = Path(path).expanduser() / MANIFEST
    if not file.is_file():
        raise ValueError(f"{str(path)!r} holds no {MANIFEST}: it is not a folder lr-lightning export wrote")
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{str(file)!r} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def empty_model(manifest: dict[str, Any]) -> nn.Module:
    """The dense model of ``manifest``'s architecture and config, randomly initialised."""
    config = dict(manifest["model_config"])
    if manifest["architecture"] == "gpt":
        return GPT(GPTConfig(**config))
    from transformers import AutoConfig

    return build_causal_lm(AutoConfig.for_model(config.pop("model_type"), **config))


def load_exported(path: str | os.PathLike) -> nn.Module:
    """The model that :func:`export_checkpoint` wrote to ``path``, in eval mode: our GPT or a Hugging Face causal LM,
    dense or with each factorized layer in its compact form."""
    manifest = read_manifest(path)
    path = Path(path).expanduser()
    if manifest["form"] == "dense" and manifest["architecture"] != "gpt":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path).eval()
    model = empty_model(manifest)
    for name, layer in manifest.get("layers", {}).items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, build_linear_structure(layer["linears"], layer["sequential"]))
    load_model(model, str(path / WEIGHTS), strict=True)
    return model.eval()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lr-lightning export", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", required=True, help="a Lightning checkpoint of a LanguageModelingTask")
    parser.add_argument("--out", required=True, help="the folder to create (must not exist, or be empty)")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--dense", dest="form", action="store_const", const="dense",
                      help="merge every factorized layer into a dense nn.Linear (default for llama / hf)")
    form.add_argument("--compact", dest="form", action="store_const", const="compact",
                      help="keep each factorized layer in its exact-rank form (default for gpt)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """The ``lr-lightning export`` subcommand: bad input is one line, ``lr-lightning: error: ...``, exit status 1."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        out = export_checkpoint(args.ckpt_path, args.out, args.form)
    except (ValueError, FileNotFoundError, PermissionError) as error:
        raise SystemExit(error_line(error)) from None
    manifest = read_manifest(out)
    print(f"exported {manifest['architecture']} ({manifest['form']}) from {args.ckpt_path} to {out}")
