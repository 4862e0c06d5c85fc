"""Tokenizers for language modelling: raw UTF-8 bytes, or byte-level BPE trained locally and cached."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal, Protocol, get_args

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

TokenizerKind = Literal["byte", "bpe"]
BYTE_VOCAB_SIZE = 256
DEFAULT_CACHE_DIR = Path("~/.cache/lr_lightning/tokenizers")


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Each UTF-8 byte is a token: vocabulary of 256, nothing to train."""

    vocab_size = BYTE_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization) backed by the ``tokenizers`` library.

    Starts from the 256-byte alphabet, so any text encodes and ``decode(encode(s)) == s``.
    """

    def __init__(self, backend: HFTokenizer) -> None:
        self.backend = backend

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids))

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        """Learn up to ``vocab_size - 256`` merges on ``text`` (fewer if the text runs out of pairs)."""
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        lines = text.splitlines(keepends=True)
        backend.train_from_iterator(lines, trainer=trainer, length=len(lines))
        return cls(backend)

    @classmethod
    def load(cls, path: Path) -> BPETokenizer:
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: Path) -> None:
        """Write the JSON file atomically, so a concurrent reader never sees a partial file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        self.backend.save(str(partial))
        partial.replace(path)


def bpe_cache_path(train_text: str, vocab_size: int, cache_dir: Path) -> Path:
    """``cache_dir/bpe-v{vocab_size}-{hash}.json`` with the hash over (vocab_size, training text)."""
    digest = hashlib.sha256(f"{vocab_size}\n".encode() + train_text.encode("utf-8")).hexdigest()
    return Path(cache_dir).expanduser() / f"bpe-v{vocab_size}-{digest[:16]}.json"


def build_tokenizer(
    kind: TokenizerKind, train_text: str, vocab_size: int, cache_dir: Path = DEFAULT_CACHE_DIR
) -> Tokenizer:
    """A byte tokenizer (``train_text``, ``vocab_size``, ``cache_dir`` unused) or a BPE tokenizer
    loaded from ``cache_dir`` when trained before on the same text and size, else trained and cached."""
    if kind == "byte":
        return ByteTokenizer()
    if kind != "bpe":
        raise ValueError(f"tokenizer kind must be one of {get_args(TokenizerKind)}, got {kind!r}")
    if vocab_size <= BYTE_VOCAB_SIZE:
        raise ValueError(f"vocab_size for bpe must exceed the {BYTE_VOCAB_SIZE}-byte alphabet, got {vocab_size}")
    path = bpe_cache_path(train_text, vocab_size, cache_dir)
    if path.is_file():
        return BPETokenizer.load(path)
    tokenizer = BPETokenizer.train(train_text, vocab_size)
    tokenizer.save(path)
    return tokenizer
