"""Reading checkpoint files safely, with one-line errors that name the file.

``torch.load`` of a bad file fails with messages that do not name it (``OSError: [Errno 22] Invalid argument``
for a truncated file, ``KeyError: 101`` for a text file) or that advise ``weights_only=False``, which would run
whatever code a file of unknown origin holds. :func:`read_checkpoint` always loads with ``weights_only=True``
and turns every such failure into one ``ValueError`` line: the file, and what is wrong with it.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME

SPECIAL_CKPT_PATHS = ("last", "best", "hpc")
"""``ckpt_path`` values the Trainer resolves itself (they name no file)."""

_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", re.DOTALL)
_NOT_ZIP = "mmap can only be used with files saved with"


def is_local_checkpoint_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a local file or folder (not ``last``/``best``/``hpc``, a registry name or a URL)."""
    text = str(path)
    return text not in SPECIAL_CKPT_PATHS and not text.startswith("registry") and "://" not in text


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The file to read for the checkpoint at ``path``: the file itself, or the ``meta.pt`` of a distributed-
    checkpoint folder. Raises a one-line ``FileNotFoundError`` naming what is missing."""
    path = Path(path).expanduser()
    if path.is_dir():
        meta = path / _METADATA_FILENAME
        if not meta.is_file():
            raise FileNotFoundError(f"checkpoint folder {str(path)!r} holds no {_METADATA_FILENAME}: "
                                    f"it is not a distributed checkpoint Lightning saved")
        return meta
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} is not a file")
    return path


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def checkpoint_error(path: str | os.PathLike, error: BaseException) -> Exception:
    """The one-line error for ``torch.load(path, weights_only=True)`` having raised ``error``."""
    name = str(path)
    if isinstance(error, (FileNotFoundError, IsADirectoryError)):
        return FileNotFoundError(f"checkpoint {name!r} does not exist or is not a file")
    if isinstance(error, PermissionError):
        return PermissionError(f"checkpoint {name!r} is not readable: permission denied")
    text = str(error)
    unsafe = _UNSAFE_GLOBAL.search(text)
    if isinstance(error, pickle.UnpicklingError) and unsafe:
        return ValueError(f"checkpoint {name!r} holds a Python object of type {unsafe.group(1)}, which a safe load "
                          "refuses (unpickling it could run arbitrary code): it is not a checkpoint lr-lightning "
                          "saved; load it only if you trust its origin")
    if isinstance(error, pickle.UnpicklingError) and (unpickler := _UNPICKLER_ERROR.search(text)):
        detail = f"unreadable pickle data: {unpickler.group(1)}"
    else:
        detail = f"{type(error).__name__}: {_first_line(text)}" if _first_line(text) else type(error).__name__
    return ValueError(f"checkpoint {name!r} is truncated or not a PyTorch checkpoint ({detail})")


def _load(path: Path, mmap: bool) -> Any:
    with warnings.catch_warnings():  # a pickle of a newer protocol is an error below, not a warning besides
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as error:
            if mmap and _NOT_ZIP in str(error) and not zipfile.is_zipfile(path):
                return torch.load(path, map_location="cpu", weights_only=True)  # the legacy (pre-1.6) format
            raise


LIGHTNING_VERSION_KEY = "pytorch-lightning_version"


def check_lightning_checkpoint(path: str | os.PathLike) -> None:
    """Raise a one-line error unless ``path`` reads as a Lightning checkpoint (what ``--ckpt_path`` must name).

    Reads the file's structure memory-mapped, not its tensors: cheap for a large checkpoint.
    """
    checkpoint = read_checkpoint(path, mmap=True)
    if LIGHTNING_VERSION_KEY not in checkpoint:
        raise ValueError(f"checkpoint {str(checkpoint_file(path))!r} is a PyTorch file but not a Lightning "
                         f"checkpoint (it has no {LIGHTNING_VERSION_KEY!r} entry)")


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint dictionary stored at ``path`` (a ``.ckpt`` file, or a distributed-checkpoint folder, whose
    ``meta.pt`` is read), loaded with ``weights_only=True`` on the CPU.

    With ``mmap=True`` tensors are memory-mapped rather than read (cheap for one key of a large checkpoint; damage
    inside tensor data then goes unnoticed until the tensors are read).

    Raises:
        FileNotFoundError: ``path`` does not exist (one line naming it).
        ValueError: The file is truncated, not a PyTorch checkpoint, or holds Python objects a safe load refuses
            (one line naming the file and what is wrong with it).
    """
    file = checkpoint_file(path)
    try:
        checkpoint = _load(file, mmap)
    except Exception as error:  # torch.load fails with many types: each becomes one line
        raise checkpoint_error(file, error) from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {str(file)!r} holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    return checkpoint
