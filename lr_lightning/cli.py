"""``lr-lightning``: LightningCLI over every task, datamodule and strategy of the package.

    lr-lightning fit --config configs/lm/lora.yaml
    lr-lightning fit --config configs/lm/lora.yaml --model.strategy ReLoRA --model.strategy.merge_every 100
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI

import lr_lightning.data  # noqa: F401  (registers the datamodules' short class names)
import lr_lightning.tasks  # noqa: F401  (registers the tasks' short class names)
from lr_lightning.callbacks.lowrank import stage_two_checkpoint
from lr_lightning.strategies import LowRankStrategy

STRATEGY_FLAGS = ("--model.strategy", "--model.init_args.strategy")


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


class LowRankCLI(LightningCLI):
    """LightningCLI that reports bad configuration as one clear line before anything runs."""

    def parse_arguments(self, parser, args) -> None:  # noqa: ANN001  (LightningCLI's signature)
        check_strategy_flag(list(sys.argv[1:] if args is None else args))
        super().parse_arguments(parser, args)

    def before_fit(self) -> None:
        """Hand ``--ckpt_path`` to the trainer before ``fit`` runs, so ``LowRankCallback.setup`` can allocate
        layers shrunk in that checkpoint at their capacities before an FSDP2 wrap."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path"):
            self.trainer.ckpt_path, config["ckpt_path"] = config["ckpt_path"], None

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, FileNotFoundError) as error:
            cause = root_cause(error)
            raise SystemExit(f"lr-lightning: error: {type(cause).__name__}: {cause}") from None


def run_cli(args: list[str] | None = None, **kwargs: Any) -> LowRankCLI:
    """Parse ``args`` and run the subcommand; tasks build their optimizer from the strategy's
    groups, so ``--optimizer`` is off. ``kwargs`` override LightningCLI's other settings."""
    settings = {"seed_everything_default": 0, "save_config_kwargs": {"overwrite": True}, **kwargs}
    return LowRankCLI(auto_configure_optimizers=False, args=args, **settings)


def main(args: list[str] | None = None) -> None:
    """The ``lr-lightning`` console script. A distributed ``fit`` that stops at a shrink (SVD training's
    prune, InRank's switch) goes on as stage 2 from the checkpoint saved there, at the new shapes."""
    args = list(sys.argv[1:] if args is None else args)
    cli = run_cli(args)
    while cli.subcommand == "fit" and (checkpoint := stage_two_checkpoint(cli.trainer)) is not None:
        cli = run_cli([*args, "--ckpt_path", checkpoint])


if __name__ == "__main__":
    main()
