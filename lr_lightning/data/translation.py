"""Parallel text for translation: file pairs, a joint SentencePiece vocabulary, fairseq2 batching by tokens.

Sources (``path``):

- ``None``: the generated reordering corpus (``data/reordering_corpus.py``), written once to the cache.
- a directory with one file per split and language, plain or gzipped: ``{split}.{lang}[.gz]`` with
  ``split`` one of ``train``; ``valid``, ``val`` or ``dev``; ``test`` or ``test_2016_flickr``
  (IWSLT'14 as prepared by fairseq, and Multi30k as distributed, both read this way).

The vocabulary is one SentencePiece model trained on both sides of the training split (the
embedding is shared and tied to the output projection), cached under ``cache_dir`` by a hash of its
inputs. Batches come from fairseq2's data pipeline: shuffle, ``bucket_by_length`` with bucket sizes
such that ``batch size x padded length <= max_tokens`` on both sides, then ``collate`` with padding.
Under DDP every process builds the same epoch and takes every ``world_size``-th batch of an equal
share, so all processes step the same number of times.
"""

from __future__ import annotations

import gzip
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import sentencepiece
import torch
from fairseq2.data.data_pipeline import create_bucket_sizes, read_sequence
from fairseq2.data.tokenizers.sentencepiece import BasicSentencePieceTokenizer, SentencePieceModel
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm
from typing_extensions import override

from lr_lightning.data.files import GZIP_ERRORS, bad_gzip_error, not_text_error
from lr_lightning.data.reordering_corpus import write_reordering_corpus

SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "val", "dev"), "test": ("test", "test_2016_flickr")}
PAD, UNK, BOS, EOS = 0, 1, 2, 3
DEFAULT_CACHE_DIR = Path("~/.cache/lr_lightning")

Pair = tuple[str, str]


def find_pair_files(folder: Path, split: str, source_lang: str, target_lang: str) -> tuple[Path, Path]:
    """The (source, target) files of ``split`` in ``folder``; a clear error names what is missing."""
    for name in SPLIT_NAMES[split]:
        for suffix in ("", ".gz"):
            pair = (folder / f"{name}.{source_lang}{suffix}", folder / f"{name}.{target_lang}{suffix}")
            if pair[0].is_file() and pair[1].is_file():
                return pair
            if pair[0].is_file() or pair[1].is_file():
                missing = pair[1] if pair[0].is_file() else pair[0]
                raise FileNotFoundError(f"{split} split: found {[p.name for p in pair if p.is_file()][0]} "
                                        f"but not its pair {missing.name} in {str(folder)!r}")
    expected = ", ".join(f"{n}.{{{source_lang},{target_lang}}}[.gz]" for n in SPLIT_NAMES[split])
    raise FileNotFoundError(f"no {split} split in {str(folder)!r}: expected one of {expected}")


def read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file, gzipped or not, without their line endings; a binary or damaged file is a
    one-line ``ValueError`` naming it."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            return [line.rstrip("\r\n") for line in handle]
    except UnicodeDecodeError:
        error = not_text_error(path)
    except GZIP_ERRORS as gzip_error:
        error = bad_gzip_error(path, gzip_error)
    raise error


def read_parallel(source: Path, target: Path) -> list[Pair]:
    """Line-aligned (source, target) sentence pairs; files of different lengths are an error."""
    src, tgt = read_lines(source), read_lines(target)
    if len(src) != len(tgt):
        raise ValueError(f"{source.name} has {len(src)} lines but {target.name} has {len(tgt)}: "
                         f"parallel files must be line-aligned")
    return list(zip(src, tgt))


