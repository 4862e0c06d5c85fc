"""TranslationTask: every strategy converts fairseq2's transformer and trains; BLEU on the generated corpus."""

import copy
import random
from functools import partial

import lightning as L
import pytest
import torch
from conftest import require_translation_extra

from lr_lightning.layers.base import LowRankLayer
from lr_lightning.strategies import SST, TDLRT, FullRank, InRank, LoRA, ReLoRA, SVDTraining

require_translation_extra()

import sacrebleu  # noqa: E402

from lr_lightning.data.reordering_corpus import make_lexicon, write_reordering_corpus  # noqa: E402
from lr_lightning.data.translation import BOS, EOS, TranslationDataModule  # noqa: E402
from lr_lightning.tasks.translation import TranslationTask, layout  # noqa: E402

TINY = dict(vocab_size=128, model_dim=32, num_layers=1, num_heads=4, ffn_dim=64, dropout=0.0, max_seq_len=64)
PROJECTIONS = 6 + 10  # one encoder layer (q, k, v, out, ffn in/out) and one decoder layer (+ cross-attention)
STRATEGIES = {
    "full_rank": (FullRank, {}, True),
    "lora": (LoRA, {"rank": 4}, True),
    "relora": (ReLoRA, {"rank": 4, "merge_every": 2, "restart_warmup_steps": 1}, True),
    "sst": (SST, {"rank": 4, "iteration_interval": 2, "restart_warmup_steps": 1}, True),
    "inrank": (InRank, {"init_rank": 2, "buffer": 2, "warmup_steps": 1, "check_every": 1}, False),
    "tdlrt": (TDLRT, {"init_rank": 4, "max_rank": 8, "augment_every": 2}, False),
    "svd_training": (SVDTraining, {"sparsify_at": 2}, True),
}


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("translation")
    folder = write_reordering_corpus(root / "corpus", seed=0, sizes={"train": 400, "valid": 16, "test": 16})
    return dict(path=str(folder), vocab_size=128, max_tokens=512, max_seq_len=32, cache_dir=str(root / "cache"))


def outputs(task: TranslationTask) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(4, 128, (3, 9), generator=g), torch.randint(4, 128, (3, 6), generator=g)
    lens = torch.tensor([9, 6, 2]), torch.tensor([6, 6, 3])
    mode = task.training
    task.eval()
    with torch.no_grad():
        result = task(*layout({"seqs": src, "seq_lens": lens[0]}), *layout({"seqs": tgt, "seq_lens": lens[1]}))
    return task.train(mode) and result


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_converts_the_fairseq2_model_and_trains(name, small_corpus, tmp_path):
    cls, kwargs, distortion_free = STRATEGIES[name]
    torch.manual_seed(0)
    dense = TranslationTask(**TINY)
    torch.manual_seed(0)
    task = TranslationTask(strategy=cls(**kwargs), **TINY)
    assert len(task.strategy.select(task)) == PROJECTIONS
    converted = task.strategy.layers(task)
    assert len(converted) == (0 if cls is FullRank else PROJECTIONS)
    assert all(isinstance(layer, LowRankLayer) for _, layer in converted)
    if distortion_free:
        torch.testing.assert_close(outputs(task), outputs(dense), atol=2e-5, rtol=1e-4)
    before = copy.deepcopy(task.state_dict())
    trainer = L.Trainer(max_steps=4, limit_val_batches=1, val_check_interval=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(task, TranslationDataModule(**small_corpus))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and 0 <= metrics["val/bleu"] <= 100
    changed = [k for k, v in task.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert any("encoder.layers.0" in k for k in changed) and any("decoder.layers.0" in k for k in changed)
    assert len(task.strategy.layers(task)) == len(converted)


def test_load_from_checkpoint_reapplies_the_strategy(small_corpus, tmp_path):
    task = TranslationTask(strategy=LoRA(rank=4), **TINY)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, TranslationDataModule(**small_corpus))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = TranslationTask.load_from_checkpoint(tmp_path / "last.ckpt")
    assert isinstance(loaded.strategy, LoRA) and len(loaded.strategy.layers(loaded)) == PROJECTIONS
    torch.testing.assert_close(outputs(loaded), outputs(task))


def test_vocabulary_smaller_than_the_tokenizer_is_an_error_before_training(small_corpus):
    task = TranslationTask(**{**TINY, "vocab_size": 16})
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="model vocab_size=16 is smaller than the tokenizer's vocabulary"):
        trainer.fit(task, TranslationDataModule(**small_corpus))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-layer, width-64 transformer trained 300 steps on the generated reordering corpus."""
    L.seed_everything(0, verbose=False)
    data = TranslationDataModule(vocab_size=256, max_tokens=2048, max_seq_len=64,
                                 cache_dir=str(tmp_path_factory.mktemp("cache")))
    task = TranslationTask(vocab_size=256, model_dim=64, num_layers=2, num_heads=4, ffn_dim=256, dropout=0.0,
                           max_seq_len=64, warmup_steps=50, beam_size=4,
                           optimizer=partial(torch.optim.AdamW, lr=3e-3, betas=(0.9, 0.98)))
    trainer = L.Trainer(max_steps=300, limit_val_batches=0, limit_test_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, data)
    trainer.test(task, data, verbose=False)
    return task, data, trainer.callback_metrics["test/bleu"].item()


def test_bleu_on_the_generated_corpus_shows_the_reordering_was_learned(trained):
    task, data, bleu = trained
    pairs = data.read_splits()["test"]
    lexicon = {s: t for group in make_lexicon(random.Random(data.seed)).values() for s, t in group}
    word_by_word = sacrebleu.corpus_bleu([" ".join(lexicon[w] for w in s.split()) for s, _ in pairs],
                                         [[t for _, t in pairs]]).score
    # A perfect lexicon without reordering scores ~25; 60 needs most sentences in the target order.
    assert word_by_word < 30 < 60 < bleu, (word_by_word, bleu)


def test_translate_turns_raw_source_sentences_into_their_references(trained):
    task, data, _ = trained
    pairs = data.read_splits()["test"][:12]
    translations = task.translate([src for src, _ in pairs])
    assert len(translations) == len(pairs)
    assert sum(hyp == ref for hyp, (_, ref) in zip(translations, pairs)) >= 9, list(zip(translations, pairs))


def greedy(task: TranslationTask, source: torch.Tensor, source_layout, max_len: int) -> list[list[int]]:
    """Argmax decoding by re-running the decoder on the whole prefix at every step."""
    from fairseq2.nn import BatchLayout

    prefix = torch.full((source.size(0), 1), BOS)
    for _ in range(max_len):
        logits = task(source, source_layout, prefix, BatchLayout(prefix.shape, [prefix.size(1)] * prefix.size(0)))
        prefix = torch.cat([prefix, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    result = []
    for row in prefix[:, 1:].tolist():
        result.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return result


def test_beam_search_of_width_one_equals_greedy_decoding(trained):
    task, data, _ = trained
    batch = next(iter(data.splits["valid"]))
    source, source_layout = layout(batch["source"])
    source, source_layout = source[:16], layout({"seqs": source[:16], "seq_lens": batch["source"]["seq_lens"][:16]})[1]
    task.eval()
    beam = [t.tolist() for t in task.translate_tokens(source, source_layout, beam_size=1)]
    with torch.no_grad():
        reference = greedy(task, source, source_layout, max_len=max(len(b) for b in beam) + 1)
    assert beam == reference
    assert all(b[-1] == EOS for b in beam)
