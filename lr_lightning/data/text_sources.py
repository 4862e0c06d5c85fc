"""Where language-modelling text comes from, read as a stream of pieces so no split is ever held whole in memory.

A source (``path`` of :class:`~lr_lightning.data.text.TextDataModule`) is one of:

- ``None``: the embedded default corpus (:func:`default_corpus`, ~0.5 MB), split by character position.
- a plain-text file, split by character position: the first ``1 - 2 * val_fraction`` of its characters train,
  the next ``val_fraction`` validate, the last ``val_fraction`` test. The file is streamed once to count its
  characters and once per split for that split's range, never held whole.
- a WikiText-style folder holding ``wiki.{train,valid,test}.tokens`` or ``{train,valid,test}.txt``.
- a shard set: a folder holding ``.json`` / ``.jsonl`` / ``.json.gz`` / ``.jsonl.gz`` (JSON lines) or
  ``.parquet`` files, or a glob pattern matching such files (``**`` recurses). Every record's ``text_field``
  is one document. Files are read one at a time with Hugging Face ``datasets`` in streaming mode
  (``load_dataset("json" | "parquet", data_files=file, streaming=True)``), so nothing is converted or cached.

Split assignment of a shard set: a file belongs to the split named by a word of its file name (words are the
runs of letters and digits): ``train`` -> train, ``validation`` / ``valid`` / ``val`` / ``dev`` -> val,
``test`` -> test; a file whose name names no split is a training file. This reads C4 as users keep it
(``c4-train.00000-of-01024.json.gz``, ``c4-validation.00000-of-00008.json.gz``) and OpenWebText's parquet
(``train-00000-of-00080.parquet``). A split that has no files of its own is carved out of the training
documents: the ``i``-th training document draws ``u_i`` from ``numpy.random.default_rng(split_seed)`` (one draw
per document, in file-name order) and goes to val if ``u_i < val_fraction``, to test if
``val_fraction <= u_i < 2 * val_fraction``, and stays in train otherwise; a draw that lands on a split with files
of its own leaves the document in train. So OpenWebText gets val and test (``val_fraction`` of the documents
each), and C4 keeps its validation files and gets a test split carved from train.

Text sources yield chunks of :data:`TEXT_CHUNK_LINES` lines (``str.splitlines`` lines of the split's text, which
is what the in-memory pipeline before token files encoded); shard sources yield one piece per document, marked
as ending a document.
"""

from __future__ import annotations

import glob
import hashlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from lr_lightning.data.files import not_text_error

