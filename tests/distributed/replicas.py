"""Run by tests/distributed/test_replicas.py in a subprocess (Lightning's DDP launcher re-runs argv).

Trains a tiny LanguageModelingTask with the strategy given as ``--strategy '{"class_path": ...,
"init_args": ...}'`` on 2 CPU processes (gloo) three ways: 2 * ``half`` steps straight, and ``half``
steps then a resume from the checkpoint to 2 * ``half``. Rank 0 writes a JSON summary (whether the
replicas' weights agree, how far the resumed run is from the straight one, the strategy's state and
the layers' ranks) and the straight run's weights, which the tests compare across backends.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, TensorDataset

from lr_lightning.callbacks import fit_in_stages
from lr_lightning.layers.tensors import full_tensor
from lr_lightning.strategies import strategy_from_config
from lr_lightning.tasks import LanguageModelingTask

VOCAB, BLOCK = 32, 16


def loader() -> DataLoader:
    """Sequences of the rule ``t_{i+1} = 3 t_i + 1 mod V`` from random starts: learnable, deterministic."""
    starts = torch.randint(0, VOCAB, (32,), generator=torch.Generator().manual_seed(0))
    seqs = [starts]
    for _ in range(BLOCK):
        seqs.append((3 * seqs[-1] + 1) % VOCAB)
    tokens = torch.stack(seqs, dim=1)
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4, shuffle=True)


def task(config: dict) -> LanguageModelingTask:
    L.seed_everything(0, verbose=False)
    strategy = strategy_from_config(config)
    return LanguageModelingTask(strategy=strategy, vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2,
                                model_dim=32, warmup_steps=2,
                                optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-2))


class StopAt(L.Callback):
    """Stop after ``step`` optimizer steps, keeping ``max_steps`` (and so the LR schedule) unchanged."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def trainer(backend: str, max_steps: int, stop_and_save_at: int | None = None,
            ckpt_dir: Path | None = None) -> L.Trainer:
    """A 2-process trainer; with ``stop_and_save_at`` it checkpoints there and stops; ``ckpt_dir`` also holds
    the checkpoint a shrink saves."""
    strategy = "ddp" if backend == "ddp" else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    saver = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_train_steps=stop_and_save_at)
    callbacks = [] if stop_and_save_at is None else [StopAt(stop_and_save_at), saver]
    return L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=max_steps, logger=False,
                     default_root_dir=ckpt_dir, enable_checkpointing=stop_and_save_at is not None,
                     callbacks=callbacks, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=True)


def full_state(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {k: full_tensor(v).detach().clone() for k, v in module.state_dict().items()}


def replica_digests(state: dict[str, torch.Tensor]) -> list[str]:
    """One digest per process of the whole weights that process holds (gathered shards under FSDP2)."""
    digest = hashlib.sha256()
    for value in state.values():
        digest.update(value.float().contiguous().numpy().tobytes())
    gathered: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(gathered, digest.hexdigest())
    return gathered


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--strategy", type=json.loads, required=True, help="strategy.to_config() as JSON")
    parser.add_argument("--half", type=int, default=4)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()

    def whole_run(ckpt_path: str | None = None) -> L.LightningModule:
        """Train to 2 * half steps from ``ckpt_path``, going on through a shrink as stage 2."""
        _, model = fit_in_stages(lambda: trainer(args.backend, 2 * args.half, ckpt_dir=args.workdir / "stages"),
                                 lambda: task(args.strategy), ckpt_path, train_dataloaders=loader())
        return model

    straight = whole_run()
    straight_state = full_state(straight)
    straight_digests = replica_digests(straight_state)

    first = task(args.strategy)
    trainer(args.backend, 2 * args.half, args.half, args.workdir / "ckpt").fit(first, loader())
    first_state = full_state(first)
    ckpt = next((args.workdir / "ckpt").glob("*.ckpt"))
    resumed = whole_run(str(ckpt))
    resumed_state = full_state(resumed)
    resumed_digests = replica_digests(resumed_state)

    if dist.get_rank() == 0:
        diff = max((straight_state[k].float() - resumed_state[k].float()).abs().max().item() for k in straight_state)
        moved = max((straight_state[k].float() - first_state[k].float()).abs().max().item() for k in straight_state
                    if straight_state[k].shape == first_state[k].shape)  # shrunk factors have new shapes
        ranks = [layer.rank for _, layer in resumed.strategy.layers(resumed)]
        capacities = [layer.capacity for _, layer in resumed.strategy.layers(resumed)]
        torch.save(straight_state, args.workdir / "straight.pt")
        (args.workdir / "result.json").write_text(json.dumps({
            "straight_replicas_equal": len(set(straight_digests)) == 1,
            "resumed_replicas_equal": len(set(resumed_digests)) == 1,
            "resume_max_abs_diff": diff, "second_half_moved": moved,
            "strategy_state": resumed.strategy.state_dict(), "ranks": ranks, "capacities": capacities,
            "step": resumed.trainer.global_step,
        }))
    dist.barrier()
    dist.destroy_process_group()  # a gloo group left to interpreter exit can abort the process (SIGABRT)


if __name__ == "__main__":
    sys.exit(main())
