import json
from pathlib import Path

import numpy as np
import pytest

from parallax_attention.cli import main as plx_main
from parallax_attention.data import (
    BPETokenizer,
    ByteTokenizer,
    TokenShards,
    WindowSampler,
    embedded_files,
    is_validation,
    load_tokenizer,
    prepare,
    read_manifest,
    stdlib_root,
)

DOCS = {f"doc{i:02d}.txt": f"Document {i}: " + ("the quick brown fox jumps over the lazy dog. " * (i + 1)) + "é∑"
        for i in range(40)}


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    for name, text in DOCS.items():
        (d / name).write_text(text, encoding="utf-8")
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    return d


def _read_split(out: Path, split: str) -> np.ndarray:
    m = read_manifest(out)
    parts = [np.fromfile(out / s["file"], dtype=m["dtype"]) for s in m["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, m["dtype"])


def test_prepare_bytes_roundtrip_and_split(text_dir, tmp_path):
    out = tmp_path / "bytes"
    m = prepare(str(text_dir), out, tokenizer="bytes", val_fraction=0.2, shard_tokens=500, progress=False)
    assert m["dtype"] == "uint16" and m["vocab_size"] == 257 and m["eos_id"] == 256
    assert len(m["splits"]["train"]["shards"]) > 1  # the shard size forced several files
    assert all(s["tokens"] <= 500 for s in m["splits"]["train"]["shards"])
    tok = ByteTokenizer()
    for split in ("train", "val"):
        ids = _read_split(out, split)
        assert len(ids) == m["splits"][split]["tokens"]
        docs = [tok.decode(d) for d in np.split(ids, np.where(ids == 256)[0] + 1)[:-1]]
        want = [t for name, t in sorted(DOCS.items()) if is_validation(name, 0.2) == (split == "val")]
        assert docs == want
    assert m["splits"]["val"]["documents"] > 0 and m["splits"]["train"]["documents"] > 0
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_prepare_is_deterministic(text_dir, tmp_path):
    a = prepare(str(text_dir), tmp_path / "a", tokenizer="bytes", val_fraction=0.1, progress=False)
    b = prepare(str(text_dir), tmp_path / "b", tokenizer="bytes", val_fraction=0.1, progress=False)
    assert a["splits"] == b["splits"]
    for s in a["splits"]["train"]["shards"]:
        assert (tmp_path / "a" / s["file"]).read_bytes() == (tmp_path / "b" / s["file"]).read_bytes()


def test_prepare_bpe_saves_tokenizer_beside_shards(text_dir, tmp_path):
    out = tmp_path / "bpe"
    m = prepare(str(text_dir), out, tokenizer="bpe", vocab_size=300, val_fraction=0.1, progress=False)
    assert (out / "tokenizer.json").is_file() and m["tokenizer"]["kind"] == "bpe"
    tok = load_tokenizer(m["tokenizer"], out)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == m["vocab_size"] <= 300
    text = DOCS["doc03.txt"]
    assert tok.decode(tok.encode(text)) == text
    ids = _read_split(out, "train")
    assert ids.max() < m["vocab_size"] and (ids == m["eos_id"]).sum() == m["splits"]["train"]["documents"]
    # Merges were learned: fewer tokens than bytes.
    assert len(tok.encode(text)) < len(text.encode())


def test_prepare_cli_and_errors(text_dir, tmp_path, capsys):
    assert plx_main(["prepare", str(text_dir), str(tmp_path / "c"), "--tokenizer", "bytes", "--no-progress"]) == 0
    assert "train" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="SRC"):
        prepare(str(tmp_path / "missing"), tmp_path / "d", tokenizer="bytes", progress=False)
    with pytest.raises(FileNotFoundError, match="plx prepare"):
        read_manifest(tmp_path / "nothing")


def test_embedded_corpus_is_local_sorted_and_has_docs():
    files = embedded_files()
    root = stdlib_root()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 100
    assert "pydoc_data/topics.py" in rel  # the English language-reference text
    assert not any("/test/" in "/" + r for r in rel)
    assert embedded_files() == files


def test_token_shards_windows(text_dir, tmp_path):
    out = tmp_path / "w"
    m = prepare(str(text_dir), out, tokenizer="bytes", val_fraction=0.0, shard_tokens=300, progress=False)
    ds = TokenShards(out, "train", seq_len=16)
    ids = _read_split(out, "train")
    assert len(ds) == sum((s["tokens"] - 1) // 16 for s in m["splits"]["train"]["shards"])
    w0 = ds.window(0)
    assert w0.shape == (17,) and np.array_equal(w0, ids[:17])
    # Window 18 is the first of the second shard (300 tokens -> 18 windows per shard).
    assert np.array_equal(ds.window(18), ids[300:317])
    with pytest.raises(ValueError, match="split"):
        TokenShards(out, "test", 16)


def test_sampler_resume_and_coverage():
    s = WindowSampler(10, seed=3)
    first = np.concatenate([s.next_global(4) for _ in range(5)])  # 20 = two full epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    a = WindowSampler(10, seed=3)
    a.next_global(4)
    a.next_global(4)
    state = json.loads(json.dumps(a.state_dict()))
    b = WindowSampler(10, seed=3)
    b.load_state_dict(state)
    assert np.array_equal(np.concatenate([b.next_global(4) for _ in range(3)]), first[8:20])
    with pytest.raises(ValueError, match="different data"):
        WindowSampler(11, seed=3).load_state_dict(state)
