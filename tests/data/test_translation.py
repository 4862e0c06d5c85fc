"""Parallel text: file layouts, alignment errors, token-budget batching, DDP shares, the generated corpus."""

import gzip
import random
import shutil

import pytest
import torch
from conftest import SHARED_DATA, require_translation_extra

require_translation_extra()

from lr_lightning.data.reordering_corpus import make_lexicon, write_reordering_corpus  # noqa: E402
from lr_lightning.data.translation import PAD, TokenBatches, TranslationDataModule, read_parallel  # noqa: E402

MULTI30K = SHARED_DATA / "multi30k"
MULTI30K_SIZES = {"train": 29000, "valid": 1014, "test": 1000}


@pytest.fixture(scope="module")
def multi30k(tmp_path_factory):
    data = TranslationDataModule(path=str(MULTI30K), source_lang="de", target_lang="en", vocab_size=4000,
                                 max_tokens=1024, max_seq_len=64, cache_dir=str(tmp_path_factory.mktemp("cache")))
    data.setup("fit")
    return data


def test_multi30k_reads_every_split_with_its_official_size(multi30k):
    pairs = multi30k.read_splits()
    assert {split: len(p) for split, p in pairs.items()} == MULTI30K_SIZES
    assert pairs["train"][0][1].startswith("Two young, White males are outside")


def test_batches_stay_within_the_token_budget_and_cover_the_split(multi30k):
    batches = list(multi30k.splits["valid"])
    for batch in batches:
        for side in ("source", "target"):
            seqs = batch[side]["seqs"]
            assert seqs.numel() <= multi30k.max_tokens
            assert seqs.size(1) <= multi30k.max_seq_len
            lens = torch.as_tensor(batch[side]["seq_lens"])
            assert torch.equal((seqs != PAD).sum(1), lens)  # padding only past each length
        assert len(batch["reference"]) == batch["source"]["seqs"].size(0)
    encoded = [(multi30k.tokenizer.encode_source(s), multi30k.tokenizer.encode_target(t))
               for s, t in multi30k.read_splits()["valid"]]
    kept = sum(max(len(s), len(t)) <= multi30k.max_seq_len for s, t in encoded)
    assert sum(len(b["reference"]) for b in batches) == kept > 1000


def test_iwslt_layout_reads_the_same_pairs(multi30k, tmp_path):
    for split, name in (("train", "train"), ("valid", "val"), ("test", "test_2016_flickr")):
        for lang in ("de", "en"):
            with gzip.open(MULTI30K / f"{name}.{lang}.gz", "rb") as src, \
                    open(tmp_path / f"{split}.{lang}", "wb") as dst:
                shutil.copyfileobj(src, dst)
    iwslt = TranslationDataModule(path=str(tmp_path), source_lang="de", target_lang="en")
    assert iwslt.read_splits() == multi30k.read_splits()


def test_mismatched_line_counts_are_an_error_naming_both_files(tmp_path):
    (tmp_path / "train.de").write_text("a\nb\nc\n")
    (tmp_path / "train.en").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"train.de has 3 lines but train.en has 2"):
        read_parallel(tmp_path / "train.de", tmp_path / "train.en")


def test_missing_files_are_an_error_naming_them(tmp_path):
    (tmp_path / "train.de").write_text("a\n")
    data = TranslationDataModule(path=str(tmp_path), source_lang="de", target_lang="en")
    with pytest.raises(FileNotFoundError, match=r"found train.de but not its pair train.en"):
        data.read_splits()
    (tmp_path / "train.en").write_text("a\n")
    with pytest.raises(FileNotFoundError, match=r"no valid split .* expected one of valid.\{de,en\}"):
        data.read_splits()
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        TranslationDataModule(path=str(tmp_path / "nowhere")).read_splits()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_seq_len": 100, "max_tokens": 1050}, "must be a multiple of max_seq_len"),
    ({"max_seq_len": 1}, "max_seq_len must be in"),
    ({"source_lang": "en", "target_lang": "en"}, "must differ"),
])
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TranslationDataModule(**kwargs)


