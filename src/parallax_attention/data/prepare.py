"""`plx prepare SRC OUT`: tokenise text into shards with a manifest.

SRC is a file or directory of text files, ``embedded`` (the running Python's
standard library: no download) or ``hf:NAME[:CONFIG]`` (a Hugging Face
dataset, streamed; needs network and `datasets`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="file, directory, 'embedded', or hf:NAME[:CONFIG]")
    p.add_argument("out", metavar="OUT", type=Path, help="output directory for shards and manifest.json")
    p.add_argument("--tokenizer", choices=("bytes", "bpe"), default="bpe",
                   help="bytes (no training) or a byte-level BPE trained on SRC (default: bpe)")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default: 4096)")
    p.add_argument("--val-fraction", type=float, default=0.02,
                   help="fraction of documents held out, chosen by a hash of the document id")
    p.add_argument("--max-bytes", type=int, default=None, help="stop reading SRC after this many bytes")
    p.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard file")
    p.add_argument("--hf-split", default="train", help="hf: dataset split")
    p.add_argument("--text-field", default="text", help="hf: text column")
    p.add_argument("--max-docs", type=int, default=None, help="hf: stop after this many documents")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cap_bytes(docs, max_bytes):
    used = 0
    for doc_id, text in docs:
        if max_bytes is not None and used >= max_bytes:
            return
        used += len(text.encode("utf-8"))
        yield doc_id, text


def prepare(src: str, out: Path, tokenizer: str = "bpe", vocab_size: int = 4096, val_fraction: float = 0.02,
            max_bytes: int | None = None, shard_tokens: int = 1 << 24, hf_split: str = "train",
            text_field: str = "text", max_docs: int | None = None, progress: bool = True) -> dict:
    """Library form of `plx prepare`; returns the manifest."""
    from .corpus import embedded_files, iter_files, iter_hf_dataset, local_files, stdlib_root
    from .shards import write_shards
    from .tokenizer import BPETokenizer, ByteTokenizer

    if tokenizer not in ("bytes", "bpe"):
        raise ValueError(f"tokenizer must be 'bytes' or 'bpe', got {tokenizer!r}")
    if src.startswith("hf:"):
        def docs():
            return _cap_bytes(iter_hf_dataset(src[3:], hf_split, text_field, max_docs), max_bytes)
        total = max_docs
    else:
        if src == "embedded":
            root = stdlib_root()
            files = embedded_files(root)
        else:
            files, root = local_files(Path(src))
        total = len(files)

        def docs():
            return _cap_bytes(iter_files(files, root), max_bytes)

    if tokenizer == "bpe":
        # The BPE is trained on the training documents only, so validation text stays unseen.
        from .corpus import is_validation

        tok = BPETokenizer.train((t for i, t in docs() if not is_validation(i, val_fraction)), vocab_size)
    else:
        tok = ByteTokenizer()
    return write_shards(docs(), out, tok, val_fraction=val_fraction, shard_tokens=shard_tokens,
                        source=src, progress=progress, total_docs=total)


def run(args: argparse.Namespace) -> int:
    m = prepare(args.src, args.out, args.tokenizer, args.vocab_size, args.val_fraction, args.max_bytes,
                args.shard_tokens, args.hf_split, args.text_field, args.max_docs, not args.no_progress)
    s = m["splits"]
    print(f"wrote {args.out}: {s['train']['tokens']:,} train / {s['val']['tokens']:,} val tokens "
          f"({s['train']['documents']} / {s['val']['documents']} documents), {m['dtype']}, "
          f"tokenizer {m['tokenizer']['kind']} (vocab {m['vocab_size']})")
    return 0
