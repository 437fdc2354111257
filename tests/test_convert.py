"""Conversion of small random Qwen3 / Qwen2 / Llama checkpoints (built offline) to parallax_qwen3."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,  # noqa: E402
                          Qwen3Config, Qwen3ForCausalLM)

from parallax_attention.cli import main as plx_main  # noqa: E402
from parallax_attention.models import ConversionError, ParallaxForCausalLM, convert_checkpoint  # noqa: E402

COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

CASES = {
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(head_dim=32, tie_word_embeddings=True)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=False)),
    "llama": (LlamaForCausalLM, LlamaConfig, dict(attention_bias=True, mlp_bias=True,
                                                  rope_parameters={"rope_theta": 5000.0, **LLAMA3_ROPE})),
    "llama-linear": (LlamaForCausalLM, LlamaConfig, dict(
        head_dim=8, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0})),
}


def _source(kind, seed=0):
    cls, cfg_cls, extra = CASES[kind]
    torch.manual_seed(seed)
    model = cls(cfg_cls(**COMMON, **extra)).eval()
    # Random values everywhere (biases and norm weights too), so a dropped or misplaced tensor shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


def _save(model, path, **kw):
    model.save_pretrained(path, **kw)
    # Tokenizer files travel with the checkpoint byte for byte.
    (path / "tokenizer_config.json").write_text('{"model_max_length": 512}\n')
    (path / "tokenizer.json").write_text('{"version": "1.0", "marker": "%s"}\n' % path.name)
    return path


def _greedy(model, prompt, use_cache=True, n=10):
    return model.generate(prompt, max_new_tokens=n, do_sample=False, use_cache=use_cache, pad_token_id=0)


@pytest.mark.parametrize("kind", list(CASES))
def test_convert_reproduces_source_then_probe_moves_it(kind, tmp_path):
    src_model = _source(kind)
    src = _save(src_model, tmp_path / "src")
    dst = convert_checkpoint(src, tmp_path / "dst")
    for f in ("tokenizer_config.json", "tokenizer.json"):
        assert (dst / f).read_bytes() == (src / f).read_bytes()
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "parallax_qwen3" and cfg["attention"] == "parallax"
    assert cfg["qk_norm"] == (kind == "qwen3")

    model = ParallaxForCausalLM.from_pretrained(dst).eval()
    layer = model.model.layers[1].self_attn
    assert layer.r_proj.weight.abs().max() == 0 and torch.equal(layer.r_norm.weight, torch.ones(layer.head_dim))
    torch.manual_seed(1)
    ids = torch.randint(0, 160, (2, 48))
    with torch.no_grad():
        ref, got = src_model(ids).logits, model(ids).logits
    assert (ref - got).abs().max() <= 1e-4
    prompt = ids[:, :7]
    assert torch.equal(_greedy(src_model, prompt), _greedy(model, prompt))

    # Fine-tuning starts from here: a non-zero probe moves the logits, and the KV cache (k, v only)
    # still gives the same generation as recomputing everything.
    with torch.no_grad():
        for blk in model.model.layers:
            blk.self_attn.r_proj.weight.normal_(0, 0.5)
        moved = model(ids).logits
    assert (moved - ref).abs().max() > 1e-2
    assert torch.equal(_greedy(model, prompt, True, 12), _greedy(model, prompt, False, 12))


def test_sharded_safetensors_and_dtype(tmp_path):
    src_model = _source("qwen3", seed=2)
    src = _save(src_model, tmp_path / "src", max_shard_size="60KB")
    assert (src / "model.safetensors.index.json").is_file()
    dst = convert_checkpoint(src, tmp_path / "dst", dtype="bfloat16")
    from safetensors import safe_open
    shards = [f for f in os.listdir(dst) if f.endswith(".safetensors")]
    with safe_open(dst / shards[0], framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    model = ParallaxForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    ids = torch.randint(0, 160, (1, 20))
    with torch.no_grad():
        for prm in src_model.parameters():  # the same rounded weights (buffers such as RoPE untouched)
            prm.copy_(prm.to(torch.bfloat16).float())
        ref = src_model(ids).logits
        assert (ref - model(ids).logits).abs().max() <= 1e-4


def test_pytorch_bin_checkpoint(tmp_path):
    src_model = _source("llama", seed=3)
    src = tmp_path / "src"
    src_model.config.save_pretrained(src)
    torch.save(src_model.state_dict(), src / "pytorch_model.bin")
    dst = convert_checkpoint(src, tmp_path / "dst", dtype="float32")
    model = ParallaxForCausalLM.from_pretrained(dst).eval()
    ids = torch.randint(0, 160, (2, 24))
    with torch.no_grad():
        assert (src_model(ids).logits - model(ids).logits).abs().max() <= 1e-4


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _bad(src, dst, match, **kw):
    with pytest.raises(ConversionError, match=match):
        convert_checkpoint(src, dst, **kw)
    assert not dst.exists()
    assert _leftovers(dst.parent) == []


def test_bad_inputs_write_nothing(tmp_path):
    good = _save(_source("qwen2"), tmp_path / "good")
    out = tmp_path / "out"
    out.mkdir()

    def variant(name, edit_cfg=None, drop=None):
        d = tmp_path / name
        d.mkdir()
        for f in good.iterdir():
            if f.name != drop:
                (d / f.name).write_bytes(f.read_bytes())
        if edit_cfg:
            cfg = json.loads((d / "config.json").read_text())
            edit_cfg(cfg)
            (d / "config.json").write_text(json.dumps(cfg))
        return d

    _bad(variant("gpt2", lambda c: c.update(model_type="gpt2")), out / "a", "model_type 'gpt2'")
    _bad(variant("nocfg", drop="config.json"), out / "b", "config.json")
    _bad(variant("noweights", drop="model.safetensors"), out / "c", "no weights")
    _bad(variant("shape", lambda c: c.update(intermediate_size=128)), out / "d", "shape")
    _bad(variant("layers", lambda c: c.update(num_hidden_layers=3)), out / "e", "missing")
    _bad(variant("sliding", lambda c: c.update(use_sliding_window=True)), out / "f", "sliding")
    _bad(variant("yarn", lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                             "rope_theta": 1e4})), out / "g", "yarn")
    _bad(good, out / "h", "dtype", dtype="int8")
    shard = variant("shards")
    (shard / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    _bad(shard, out / "i", "missing")
    _bad(tmp_path / "nowhere", out / "j", "not a directory")


def test_existing_destination(tmp_path):
    src = _save(_source("qwen3"), tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty"):
        convert_checkpoint(src, dst)
    assert (dst / "keep.txt").read_text() == "mine"
    convert_checkpoint(src, dst, overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    assert _leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    convert_checkpoint(src, empty)  # an empty directory is fine
    assert (empty / "model.safetensors").is_file()


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    src = _save(_source("qwen3"), tmp_path / "src")
    import safetensors.torch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists() and _leftovers(tmp_path) == []


def test_cli(tmp_path, capsys):
    src = _save(_source("qwen2"), tmp_path / "src")
    assert plx_main(["convert", str(src), str(tmp_path / "dst"), "--dtype", "float16", "--no-progress"]) == 0
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["dtype"] == "float16"
    assert plx_main(["convert", str(src), str(tmp_path / "dst")]) == 2
    assert "not empty" in capsys.readouterr().err