SPLITS = ("train", "val", "test")
TEXT_CHUNK_LINES = 1_000
"""Lines per encoded chunk of a text source."""
READ_BLOCK_CHARS = 1 << 20
"""Characters read from a text file at a time."""
SPLIT_FILE_LAYOUTS = (
    {"train": "wiki.train.tokens", "val": "wiki.valid.tokens", "test": "wiki.test.tokens"},
    {"train": "train.txt", "val": "valid.txt", "test": "test.txt"},
)
SHARD_BUILDERS = {".json": "json", ".jsonl": "json", ".json.gz": "json", ".jsonl.gz": "json", ".parquet": "parquet"}
"""File-name endings of shard files and the ``datasets`` builder that reads them."""
SPLIT_NAME_WORDS = {"train": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val", "test": "test"}
GLOB_CHARACTERS = frozenset("*?[")


class Piece(NamedTuple):
    """A stretch of text to encode; ``ends_document`` when a document separator follows it."""

    text: str
    ends_document: bool


class TextSource(Protocol):
    """A corpus readable split by split as a stream of :class:`Piece`."""

    def pieces(self, split: str) -> Iterator[Piece]:
        """The whole split, in order."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the source's content and split rule (part of the token-file cache key)."""
        ...


def default_corpus() -> str:
    """The ``pydoc_data.topics`` help texts, joined with blank lines in sorted key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def split_by_position(text: str, val_fraction: float) -> dict[str, str]:
    """Cut ``text`` into train / val / test = first ``1 - 2f`` / next ``f`` / last ``f`` of its characters."""
    start = split_starts(len(text), val_fraction)
    return {"train": text[: start["val"]], "val": text[start["val"] : start["test"]], "test": text[start["test"] :]}


def split_starts(n_chars: int, val_fraction: float) -> dict[str, int]:
    """First character of each split when ``n_chars`` characters are split by position (end of test = n_chars)."""
    n_eval = int(n_chars * val_fraction)
    return {"train": 0, "val": n_chars - 2 * n_eval, "test": n_chars - n_eval}


def file_identity(path: Path) -> dict[str, Any]:
    """Resolved path, size and modification time of ``path``: how the cache recognises a file without reading it
    (a file rewritten in place with the same size within the same nanosecond would not be noticed)."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def line_chunks(blocks: Iterable[str], lines_per_chunk: int = TEXT_CHUNK_LINES) -> Iterator[str]:
    """The text that ``blocks`` concatenate, as strings of ``lines_per_chunk`` lines (``str.splitlines`` with
    line ends kept; the last chunk may be shorter), identical to chunking the joined text in memory."""
    carry, lines = "", []
    for block in blocks:
        pieces = (carry + block).splitlines(keepends=True)
        carry = pieces.pop() if pieces else ""
        lines.extend(pieces)
        while len(lines) >= lines_per_chunk:
            yield "".join(lines[:lines_per_chunk])
            del lines[:lines_per_chunk]
    if carry:
        lines.append(carry)
    for start in range(0, len(lines), lines_per_chunk):
        yield "".join(lines[start : start + lines_per_chunk])


def char_blocks(path: Path, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """Characters ``[start, stop)`` of the UTF-8 text file ``path`` (newlines translated as ``Path.read_text``
    does), in blocks of at most :data:`READ_BLOCK_CHARS`; a file that is not UTF-8 is a one-line ``ValueError``."""
    position = 0
    try:
        with open(path, encoding="utf-8") as file:
            while stop is None or position < stop:
                block = file.read(READ_BLOCK_CHARS)
                if not block:
                    break
                low = max(start - position, 0)
                high = len(block) if stop is None else min(stop - position, len(block))
                if low < high:
                    yield block[low:high]
                position += len(block)
    except UnicodeDecodeError:
        error = not_text_error(path)
        raise error from None


class StringSource:
    """A corpus held as one string (the small embedded default corpus), split by character position."""

    def __init__(self, text: str, val_fraction: float) -> None:
        self.texts = split_by_position(text, val_fraction)
        self.digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        self.val_fraction = val_fraction

    def pieces(self, split: str) -> Iterator[Piece]:
        for chunk in line_chunks([self.texts[split]]):
            yield Piece(chunk, False)

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "string", "sha256": self.digest, "val_fraction": self.val_fraction}


class TextFileSource:
    """One plain-text file split by character position (see the module doc)."""

    def __init__(self, path: Path, val_fraction: float) -> None:
        self.path = path
        self.val_fraction = val_fraction
        self._starts: dict[str, int] | None = None
        self._n_chars = 0

    def _split_range(self, split: str) -> tuple[int, int]:
        if self._starts is None:
            self._n_chars = sum(len(block) for block in char_blocks(self.path))
            self._starts = split_starts(self._n_chars, self.val_fraction)
        stops = {"train": self._starts["val"], "val": self._starts["test"], "test": self._n_chars}
        return self._starts[split], stops[split]

    def pieces(self, split: str) -> Iterator[Piece]:
        start, stop = self._split_range(split)
        for chunk in line_chunks(char_blocks(self.path, start, stop)):
            yield Piece(chunk, False)

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "text_file", "file": file_identity(self.path), "val_fraction": self.val_fraction}


