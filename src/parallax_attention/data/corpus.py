"""Text sources: the embedded corpus (Python's own standard library), local files, HF datasets.

Every source yields ``(doc_id, text)`` in a deterministic order. ``doc_id`` is
stable across machines with the same source (a relative path, or a dataset
index) and decides the train/val split, so the split does not depend on how
many documents came before.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Iterator

TEXT_SUFFIXES = (".py", ".txt", ".rst", ".md")
# Skipped in the embedded corpus: the test suite (60% of the bytes, much of it
# generated data), codec tables (machine-generated), and installed third-party code.
_EMBEDDED_SKIP_DIRS = {"test", "tests", "encodings", "site-packages", "dist-packages", "__pycache__",
                       "idle_test", "lib2to3"}


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def embedded_files(root: Path | None = None) -> list[Path]:
    """Source and documentation files of the standard library, sorted by relative path.

    ``pydoc_data/topics.py`` carries the English language-reference topics that
    ``help()`` shows, so the corpus mixes prose and code.
    """
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory not found: {root}")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EMBEDDED_SKIP_DIRS and not d.startswith("."))
        for name in filenames:
            if name.endswith(TEXT_SUFFIXES):
                files.append(Path(dirpath) / name)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return files


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def iter_files(paths: list[Path], root: Path | None = None) -> Iterator[tuple[str, str]]:
    for p in paths:
        doc_id = p.relative_to(root).as_posix() if root is not None else p.name
        text = _read_text(p)
        if text.strip():
            yield doc_id, text


def local_files(src: Path) -> tuple[list[Path], Path]:
    """A file, or every text file under a directory (sorted); returns (files, root for ids)."""
    src = Path(src)
    if src.is_file():
        return [src], src.parent
    if not src.is_dir():
        raise FileNotFoundError(f"SRC: no such file or directory: {src}")
    files = sorted((p for p in src.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES),
                   key=lambda p: p.relative_to(src).as_posix())
    if not files:
        raise ValueError(f"SRC: no text files ({', '.join(TEXT_SUFFIXES)}) under {src}")
    return files, src


def iter_hf_dataset(spec: str, split: str = "train", text_field: str = "text",
                    max_docs: int | None = None) -> Iterator[tuple[str, str]]:
    """Stream a Hugging Face dataset: ``spec`` is ``NAME`` or ``NAME:CONFIG`` (needs network)."""
    try:
        import datasets  # optional: only this source needs it
    except ImportError as e:
        raise ImportError("SRC hf:...: streaming a Hugging Face dataset needs `pip install datasets`") from e
    name, _, config = spec.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
    for i, row in enumerate(ds):
        if max_docs is not None and i >= max_docs:
            break
        if text_field not in row:
            raise KeyError(f"--text-field: column {text_field!r} not in dataset row (columns: {sorted(row)})")
        yield str(i), row[text_field]


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Deterministic split by a hash of the document id."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "little")
    return (h % 1_000_000) < val_fraction * 1_000_000
