import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_tokenizers import save_hf_tokenizer

from lr_lightning.data import TextDataModule, text_sources
from lr_lightning.data import text as text_module
from lr_lightning.data.files import read_text
from lr_lightning.data.text import TokenWindowDataset, default_corpus
from lr_lightning.data.text_sources import split_by_position
from lr_lightning.data.tokenizers import BPETokenizer, ByteTokenizer, PretrainedTokenizer, build_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
ROUND_TRIP_TEXT = "héllo  wörld\n\n\tfoo = bar(1, 2)  # 😀\n"


def tokens_of(dm: TextDataModule, split: str) -> list[int]:
    return dm.tokens[split].array.tolist()


def in_memory_encoding(tokenizer, text: str) -> list[int]:
    """The encoding before token files: the whole split in memory, encoded in chunks of 1,000 lines."""
    lines = text.splitlines(keepends=True)
    return [i for start in range(0, len(lines), 1_000) for i in tokenizer.encode("".join(lines[start : start + 1_000]))]


def documents(n: int, tag: str) -> list[str]:
    return [f"{tag} document {i}: " + "the quick brown fox jumps. " * (1 + i % 5) for i in range(n)]


def write_jsonl_gz(path: Path, texts: list[str], field: str = "text") -> None:
    with gzip.open(path, "wt", encoding="utf-8") as file:
        for text in texts:
            file.write(json.dumps({field: text, "url": "https://example.org"}) + "\n")


def test_default_corpus_splits_partition_the_text():
    splits = split_by_position(default_corpus(), val_fraction=0.05)
    assert splits["train"] + splits["val"] + splits["test"] == default_corpus()
    n = len(default_corpus())
    assert len(splits["val"]) == len(splits["test"]) == int(0.05 * n)


def test_memmap_tokens_equal_the_in_memory_encoding_of_the_default_corpus(tmp_path):
    dm = TextDataModule(seq_len=32, batch_size=4, cache_dir=str(tmp_path))
    dm.setup("fit")
    splits = split_by_position(default_corpus(), val_fraction=0.05)
    for split, text in splits.items():
        assert isinstance(dm.tokens[split].array, np.memmap) and dm.tokens[split].dtype == np.uint16
        assert tokens_of(dm, split) == ByteTokenizer().encode(text)
        in_memory = TokenWindowDataset(torch.tensor(ByteTokenizer().encode(text)), 32)
        assert len(dm.datasets[split]) == len(in_memory)
        for index in (0, 7, len(in_memory) - 1):
            x, y = dm.datasets[split][index]
            assert x.dtype == torch.long and torch.equal(x, in_memory[index][0]) and torch.equal(y, in_memory[index][1])


