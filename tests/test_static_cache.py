"""StaticKVCache and StaticGenerator: step-by-step logits equal the full forward, greedy tokens equal
transformers' generate(), the device-length path (what a CUDA graph replays) equals the host-length path."""

import pytest
import torch

pytest.importorskip("transformers")
from parallax_attention.models import ParallaxConfig, ParallaxForCausalLM, StaticGenerator  # noqa: E402
from parallax_attention.nn import StaticKVCache  # noqa: E402

ATTENTIONS = ["parallax", "softmax"]


def _model(attention="parallax", seed=0, **overrides):
    torch.manual_seed(seed)
    model = ParallaxForCausalLM(ParallaxConfig.from_preset("tiny", attention=attention, **overrides)).eval()
    if attention == "parallax":
        with torch.no_grad():  # a probe large enough to change the model's choices
            for layer in model.model.layers:
                layer.self_attn.r_proj.weight.normal_(0, 0.5)
    return model


def _cache(model, batch, capacity):
    return StaticKVCache.for_model(model.config, batch, capacity, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("device_lengths", [False, True])
@torch.no_grad()
def test_stepwise_logits_equal_full_forward(attention, window, device_lengths):
    # Prefill 20 tokens (a chunk longer than a decode step), then steps of 1, 3 and 1 tokens; every
    # step's logits must equal the uncached forward over the whole sequence at those positions.
    model = _model(attention, attention_window=window)
    ids = torch.randint(0, 1024, (2, 25))
    full = model(ids).logits
    cache = _cache(model, 2, 32)
    got = [model(input_ids=ids[:, :20], cache=cache).logits]
    assert cache.length == 20 and cache.seqlens.tolist() == [20, 20]
    pos = 20
    for n in (1, 3, 1):
        if device_lengths:
            cache.length = None  # what a replayed graph sees: lengths only on the device
        got.append(model(input_ids=ids[:, pos:pos + n], cache=cache).logits)
        pos += n
    assert cache.seqlens.tolist() == [25, 25]
    torch.testing.assert_close(torch.cat(got, 1), full, atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_stepwise_triton_kernels_on_strided_cache_views():
    # The cache hands the kernels (batch, capacity, heads, dim) views of (batch, heads, capacity, dim)
    # storage; the Triton decode kernel (interpreted on the CPU) must read them right.
    model = _model("parallax", attention_window=6)
    ids = torch.randint(0, 1024, (2, 22))
    full = model(ids).logits
    for layer in model.model.layers:
        layer.self_attn.backend = "triton"
    cache = _cache(model, 2, 24)
    got = [model(input_ids=ids[:, :18], cache=cache).logits]
    cache.length = None
    for pos, n in ((18, 2), (20, 1), (21, 1)):
        got.append(model(input_ids=ids[:, pos:pos + n], cache=cache).logits)
    torch.testing.assert_close(torch.cat(got, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_generator_equals_transformers_generate(attention):
    model = _model(attention)
    prompt = torch.randint(0, 1024, (3, 9))
    ref = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    gen = StaticGenerator(model, batch_size=3, capacity=24)
    out = gen.generate(prompt, max_new_tokens=12)
    assert out.shape == (3, 21)
    assert torch.equal(out, ref)
    # The generator reuses its cache: a second call with another prompt starts from scratch.
    prompt2 = torch.randint(0, 1024, (3, 5))
    ref2 = model.generate(prompt2, max_new_tokens=7, min_new_tokens=7, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    assert torch.equal(gen.generate(prompt2, max_new_tokens=7), ref2)
    assert gen.cache.length == 5 + 7 - 1


def test_generator_eos_pads_and_stops():
    model = _model()
    prompt = torch.randint(0, 1024, (2, 6))
    free = StaticGenerator(model, 2, 80).generate(prompt, max_new_tokens=70)
    eos = int(free[0, 6 + 3])  # the 4th token of sequence 0 becomes eos
    out = StaticGenerator(model, 2, 80).generate(prompt, max_new_tokens=70, eos_token_id=eos, pad_token_id=7)
    new, ref = out[:, 6:], free[:, 6:]
    for b in range(2):
        hits = (ref[b] == eos).nonzero()
        stop = int(hits[0]) if len(hits) else ref.shape[1]
        assert torch.equal(new[b, :stop + 1], ref[b, :stop + 1])
        assert (new[b, stop + 1:] == 7).all()
    if all((ref[b] == eos).any() for b in range(2)):
        assert out.shape[1] < free.shape[1]  # stopped early once both had finished


def test_static_cache_errors():
    model = _model()
    cache = _cache(model, 2, 8)
    with torch.no_grad():
        with pytest.raises(ValueError, match="capacity"):
            model(input_ids=torch.randint(0, 1024, (2, 9)), cache=cache)
        with pytest.raises(ValueError, match="batch"):
            model(input_ids=torch.randint(0, 1024, (3, 4)), cache=cache)
        with pytest.raises(ValueError, match="attention_mask"):
            model(input_ids=torch.randint(0, 1024, (2, 4)), attention_mask=torch.tensor([[0, 1, 1, 1]] * 2),
                  cache=cache)
        with pytest.raises(ValueError, match="set_length"):
            model(input_ids=torch.randint(0, 1024, (2, 17)), cache=_unknown_length_cache(model))
    with pytest.raises(ValueError, match="inference"):
        model(input_ids=torch.randint(0, 1024, (2, 4)), cache=_cache(model, 2, 8))
    with pytest.raises(ValueError, match="capacity"):
        StaticKVCache(2, 1, 0, 2, 32)
    gen = StaticGenerator(model, 2, 10)
    with pytest.raises(ValueError, match="capacity"):
        gen.generate(torch.randint(0, 1024, (2, 6)), max_new_tokens=5)
    with pytest.raises(ValueError, match="batch"):
        gen.generate(torch.randint(0, 1024, (1, 6)), max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids"):
        gen.generate(torch.randint(0, 1024, (2, 6)).int(), max_new_tokens=2)
    with pytest.raises(ValueError, match="cuda_graph"):
        StaticGenerator(model, 2, 10, cuda_graph=True)


def _unknown_length_cache(model):
    cache = _cache(model, 2, 64)
    cache.length = None
    return cache


def test_visible_mask_matches_positions():
    cache = StaticKVCache(1, 2, 12, 1, 8)
    cache.seqlens.copy_(torch.tensor([3, 6], dtype=torch.int32))
    cache.length = None
    mask = cache.visible(2, (2, 0), group=2)
    assert mask.shape == (2, 1, 4, 12)
    for b, n in enumerate((3, 6)):
        for g in range(2):
            for i in range(2):
                p = n + i
                want = [(p - 2 <= j <= p) for j in range(12)]
                assert mask[b, 0, g * 2 + i].tolist() == want


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_generator_ragged_prompts_equal_one_by_one(attention, padding):
    # Prompts of 9, 4 and 6 tokens in one padded batch: each continues exactly as it does alone.
    model = _model(attention)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 1024, (n,), generator=g) for n in (9, 4, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        sl = slice(width - len(p), width) if padding == "left" else slice(0, len(p))
        ids[i, sl] = p
        mask[i, sl] = 1
    out = StaticGenerator(model, 3, width + 10).generate(ids, max_new_tokens=10, attention_mask=mask)
    assert out.shape == (3, width + 10) and torch.equal(out[:, :width], ids)
    for i, p in enumerate(prompts):
        alone = StaticGenerator(model, 1, 32).generate(p[None], max_new_tokens=10)
        assert torch.equal(out[i, width:], alone[0, len(p):]), i


def test_generator_rejects_holes_in_the_mask():
    model = _model()
    gen = StaticGenerator(model, 2, 16)
    ids = torch.randint(0, 1024, (2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        gen.generate(ids, 3, attention_mask=torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="attention_mask"):
        gen.generate(ids, 3, attention_mask=torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="attention_mask"):
        gen.generate(ids, 3, attention_mask=torch.ones(2, 4))


def test_select_tokens_samples_the_filtered_softmax():
    from parallax_attention.models.generation import select_tokens
    probs = torch.tensor([0.5, 0.3, 0.1, 0.07, 0.03], dtype=torch.float64)
    logits = probs.log().float()[None].expand(60000, -1)
    torch.manual_seed(0)

    def freq(**kw):
        return torch.bincount(select_tokens(logits, do_sample=True, **kw), minlength=5).double() / logits.shape[0]
    cases = [(dict(), probs),
             (dict(temperature=0.5), probs ** 2 / (probs ** 2).sum()),
             (dict(top_k=2), torch.tensor([0.625, 0.375, 0, 0, 0], dtype=torch.float64)),
             (dict(top_p=0.6), torch.tensor([0.625, 0.375, 0, 0, 0], dtype=torch.float64)),
             (dict(top_p=0.85), torch.tensor([5, 3, 1, 0, 0], dtype=torch.float64) / 9),
             (dict(top_k=4, top_p=0.99, temperature=2.0), None)]
    for kw, want in cases:
        got = freq(**kw)
        if want is None:  # temperature 2 over the top 4, nucleus 0.99 of that
            p = probs[:4].sqrt() / probs[:4].sqrt().sum()
            want = torch.cat([p, torch.zeros(1, dtype=torch.float64)])
        assert (got - want).abs().max() < 0.01, (kw, got, want)
    assert torch.equal(select_tokens(logits[:3]), torch.zeros(3, dtype=torch.long))


def test_generator_sampling():
    model = _model()
    prompt = torch.randint(0, 1024, (2, 6))
    gen = StaticGenerator(model, 2, 40)
    greedy = gen.generate(prompt, max_new_tokens=12)
    assert torch.equal(gen.generate(prompt, max_new_tokens=12, do_sample=True, top_k=1), greedy)
    torch.manual_seed(1)
    a = gen.generate(prompt, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=3)
    torch.manual_seed(1)
    b = gen.generate(prompt, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, greedy)
    # every sampled token is among the top 3 of the logits that preceded it
    with torch.no_grad():
        logits = model(a).logits[:, 5:-1]
    top3 = torch.topk(logits, 3, dim=-1).indices
    assert (top3 == a[:, 6:, None]).any(-1).all()
    for bad in (dict(temperature=0.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            gen.generate(prompt, max_new_tokens=2, do_sample=True, **bad)


def test_generator_full_mask_is_the_unpadded_path():
    model = _model()
    prompt = torch.randint(0, 1024, (2, 7))
    gen = StaticGenerator(model, 2, 20)
    out = gen.generate(prompt, max_new_tokens=6, attention_mask=torch.ones(2, 7, dtype=torch.long))
    assert gen.cache.length == 7 + 6 - 1  # host-known lengths, as without a mask
    assert torch.equal(out, gen.generate(prompt, max_new_tokens=6))
