"""Streaming ``.npy`` files for the CLI: rows read memory-mapped a block at a time, checked in
one pass, and written chunk by chunk to a temporary file that replaces the output only when
complete.

An interruption (Ctrl-C, or ``SIGTERM``, which :func:`interruptible` turns into the same
``KeyboardInterrupt``) removes the temporary file: the output path is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import numpy as np

__all__ = ["RowFile", "check_finite_rows", "RowWriter", "interruptible", "SCAN_ROWS"]

#: Rows per block of the validation pass (a few MB at D = 64).
SCAN_ROWS = 1 << 16


class RowFile:
    """The rows of an ``(n, D)`` float ``.npy`` file, read a block at a time.

    Each block is memory-mapped, copied into memory in native byte order, and unmapped, so the
    process holds one block, however large the file (a whole-file map would count every page
    it touched in the resident set). Fortran-ordered files, whose rows are not contiguous, are
    mapped whole instead.

    Attributes:
        path, shape, dtype: the file, its ``(n, D)`` shape and its dtype.
    """

    def __init__(self, path: str | os.PathLike, name: str, dim: int) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{name}: {path}: no such file")
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, self._fortran, dtype = read(f)
                self._offset = f.tell()
        except ValueError as e:
            if zipfile.is_zipfile(self.path):
                raise ValueError(f"{name}: {path} is an .npz archive; expected a single .npy "
                                 f"array") from e
            raise ValueError(f"{name}: {path} is not a readable .npy file ({e})") from e
        except (OSError, EOFError) as e:
            raise ValueError(f"{name}: {path} is not a readable .npy file ({e})") from e
        if dtype.hasobject:
            raise ValueError(f"{name}: {path} holds pickled Python objects, which are refused "
                             f"unread; save a plain float array with numpy.save")
        if len(shape) != 2:
            raise ValueError(f"{name}: expected shape (n, {dim}), got {shape}")
        if dtype.kind != "f":
            raise TypeError(f"{name}: expected a floating-point array, got dtype {dtype}"
                            + (" (convert with .astype(float) if the values are continuous)"
                               if dtype.kind in "iu" else ""))
        if shape[1] != dim:
            raise ValueError(f"{name}: expected last dimension {dim} for this flow, got shape "
                             f"{shape}")
        if shape[0] == 0:
            raise ValueError(f"{name}: expected at least 1 row, got shape {shape}")
        expected = self._offset + shape[0] * shape[1] * dtype.itemsize
        if self.path.stat().st_size < expected:
            raise ValueError(f"{name}: {path} is truncated ({self.path.stat().st_size:,} bytes, "
                             f"its header promises {expected:,})")
        self.shape, self.dtype = tuple(shape), dtype

    def __len__(self) -> int:
        return self.shape[0]

    def block(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as an in-memory array of the native byte order ``(m, D)``."""
        stop = min(stop, self.shape[0])
        if self._fortran:
            whole = np.load(self.path, mmap_mode="r", allow_pickle=False)
            rows = whole[start:stop]
        else:
            width = self.shape[1] * self.dtype.itemsize
            rows = np.memmap(self.path, dtype=self.dtype, mode="r",
                             offset=self._offset + start * width, shape=(stop - start,
                                                                         self.shape[1]))
        out = np.array(rows, dtype=self.dtype.newbyteorder("="))
        del rows
        return out

    def blocks(self, size: int) -> Iterator[np.ndarray]:
        """All rows, ``size`` at a time."""
        for start in range(0, self.shape[0], size):
            yield self.block(start, start + size)


def check_finite_rows(rows: RowFile, name: str) -> None:
    """One streaming pass: raise naming the first row with NaN or Inf, and how many there are.

    Raises:
        ValueError: ``"{name}: expected finite values, got NaN or Inf in K row(s), the first
            at row R"`` (rows counted from 0).
    """
    first, count = None, 0
    for i, block in enumerate(rows.blocks(SCAN_ROWS)):
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            count += int(bad.sum())
            if first is None:
                first = i * SCAN_ROWS + int(np.argmax(bad))
    if count:
        raise ValueError(f"{name}: expected finite values, got NaN or Inf in {count:,} row(s), "
                         f"the first at row {first:,} (counting from 0)")


class RowWriter:
    """An ``(n, *k)`` ``.npy`` output written chunk by chunk to a temporary file in the
    output's folder (plain sequential writes, so written rows do not stay in memory), which
    :meth:`commit` renames onto ``path``; :meth:`discard` (or leaving the ``with`` block with
    an exception) deletes it. The header is written at the first chunk, with that chunk's dtype
    and width."""

    def __init__(self, path: str | os.PathLike, n: int) -> None:
        self.path, self.n, self.rows = Path(path), n, 0
        self._tmp: str | None = None
        self._file = None

    def write(self, block: np.ndarray) -> None:
        """Append ``block`` ``(m, *k)`` after the rows written so far."""
        if self._file is None:
            fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                             dir=self.path.parent)
            self._file = os.fdopen(fd, "wb")
            header = {"descr": np.lib.format.dtype_to_descr(block.dtype),
                      "fortran_order": False, "shape": (self.n, *block.shape[1:])}
            np.lib.format.write_array_header_1_0(self._file, header)
        self._file.write(np.ascontiguousarray(block).tobytes())
        self.rows += len(block)

    def commit(self) -> None:
        """Flush, sync and rename the finished file onto the output path."""
        if self._file is None or self.rows != self.n:
            raise RuntimeError(f"RowWriter: {self.rows} of {self.n} rows written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self._tmp, self.path)
        self._tmp = None

    def discard(self) -> None:
        """Close and delete the temporary file, if any."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp is not None and os.path.exists(self._tmp):
            os.unlink(self._tmp)
        self._tmp = None

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """``SIGTERM`` raises ``KeyboardInterrupt`` inside the block, as Ctrl-C does (main thread
    only; elsewhere the block runs unchanged)."""
    try:
        old = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