def train_sentencepiece(texts: list[str], vocab_size: int, model_type: str, cache_dir: Path) -> Path:
    """Train (or reuse from ``cache_dir``) a SentencePiece model with pad/unk/bos/eos = 0/1/2/3."""
    digest = hashlib.sha256(f"{vocab_size}:{model_type}:".encode())
    for text in texts:
        digest.update(text.encode("utf-8") + b"\n")
    path = cache_dir / f"spm-{model_type}-{vocab_size}-{digest.hexdigest()[:16]}.model"
    if path.is_file():
        return path
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tqdm(texts, desc="training SentencePiece", unit="line", leave=False)),
        model_writer=buffer, vocab_size=vocab_size, model_type=model_type, character_coverage=1.0,
        pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, hard_vocab_limit=False, minloglevel=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_bytes(buffer.getvalue())
    partial.replace(path)
    return path


class TranslationTokenizer:
    """A joint SentencePiece vocabulary through fairseq2: source ``x </s>``, target ``<s> y </s>``."""

    def __init__(self, model_path: Path) -> None:
        self.path = model_path
        self.backend = BasicSentencePieceTokenizer(SentencePieceModel(model_path))
        self.vocab_info = self.backend.vocab_info
        self._source = self.backend.create_encoder(mode="prompt_response")
        self._target = self.backend.create_encoder()
        self._decode = self.backend.create_decoder()

    @property
    def vocab_size(self) -> int:
        return self.vocab_info.size

    def encode_source(self, text: str) -> torch.Tensor:
        return self._source(text)

    def encode_target(self, text: str) -> torch.Tensor:
        return self._target(text)

    def decode(self, tokens: torch.Tensor) -> str:
        """Detokenized text of ``tokens``, control symbols (``<s>``, ``</s>``, padding) removed."""
        keep = (tokens != PAD) & (tokens != BOS) & (tokens != EOS)
        return self._decode(tokens[keep].cpu())


class TokenBatches(IterableDataset):
    """One epoch of padded batches per iteration, from fairseq2's pipeline; reshuffled every epoch.

    Each example is ``{"source", "target", "reference"}``; a batch is the collated dict (``seqs``,
    ``seq_lens`` per side, ``reference`` strings). With ``shuffle`` the epoch ``e`` uses seed ``seed + e``;
    without, every epoch is the same one, built once.
    """

    def __init__(self, examples: list[dict[str, Any]], max_tokens: int, max_seq_len: int,
                 shuffle: bool, seed: int) -> None:
        self.examples, self.shuffle, self.seed = examples, shuffle, seed
        self.bucket_sizes = create_bucket_sizes(max_num_elements=max_tokens, max_seq_len=max_seq_len)
        self.epoch, self.rank, self.world_size = 0, 0, 1
        self._built: tuple[int, list[dict[str, Any]]] | None = None
        self._length = len(self._epoch_batches(0))

    def _epoch_batches(self, epoch: int) -> list[dict[str, Any]]:
        """The batches of ``epoch``; the last epoch built is kept, so it is not built twice."""
        key = epoch if self.shuffle else 0
        if self._built is None or self._built[0] != key:
            self._built = (key, self._build(key))
        return self._built[1]

    def _build(self, epoch: int) -> list[dict[str, Any]]:
        builder = read_sequence(self.examples)
        if self.shuffle:
            builder = builder.shuffle(0, seed=self.seed + epoch)
        builder = builder.bucket_by_length(self.bucket_sizes, selector="source,target", skip_above_max_examples=True)
        if self.shuffle:
            builder = builder.shuffle(0, seed=self.seed + epoch)
        return list(builder.collate(pad_value=PAD).and_return())

    def __len__(self) -> int:
        return self._length // self.world_size

    @override
    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = self._epoch_batches(self.epoch)
        self.epoch += 1
        share = len(batches) // self.world_size
        yield from batches[self.rank: share * self.world_size: self.world_size]


