"""Crash-safe writes: a file or a directory appears complete or not at all (write aside, fsync, rename)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk (directories only where the OS allows it)."""
    if path.is_dir() and os.name == "nt":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_file(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write a file through `write(handle)` into a temporary file beside it, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync(path.parent)
    return path


def replace_directory(staging: Path, target: Path, keep: Sequence[str] = ()) -> None:
    """Move a fully written staging directory into place of target, so readers never see a half-written one.

    keep: sub-directories of an existing target that move over with it. They are hard-linked into the staging
    directory before the swap, so they never go missing and no large file is copied.
    """
    for name in keep:
        if (target / name).is_dir():
            shutil.copytree(target / name, staging / name, copy_function=os.link)
    for path in sorted(staging.rglob("*"), reverse=True):  # files before the directories that hold them
        _fsync(path)
    _fsync(staging)
    if target.exists():
        old = target.with_name(f".{target.name}.old{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)
    _fsync(target.parent)
