"""Directories written whole or not at all (model exports and conversions)."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path


def check_destination(dst: Path, overwrite: bool, error=ValueError) -> None:
    """Raise `error` unless dst is absent, an empty directory, or overwrite is set."""
    if dst.exists() and not dst.is_dir():
        raise error(f"dst: {dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise error(f"dst: {dst} exists and is not empty; pass overwrite=True (--overwrite) to replace it")


@contextlib.contextmanager
def atomic_directory(dst: Path):
    """Yield a fresh temporary directory beside dst; on success it replaces dst in one rename (an
    existing dst is swapped out first and removed last), on any failure it is removed and dst is
    left as it was."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, dst: Path) -> None:
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
