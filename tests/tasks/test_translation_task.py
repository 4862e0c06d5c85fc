"""TranslationTask: every strategy converts fairseq2's transformer and HyboNet's, and trains; BLEU on generated data."""

import copy
import random
from functools import partial

import lightning as L
import pytest
import torch
from conftest import require_translation_extra

from lr_lightning.layers.base import LowRankLayer
from lr_lightning.models.hyperbolic import LorentzLinear, lorentz_residual
from lr_lightning.optim_riemannian import RiemannianAdamW
from lr_lightning.strategies import SST, TDLRT, FullRank, InRank, LoRA, ReLoRA, SVDTraining

require_translation_extra()

import sacrebleu  # noqa: E402

from lr_lightning.data.reordering_corpus import make_lexicon, write_reordering_corpus  # noqa: E402
from lr_lightning.data.translation import BOS, EOS, TranslationDataModule  # noqa: E402
from lr_lightning.models.lorentz_transformer import LorentzTransformer  # noqa: E402
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


# ----------------------------------------------------------------------------- HyboNet (Lorentz) architecture
HYBONET = dict(TINY, architecture="hybonet", optimizer=partial(RiemannianAdamW, lr=1e-3))
LORENTZ_MAPS = 6 + 10 + 2  # encoder (q, k, v, merge, ffn in/out), decoder (+ cross q, k, v, merge), 2 position maps


