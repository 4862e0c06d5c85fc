"""One-line errors for data files that cannot be read as what they should be (a binary file given as text, a
damaged gzip or NumPy file): the file's path and what is wrong with it, instead of a bare ``UnicodeDecodeError``."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)
"""What reading a damaged or truncated ``.gz`` file raises."""


def _raw_bytes(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


def not_text_error(path: Path) -> ValueError:
    """The error for ``path`` (gzipped if its name ends in ``.gz``) not being UTF-8 text, with the first bad byte's
    position; call it when decoding ``path`` raised ``UnicodeDecodeError``."""
    data = _raw_bytes(path)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        return ValueError(f"{str(path)!r} is not UTF-8 text (byte {error.start}, line {line}: {error.reason}); "
                          f"is it a binary file?")
    return ValueError(f"{str(path)!r} is not UTF-8 text; is it a binary file?")


def bad_gzip_error(path: Path, error: BaseException) -> ValueError:
    """The error for ``path`` not being a readable gzip file (``error`` is what reading it raised)."""
    detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return ValueError(f"{str(path)!r} is truncated or not a gzip file ({detail})")


def read_text(path: Path) -> str:
    """``path.read_text(encoding="utf-8")`` whose failure on a binary file is a one-line ``ValueError`` naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        error = not_text_error(path)
    raise error


def unreadable_error(path: Path, kind: str, error: BaseException) -> ValueError:
    """The error for ``path`` not being a readable ``kind`` file (``.npy``, ``.npz``, ...): what reading it raised,
    in one line."""
    message = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    detail = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return ValueError(f"{str(path)!r} is truncated or not a {kind} file ({detail})")