def test_memmap_bpe_tokens_of_a_wikitext_folder_equal_the_in_memory_encoding(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = default_corpus().splitlines(keepends=True)
    texts = {"train": "".join(lines[:2_500]), "valid": "".join(lines[2_500:3_000]), "test": "".join(lines[3_000:3_400])}
    for name, text in texts.items():
        (corpus / f"wiki.{name}.tokens").write_text(text, encoding="utf-8")
    dm = TextDataModule(path=str(corpus), tokenizer="bpe", bpe_vocab_size=400, seq_len=16, batch_size=4,
                        cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    in_memory = BPETokenizer.train(texts["train"], vocab_size=400)  # the tokenizer the in-memory pipeline trained
    assert dm.tokenizer.fingerprint() == in_memory.fingerprint()
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        assert tokens_of(dm, split) == in_memory_encoding(in_memory, texts[name])
    assert len(texts["train"].splitlines()) > 2_000  # several chunks of 1,000 lines were joined


@pytest.mark.parametrize("block_chars", [7, 4_096, 1 << 20])
def test_a_file_read_in_blocks_gives_the_in_memory_tokens(tmp_path, monkeypatch, block_chars):
    monkeypatch.setattr(text_sources, "READ_BLOCK_CHARS", block_chars)
    text = "".join(f"línea {i}\u2028 x\r\n" if i % 7 == 0 else f"line {i} ☃\n\n" for i in range(3_000))
    file = tmp_path / "corpus.txt"
    file.write_bytes(text.encode("utf-8"))
    dm = TextDataModule(path=str(file), tokenizer="bpe", bpe_vocab_size=300, seq_len=8, batch_size=2,
                        cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    splits = split_by_position(read_text(file), 0.05)
    in_memory = BPETokenizer.train(splits["train"], vocab_size=300)
    assert dm.tokenizer.fingerprint() == in_memory.fingerprint()
    for split, split_text in splits.items():
        assert tokens_of(dm, split) == in_memory_encoding(in_memory, split_text)


def test_a_second_run_opens_the_cached_token_files(tmp_path, monkeypatch):
    first = TextDataModule(seq_len=32, batch_size=4, max_chars=30_000, cache_dir=str(tmp_path))
    first.prepare_data()
    (folder,) = tmp_path.glob("tokens-*")
    assert sorted(p.name for p in folder.iterdir()) == ["test.bin", "test.json", "train.bin", "train.json",
                                                        "val.bin", "val.json"]

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again despite cached token files")

    monkeypatch.setattr(text_module, "write_token_file", fail)
    second = TextDataModule(seq_len=32, batch_size=4, max_chars=30_000, cache_dir=str(tmp_path))
    second.setup("fit")
    train_text = split_by_position(default_corpus(), 0.05)["train"][:30_000]
    assert second.tokens["train"].path.parent == folder
    assert tokens_of(second, "train") == ByteTokenizer().encode(train_text)
    monkeypatch.undo()
    TextDataModule(seq_len=32, batch_size=4, max_chars=20_000, cache_dir=str(tmp_path)).setup("fit")
    assert len(list(tmp_path.glob("tokens-*"))) == 2


def test_a_changed_source_file_is_tokenized_again(tmp_path):
    file = tmp_path / "corpus.txt"
    file.write_text("first version of the corpus\n" * 100, encoding="utf-8")
    dm = TextDataModule(path=str(file), seq_len=8, batch_size=2, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    file.write_text("second version of the text!\n" * 120, encoding="utf-8")
    again = TextDataModule(path=str(file), seq_len=8, batch_size=2, cache_dir=str(tmp_path / "cache"))
    again.setup("fit")
    assert again.tokens["train"].path != dm.tokens["train"].path
    assert ByteTokenizer().decode(tokens_of(again, "test")) == split_by_position(read_text(file), 0.05)["test"]


def test_an_interrupted_tokenization_is_redone_not_trusted(tmp_path, monkeypatch):
    calls = []

    def crash_on_val(tokenizer, pieces):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_encode(tokenizer, pieces)

    real_encode = text_module.encode_pieces
    monkeypatch.setattr(text_module, "encode_pieces", crash_on_val)
    with pytest.raises(KeyboardInterrupt):
        TextDataModule(seq_len=32, batch_size=4, max_chars=20_000, cache_dir=str(tmp_path)).prepare_data()
    monkeypatch.undo()
    dm = TextDataModule(seq_len=32, batch_size=4, max_chars=20_000, cache_dir=str(tmp_path))
    dm.setup("fit")
    splits = split_by_position(default_corpus(), 0.05)
    assert tokens_of(dm, "val") == ByteTokenizer().encode(splits["val"][:20_000])


def test_batches_are_shifted_windows(tmp_path):
    dm = TextDataModule(seq_len=32, batch_size=4, max_chars=20_000, cache_dir=str(tmp_path))
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    x, y = next(iter(dm.val_dataloader()))
    val = torch.from_numpy(dm.tokens["val"].array[:33].astype(np.int64))
    assert torch.equal(x[0], val[:32]) and torch.equal(y[0], val[1:33])
    assert len(dm.train_dataloader()) == len(dm.datasets["train"]) // 4


def test_worker_processes_read_the_same_windows(tmp_path):
    dm = TextDataModule(seq_len=32, batch_size=4, max_chars=5_000, num_workers=1, cache_dir=str(tmp_path))
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    expected = [dm.datasets["val"][i][0] for i in range(len(dm.datasets["val"]))]
    assert torch.equal(torch.cat([x for x, _ in batches]), torch.stack(expected))


def test_token_window_dataset():
    dataset = TokenWindowDataset(torch.arange(11), block_size=3)
    assert len(dataset) == 3
    x, y = dataset[1]
    assert x.tolist() == [3, 4, 5] and y.tolist() == [4, 5, 6]
    with pytest.raises(IndexError):
        dataset[3]
    with pytest.raises(ValueError, match="block_size"):
        TokenWindowDataset(torch.arange(3), block_size=3)
    x, _ = TokenWindowDataset(np.arange(11, dtype=np.uint16), block_size=3)[2]
    assert x.dtype == torch.long and x.tolist() == [6, 7, 8]


def test_split_shorter_than_a_window_raises(tmp_path):
    dm = TextDataModule(seq_len=64, batch_size=1, max_chars=50, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="seq_len"):
        dm.setup("fit")


@pytest.mark.skipif(not (SHARED_DATA / "wikitext-2").is_dir(), reason="shared/data/wikitext-2 not present")
def test_wikitext2_loads_with_max_chars(tmp_path):
    folder = SHARED_DATA / "wikitext-2"
    dm = TextDataModule(path=str(folder), seq_len=64, batch_size=8, max_chars=20_000, cache_dir=str(tmp_path))
    dm.setup("fit")
    valid = (folder / "wiki.valid.tokens").read_text(encoding="utf-8")[:20_000]
    assert dm.tokenizer.decode(tokens_of(dm, "val")) == valid
    assert all(len(tokens) >= 20_000 for tokens in dm.tokens.values())
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 64)


def test_plain_text_file_split_by_position(tmp_path):
    text = "".join(f"line {i}: the quick brown fox\r\n" for i in range(200))
    file = tmp_path / "corpus.txt"
    file.write_bytes(text.encode("utf-8"))
    dm = TextDataModule(path=str(file), seq_len=16, batch_size=2, val_fraction=0.1, cache_dir=str(tmp_path))
    dm.setup("fit")
    decoded = {split: dm.tokenizer.decode(tokens_of(dm, split)) for split in dm.tokens}
    text = text.replace("\r\n", "\n")  # read as text, like Path.read_text
    n_eval = int(0.1 * len(text))
    assert decoded["test"] == text[-n_eval:]
    assert decoded["val"] == text[-2 * n_eval : -n_eval]
    assert decoded["train"] == text[: -2 * n_eval]


def test_directory_with_txt_splits(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_text(f"{split} text " * 20, encoding="utf-8")
    dm = TextDataModule(path=str(tmp_path), seq_len=8, batch_size=2, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    assert dm.tokenizer.decode(tokens_of(dm, "val")) == "valid text " * 20


def test_c4_style_jsonl_shards_split_by_file_name_with_test_carved_from_train(tmp_path):
    train_docs, valid_docs = documents(120, "train"), documents(15, "valid")
    write_jsonl_gz(tmp_path / "c4-train.00000-of-00002.json.gz", train_docs[:60])
    write_jsonl_gz(tmp_path / "c4-train.00001-of-00002.json.gz", train_docs[60:])
    write_jsonl_gz(tmp_path / "c4-validation.00000-of-00001.json.gz", valid_docs)
    dm = TextDataModule(path=str(tmp_path), seq_len=16, batch_size=2, val_fraction=0.1, cache_dir=str(tmp_path))
    dm.setup("fit")
    decoded = {split: dm.tokenizer.decode(tokens_of(dm, split)) for split in dm.tokens}
    assert decoded["val"] == "".join(doc + "\n\n" for doc in valid_docs)
    train = [doc for doc in decoded["train"].split("\n\n") if doc]
    test = [doc for doc in decoded["test"].split("\n\n") if doc]
    assert sorted(train + test) == sorted(train_docs) and not set(train) & set(test)
    assert [doc for doc in train_docs if doc in train] == train  # file and record order is kept
    assert 2 <= len(test) <= 30  # about val_fraction = 10% of 120 documents


def test_openwebtext_style_parquet_gets_val_and_test_carved_by_a_seeded_draw(tmp_path):
    docs = documents(200, "owt")
    for index in range(2):
        table = pa.table({"text": docs[index * 100 : (index + 1) * 100], "id": list(range(100))})
        pq.write_table(table, tmp_path / f"train-0000{index}-of-00002.parquet")

    def split_documents(seed: int) -> dict[str, list[str]]:
        dm = TextDataModule(path=str(tmp_path / "train-*.parquet"), seq_len=8, batch_size=2, val_fraction=0.1,
                            split_seed=seed, cache_dir=str(tmp_path / "cache"))
        dm.setup("fit")
        return {split: [d for d in dm.tokenizer.decode(tokens_of(dm, split)).split("\n\n") if d] for split in dm.tokens}

    splits = split_documents(seed=0)
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == sorted(docs)
    assert all(5 <= len(splits[split]) <= 40 for split in ("val", "test"))
    assert split_documents(seed=0) == splits and split_documents(seed=1)["val"] != splits["val"]


def test_shards_with_a_hugging_face_tokenizer_end_each_document_with_eos(tmp_path):
    docs = documents(40, "doc")
    folder = save_hf_tokenizer(tmp_path / "tokenizer", docs)
    (tmp_path / "data").mkdir()
    for split, texts in (("train", docs[:30]), ("validation", docs[30:35]), ("test", docs[35:])):
        with open(tmp_path / "data" / f"{split}.jsonl", "w", encoding="utf-8") as file:
            file.writelines(json.dumps({"content": text}) + "\n" for text in texts)
    dm = TextDataModule(path=str(tmp_path / "data"), tokenizer=str(folder), text_field="content", seq_len=8,
                        batch_size=2, cache_dir=str(tmp_path / "cache"))
    reference = PretrainedTokenizer(folder)
    assert dm.tokenizer_vocab_size == reference.vocab_size == len(reference.backend)
    dm.setup("fit")
    expected = [i for doc in docs[30:35] for i in reference.encode(doc) + [reference.eos_id]]
    assert tokens_of(dm, "val") == expected and tokens_of(dm, "train").count(reference.eos_id) == 30


def test_bpe_trains_on_a_bounded_sample_of_the_training_split(tmp_path):
    dm = TextDataModule(tokenizer="bpe", bpe_vocab_size=400, bpe_sample_chars=30_000, seq_len=16, batch_size=4,
                        max_chars=60_000, cache_dir=str(tmp_path))
    dm.setup("fit")
    sample = split_by_position(default_corpus(), 0.05)["train"][:30_000]
    assert dm.tokenizer.fingerprint() == BPETokenizer.train(sample, vocab_size=400).fingerprint()


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

    monkeypatch.setattr(BPETokenizer, "train_from_texts", fail)
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
    assert len(list(tmp_path.glob("bpe-*.json"))) == 1 and len(list(tmp_path.glob("tokens-*"))) == 1
    dm.setup("fit")
    assert 256 < dm.tokenizer_vocab_size <= 400
    assert all(int(tokens.array.max()) < dm.tokenizer_vocab_size for tokens in dm.tokens.values())
    assert len(dm.tokens["train"]) < 0.9 * 50_000


def test_missing_path_error_names_the_path(tmp_path):
    missing = tmp_path / "no_such_corpus"
    with pytest.raises(FileNotFoundError, match="no_such_corpus"):
        TextDataModule(path=str(missing))


def test_directory_without_split_files(tmp_path):
    (tmp_path / "readme.md").write_text("nothing here")
    with pytest.raises(FileNotFoundError, match=r"wiki\.train\.tokens.*train\.txt.*\.jsonl.*\.parquet") as error:
        TextDataModule(path=str(tmp_path))
    assert str(tmp_path) in str(error.value)


def test_shard_errors_name_the_parameter_and_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"path .*c4-\*\.json\.gz.* matches no file"):
        TextDataModule(path=str(tmp_path / "c4-*.json.gz"))
    (tmp_path / "train.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"train\.csv.*not a shard file; expected names ending in \.json"):
        TextDataModule(path=str(tmp_path / "train.*"))
    (tmp_path / "mixed").mkdir()
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "mixed" / "train.parquet")
    write_jsonl_gz(tmp_path / "mixed" / "valid.json.gz", ["b"])
    with pytest.raises(ValueError, match=r"path mixes shard formats \['json', 'parquet'\]"):
        TextDataModule(path=str(tmp_path / "mixed"))
    (tmp_path / "other").mkdir()
    write_jsonl_gz(tmp_path / "other" / "train.json.gz", documents(5, "x"), field="body")
    dm = TextDataModule(path=str(tmp_path / "other"), seq_len=4, batch_size=1, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"text_field='text' is not a field of the records in .*train\.json\.gz"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"tokenizer": "word"}, "tokenizer"),
        ({"tokenizer": "bpe", "bpe_vocab_size": 100}, "bpe_vocab_size"),
        ({"seq_len": 0}, "seq_len"),
        ({"val_fraction": 0.5}, "val_fraction"),
        ({"max_chars": 0}, "max_chars"),
        ({"bpe_sample_chars": -1}, "bpe_sample_chars"),
        ({"text_field": ""}, "text_field"),
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
    dm = TextDataModule(path=str(path), seq_len=8, batch_size=2, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError) as error:
        dm.setup("fit")
    message = str(error.value)
    assert type(error.value) is ValueError and "\n" not in message
    assert f"{str(bad)!r} is not UTF-8 text (byte 20, line 2: invalid start byte); is it a binary file?" == message
