"""Run by tests/distributed/test_translation_replicas.py in a subprocess (Lightning's launcher re-runs argv).

Trains a tiny TranslationTask (LoRA, no dropout) on the generated reordering corpus on 2 CPU processes (gloo)
under DDP or FSDP2 (``ModelParallelStrategy``), then validates with beam search, each process decoding its
own share of the sentences. Rank 0 writes a JSON summary (whether the replicas' whole weights agree, how far
training moved them, whether the model was sharded with the embedding still tied to the output projection,
each process's hypothesis lengths, the validation metrics) and the whole weights, which the test compares
across backends.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from replicas import full_state, replica_digests
from torch.distributed.fsdp import FSDPModule

from lr_lightning.data.reordering_corpus import write_reordering_corpus
from lr_lightning.data.translation import TranslationDataModule
from lr_lightning.layers.tensors import local_tensor
from lr_lightning.strategies import LoRA
from lr_lightning.tasks import TranslationTask


class RecordingTask(TranslationTask):
    """Records the longest hypothesis of every batch it decodes."""

    decoded: list[int]

    def translate_tokens(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        tokens = super().translate_tokens(*args, **kwargs)
        self.decoded.append(max(len(t) for t in tokens))
        return tokens


def task() -> RecordingTask:
    """Identical on every process (seeded): FSDP2 shards each process's own copy. Hypothesis lengths follow the
    source lengths (``max_gen_len``), so the processes' beam searches run unequal numbers of decoder steps."""
    L.seed_everything(0, verbose=False)
    return RecordingTask(strategy=LoRA(rank=4, alpha=8.0), vocab_size=64, model_dim=32, num_layers=1, num_heads=4,
                         ffn_dim=64, dropout=0.0, max_seq_len=32, warmup_steps=2, beam_size=2, max_gen_len=(0.5, 2),
                         optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-2))


def trainer(backend: str, steps: int, workdir: Path) -> L.Trainer:
    strategy = "ddp" if backend == "ddp" else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, num_sanity_val_steps=0,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=workdir)


def sharding(model: torch.nn.Module) -> dict[str, bool]:
    """Whether every layer is an FSDP2 module, whether this process holds only a shard of the embedding, and
    whether the encoder's and decoder's embeddings and the output projection are still one parameter."""
    embedding = model.encoder_frontend.embed.weight
    layers = [*model.encoder.layers, *model.decoder.layers]
    return {"sharded": all(isinstance(m, FSDPModule) for m in [model, *layers])
            and local_tensor(embedding).numel() < embedding.numel(),
            "tied": model.final_proj.weight is embedding and model.decoder_frontend.embed.weight is embedding}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()

    corpus = write_reordering_corpus(args.workdir / "corpus", seed=0, sizes={"train": 200, "valid": 32, "test": 8})
    data = TranslationDataModule(path=str(corpus), vocab_size=64, max_tokens=128, max_seq_len=32,
                                 cache_dir=str(args.workdir / "cache"))
    data.setup("fit")  # trains the tokenizer before the second process starts, which then reads it from the cache
    model = task()
    initial = full_state(model)
    fit = trainer(args.backend, args.steps, args.workdir)
    fit.fit(model, data)
    layout = sharding(model.model)
    model.decoded = []
    metrics = {k: float(v) for k, v in fit.validate(model, data, verbose=False)[0].items()}
    state = full_state(model)
    digests = replica_digests(state)
    decoded: list[list[int]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(decoded, model.decoded)

    if dist.get_rank() == 0:
        torch.save(state, args.workdir / "weights.pt")
        moved = max((state[k].float() - initial[k].float()).abs().max().item() for k in state)
        (args.workdir / "result.json").write_text(json.dumps({
            "replicas_equal": len(set(digests)) == 1, "moved": moved, "step": model.trainer.global_step,
            "decoded": decoded, **layout, **metrics,
        }))
    dist.barrier()
    dist.destroy_process_group()  # a gloo group left to interpreter exit can abort the process (SIGABRT)


if __name__ == "__main__":
    sys.exit(main())