class TranslationDataModule(L.LightningDataModule):
    """Parallel text from files or the generated reordering corpus, tokenized with a joint SentencePiece model.

    Args:
        path: Folder with ``{split}.{lang}[.gz]`` files (see module doc); ``None`` writes and uses
            the generated reordering corpus.
        source_lang: File suffix of the source side (``de`` for Multi30k De-En).
        target_lang: File suffix of the target side.
        vocab_size: SentencePiece vocabulary size (an upper bound on small corpora).
        tokenizer_type: SentencePiece algorithm.
        max_tokens: Token budget per batch: ``batch size x padded length <= max_tokens`` on each side.
        max_seq_len: Longest sequence kept (in tokens, with ``<s>``/``</s>``); longer pairs are dropped.
        seed: Shuffle seed (epoch ``e`` uses ``seed + e``) and seed of the generated corpus.
        cache_dir: Where the generated corpus and the SentencePiece models are kept.
    """

    def __init__(
        self,
        path: str | None = None,
        source_lang: str = "src",
        target_lang: str = "tgt",
        vocab_size: int = 8000,
        tokenizer_type: Literal["unigram", "bpe"] = "unigram",
        max_tokens: int = 4096,
        max_seq_len: int = 128,
        seed: int = 0,
        cache_dir: str = str(DEFAULT_CACHE_DIR),
    ) -> None:
        super().__init__()
        if vocab_size < 8:
            raise ValueError(f"vocab_size must be >= 8 (4 control symbols plus pieces), got {vocab_size}")
        if not 2 <= max_seq_len <= max_tokens:
            raise ValueError(f"max_seq_len must be in [2, max_tokens={max_tokens}], got {max_seq_len}")
        if max_tokens % max_seq_len:
            raise ValueError(f"max_tokens ({max_tokens}) must be a multiple of max_seq_len ({max_seq_len})")
        if source_lang == target_lang:
            raise ValueError(f"source_lang and target_lang must differ, both are {source_lang!r}")
        self.path, self.source_lang, self.target_lang = path, source_lang, target_lang
        self.vocab_size, self.tokenizer_type = vocab_size, tokenizer_type
        self.max_tokens, self.max_seq_len, self.seed = max_tokens, max_seq_len, seed
        self.cache_dir = Path(cache_dir).expanduser()
        self.tokenizer: TranslationTokenizer | None = None
        self.splits: dict[str, TokenBatches] = {}

    def corpus_folder(self) -> Path:
        """The folder the split files are read from (the generated corpus is written on first use)."""
        if self.path is None:
            return write_reordering_corpus(self.cache_dir / "translation" / f"reordering-{self.seed}", self.seed)
        folder = Path(self.path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"path {str(folder)!r} is not a directory of parallel text files")
        return folder

    def read_splits(self) -> dict[str, list[Pair]]:
        """Sentence pairs of every split, checked for presence and alignment."""
        folder = self.corpus_folder()
        files = {split: find_pair_files(folder, split, self.source_lang, self.target_lang) for split in SPLIT_NAMES}
        return {split: read_parallel(*pair) for split, pair in files.items()}

    @property
    def tokenizer_vocab_size(self) -> int | None:
        return self.tokenizer.vocab_size if self.tokenizer is not None else None

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        pairs = self.read_splits()
        texts = [side for pair in pairs["train"] for side in pair]
        self.tokenizer = TranslationTokenizer(
            train_sentencepiece(texts, self.vocab_size, self.tokenizer_type, self.cache_dir / "tokenizers"))
        for split, split_pairs in pairs.items():
            examples = [{"source": self.tokenizer.encode_source(src), "target": self.tokenizer.encode_target(tgt),
                         "reference": tgt}
                        for src, tgt in tqdm(split_pairs, desc=f"encoding {split}", unit="pair", leave=False)]
            self.splits[split] = TokenBatches(examples, self.max_tokens, self.max_seq_len,
                                              shuffle=split == "train", seed=self.seed)

    def _loader(self, split: str) -> DataLoader:
        batches = self.splits[split]
        if self.trainer is not None:
            batches.rank, batches.world_size = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(batches, batch_size=None)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("valid")

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
