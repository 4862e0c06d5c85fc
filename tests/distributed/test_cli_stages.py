"""``lr-lightning fit`` on 2 DDP processes goes on through SVD training's prune as stage 2, in one command."""

import subprocess
import sys
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "lm" / "svd_training.yaml"


def test_one_command_trains_through_the_shrink_to_max_steps(tmp_path):
    strategy = "--model.init_args.strategy.init_args"
    proc = subprocess.run(
        [sys.executable, "-m", "lr_lightning.cli", "fit", "--config", str(CONFIG),
         "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
         "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(tmp_path), f"{strategy}.sparsify_at", "1", f"{strategy}.prune_at", "2",
         f"{strategy}.energy", "0.3", "--model.init_args.n_layer", "1", "--model.init_args.model_dim", "32",
         "--data.init_args.max_chars", "20000", "--data.init_args.batch_size", "4"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [shrunk] = tmp_path.rglob("lowrank-shrink-step=2.ckpt")
    last = max(tmp_path.rglob("*step=4.ckpt"), key=lambda p: p.stat().st_mtime)  # stage 2's own checkpoint
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4
    capacities = checkpoint["lowrank_capacities"]
    assert capacities == torch.load(shrunk, map_location="cpu", weights_only=False)["lowrank_capacities"]
    assert max(capacities.values()) < 32  # model_dim = 32: every layer was shrunk below its full rank
    assert checkpoint["state_dict"]["model.blocks.0.mlp.fc.N"].shape[1] == capacities["model.blocks.0.mlp.fc"]
