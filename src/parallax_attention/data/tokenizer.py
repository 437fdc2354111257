"""Tokenizers that need no download: raw bytes, or a byte-level BPE trained on the corpus.

Both map text to ids in [0, vocab_size) and reserve one end-of-document id.
A tokenizer serialises to a small JSON spec kept in the shard manifest (and a
``tokenizer.json`` beside the shards for BPE), so training and evaluation
decode with exactly what encoded the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; id 256 ends a document."""

    kind = "bytes"

    def __init__(self):
        self.eos_id = 256
        self.vocab_size = 257

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def save(self, directory: Path) -> None:  # nothing beyond the spec
        pass


class BPETokenizer:
    """Byte-level BPE from the `tokenizers` library, trained on the corpus being prepared."""

    kind = "bpe"
    EOS = "<|endoftext|>"

    def __init__(self, tok):
        self._tok = tok
        self.eos_id = tok.token_to_id(self.EOS)
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 300:
            raise ValueError(f"--vocab-size: a byte-level BPE needs at least 300 ids, got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[cls.EOS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> "BPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def spec(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "file": "tokenizer.json"}

    def save(self, directory: Path) -> None:
        import os

        tmp = Path(directory) / "tokenizer.json.tmp"
        self._tok.save(str(tmp))
        os.replace(tmp, Path(directory) / "tokenizer.json")


def load_tokenizer(spec: dict, directory: Path):
    """The tokenizer a manifest describes."""
    if spec["kind"] == "bytes":
        return ByteTokenizer()
    if spec["kind"] == "bpe":
        return BPETokenizer.load(Path(directory) / spec.get("file", "tokenizer.json"))
    raise ValueError(f"unknown tokenizer kind in manifest: {spec['kind']!r}")