class SplitFilesSource:
    """One text file per split (WikiText layout)."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def pieces(self, split: str) -> Iterator[Piece]:
        for chunk in line_chunks(char_blocks(self.files[split])):
            yield Piece(chunk, False)

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "split_files", "files": {split: file_identity(file) for split, file in self.files.items()}}


def shard_builder(path: Path) -> str | None:
    """The ``datasets`` builder (``"json"`` or ``"parquet"``) for a shard file, ``None`` for any other file."""
    name = path.name.lower()
    return next((builder for suffix, builder in SHARD_BUILDERS.items() if name.endswith(suffix)), None)


def split_of_file(path: Path) -> str:
    """The split a shard file belongs to, from the words of its name (``train`` when it names none)."""
    words = re.findall(r"[a-z]+", path.name.lower())
    return next((SPLIT_NAME_WORDS[word] for word in words if word in SPLIT_NAME_WORDS), "train")


def read_documents(file: Path, builder: str, text_field: str) -> Iterator[str]:
    """The ``text_field`` of every record of one shard file, streamed through ``datasets``."""
    import datasets

    records = datasets.load_dataset(builder, data_files=[str(file)], split="train", streaming=True)
    fields = list(records.features) if records.features is not None else None
    if fields is not None and text_field not in fields:
        raise ValueError(f"text_field={text_field!r} is not a field of the records in {str(file)!r}; "
                         f"their fields are {fields}")
    for record in records:
        text = record.get(text_field)
        if not isinstance(text, str):
            raise ValueError(f"text_field={text_field!r} of a record in {str(file)!r} is "
                             f"{type(text).__name__}, not a string; fields of that record: {list(record)}")
        yield text


class ShardSource:
    """Documents from JSON-lines or parquet shard files, assigned to splits by file name (see the module doc)."""

    def __init__(self, files: list[Path], text_field: str, val_fraction: float, split_seed: int) -> None:
        builders = {shard_builder(file) for file in files}
        if len(builders) != 1:
            raise ValueError(f"path mixes shard formats {sorted(builders)}; use only json/jsonl or only parquet files")
        self.builder = builders.pop()
        self.files = {split: sorted(f for f in files if split_of_file(f) == split) for split in SPLITS}
        if not self.files["train"]:
            raise FileNotFoundError(f"no training shard among {[str(f) for f in files]}: a training file has "
                                    "'train' or no split name (validation/valid/val/dev/test) in its file name")
        self.carved = tuple(split for split in SPLITS if not self.files[split])
        self.text_field = text_field
        self.val_fraction = val_fraction
        self.split_seed = split_seed

    def _documents(self, files: list[Path]) -> Iterator[str]:
        for file in files:
            yield from read_documents(file, self.builder, self.text_field)

    def _carved_documents(self, split: str) -> Iterator[str]:
        """Training documents whose seeded draw assigns them to ``split`` (see the module doc)."""
        draws = np.random.default_rng(self.split_seed)
        bounds = {"val": (0.0, self.val_fraction), "test": (self.val_fraction, 2 * self.val_fraction)}
        for document in self._documents(self.files["train"]):
            u = draws.random()
            drawn = next((name for name, (low, high) in bounds.items() if low <= u < high), "train")
            if (drawn if drawn in self.carved else "train") == split:
                yield document

    def pieces(self, split: str) -> Iterator[Piece]:
        if self.carved and (split == "train" or split in self.carved):
            documents = self._carved_documents(split)
        else:
            documents = self._documents(self.files[split])
        for document in documents:
            yield Piece(document, True)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "shards",
            "builder": self.builder,
            "text_field": self.text_field,
            "files": {split: [file_identity(f) for f in files] for split, files in self.files.items()},
            "carved": list(self.carved),
            "val_fraction": self.val_fraction if self.carved else None,
            "split_seed": self.split_seed if self.carved else None,
        }


def find_split_files(path: Path) -> dict[str, Path] | None:
    """The WikiText-style per-split files of folder ``path``, or ``None`` if it has no complete layout."""
    for layout in SPLIT_FILE_LAYOUTS:
        files = {split: path / name for split, name in layout.items()}
        if all(file.is_file() for file in files.values()):
            return files
    return None


def glob_shards(pattern: str) -> list[Path]:
    """Files matching the glob ``pattern``; each must be a shard file."""
    files = sorted(Path(match) for match in glob.glob(pattern, recursive=True) if Path(match).is_file())
    if not files:
        raise FileNotFoundError(f"path {pattern!r} matches no file")
    for file in files:
        if shard_builder(file) is None:
            raise ValueError(f"path {pattern!r} matches {str(file)!r}, which is not a shard file; expected names "
                             f"ending in {', '.join(SHARD_BUILDERS)}")
    return files


def open_source(path: str | None, val_fraction: float, text_field: str = "text", split_seed: int = 0) -> TextSource:
    """The source at ``path`` (see the module doc); a missing or unusable path raises naming ``path``."""
    if path is None:
        return StringSource(default_corpus(), val_fraction)
    if GLOB_CHARACTERS & set(path):
        return ShardSource(glob_shards(str(Path(path).expanduser())), text_field, val_fraction, split_seed)
    location = Path(path).expanduser()
    if not location.exists():
        raise FileNotFoundError(f"path {str(location)!r} does not exist")
    if location.is_file():
        if shard_builder(location) is not None:
            return ShardSource([location], text_field, val_fraction, split_seed)
        return TextFileSource(location, val_fraction)
    files = find_split_files(location)
    if files is not None:
        return SplitFilesSource(files)
    shards = sorted(f for f in location.iterdir() if f.is_file() and shard_builder(f) is not None)
    if shards:
        return ShardSource(shards, text_field, val_fraction, split_seed)
    layouts = " or ".join(", ".join(layout.values()) for layout in SPLIT_FILE_LAYOUTS)
    raise FileNotFoundError(f"directory {str(location)!r} lacks the split files; expected {layouts}, "
                            f"or shard files ending in {', '.join(SHARD_BUILDERS)}")
