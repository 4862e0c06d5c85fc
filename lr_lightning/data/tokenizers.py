"""Tokenizers for language modelling: raw UTF-8 bytes, byte-level BPE trained locally and cached, or a local
Hugging Face tokenizer directory (a LLaMA or GPT-2 tokenizer saved with ``save_pretrained``).

Every tokenizer here has ``vocab_size``, ``encode``, ``decode``, ``eos_id`` (the id put
after each document of a document corpus, or ``None``) and ``fingerprint`` (a hash of what decides its ids,
part of the token-file cache key).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
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

    @property
    def eos_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def fingerprint(self) -> str: ...


class ByteTokenizer:
    """Each UTF-8 byte is a token: vocabulary of 256, nothing to train, no end-of-document token."""

    vocab_size = BYTE_VOCAB_SIZE
    eos_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "byte"


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization) backed by the ``tokenizers`` library.

    Starts from the 256-byte alphabet, so any text encodes and ``decode(encode(s)) == s``. It has no special
    tokens, hence no end-of-document token.
    """

    eos_id = None

    def __init__(self, backend: HFTokenizer) -> None:
        self.backend = backend

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids))

    def fingerprint(self) -> str:
        """SHA-256 of the serialized tokenizer (merges, vocabulary, pre-tokenizer)."""
        return "bpe-" + hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()

    @classmethod
    def train_from_texts(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn up to ``vocab_size - 256`` merges on the strings ``texts`` yields (fewer if they run out of pairs).

        ``texts`` is consumed once, streaming: the trainer keeps word counts, never the text itself, so a corpus
        larger than memory trains as long as its distinct words fit.
        """
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        """:meth:`train_from_texts` on the lines of ``text``."""
        return cls.train_from_texts(text.splitlines(keepends=True), vocab_size)

    @classmethod
    def load(cls, path: Path) -> BPETokenizer:
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: Path) -> None:
        """Write the JSON file atomically, so a concurrent reader never sees a partial file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        self.backend.save(str(partial))
        partial.replace(path)


class PretrainedTokenizer:
    """A Hugging Face tokenizer saved in a local directory, loaded with ``AutoTokenizer`` (no download).

    ``vocab_size`` is the full size including added tokens (``len(tokenizer)``), the number of embedding rows a
    model needs. Text is encoded without special tokens (no BOS per chunk); ``eos_id`` is the tokenizer's
    ``eos_token_id`` (``None`` if it defines none), which the data module appends after each document of a
    document corpus (json/parquet shards).
    """

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self.path = Path(path).expanduser()
        try:
            self.backend = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"tokenizer {str(self.path)!r} is not a loadable Hugging Face tokenizer directory "
                             f"(expected tokenizer.json or tokenizer.model with tokenizer_config.json): "
                             f"{first_line}") from error

    @property
    def vocab_size(self) -> int:
        return len(self.backend)

    @property
    def eos_id(self) -> int | None:
        return self.backend.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False, verbose=False)

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids))

    def fingerprint(self) -> str:
        """SHA-256 over the names and bytes of the files directly inside the tokenizer directory."""
        digest = hashlib.sha256()
        for file in sorted(p for p in self.path.iterdir() if p.is_file()):
            digest.update(file.name.encode("utf-8") + b"\0" + file.read_bytes() + b"\0")
        return "hf-" + digest.hexdigest()


def parse_tokenizer_spec(spec: str) -> TokenizerKind | Path:
    """``"byte"`` / ``"bpe"`` as given, or the path of an existing directory (a local Hugging Face tokenizer)."""
    if spec in get_args(TokenizerKind):
        return spec
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        return path
    raise ValueError(f"tokenizer must be one of {get_args(TokenizerKind)} or the path of a local Hugging Face "
                     f"tokenizer directory, got {spec!r} (no such directory)")


def bpe_cache_file(key: str, vocab_size: int, cache_dir: Path) -> Path:
    """``cache_dir/bpe-v{vocab_size}-{key[:16]}.json``."""
    return Path(cache_dir).expanduser() / f"bpe-v{vocab_size}-{key[:16]}.json"


def bpe_cache_path(train_text: str, vocab_size: int, cache_dir: Path) -> Path:
    """``cache_dir/bpe-v{vocab_size}-{hash}.json`` with the hash over (vocab_size, training text)."""
    digest = hashlib.sha256(f"{vocab_size}\n".encode() + train_text.encode("utf-8")).hexdigest()
    return bpe_cache_file(digest, vocab_size, cache_dir)


def load_or_train_bpe(path: Path, training_texts: Callable[[], Iterable[str]], vocab_size: int) -> BPETokenizer:
    """The BPE tokenizer cached at ``path``, or one trained on ``training_texts()`` and saved there."""
    if vocab_size <= BYTE_VOCAB_SIZE:
        raise ValueError(f"vocab_size for bpe must exceed the {BYTE_VOCAB_SIZE}-byte alphabet, got {vocab_size}")
    if path.is_file():
        return BPETokenizer.load(path)
    tokenizer = BPETokenizer.train_from_texts(training_texts(), vocab_size)
    tokenizer.save(path)
    return tokenizer


def build_tokenizer(
    kind: TokenizerKind, train_text: str, vocab_size: int, cache_dir: Path = DEFAULT_CACHE_DIR
) -> Tokenizer:
    """A byte tokenizer (``train_text``, ``vocab_size``, ``cache_dir`` unused) or a BPE tokenizer
    loaded from ``cache_dir`` when trained before on the same text and size, else trained and cached."""
    if kind == "byte":
        return ByteTokenizer()
    if kind != "bpe":
        raise ValueError(f"tokenizer kind must be one of {get_args(TokenizerKind)}, got {kind!r}")
    path = bpe_cache_path(train_text, vocab_size, cache_dir)
    return load_or_train_bpe(path, lambda: train_text.splitlines(keepends=True), vocab_size)
