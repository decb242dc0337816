"""Atomic writes: every artifact is written under a hidden staging directory next to its target and renamed into
place only when complete, so a reader (or a killed export) sees the previous version or the whole new one.

:func:`staging_dir` makes that directory and always removes what is left of it; :func:`publish` renames one staged
file onto its target; :func:`replace_dir` swaps a staged directory in for a whole directory. Used by the manifest
writer (:func:`atomic_write_bytes`), the ONNX writer, the TensorRT engine writer and ``to_onnx``'s export directory.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write_bytes", "atomic_write_text", "publish", "replace_dir", "staging_dir"]


def _hidden_sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}"


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to disk; directories are skipped where they have no fd."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def staging_dir(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh hidden directory next to ``target`` (same filesystem, so renames out of it are atomic); whatever is
    still in it on exit, normal or not, is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _hidden_sibling(target, "staging")
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staged: str | os.PathLike, target: str | os.PathLike) -> Path:
    """fsync the complete file ``staged`` and rename it onto ``target`` (in the same filesystem)."""
    staged, target = Path(staged), Path(target)
    _fsync(staged)
    os.replace(staged, target)
    _fsync(target.parent)
    return target


def replace_dir(staged: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Replace the directory ``target`` by the complete ``staged`` one (two renames; the old one is restored if the
    second fails, and removed once the new one is in place)."""
    staged, target = Path(staged), Path(target)
    backup = None
    if target.exists():
        backup = _hidden_sibling(target, "old")
        os.replace(target, backup)
    try:
        os.replace(staged, target)
    except BaseException:
        if backup is not None:
            os.replace(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    _fsync(target.parent)
    return target


def atomic_write_bytes(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write ``data`` (bytes, or a callable that writes to the open binary file) to ``path`` atomically."""
    path = Path(path)
    with staging_dir(path) as staging:
        staged = staging / path.name
        with open(staged, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
        return publish(staged, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