def test_ddp_ranks_get_equal_disjoint_shares_of_one_epoch():
    g = torch.Generator().manual_seed(0)
    examples = [{"source": torch.randint(4, 9, (int(n),)), "target": torch.randint(4, 9, (int(m),)),
                 "reference": str(i)} for i, (n, m) in enumerate(torch.randint(2, 30, (500, 2), generator=g))]
    views = [TokenBatches(examples, max_tokens=256, max_seq_len=32, shuffle=True, seed=3) for _ in range(2)]
    for rank, view in enumerate(views):
        view.rank, view.world_size = rank, 2
    shares = [[tuple(b["reference"]) for b in view] for view in views]
    assert len(shares[0]) == len(shares[1]) == len(views[0])
    assert not set(shares[0]) & set(shares[1])
    next_epoch = [tuple(b["reference"]) for b in views[0]]
    assert next_epoch != shares[0]  # reshuffled


def test_sentencepiece_model_is_cached(tmp_path):
    corpus = write_reordering_corpus(tmp_path / "corpus", seed=1, sizes={"train": 300, "valid": 10, "test": 10})
    first = TranslationDataModule(path=str(corpus), vocab_size=100, cache_dir=str(tmp_path / "cache"))
    first.setup("fit")
    mtime = first.tokenizer.path.stat().st_mtime_ns
    second = TranslationDataModule(path=str(corpus), vocab_size=100, cache_dir=str(tmp_path / "cache"))
    second.setup("fit")
    assert second.tokenizer.path == first.tokenizer.path and second.tokenizer.path.stat().st_mtime_ns == mtime
    text = "togi nala kuri"
    assert first.tokenizer.decode(first.tokenizer.encode_target(text)) == text


def test_generated_corpus_is_deterministic_and_needs_reordering(tmp_path):
    sizes = {"train": 200, "valid": 50, "test": 50}
    a = write_reordering_corpus(tmp_path / "a", seed=5, sizes=sizes)
    b = write_reordering_corpus(tmp_path / "b", seed=5, sizes=sizes)
    assert (a / "train.src").read_text() == (b / "train.src").read_text()
    lexicon = {s: t for pairs in make_lexicon(random.Random(5)).values() for s, t in pairs}
    pairs = read_parallel(a / "test.src", a / "test.tgt")
    word_by_word = [" ".join(lexicon[w] for w in src.split()) for src, _ in pairs]
    assert all(sorted(w.split()) == sorted(tgt.split()) for w, (_, tgt) in zip(word_by_word, pairs))
    assert all(w != tgt for w, (_, tgt) in zip(word_by_word, pairs))


def test_binary_or_damaged_files_are_one_error_naming_the_file(tmp_path):
    from lr_lightning.data.translation import read_lines

    (tmp_path / "train.de").write_bytes(b"ein Satz\n\xff\xfe binary\n")
    with pytest.raises(ValueError, match=r"train\.de' is not UTF-8 text \(byte 9, line 2: invalid start byte\)"):
        read_lines(tmp_path / "train.de")
    (tmp_path / "train.en.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"train\.en\.gz' is truncated or not a gzip file \(BadGzipFile"):
        read_lines(tmp_path / "train.en.gz")
    (tmp_path / "valid.en.gz").write_bytes(gzip.compress(b"a sentence\n" * 100)[:30])
    with pytest.raises(ValueError, match=r"valid\.en\.gz' is truncated or not a gzip file \(EOFError"):
        read_lines(tmp_path / "valid.en.gz")
    (tmp_path / "test.de.gz").write_bytes(gzip.compress(b"\x80\x81"))
    with pytest.raises(ValueError, match=r"test\.de\.gz' is not UTF-8 text \(byte 0, line 1"):
        read_lines(tmp_path / "test.de.gz")
