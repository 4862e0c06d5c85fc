from pathlib import Path

import pytest
import torch

from lr_lightning.data import TextDataModule
from lr_lightning.data.text import TokenWindowDataset, default_corpus, load_splits
from lr_lightning.data.tokenizers import BPETokenizer, ByteTokenizer, build_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
ROUND_TRIP_TEXT = "héllo  wörld\n\n\tfoo = bar(1, 2)  # 😀\n"


def test_default_corpus_splits_partition_the_text():
    splits = load_splits(None, val_fraction=0.05)
    assert splits["train"] + splits["val"] + splits["test"] == default_corpus()
    n = len(default_corpus())
    assert len(splits["val"]) == len(splits["test"]) == int(0.05 * n)


def test_default_corpus_is_deterministic():
    a, b = TextDataModule(seq_len=32, batch_size=4), TextDataModule(seq_len=32, batch_size=4)
    a.setup("fit")
    b.setup("fit")
    for split in ("train", "val", "test"):
        assert a.ids[split].dtype == torch.long and a.ids[split].dim() == 1
        assert torch.equal(a.ids[split], b.ids[split])
    assert len(a.ids["train"]) > 10 * len(a.ids["val"])


def test_batches_are_shifted_windows():
    dm = TextDataModule(seq_len=32, batch_size=4, max_chars=20_000)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    x, y = next(iter(dm.val_dataloader()))
    assert torch.equal(x[0], dm.ids["val"][:32]) and torch.equal(y[0], dm.ids["val"][1:33])
    assert len(dm.train_dataloader()) == len(dm.datasets["train"]) // 4


def test_token_window_dataset():
    dataset = TokenWindowDataset(torch.arange(11), block_size=3)
    assert len(dataset) == 3
    x, y = dataset[1]
    assert x.tolist() == [3, 4, 5] and y.tolist() == [4, 5, 6]
    with pytest.raises(IndexError):
        dataset[3]
    with pytest.raises(ValueError, match="block_size"):
        TokenWindowDataset(torch.arange(3), block_size=3)


def test_split_shorter_than_a_window_raises():
    dm = TextDataModule(seq_len=64, batch_size=1, max_chars=50)
    with pytest.raises(ValueError, match="seq_len"):
        dm.setup("fit")


@pytest.mark.skipif(not (SHARED_DATA / "wikitext-2").is_dir(), reason="shared/data/wikitext-2 not present")
def test_wikitext2_loads_with_max_chars():
    folder = SHARED_DATA / "wikitext-2"
    dm = TextDataModule(path=str(folder), seq_len=64, batch_size=8, max_chars=20_000)
    dm.setup("fit")
    valid = (folder / "wiki.valid.tokens").read_text(encoding="utf-8")[:20_000]
    assert dm.tokenizer.decode(dm.ids["val"].tolist()) == valid
    assert all(len(ids) >= 20_000 for ids in dm.ids.values())
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 64)


def test_plain_text_file_split_by_position(tmp_path):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(200))
    file = tmp_path / "corpus.txt"
    file.write_text(text, encoding="utf-8")
    dm = TextDataModule(path=str(file), seq_len=16, batch_size=2, val_fraction=0.1)
    dm.setup("fit")
    decoded = {split: dm.tokenizer.decode(ids.tolist()) for split, ids in dm.ids.items()}
    n_eval = int(0.1 * len(text))
    assert decoded["test"] == text[-n_eval:]
    assert decoded["val"] == text[-2 * n_eval : -n_eval]
    assert decoded["train"] == text[: -2 * n_eval]


