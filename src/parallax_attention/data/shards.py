"""Token shards: raw uint16/uint32 arrays on disk (numpy memmap) plus a JSON manifest.

Layout of a prepared directory::

    manifest.json        dtype, tokenizer spec, per split: shard files and token counts
    train_00000.bin ...  documents' tokens, each document followed by the EOS id
    val_00000.bin ...
    tokenizer.json       (BPE only)

Every file is written to a temporary name and renamed into place; the manifest
is written last, so a directory with a manifest is complete.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .corpus import is_validation

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


class _ShardWriter:
    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []
        self.docs = 0

    def add(self, ids: np.ndarray) -> None:
        self.buf.append(ids.astype(self.dtype, copy=False))
        self.buffered += len(ids)
        self.docs += 1
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        arr = np.concatenate(self.buf) if self.buf else np.zeros(0, self.dtype)
        head, rest = arr[:n], arr[n:]
        name = f"{self.split}_{len(self.shards):05d}.bin"
        atomic_write_bytes(self.out / name, head.tobytes())
        self.shards.append({"file": name, "tokens": int(len(head))})
        self.buf = [rest] if len(rest) else []
        self.buffered = len(rest)

    def close(self) -> dict:
        if self.buffered:
            self._flush(self.buffered)
        return {"shards": self.shards, "tokens": sum(s["tokens"] for s in self.shards), "documents": self.docs}


def write_shards(
    docs: Iterable[tuple[str, str]],
    out: Path,
    tokenizer,
    val_fraction: float = 0.01,
    shard_tokens: int = 1 << 24,
    source: str = "",
    progress: bool = True,
    total_docs: int | None = None,
    batch_docs: int = 256,
) -> dict:
    """Tokenise ``docs`` into shards under ``out``; returns the manifest (also written)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32)
    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in ("train", "val")}
    eos = np.asarray([tokenizer.eos_id], dtype=np.int64)
    bar = None
    if progress:
        try:
            from tqdm import tqdm
        except ImportError:  # progress bar is optional
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=total_docs, unit="doc", desc="tokenising", dynamic_ncols=True)
    t0 = time.time()
    pending: list[tuple[str, str]] = []

    def flush_pending():
        ids_list = tokenizer.encode_batch([t for _, t in pending])
        for (doc_id, _), ids in zip(pending, ids_list):
            split = "val" if is_validation(doc_id, val_fraction) else "train"
            writers[split].add(np.concatenate([ids, eos]))
        if bar is not None:
            bar.update(len(pending))
        pending.clear()

    for doc in docs:
        pending.append(doc)
        if len(pending) >= batch_docs:
            flush_pending()
    if pending:
        flush_pending()
    if bar is not None:
        bar.close()
    splits = {s: w.close() for s, w in writers.items()}
    if splits["train"]["tokens"] == 0:
        raise ValueError("SRC: no training tokens were produced (empty source?)")
    tokenizer.save(out)
    manifest = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "tokenizer": tokenizer.spec(),
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "val_fraction": val_fraction,
        "source": source,
        "python": platform.python_version(),
        "seconds": round(time.time() - t0, 2),
        "splits": splits,
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {directory}: run `plx prepare SRC {directory}` first")
    return json.loads(path.read_text())


class TokenShards:
    """Read-only view of one split's shards as memmaps, cut into fixed windows.

    Window w covers tokens [start, start + seq_len + 1) of one shard (inputs
    and the next-token labels), with windows placed every ``seq_len`` tokens;
    windows never straddle shards.
    """

    def __init__(self, directory: Path, split: str, seq_len: int):
        self.directory = Path(directory)
        self.manifest = read_manifest(directory)
        if split not in self.manifest["splits"]:
            raise ValueError(f"split must be one of {sorted(self.manifest['splits'])}, got {split!r}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        dtype = np.dtype(self.manifest["dtype"])
        self.arrays = []
        counts = []
        for shard in self.manifest["splits"][split]["shards"]:
            n = shard["tokens"]
            if n < seq_len + 1:
                continue
            self.arrays.append(np.memmap(self.directory / shard["file"], dtype=dtype, mode="r", shape=(n,)))
            counts.append((n - 1) // seq_len)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_windows = int(self.offsets[-1])

    def __len__(self) -> int:
        return self.num_windows

    def window(self, w: int) -> np.ndarray:
        s = int(np.searchsorted(self.offsets, w, side="right") - 1)
        start = (w - int(self.offsets[s])) * self.seq_len
        return np.asarray(self.arrays[s][start:start + self.seq_len + 1], dtype=np.int64)

    def batch(self, windows) -> np.ndarray:
        return np.stack([self.window(int(w)) for w in windows])


@dataclass
class SamplerState:
    epoch: int = 0
    cursor: int = 0  # windows consumed in this epoch's permutation


class WindowSampler:
    """Deterministic shuffled windows; the whole position is (epoch, cursor).

    Epoch e visits the windows in ``permutation(seed + e)``. Each call to
    :meth:`next_global` takes the next ``global_batch`` windows (wrapping into
    the next epoch when needed); a rank keeps its slice, so the sample order
    does not depend on the number of ranks for a fixed global batch.
    """

    def __init__(self, num_windows: int, seed: int = 0):
        if num_windows < 1:
            raise ValueError("the split has no full window: use a shorter seq_len or more data")
        self.n = num_windows
        self.seed = seed
        self.state = SamplerState()
        self._perm_epoch = -1
        self._perm = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def next_global(self, global_batch: int) -> np.ndarray:
        out = []
        while len(out) < global_batch:
            perm = self._permutation(self.state.epoch)
            take = min(global_batch - len(out), self.n - self.state.cursor)
            out.extend(perm[self.state.cursor:self.state.cursor + take].tolist())
            self.state.cursor += take
            if self.state.cursor >= self.n:
                self.state = SamplerState(self.state.epoch + 1, 0)
        return np.asarray(out, dtype=np.int64)

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "cursor": self.state.cursor, "seed": self.seed, "n": self.n}

    def load_state_dict(self, sd: dict) -> None:
        if sd["n"] != self.n or sd["seed"] != self.seed:
            raise ValueError(f"data position was saved for {sd['n']} windows / seed {sd['seed']}, "
                             f"this run has {self.n} / {self.seed}: different data or seq_len")
        self.state = SamplerState(int(sd["epoch"]), int(sd["cursor"]))


def iter_eval_batches(shards: TokenShards, batch_size: int, max_batches: int) -> Iterator[np.ndarray]:
    """The first ``max_batches`` batches of windows in order: the same every evaluation."""
    n = min(len(shards), batch_size * max_batches)
    for i in range(0, n, batch_size):
        yield shards.batch(range(i, min(n, i + batch_size)))
