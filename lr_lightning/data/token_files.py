"""Token files: a split's token ids on disk as one flat binary array, read back through ``numpy.memmap``.

A tokenized split lives in two files in a cache folder ``<cache_dir>/tokens-<key>/``:

- ``<split>.bin``: the ids as a raw little-endian array, ``uint16`` when every id fits (vocabulary of at most
  65,536), else ``uint32``;
- ``<split>.json``: metadata (``dtype``, ``count``, ``format``, and whatever description the writer adds).

Both are written under a temporary name and renamed into place, the ``.bin`` first and the ``.json`` last, and a
split counts as cached only when its ``.json`` exists and its ``count`` matches the ``.bin`` size. A run killed
while writing leaves only temporary files (``*.partial-*``), which no later run trusts. Two processes writing the
same split at once both produce the same bytes; the later rename wins.

The folder's ``key`` is a hash of everything that decides the tokens (see :func:`cache_key`).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

TOKEN_FILE_FORMAT = 1
"""Bumped when the layout or the meaning of the files changes, so older caches are not reused."""
FLUSH_TOKENS = 1 << 18
"""Ids gathered in memory (as Python ints, about 10 MB) before they are appended to the ``.bin`` file."""


def cache_key(inputs: dict[str, Any]) -> str:
    """A 16-hex-digit hash of ``inputs`` (JSON-serializable; key order does not matter) and the file format."""
    payload = json.dumps({"format": TOKEN_FILE_FORMAT, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when ids ``0 .. vocab_size - 1`` fit in 16 bits, else ``uint32``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _partial_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")


class TokenFile:
    """One split's ids on disk: ``path`` (the ``.bin``), ``dtype`` and ``count``; ``array`` maps it lazily.

    The memory map is opened on first use in each process and is not pickled, so DataLoader workers (fork or
    spawn) each map the file themselves instead of receiving a copy of the tokens.
    """

    def __init__(self, path: Path, dtype: np.dtype, count: int) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.count = count
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return self.count

    @property
    def array(self) -> np.ndarray:
        """The ids as a read-only ``numpy.memmap`` (an empty array for an empty split)."""
        if self._array is None:
            if self.count == 0:
                self._array = np.empty(0, dtype=self.dtype)
            else:
                self._array = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.count,))
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    @classmethod
    def open(cls, path: Path) -> TokenFile | None:
        """The token file at ``path`` (``<split>.bin``) if it and its metadata are complete, else ``None``."""
        meta_path = path.with_suffix(".json")
        if not (meta_path.is_file() and path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            dtype, count = np.dtype(meta["dtype"]), int(meta["count"])
        except (ValueError, KeyError, TypeError):
            return None
        if meta.get("format") != TOKEN_FILE_FORMAT or path.stat().st_size != count * dtype.itemsize:
            return None
        return cls(path, dtype, count)


def write_token_file(
    path: Path,
    id_batches: Iterable[list[int]],
    vocab_size: int,
    description: dict[str, Any] | None = None,
    progress: str | None = None,
) -> TokenFile:
    """Append every batch of ids from ``id_batches`` to ``path`` (``<split>.bin``) and write its metadata.

    Memory stays bounded by :data:`FLUSH_TOKENS` ids whatever the corpus size. ``progress``, when given, is the
    label of a tqdm bar counting tokens. Raises ``ValueError`` if an id falls outside ``[0, vocab_size)``.
    """
    dtype = token_dtype(vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_name(path)
    count, pending = 0, []
    bar = tqdm(desc=progress, unit="tok", unit_scale=True, disable=progress is None)
    try:
        with open(partial, "wb") as out:

            def flush() -> None:
                ids = np.asarray(pending, dtype=np.int64)
                if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                    raise ValueError(f"token id outside [0, {vocab_size}) while writing {str(path)!r}")
                ids.astype(dtype).tofile(out)
                pending.clear()

            for ids in id_batches:
                pending.extend(ids)
                count += len(ids)
                bar.update(len(ids))
                if len(pending) >= FLUSH_TOKENS:
                    flush()
            flush()
        partial.replace(path)
    finally:
        bar.close()
        partial.unlink(missing_ok=True)
    meta = {"format": TOKEN_FILE_FORMAT, "dtype": dtype.name, "count": count, "vocab_size": vocab_size,
            **(description or {})}
    meta_path = path.with_suffix(".json")
    meta_partial = _partial_name(meta_path)
    meta_partial.write_text(json.dumps(meta, indent=1, sort_keys=True, default=str), encoding="utf-8")
    meta_partial.replace(meta_path)
    return TokenFile(path, dtype, count)
