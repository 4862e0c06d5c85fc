"""``lr-lightning``: LightningCLI over every task, datamodule and strategy of the package.

    lr-lightning fit --config configs/lm/lora.yaml
    lr-lightning fit --config configs/lm/lora.yaml --model.strategy SST --model.strategy.rank 32
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

import lr_lightning.data  # noqa: F401  (registers the datamodules' short class names)
import lr_lightning.strategies  # noqa: F401  (registers the strategies' short class names)
import lr_lightning.tasks  # noqa: F401  (registers the tasks' short class names)


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI; tasks build their optimizer from the strategy's groups, so ``--optimizer`` is off."""
    return LightningCLI(
        auto_configure_optimizers=False,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
