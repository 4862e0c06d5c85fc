"""``lr-lightning``: LightningCLI over every task, datamodule and strategy of the package.

    lr-lightning fit --config configs/lm/lora.yaml
    lr-lightning fit --config configs/lm/lora.yaml --model.strategy ReLoRA --model.strategy.merge_every 100
    lr-lightning export --ckpt_path run/checkpoints/last.ckpt --out exported/ [--dense | --compact]

``export`` writes a trained language model as a standalone folder (:mod:`lr_lightning.export`).

The resolved config is written as ``config.yaml`` next to the run's logs (the logger's ``log_dir``) or, without a
logger, its checkpoints (``<default_root_dir>/checkpoints``), once setup has succeeded; never over a ``--config``
input or a file the CLI did not write. Bad input (a constructor's, ``setup``'s or ``--ckpt_path``'s) is one line,
``lr-lightning: error: <Type>: <message>``, with exit status 1.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from typing_extensions import override

import lr_lightning.data  # noqa: F401  (registers the datamodules' short class names)
import lr_lightning.tasks  # noqa: F401  (registers the tasks' short class names)
from lr_lightning.callbacks.lowrank import DivergenceError, stage_two_checkpoint
from lr_lightning.checkpoints import (
    check_lightning_checkpoint,
    checkpoint_error,
    checkpoint_file,
    is_local_checkpoint_path,
)
from lr_lightning.strategies import LowRankStrategy

STRATEGY_FLAGS = ("--model.strategy", "--model.init_args.strategy")
SETUP_ERRORS = (ValueError, TypeError, FileNotFoundError)
"""What our code raises for bad input; before the first batch, the CLI reports it as one line (see ``LowRankCLI``)."""
RESOLVED_CONFIG_HEADER = "# lr-lightning: the resolved config of this run (a later run writing here replaces it)"
PACKAGE_DIR = Path(__file__).resolve().parent


def strategy_names() -> list[str]:
    """Short names of every imported :class:`LowRankStrategy` subclass."""
    found, todo = [], [LowRankStrategy]
    while todo:
        cls = todo.pop()
        found.append(cls.__name__)
        todo += cls.__subclasses__()
    return sorted(set(found) - {"LowRankStrategy"})


def check_strategy_flag(args: list[str]) -> None:
    """Reject ``--model.strategy NAME`` naming no known strategy, listing the allowed names."""
    for i, arg in enumerate(args):
        flag, _, value = arg.partition("=")
        if flag not in STRATEGY_FLAGS:
            continue
        value = value or (args[i + 1] if i + 1 < len(args) else "")
        if value and not value.startswith(("{", "-")) and "." not in value and value not in strategy_names():
            raise SystemExit(f"lr-lightning: error: {flag}: unknown strategy {value!r}; "
                             f"allowed: {', '.join(strategy_names())} (or a dotted class path)")


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain (jsonargparse wraps the one our constructors raise)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def error_line(error: BaseException) -> str:
    """The CLI's one-line report of ``error``."""
    return f"lr-lightning: error: {type(error).__name__}: {' '.join(str(error).splitlines())}"


