"""Language-modelling data: a corpus tokenized once into memory-mapped token files, cut into token windows.

Sources (``path``, see :mod:`lr_lightning.data.text_sources` for the split rules): ``None`` for the embedded
default corpus, a plain-text file, a WikiText-style folder, or a set of ``json``/``jsonl``/``parquet`` shards
(C4, OpenWebText as users keep them). Tokenizers (``tokenizer``, see :mod:`lr_lightning.data.tokenizers`):
``"byte"``, ``"bpe"`` (trained locally on the training split and cached) or a local Hugging Face tokenizer folder.

Pipeline: each split is read as a stream of pieces (chunks of lines of a text file, or documents of a shard),
encoded piece by piece and appended to ``<token cache>/tokens-<key>/<split>.bin`` (see
:mod:`lr_lightning.data.token_files`), with a tqdm bar counting tokens. Peak memory is about ten megabytes of ids
plus one piece and its encoding, whatever the corpus size; training reads windows straight from the ``numpy.memmap``.
The cache key hashes the source's identity (file paths, sizes and modification times; the default corpus by
content), the split rule (``val_fraction``, ``split_seed``, ``text_field``), ``max_chars`` and the tokenizer's
identity (a hash of its serialized vocabulary and merges, or of its folder's files), so a second run with the
same inputs opens the files without tokenizing. Tokenization runs in ``prepare_data`` (rank 0 under DDP);
``setup`` on every rank opens the memory maps (and tokenizes itself if ``prepare_data`` was not called).

Text sources are encoded in chunks of 1,000 lines, as the in-memory pipeline before token files did, so token
ids (and training results) are unchanged for existing configs. Documents of a shard set are each followed by a
separator: the tokenizer's end-of-sequence id when it has one (Hugging Face tokenizers), else the encoding of a
blank line ``"\\n\\n"`` (byte and our BPE tokenizers have no special tokens).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from typing_extensions import override

from lr_lightning.data.splits import SplitDataModule
from lr_lightning.data.text_sources import SPLITS, TEXT_CHUNK_LINES, Piece, default_corpus, open_source
from lr_lightning.data.token_files import TokenFile, cache_key, write_token_file
from lr_lightning.data.tokenizers import (
    BYTE_VOCAB_SIZE,
    DEFAULT_CACHE_DIR,
    ByteTokenizer,
    PretrainedTokenizer,
    Tokenizer,
    bpe_cache_file,
    load_or_train_bpe,
    parse_tokenizer_spec,
)

__all__ = ["TextDataModule", "TokenWindowDataset", "default_corpus", "encode_pieces", "limit_chars"]

DEFAULT_TOKEN_CACHE_DIR = Path("~/.cache/lr_lightning/tokens")
DOCUMENT_SEPARATOR_TEXT = "\n\n"
"""What separates documents for a tokenizer without an end-of-sequence token."""


def limit_chars(pieces: Iterable[Piece], max_chars: int | None) -> Iterator[Piece]:
    """The first ``max_chars`` characters of ``pieces`` (all of them for ``None``); a piece cut short is no
    longer marked as ending a document."""
    if max_chars is None:
        yield from pieces
        return
    left = max_chars
    for piece in pieces:
        if left <= 0:
            return
        if len(piece.text) > left:
            yield Piece(piece.text[:left], False)
            return
        left -= len(piece.text)
        yield piece


def encode_pieces(tokenizer: Tokenizer, pieces: Iterable[Piece]) -> Iterator[list[int]]:
    """Token ids of each piece, in order, with the document separator appended after pieces ending a document."""
    eos = tokenizer.eos_id
    separator = [eos] if eos is not None else tokenizer.encode(DOCUMENT_SEPARATOR_TEXT)
    for piece in pieces:
        ids = tokenizer.encode(piece.text)
        yield ids + separator if piece.ends_document else ids


def lines_of(pieces: Iterable[Piece]) -> Iterator[str]:
    """The lines (ends kept) of every piece: what BPE training reads."""
    for piece in pieces:
        yield from piece.text.splitlines(keepends=True)


class TokenWindowDataset(Dataset):
    """Consecutive windows of ``block_size + 1`` tokens as ``(x, y = x shifted by one)``, int64 tensors.

    ``ids`` is a 1-D tensor, a NumPy array or a :class:`TokenFile` (read through its memory map, one window at
    a time). Window ``i`` starts at token ``i * block_size``: the inputs ``x`` never overlap and every token
    after the first is a target exactly once; a trailing remainder too short for a window is dropped.
    """

    def __init__(self, ids: torch.Tensor | np.ndarray | TokenFile, block_size: int) -> None:
        if len(ids) < block_size + 1:
            raise ValueError(f"need at least block_size + 1 = {block_size + 1} tokens, got {len(ids)}")
        self.ids = ids
        self.block_size = block_size

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.block_size

    @override
    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window index {index} out of range for {len(self)} windows")
        start = index * self.block_size
        ids = self.ids.array if isinstance(self.ids, TokenFile) else self.ids
        window = ids[start : start + self.block_size + 1]
        window = window.long() if isinstance(window, torch.Tensor) else torch.from_numpy(window.astype(np.int64))
        return window[:-1], window[1:]


class TextDataModule(SplitDataModule):
    """Next-token prediction on a text corpus, tokenized once into memory-mapped token files (see module doc).

    Args:
        path: Corpus location: ``None`` for the embedded default corpus (Python's help topics); a single text
            file split by character position; a folder with ``wiki.{train,valid,test}.tokens`` or
            ``{train,valid,test}.txt``; or a folder or glob of ``.json``/``.jsonl``/``.json.gz``/``.parquet``
            shards (C4, OpenWebText), split by file name, with missing splits carved from train by document.
        tokenizer: ``"byte"`` (UTF-8 bytes, vocabulary 256), ``"bpe"`` (byte-level BPE trained on the training
            split and cached) or the path of a local Hugging Face tokenizer folder (``save_pretrained`` output;
            its vocabulary size counts added tokens).
        bpe_vocab_size: Target BPE vocabulary size (must exceed 256); used only for ``"bpe"``.
        seq_len: Tokens per training sequence (at most the model's context length).
        batch_size: Sequences per batch.
        val_fraction: Fraction of characters for validation and, again, for test when splitting the default
            corpus or a single file; fraction of training documents carved out for each shard split that has
            no files of its own; in (0, 0.5).
        max_chars: Keep only the first ``max_chars`` characters of each split (quick runs).
        num_workers: DataLoader worker processes.
        cache_dir: Where trained BPE tokenizers and token files (``tokens-<key>/``) are cached; by default
            tokenizers go to ``~/.cache/lr_lightning/tokenizers`` and token files to
            ``~/.cache/lr_lightning/tokens``.
        text_field: Record field holding a document's text in json/parquet shards.
        split_seed: Seed of the per-document draw that carves val/test out of training shards.
        bpe_sample_chars: Train BPE on only the first ``bpe_sample_chars`` characters of the training split
            (a bounded sample of a big corpus); ``None`` trains on the whole split.
    """

    drop_last_train = True

    def __init__(
        self,
        path: str | None = None,
        tokenizer: str = "byte",
        bpe_vocab_size: int = 4096,
        seq_len: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        max_chars: int | None = None,
        num_workers: int = 0,
        cache_dir: str | None = None,
        text_field: str = "text",
        split_seed: int = 0,
        bpe_sample_chars: int | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer_spec = parse_tokenizer_spec(tokenizer)
        if self.tokenizer_spec == "bpe" and bpe_vocab_size <= BYTE_VOCAB_SIZE:
            raise ValueError(f"bpe_vocab_size must exceed {BYTE_VOCAB_SIZE} for tokenizer='bpe', got {bpe_vocab_size}")
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value}")
        if not 0.0 < val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
        for name, value in (("max_chars", max_chars), ("bpe_sample_chars", bpe_sample_chars)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive int or None, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not text_field:
            raise ValueError("text_field must be a non-empty field name, got ''")
        self.source = open_source(path, val_fraction, text_field, split_seed)
        self.save_hyperparameters()
        self.path = path
        self.bpe_vocab_size = bpe_vocab_size
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.max_chars = max_chars
        self.num_workers = num_workers
        self.bpe_sample_chars = bpe_sample_chars
        root = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.tokenizer_cache_dir = root or DEFAULT_CACHE_DIR.expanduser()
        self.token_cache_dir = root or DEFAULT_TOKEN_CACHE_DIR.expanduser()
        self.tokenizer: Tokenizer | None = ByteTokenizer() if self.tokenizer_spec == "byte" else None
        self.tokens: dict[str, TokenFile] = {}
        self.datasets: dict[str, TokenWindowDataset] = {}

    @property
    def tokenizer_vocab_size(self) -> int:
        """Vocabulary size of the tokenizer (256 for bytes; for BPE known only after ``setup()``)."""
        if self.tokenizer is None and isinstance(self.tokenizer_spec, Path):
            self.tokenizer = PretrainedTokenizer(self.tokenizer_spec)
        if self.tokenizer is None:
            raise RuntimeError("the BPE tokenizer is trained in setup(); call setup() before tokenizer_vocab_size")
        return self.tokenizer.vocab_size

    def _split_pieces(self, split: str) -> Iterator[Piece]:
        return limit_chars(self.source.pieces(split), self.max_chars)

    def _build_tokenizer(self) -> Tokenizer:
        """The tokenizer, training (or loading the cached) BPE on the training split streamed line by line."""
        if self.tokenizer is not None:
            return self.tokenizer
        if isinstance(self.tokenizer_spec, Path):
            return PretrainedTokenizer(self.tokenizer_spec)
        key = cache_key({"source": self.source.fingerprint(), "max_chars": self.max_chars,
                         "sample_chars": self.bpe_sample_chars, "lines": "str.splitlines"})
        path = bpe_cache_file(key, self.bpe_vocab_size, self.tokenizer_cache_dir)
        return load_or_train_bpe(
            path, lambda: lines_of(limit_chars(self._split_pieces("train"), self.bpe_sample_chars)),
            self.bpe_vocab_size)

    def token_folder(self, tokenizer: Tokenizer) -> Path:
        """``<token cache>/tokens-<key>``: the key hashes source, split rule, ``max_chars`` and tokenizer."""
        inputs: dict[str, Any] = {"source": self.source.fingerprint(), "max_chars": self.max_chars,
                                  "tokenizer": tokenizer.fingerprint(), "chunk_lines": TEXT_CHUNK_LINES,
                                  "document_separator": DOCUMENT_SEPARATOR_TEXT}
        return self.token_cache_dir / f"tokens-{cache_key(inputs)}"

    def _token_files(self, tokenizer: Tokenizer) -> dict[str, TokenFile]:
        """Every split's token file, tokenizing the splits not cached yet."""
        folder = self.token_folder(tokenizer)
        files = {}
        for split in SPLITS:
            path = folder / f"{split}.bin"
            cached = TokenFile.open(path)
            files[split] = cached or write_token_file(
                path, encode_pieces(tokenizer, self._split_pieces(split)), tokenizer.vocab_size,
                description={"split": split, "tokenizer": tokenizer.fingerprint(), "path": self.path,
                             "max_chars": self.max_chars},
                progress=f"tokenizing {split}")
        return files

    @override
    def prepare_data(self) -> None:
        """Train or load the tokenizer and tokenize every split into token files (rank 0 only under DDP)."""
        self._token_files(self._build_tokenizer())

    @override
    def setup(self, stage: str | None = None) -> None:
        """Open each split's token file (tokenizing it first if ``prepare_data`` did not) as a window dataset."""
        if self.datasets:
            return
        self.tokenizer = self._build_tokenizer()
        self.tokens = self._token_files(self.tokenizer)
        for split, tokens in self.tokens.items():
            if len(tokens) < self.seq_len + 1:
                raise ValueError(
                    f"the {split} split has {len(tokens)} tokens, fewer than seq_len + 1 = {self.seq_len + 1}; "
                    "lower seq_len or raise max_chars / val_fraction"
                )
        self.datasets = {split: TokenWindowDataset(tokens, self.seq_len) for split, tokens in self.tokens.items()}
        if len(self.datasets["train"]) < self.batch_size:
            raise ValueError(
                f"the train split has {len(self.datasets['train'])} windows, fewer than batch_size={self.batch_size}"
            )