def decoder_points(task: TranslationTask) -> torch.Tensor:
    """The decoder's output points for the fixed inputs of :func:`outputs`."""
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(4, 128, (3, 9), generator=g), torch.randint(4, 128, (3, 6), generator=g)
    with torch.no_grad():
        memory, mask = task.model.encode(*layout({"seqs": src, "seq_lens": torch.tensor([9, 6, 2])}))
        return task.model.decode(*layout({"seqs": tgt, "seq_lens": torch.tensor([6, 6, 3])}), memory, mask)


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_converts_and_trains_the_hybonet_model_on_the_hyperboloid(name, small_corpus, tmp_path):
    cls, kwargs, distortion_free = STRATEGIES[name]
    torch.manual_seed(0)
    dense = TranslationTask(**HYBONET)
    torch.manual_seed(0)
    task = TranslationTask(strategy=cls(**kwargs), **HYBONET)
    assert isinstance(task.model, LorentzTransformer)
    maps = [n for n, m in task.named_modules() if isinstance(m, LorentzLinear)]
    assert len(maps) == LORENTZ_MAPS
    converted = task.strategy.layers(task)
    expected = [] if cls is FullRank else sorted(f"{n}.linear" for n in maps)
    assert sorted(n for n, _ in converted) == expected
    assert all(isinstance(layer, LowRankLayer) for _, layer in converted)
    if distortion_free:  # SST's U diag(s) V^T (and the others' init) reproduce W: the logits do not change
        torch.testing.assert_close(outputs(task), outputs(dense), atol=1e-3, rtol=1e-4)
    before = copy.deepcopy(task.state_dict())
    trainer = L.Trainer(max_steps=4, limit_val_batches=1, val_check_interval=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(task, TranslationDataModule(**small_corpus))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and 0 <= metrics["val/bleu"] <= 100
    changed = {k for k, v in task.state_dict().items() if k in before and not torch.equal(v, before[k])}
    assert {"model.embed_tokens", "model.output_points"} <= changed
    assert any("encoder.layers.0" in k for k in changed) and any("decoder.layers.0" in k for k in changed)
    assert len(task.strategy.layers(task)) == len(converted)
    for tensor in (task.model.embed_tokens, task.model.output_points, decoder_points(task)):
        assert lorentz_residual(tensor.detach(), 1.0).abs().max() < 1e-4


def test_sst_conversion_of_the_hybonet_model_leaves_its_logits_unchanged():
    torch.manual_seed(0)
    task = TranslationTask(**HYBONET)
    before = outputs(task)
    task.strategy = SST(rank=4)
    task.strategy.apply(task)
    assert len(task.strategy.layers(task)) == LORENTZ_MAPS
    torch.testing.assert_close(outputs(task), before, atol=1e-3, rtol=1e-4)
    assert not torch.allclose(outputs(TranslationTask(**HYBONET)), before)  # a different init would differ


def test_hybonet_with_a_euclidean_optimizer_is_refused_before_training(small_corpus):
    task = TranslationTask(**{**HYBONET, "optimizer": torch.optim.AdamW})
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(TypeError, match="RiemannianAdamW"):
        trainer.fit(task, TranslationDataModule(**small_corpus))
    assert trainer.global_step == 0


def test_the_default_optimizer_keeps_hybonet_points_on_the_manifold_and_is_adamw_for_the_transformer():
    hybonet = TranslationTask(**{k: v for k, v in HYBONET.items() if k != "optimizer"}).build_optimizer()
    assert isinstance(hybonet, RiemannianAdamW)
    assert any(g["lowrank_role"] == "manifold" for g in hybonet.param_groups)
    transformer = TranslationTask(**{k: v for k, v in TINY.items() if k != "optimizer"}).build_optimizer()
    assert type(transformer) is torch.optim.AdamW


@pytest.mark.parametrize(("override", "message"), [
    ({"architecture": "lorentz"}, r"architecture must be one of \('transformer', 'hybonet'\), got 'lorentz'"),
    ({"curvature": 0.0}, "curvature must be > 0"),
    ({"curvature": -1.0}, "curvature must be > 0"),
    ({"model_dim": 4, "num_heads": 4}, "hybonet needs model_dim >= 2 \\* num_heads"),
])
def test_bad_hybonet_configuration_is_an_error_naming_the_parameter(override, message):
    with pytest.raises(ValueError, match=message):
        TranslationTask(**{**HYBONET, **override})


@pytest.fixture(scope="module")
def trained_hybonet(tmp_path_factory):
    """A 2-layer, width-64 HyboNet transformer trained 300 steps on the generated reordering corpus."""
    L.seed_everything(0, verbose=False)
    data = TranslationDataModule(vocab_size=256, max_tokens=2048, max_seq_len=64,
                                 cache_dir=str(tmp_path_factory.mktemp("cache")))
    task = TranslationTask(architecture="hybonet", vocab_size=256, model_dim=64, num_layers=2, num_heads=4,
                           ffn_dim=256, dropout=0.0, max_seq_len=64, warmup_steps=50, beam_size=4,
                           optimizer=partial(RiemannianAdamW, lr=3e-3, betas=(0.9, 0.98)))
    trainer = L.Trainer(max_steps=300, limit_val_batches=0, limit_test_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, data)
    trainer.test(task, data, verbose=False)
    return task, data, trainer.callback_metrics["test/bleu"].item()


def test_hybonet_learns_the_reordering_of_the_generated_corpus(trained_hybonet):
    task, data, bleu = trained_hybonet
    pairs = data.read_splits()["test"]
    lexicon = {s: t for group in make_lexicon(random.Random(data.seed)).values() for s, t in group}
    word_by_word = sacrebleu.corpus_bleu([" ".join(lexicon[w] for w in s.split()) for s, _ in pairs],
                                         [[t for _, t in pairs]]).score
    assert word_by_word < 30 < 60 < bleu, (word_by_word, bleu)
    for tensor in (task.model.embed_tokens, task.model.output_points):
        assert lorentz_residual(tensor.detach(), 1.0).abs().max() < 1e-4


def test_hybonet_beam_search_of_width_one_equals_greedy_decoding(trained_hybonet):
    task, data, _ = trained_hybonet
    batch = next(iter(data.splits["valid"]))
    source, source_layout = layout({"seqs": batch["source"]["seqs"][:16],
                                    "seq_lens": batch["source"]["seq_lens"][:16]})
    task.eval()
    beam = [t.tolist() for t in task.translate_tokens(source, source_layout, beam_size=1)]
    with torch.no_grad():
        reference = greedy(task, source, source_layout, max_len=max(len(b) for b in beam) + 1)
    assert beam == reference
    assert all(b[-1] == EOS for b in beam)


def test_hybonet_refuses_fsdp2_sharding():
    task = TranslationTask(**HYBONET)
    task._device_mesh = {"data_parallel": None}  # what ModelParallelStrategy hands configure_model
    with pytest.raises(ValueError, match="architecture='hybonet' cannot be sharded with FSDP2"):
        task.configure_model()