def raised_by_package(error: BaseException) -> bool:
    """Whether ``error`` was raised from this package's code (the innermost frame of its traceback)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


class RunStartHooks(L.Callback):
    """Calls :meth:`on_run_start` when the run gets past setup: at the first sanity check, training, validation,
    test or predict start (each may be the first, depending on the subcommand and the trainer's settings)."""

    def on_run_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """What to do once setup has succeeded."""

    @override
    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_run_start(trainer, pl_module)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_run_start(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_run_start(trainer, pl_module)

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_run_start(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_run_start(trainer, pl_module)


class ResolvedConfigCallback(RunStartHooks, SaveConfigCallback):
    """Writes the resolved config once setup has succeeded, next to the run's logs or checkpoints, and never over a
    user's file.

    Where: the logger's ``log_dir`` (``trainer.log_dir``); without a logger, the checkpoint callback's ``dirpath``
    when fitting, else ``default_root_dir``. When: at the first of sanity check, training, validation, test or
    predict start, so a run that fails in ``prepare_data``, ``setup``, ``configure_model``, the checkpoint restore or
    ``on_fit_start`` writes nothing. Over what: a missing file, or one this callback wrote before (it starts with
    :data:`RESOLVED_CONFIG_HEADER`; ``main``'s stage 2 rewrites its stage 1's), never a ``--config`` input
    (``protected``) or any other file: those are left as they are, with a warning.

    Args:
        parser, config, config_filename, overwrite, multifile: As for :class:`SaveConfigCallback`; ``overwrite``
            and ``multifile`` are ignored (the policy above decides; one file is written).
        protected: Paths never written (the ``--config`` inputs; ``LowRankCLI`` passes them).
    """

    def __init__(self, parser: Any, config: Any, config_filename: str = "config.yaml", overwrite: bool = False,
                 multifile: bool = False, protected: tuple[str, ...] = ()) -> None:
        super().__init__(parser, config, config_filename, overwrite, multifile=False)
        self.protected = tuple(protected)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Nothing yet: the config is written once setup has succeeded (see the class docstring)."""

    def config_dir(self, trainer: L.Trainer) -> str:
        """The folder the config goes to (call on every process: ``trainer.log_dir`` broadcasts)."""
        folder = trainer.log_dir if trainer.loggers else None
        if folder is not None:
            return str(folder)
        checkpoint = trainer.checkpoint_callback
        if trainer.state.fn == "fit" and checkpoint is not None and getattr(checkpoint, "dirpath", None):
            return str(checkpoint.dirpath)
        return str(trainer.default_root_dir)

    def refusal(self, path: Path) -> str | None:
        """Why ``path`` must not be written, or ``None`` if it may be."""
        if any(same_file(path, p) for p in self.protected if Path(p).exists()):
            return "it is a --config input"
        if path.exists():
            if not path.is_file():
                return "it is not a file"
            with path.open(encoding="utf-8", errors="replace") as f:
                if f.readline().rstrip("\n") != RESOLVED_CONFIG_HEADER:
                    return "it is a file the CLI did not write"
        return None

    @override
    def on_run_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the config (once)."""
        if self.already_saved:
            return
        self.already_saved = True
        folder = self.config_dir(trainer)
        if not trainer.is_global_zero:
            return
        path = Path(folder) / self.config_filename
        try:
            reason = self.refusal(path)
            if reason is None:
                text = self.parser.dump(self.config, skip_none=False)
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_name(f".{path.name}.partial")
                partial.write_text(f"{RESOLVED_CONFIG_HEADER}\n{text}", encoding="utf-8")
                os.replace(partial, path)
        except OSError as error:  # the run goes on without its config file rather than stop here on process 0
            reason = f"{type(error).__name__}: {error}"
        if reason is not None:
            rank_zero_warn(f"the resolved config is not written to {str(path)!r}: {reason}")
        self.save_config(trainer, pl_module, str(trainer.state.fn))


class RunStarted(RunStartHooks):
    """Records whether the run got past setup."""

    def __init__(self) -> None:
        self.started = False

    @override
    def on_run_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = True


LOGGER_BOOTSTRAP_FILES = ("events.out.tfevents.*", "hparams.yaml", "metrics.csv")
"""What a TensorBoard or CSV logger writes into its version folder before anything is logged (Lightning creates the
experiment before ``setup``)."""


class NewLogDirs:
    """The version folders of the run's TensorBoard / CSV loggers, noted before the run, so that a run failing before
    its first batch can remove those it created holding nothing but the loggers' empty files."""

    def __init__(self, trainer: L.Trainer) -> None:
        self.trainer = trainer
        self.before: list[tuple[Any, set[str], list[Path]]] = []
        for logger in trainer.loggers:
            if isinstance(logger, (TensorBoardLogger, CSVLogger)):
                root = Path(logger.root_dir)
                missing = [p for p in (root, *root.parents) if not p.exists()]
                self.before.append((logger, set(os.listdir(root)) if root.is_dir() else set(), missing))

    def remove(self) -> None:
        """Remove the version folders created since, if they hold only the loggers' files, and the emptied parents
        that did not exist before (on process 0)."""
        if not self.trainer.is_global_zero:
            return
        for logger, entries, missing in self.before:
            folder = Path(logger.log_dir)
            if not folder.is_dir() or folder.name in entries:
                continue
            files = [p for p in folder.rglob("*") if not p.is_dir()]
            if any(not any(p.match(pattern) for pattern in LOGGER_BOOTSTRAP_FILES) for p in files):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            for parent in missing:
                try:
                    parent.rmdir()
                except OSError:
                    break


def config_inputs(config: Any, subcommand: str | None) -> tuple[str, ...]:
    """The files given as ``--config`` (before and after the subcommand), as absolute paths."""
    found = []
    for namespace in (config, config.get(subcommand) if subcommand else None):
        for entry in (namespace.get("config") if namespace is not None else None) or []:
            path = getattr(entry, "absolute", None) or (os.fspath(entry) if isinstance(entry, (str, Path)) else None)
            if path:
                found.append(str(path))
    return tuple(found)


class LowRankCLI(LightningCLI):
    """LightningCLI that reports bad configuration as one clear line before anything runs."""

    @override
    def parse_arguments(self, parser, args) -> None:  # noqa: ANN001  (LightningCLI's signature)
        check_strategy_flag(list(sys.argv[1:] if args is None else args))
        super().parse_arguments(parser, args)

    @override
    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` (it exists, it reads as a checkpoint) before LightningCLI reads its hyperparameters,
        and report a bad one as one line."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not is_local_checkpoint_path(ckpt_path):
            super()._parse_ckpt_path()
            return
        try:
            check_lightning_checkpoint(ckpt_path)  # cheap: the structure, not the tensors' bytes
        except (FileNotFoundError, PermissionError, ValueError) as error:
            raise SystemExit(error_line(error)) from None
        try:
            super()._parse_ckpt_path()  # reads the whole file: damage inside tensor data shows here
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
            raise SystemExit(error_line(checkpoint_error(checkpoint_file(ckpt_path), error))) from None

    @override
    def before_instantiate_classes(self) -> None:
        """Tell the config callback which files are ``--config`` inputs, never to be written."""
        if isinstance(self.save_config_callback, type) and issubclass(self.save_config_callback,
                                                                      ResolvedConfigCallback):
            protected = config_inputs(self.config, self.config.get("subcommand"))
            self.save_config_kwargs = {**self.save_config_kwargs, "protected": protected}

    @override
    def before_fit(self) -> None:
        """Hand ``--ckpt_path`` to the trainer before ``fit`` runs, so ``LowRankCallback.setup`` can allocate
        layers shrunk in that checkpoint at their capacities before an FSDP2 wrap."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path"):
            self.trainer.ckpt_path, config["ckpt_path"] = config["ckpt_path"], None

    @override
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except SETUP_ERRORS as error:
            raise SystemExit(error_line(root_cause(error))) from None

    @override
    def _run_subcommand(self, subcommand: str) -> None:
        """Run ``subcommand``; a ``ValueError``, ``TypeError`` or ``FileNotFoundError`` that our code raises before
        the first batch (``prepare_data``, ``setup``, ``configure_model``, the optimizer, the checkpoint restore,
        ``on_fit_start``: bad input) is one line, as is a divergence. Anything else, or raised later, keeps its
        traceback."""
        started, log_dirs = RunStarted(), NewLogDirs(self.trainer)
        self.trainer.callbacks.append(started)
        try:
            super()._run_subcommand(subcommand)
        except DivergenceError as error:
            raise SystemExit(error_line(error)) from None
        except Exception as error:
            if started.started:
                raise
            log_dirs.remove()  # a failed setup leaves no empty lightning_logs/version_N
            if not isinstance(error, SETUP_ERRORS) or not raised_by_package(error):
                raise
            raise SystemExit(error_line(error)) from None


def run_cli(args: list[str] | None = None, **kwargs: Any) -> LowRankCLI:
    """Parse ``args`` and run the subcommand; tasks build their optimizer from the strategy's
    groups, so ``--optimizer`` is off. ``kwargs`` override LightningCLI's other settings."""
    settings = {"seed_everything_default": 0, "save_config_callback": ResolvedConfigCallback, **kwargs}
    return LowRankCLI(auto_configure_optimizers=False, args=args, **settings)


def main(args: list[str] | None = None) -> None:
    """The ``lr-lightning`` console script. A distributed ``fit`` that stops at a shrink (SVD training's
    prune, InRank's switch) goes on as stage 2 from the checkpoint saved there, at the new shapes. ``export`` runs
    :func:`lr_lightning.export.main` on the rest of the arguments."""
    args = list(sys.argv[1:] if args is None else args)
    if args[:1] == ["export"]:
        from lr_lightning.export import main as export_main

        export_main(args[1:])
        return
    cli = run_cli(args)
    while cli.subcommand == "fit" and (checkpoint := stage_two_checkpoint(cli.trainer)) is not None:
        cli = run_cli([*args, "--ckpt_path", checkpoint])


if __name__ == "__main__":
    main()
