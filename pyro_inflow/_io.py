"""Safe files: atomic writes, and loading that never runs code (``weights_only=True``)."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["atomic_write", "save_payload", "load_payload", "FORMAT", "FORMAT_VERSION"]

FORMAT = "pyro_inflow"
FORMAT_VERSION = 1


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` via a temporary file in the same folder and ``os.replace``.

    A crash or kill during ``write`` leaves any previous file at ``path`` intact and no
    partly written file behind.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_payload(path: str | os.PathLike, kind: str, payload: dict) -> None:
    """Save tensors and plain data (dicts, lists, str, numbers) under a format header."""
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, **payload}
    atomic_write(path, lambda f: torch.save(record, f))


def load_payload(path: str | os.PathLike, kind: str) -> dict:
    """Load a file written by :func:`save_payload`, refusing anything else.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a pyro_inflow file of this ``kind``, a newer format version, or a file
            that is truncated, corrupt, or holds objects other than tensors and plain data
            (those are refused by ``torch.load(weights_only=True)`` without running them).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": refused anyway
            warnings.simplefilter("ignore")
            record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to parse an untrusted file is the same user error
        raise ValueError(
            f"{path}: not a readable pyro_inflow {kind} file (truncated, corrupt, or holding "
            f"objects other than tensors and plain data, which are refused unrun; "
            f"{type(e).__name__})"
        ) from e
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pyro_inflow file (no '{FORMAT}' header)")
    version = record.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {version!r} is newer than this pyro_inflow supports "
            f"({FORMAT_VERSION}); upgrade pyro_inflow"
        )
    if record.get("kind") != kind:
        raise ValueError(
            f"{path}: expected a pyro_inflow {kind} file, got a {record.get('kind')!r} file")
    return record
