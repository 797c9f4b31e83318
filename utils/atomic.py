"""Atomic writes: a reader (or a rerun after ``kill -9``) sees the old file or directory or the new
one, never a torn one. Every file and artifact directory the project writes goes through here:
``atomic_path`` for a file, ``atomic_dir`` for a directory, one temporary-name scheme for both."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def tmp_name(path: Path) -> Path:
    """Hidden, per-process temporary name beside ``path`` (same filesystem, so os.replace works)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces the file ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory to fill; it replaces the directory ``path`` (removing an
    old one) only if the block succeeds. Temporaries of ``path`` left by killed runs go first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tmp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj, **dumps_kw) -> None:
    """``json.dumps(obj, **dumps_kw)`` written atomically (UTF-8)."""
    write_text(path, json.dumps(obj, **dumps_kw))


def save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def remove_stale_tmp(directory: str | Path) -> None:
    """Delete temporary files left by killed processes (names from :func:`tmp_name`)."""
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.glob(".*.tmp"):
            if p.is_file():
                p.unlink(missing_ok=True)


class NpyAppender:
    """A 1-D ``.npy`` file written in pieces, for arrays too large to hold: ``append`` chunks,
    then ``close`` writes the header for the final length and renames the file into place (a
    reader or a rerun never sees a partial file). The header's space is reserved up front, so
    nothing is copied at the end; the file is byte for byte what ``np.save`` writes (numpy pads
    the header of a 1-D array to the same 128 bytes whatever its length)."""

    HEADER_BYTES = 128

    def __init__(self, path: str | Path, dtype):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self.tmp = tmp_name(self.path)
        self.f = open(self.tmp, "wb")
        self.f.write(b"\0" * self.HEADER_BYTES)
        self.n = 0

    def append(self, chunk: np.ndarray) -> None:
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        self.f.write(chunk.data)
        self.n += chunk.shape[0]

    def close(self) -> None:
        """The header for ``n`` rows, then the rename."""
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {
            "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
            "shape": (self.n,)})
        if header.tell() != self.HEADER_BYTES:
            raise ValueError(f"{self.path}: npy header of {header.tell()} bytes, not "
                             f"{self.HEADER_BYTES}")
        self.f.seek(0)
        self.f.write(header.getvalue())
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)
