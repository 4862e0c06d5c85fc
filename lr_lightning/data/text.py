"""Language-modelling text data: load a corpus, split it, tokenize it, cut it into token windows.

Sources (``path``):

- ``None``: the embedded default corpus, the language-reference help topics that ship with every
  CPython (``pydoc_data.topics``, ~0.5 MB of English), joined in sorted key order.
- a directory holding ``wiki.{train,valid,test}.tokens`` (WikiText) or ``{train,valid,test}.txt``.
- a single plain-text file.

The default corpus and single files are split by character position: the first
``1 - 2 * val_fraction`` of the characters train, the next ``val_fraction`` validate, the last
``val_fraction`` test.
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from typing_extensions import override

from lr_lightning.data.files import read_text
from lr_lightning.data.tokenizers import (
    BYTE_VOCAB_SIZE,
    DEFAULT_CACHE_DIR,
    ByteTokenizer,
    Tokenizer,
    TokenizerKind,
    build_tokenizer,
)

SPLIT_FILE_LAYOUTS = (
    {"train": "wiki.train.tokens", "val": "wiki.valid.tokens", "test": "wiki.test.tokens"},
    {"train": "train.txt", "val": "valid.txt", "test": "test.txt"},
)
ENCODE_CHUNK_LINES = 1_000


def default_corpus() -> str:
    """The ``pydoc_data.topics`` help texts, joined with blank lines in sorted key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def split_by_position(text: str, val_fraction: float) -> dict[str, str]:
    """Cut ``text`` into train / val / test = first ``1 - 2f`` / next ``f`` / last ``f`` of its characters."""
    n_eval = int(len(text) * val_fraction)
    val_start, test_start = len(text) - 2 * n_eval, len(text) - n_eval
    return {"train": text[:val_start], "val": text[val_start:test_start], "test": text[test_start:]}


def find_split_files(path: Path) -> dict[str, Path] | None:
    """The per-split files of a corpus directory, or ``None`` when ``path`` is a single text file."""
    if not path.exists():
        raise FileNotFoundError(f"path {str(path)!r} does not exist")
    if path.is_file():
        return None
    for layout in SPLIT_FILE_LAYOUTS:
        files = {split: path / name for split, name in layout.items()}
        if all(file.is_file() for file in files.values()):
            return files
    expected = " or ".join(", ".join(layout.values()) for layout in SPLIT_FILE_LAYOUTS)
    raise FileNotFoundError(f"directory {str(path)!r} lacks the split files; expected {expected}")


def load_splits(path: str | None, val_fraction: float) -> dict[str, str]:
    """Texts of the ``train``, ``val`` and ``test`` splits of the corpus at ``path`` (see module doc)."""
    if path is None:
        return split_by_position(default_corpus(), val_fraction)
    source = Path(path).expanduser()
    files = find_split_files(source)
    if files is None:
        return split_by_position(read_text(source), val_fraction)
    return {split: read_text(file) for split, file in files.items()}


def encode_text(tokenizer: Tokenizer, text: str, desc: str = "tokenizing") -> torch.Tensor:
    """Token ids of ``text`` as a 1-D LongTensor, encoded in chunks of lines with a progress bar."""
    lines = text.splitlines(keepends=True)
    chunks = ["".join(lines[i : i + ENCODE_CHUNK_LINES]) for i in range(0, len(lines), ENCODE_CHUNK_LINES)]
    ids = [
        torch.tensor(tokenizer.encode(chunk), dtype=torch.long)
        for chunk in tqdm(chunks, desc=desc, unit="chunk", disable=len(chunks) < 2)
    ]
    return torch.cat(ids) if ids else torch.empty(0, dtype=torch.long)


class TokenWindowDataset(Dataset):
    """Consecutive windows of ``block_size + 1`` tokens as ``(x, y = x shifted by one)``.

    Window ``i`` starts at token ``i * block_size``: the inputs ``x`` never overlap and every token
    after the first is a target exactly once; a trailing remainder too short for a window is dropped.
    """

    def __init__(self, ids: torch.Tensor, block_size: int) -> None:
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
        window = self.ids[start : start + self.block_size + 1]
        return window[:-1], window[1:]


