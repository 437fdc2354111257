"""Data: corpora (embedded, local, Hugging Face), tokenizers, token shards and samplers."""

from .corpus import embedded_files, is_validation, stdlib_root
from .prepare import prepare
from .shards import TokenShards, WindowSampler, iter_eval_batches, read_manifest, write_shards
from .tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer

__all__ = [
    "BPETokenizer", "ByteTokenizer", "TokenShards", "WindowSampler", "embedded_files", "is_validation",
    "iter_eval_batches", "load_tokenizer", "prepare", "read_manifest", "stdlib_root", "write_shards",
]