def test_directory_with_txt_splits(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_text(f"{split} text " * 20, encoding="utf-8")
    dm = TextDataModule(path=str(tmp_path), seq_len=8, batch_size=2)
    dm.setup("fit")
    assert dm.tokenizer.decode(dm.ids["val"].tolist()) == "valid text " * 20


def test_byte_tokenizer_round_trip_and_vocab_size():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(ROUND_TRIP_TEXT)
    assert max(ids) < 256 and tokenizer.decode(ids) == ROUND_TRIP_TEXT
    assert TextDataModule().tokenizer_vocab_size == 256


def test_bpe_trains_caches_and_round_trips(tmp_path, monkeypatch):
    text = default_corpus()[:100_000]
    tokenizer = build_tokenizer("bpe", text, vocab_size=400, cache_dir=tmp_path)
    assert 256 < tokenizer.vocab_size <= 400
    assert tokenizer.decode(tokenizer.encode(ROUND_TRIP_TEXT)) == ROUND_TRIP_TEXT
    assert len(tokenizer.encode(text[:5_000])) < 5_000
    (cache_file,) = tmp_path.glob("*.json")

    def fail(*args, **kwargs):
        raise AssertionError("retrained despite a cached tokenizer")

    monkeypatch.setattr(BPETokenizer, "train", fail)
    cached = build_tokenizer("bpe", text, vocab_size=400, cache_dir=tmp_path)
    assert cached.encode(text[:5_000]) == tokenizer.encode(text[:5_000])
    monkeypatch.undo()

    build_tokenizer("bpe", text + "more", vocab_size=400, cache_dir=tmp_path)
    build_tokenizer("bpe", text, vocab_size=300, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 3 and cache_file.exists()


def test_bpe_datamodule(tmp_path):
    dm = TextDataModule(tokenizer="bpe", bpe_vocab_size=400, seq_len=16, batch_size=4, max_chars=50_000,
                        cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="setup"):
        _ = dm.tokenizer_vocab_size
    dm.prepare_data()
    assert len(list(tmp_path.glob("*.json"))) == 1
    dm.setup("fit")
    assert 256 < dm.tokenizer_vocab_size <= 400
    assert all(int(ids.max()) < dm.tokenizer_vocab_size for ids in dm.ids.values())
    assert len(dm.ids["train"]) < 0.9 * 50_000 * (1 - 2 * 0.05)


def test_missing_path_error_names_the_path(tmp_path):
    missing = tmp_path / "no_such_corpus"
    with pytest.raises(FileNotFoundError, match="no_such_corpus"):
        TextDataModule(path=str(missing))


def test_directory_without_split_files(tmp_path):
    (tmp_path / "readme.md").write_text("nothing here")
    with pytest.raises(FileNotFoundError, match=r"wiki\.train\.tokens.*train\.txt") as error:
        TextDataModule(path=str(tmp_path))
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"tokenizer": "word"}, "tokenizer"),
        ({"tokenizer": "bpe", "bpe_vocab_size": 100}, "bpe_vocab_size"),
        ({"seq_len": 0}, "seq_len"),
        ({"val_fraction": 0.5}, "val_fraction"),
        ({"max_chars": 0}, "max_chars"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TextDataModule(**kwargs)


def test_unknown_tokenizer_kind(tmp_path):
    with pytest.raises(ValueError, match="byte"):
        build_tokenizer("word", "text", 300, tmp_path)


BINARY = b"readable first line\n" + bytes(range(128, 256))  # 0x80 (byte 20) starts no UTF-8 character


@pytest.mark.parametrize("layout", ["file", "directory"])
def test_binary_corpus_is_one_error_naming_the_file(tmp_path, layout):
    if layout == "file":
        bad = tmp_path / "corpus.bin"
        bad.write_bytes(BINARY)
        path = bad
    else:
        for split in ("train", "valid", "test"):
            (tmp_path / f"{split}.txt").write_text(f"{split} text " * 20, encoding="utf-8")
        bad = tmp_path / "valid.txt"
        bad.write_bytes(BINARY)
        path = tmp_path
    dm = TextDataModule(path=str(path), seq_len=8, batch_size=2)
    with pytest.raises(ValueError) as error:
        dm.setup("fit")
    message = str(error.value)
    assert type(error.value) is ValueError and "\n" not in message
    assert f"{str(bad)!r} is not UTF-8 text (byte 20, line 2: invalid start byte); is it a binary file?" == message