class TextDataModule(L.LightningDataModule):
    """Next-token prediction on a text corpus, tokenized into byte or BPE ids.

    Args:
        path: Corpus location: ``None`` for the embedded default corpus (Python's help topics), a
            directory with ``wiki.{train,valid,test}.tokens`` or ``{train,valid,test}.txt``, or a
            single text file split by character position.
        tokenizer: ``"byte"`` (UTF-8 bytes, vocabulary 256) or ``"bpe"`` (byte-level BPE trained on
            the training split and cached).
        bpe_vocab_size: Target BPE vocabulary size (must exceed 256); ignored for ``"byte"``.
        seq_len: Tokens per training sequence (at most the model's context length).
        batch_size: Sequences per batch.
        val_fraction: Fraction of characters for validation and, again, for test when splitting
            the default corpus or a single file; in (0, 0.5).
        max_chars: Keep only the first ``max_chars`` characters of each split (quick runs).
        num_workers: DataLoader worker processes.
        cache_dir: Where trained BPE tokenizers are cached; default ``~/.cache/lr_lightning/tokenizers``.
    """

    def __init__(
        self,
        path: str | None = None,
        tokenizer: TokenizerKind = "byte",
        bpe_vocab_size: int = 4096,
        seq_len: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        max_chars: int | None = None,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if tokenizer not in get_args(TokenizerKind):
            raise ValueError(f"tokenizer must be one of {get_args(TokenizerKind)}, got {tokenizer!r}")
        if tokenizer == "bpe" and bpe_vocab_size <= BYTE_VOCAB_SIZE:
            raise ValueError(f"bpe_vocab_size must exceed {BYTE_VOCAB_SIZE} for tokenizer='bpe', got {bpe_vocab_size}")
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value}")
        if not 0.0 < val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
        if max_chars is not None and max_chars <= 0:
            raise ValueError(f"max_chars must be a positive int or None, got {max_chars}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if path is not None:
            find_split_files(Path(path).expanduser())
        self.save_hyperparameters()
        self.path = path
        self.tokenizer_kind = tokenizer
        self.bpe_vocab_size = bpe_vocab_size
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.max_chars = max_chars
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
        self.tokenizer: Tokenizer | None = ByteTokenizer() if tokenizer == "byte" else None
        self.ids: dict[str, torch.Tensor] = {}
        self.datasets: dict[str, TokenWindowDataset] = {}

    @property
    def tokenizer_vocab_size(self) -> int:
        """Vocabulary size of the tokenizer (256 for bytes; for BPE known only after ``setup()``)."""
        if self.tokenizer is None:
            raise RuntimeError("the BPE tokenizer is trained in setup(); call setup() before tokenizer_vocab_size")
        return self.tokenizer.vocab_size

    def _texts(self) -> dict[str, str]:
        texts = load_splits(self.path, self.val_fraction)
        return {split: text[: self.max_chars] for split, text in texts.items()}

    @override
    def prepare_data(self) -> None:
        """Train and cache the BPE tokenizer once (rank 0 only under DDP)."""
        if self.tokenizer_kind == "bpe":
            build_tokenizer("bpe", self._texts()["train"], self.bpe_vocab_size, self.cache_dir)

    @override
    def setup(self, stage: str | None = None) -> None:
        """Tokenize all splits into 1-D LongTensors (``self.ids``) and wrap them as window datasets."""
        if self.datasets:
            return
        texts = self._texts()
        self.tokenizer = build_tokenizer(self.tokenizer_kind, texts["train"], self.bpe_vocab_size, self.cache_dir)
        self.ids = {split: encode_text(self.tokenizer, text, f"tokenizing {split}") for split, text in texts.items()}
        for split, ids in self.ids.items():
            if len(ids) < self.seq_len + 1:
                raise ValueError(
                    f"the {split} split has {len(ids)} tokens, fewer than seq_len + 1 = {self.seq_len + 1}; "
                    "lower seq_len or raise max_chars / val_fraction"
                )
        self.datasets = {split: TokenWindowDataset(ids, self.seq_len) for split, ids in self.ids.items()}
        if len(self.datasets["train"]) < self.batch_size:
            raise ValueError(
                f"the train split has {len(self.datasets['train'])} windows, fewer than batch_size={self.batch_size}"
            )

    def _loader(self, split: str, train: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
