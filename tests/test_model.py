"""ParallaxForCausalLM: presets, loss, save/load, Auto classes, generation with and without the KV cache."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
from parallax_attention.models import ParallaxConfig, ParallaxForCausalLM  # noqa: E402


def _model(seed=0, probe_scale=None, **overrides):
    torch.manual_seed(seed)
    model = ParallaxForCausalLM(ParallaxConfig.from_preset("tiny", **overrides)).eval()
    if probe_scale is not None:
        # Make the probe large enough to change the model's choices.
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.r_proj.weight.normal_(0, probe_scale)
    return model


def test_presets():
    tiny = _model()
    n = sum(p.numel() for p in tiny.parameters())
    assert 100_000 <= n <= 1_000_000
    assert tiny.lm_head.weight is tiny.model.embed_tokens.weight  # tied
    big = ParallaxConfig.from_preset("0.6b")
    assert (big.hidden_size, big.num_hidden_layers, big.num_attention_heads, big.num_key_value_heads,
            big.head_dim, big.intermediate_size, big.tie_word_embeddings) == (1024, 28, 16, 8, 128, 3072, True)
    assert ParallaxConfig.from_preset("1.7b").hidden_size == 2048
    assert ParallaxConfig.from_preset("tiny", attention="softmax").attention == "softmax"
    with pytest.raises(ValueError, match="preset"):
        ParallaxConfig.from_preset("7b")
    with pytest.raises(ValueError, match="attention"):
        ParallaxConfig.from_preset("tiny", attention="linear")


def test_labels_loss_is_shifted_cross_entropy():
    model = _model()
    ids = torch.randint(0, 1024, (2, 16))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(input_ids=ids, labels=labels)
    logits = out.logits
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, 1024), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    out.loss.backward()
    assert model.model.layers[0].self_attn.r_proj.weight.grad.abs().max() > 0


def test_gradient_checkpointing_same_gradients():
    model = _model(probe_scale=0.1).train()
    ids = torch.randint(0, 1024, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    assert model.model.gradient_checkpointing
    model(input_ids=ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6)


def test_save_load_round_trip(tmp_path):
    model = _model(probe_scale=0.5, probe_gate="head")
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "parallax_qwen3" and cfg["probe_gate"] == "head"
    assert (tmp_path / "model.safetensors").is_file()
    loaded = ParallaxForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 1024, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_auto_classes_after_importing_the_package(tmp_path):
    # A fresh interpreter: `import parallax_attention` alone must make the Auto classes work.
    _model(probe_scale=0.5).save_pretrained(tmp_path)
    code = (
        "import sys, parallax_attention\n"
        "assert 'transformers.modeling_utils' not in sys.modules\n"
        "from transformers import AutoConfig, AutoModel, AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "print(type(m).__name__, type(AutoModel.from_config(m.config)).__name__, "
        f"type(AutoConfig.from_pretrained({str(tmp_path)!r})).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ParallaxForCausalLM", "ParallaxModel", "ParallaxConfig"]


@pytest.mark.parametrize("attention", ["parallax", "softmax"])
def test_generation_cache_equals_no_cache(attention):
    model = _model(probe_scale=0.5 if attention == "parallax" else None, attention=attention)
    if attention == "softmax":
        assert all(layer.self_attn.r_proj is None for layer in model.model.layers)
    prompt = torch.randint(0, 1024, (3, 9))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **kw)
    uncached = model.generate(prompt, use_cache=False, **kw)
    assert cached.shape == (3, 21)
    assert torch.equal(cached, uncached)


def test_probe_changes_generation():
    # The cache test above is only meaningful if the probe matters: with a zero probe the model
    # is the softmax model and its logits differ.
    model = _model(probe_scale=0.5)
    ids = torch.randint(0, 1024, (2, 12))
    with torch.no_grad():
        with_probe = model(ids).logits
        for layer in model.model.layers:
            layer.self_attn.r_proj.weight.zero_()
        without = model(ids).logits
    assert (with_probe - without).abs().max() > 1e-2


def test_left_padded_batch_generation_matches_single():
    model = _model(probe_scale=0.5)
    torch.manual_seed(3)
    a, b = torch.randint(1, 1024, (1, 10)), torch.randint(1, 1024, (1, 6))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    out = model.generate(batch, attention_mask=mask, **kw)
    assert torch.equal(out[0, 10:], model.generate(a, **kw)[0, 10:])
    assert torch.equal(out[1, 10:], model.generate(b, **kw)[0, 6:])


def test_autocast_training_step():
    # float32 weights under bfloat16 autocast (the norms return float32, the linears bfloat16).
    model = _model(probe_scale=0.1).train()
    ids = torch.randint(0, 1024, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.layers[0].self_attn.r_proj.weight.grad.abs().max() > 0


def test_model_benchmark_smoke(tmp_path):
    import pathlib
    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "model.py"
    out = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "model_bench.json").read_text())["rows"]
    assert [r["section"] for r in rows] == ["train fwd+bwd"] + ["generate", "generate, StaticGenerator (static cache)"] * 2
    assert all(r["softmax_tok_s"] > 0 and r["parallax_tok_s"] > 0 and not r["note"] for r in rows)
    assert out.stdout.rstrip().splitlines()[-1].startswith("| generate")
