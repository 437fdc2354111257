"""ParallaxAttention against independent float64 math: projections, norms, RoPE on q/k/r, GQA, gate, window."""

import math

import pytest
import torch

from parallax_attention.nn import ParallaxAttention, RMSNorm, RotaryEmbedding

transformers = pytest.importorskip("transformers")
from transformers.cache_utils import DynamicCache  # noqa: E402


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, theta):
    """Rotate pairs (i, i + D/2) by pos * theta^(-2i/D): written as explicit 2x2 rotations.

    Angles in float32, as Hugging Face Llama/Qwen compute them (converted checkpoints must match).
    """
    d = x.shape[-1]
    half = d // 2
    freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = pos.float()[:, None] * freq[None, :]                        # (L, D/2)
    c = torch.cos(ang).double()[None, :, None, :]
    s = torch.sin(ang).double()[None, :, None, :]
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * c - b * s, a * s + b * c], dim=-1)


def naive_layer(layer, x, pos=None):
    """The layer's function from its weights, in float64, one query at a time."""
    sd = {k: v.double() for k, v in layer.state_dict().items()}
    x = x.double()
    bsz, n, _ = x.shape
    hq, hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    pos = torch.arange(n) if pos is None else pos

    def proj(name, heads):
        y = x @ sd[f"{name}.weight"].T
        if f"{name}.bias" in sd:
            y = y + sd[f"{name}.bias"]
        return y.view(bsz, n, heads, d)

    eps = 1e-6
    q, k, v = proj("q_proj", hq), proj("k_proj", hkv), proj("v_proj", hkv)
    if layer.q_norm is not None:
        q, k = _rms(q, sd["q_norm.weight"], eps), _rms(k, sd["k_norm.weight"], eps)
    theta = layer.rotary.theta
    q, k = _rope(q, pos, theta), _rope(k, pos, theta)
    r = torch.zeros_like(q)
    if layer.attention == "parallax":
        r = proj("r_proj", hq)
        if layer.r_norm is not None:
            r = _rms(r, sd["r_norm.weight"], eps)
        if layer.probe_rope:
            r = _rope(r, pos, theta)
        if layer.r_gate is not None:
            r = r * torch.sigmoid(x @ sd["r_gate.weight"].T)[..., None]
    left = layer.window_size[0]
    out = torch.zeros(bsz, n, hq, d, dtype=torch.float64)
    for b in range(bsz):
        for h in range(hq):
            g = h // (hq // hkv)
            for i in range(n):
                j0 = 0 if left < 0 else max(0, i - left)
                kk, vv = k[b, j0:i + 1, g], v[b, j0:i + 1, g]
                p = torch.softmax(kk @ q[b, i, h] / math.sqrt(d), dim=0)
                t = kk @ r[b, i, h]
                w = p * (1 + (p * t).sum() - t)
                out[b, i, h] = w @ vv
    o = out.reshape(bsz, n, hq * d) @ sd["o_proj.weight"].T
    if "o_proj.bias" in sd:
        o = o + sd["o_proj.bias"]
    return o


def _randomize(layer, scale=0.3):
    """Random weights everywhere (norm weights around 1, biases non-zero) so every term shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("kw", [
    dict(num_heads=4, num_kv_heads=2),
    dict(num_heads=4, num_kv_heads=1, qk_norm=False, qkv_bias=True, o_bias=False),
    dict(num_heads=2, num_kv_heads=2, probe_gate="head", attention_bias=True),
    dict(num_heads=4, num_kv_heads=2, probe_rope=False, probe_norm=False),
    dict(num_heads=4, num_kv_heads=2, window_size=(3, 0)),
    dict(num_heads=4, num_kv_heads=2, attention="softmax"),
    dict(num_heads=4, num_kv_heads=2, attention="softmax", window_size=(2, 0)),
])
def test_layer_matches_naive_math(kw):
    torch.manual_seed(0)
    layer = _randomize(ParallaxAttention(32, head_dim=8, rope_theta=100.0, **kw)).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (2, 9, 32)
    torch.testing.assert_close(out, naive_layer(layer, x), rtol=1e-9, atol=1e-9)


def test_zero_probe_is_softmax_attention():
    torch.manual_seed(0)
    plx = ParallaxAttention(32, 4, 2, 8, probe_init="zeros")
    assert plx.r_proj.weight.abs().sum() == 0
    _randomize(plx)
    with torch.no_grad():
        plx.r_proj.weight.zero_()
    soft = ParallaxAttention(32, 4, 2, 8, attention="softmax")
    missing = soft.load_state_dict(plx.state_dict(), strict=False)
    assert set(missing.unexpected_keys) == {"r_proj.weight", "r_norm.weight"} and not missing.missing_keys
    # in float64, so the identity is checked and not the two paths' fp32 rounding (their orders differ:
    # one fp32 gradient element of 1632 was 1.4e-5 apart on one CPU)
    plx.double()
    soft.double()
    x = torch.randn(3, 17, 32, dtype=torch.float64, requires_grad=True)
    o1, o2 = plx(x), soft(x)
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    g1, = torch.autograd.grad(o1.square().sum(), x)
    g2, = torch.autograd.grad(o2.square().sum(), x)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5)
    # ... and a non-zero probe changes the output.
    with torch.no_grad():
        plx.r_proj.weight.normal_()
    assert (plx(x) - o2).abs().max() > 1e-2


def test_probe_gate_scales_the_probe():
    # With g = 0 the gate is sigmoid(0) = 1/2 on every head: the same as halving r without a gate
    # (probe_norm off, so halving W_R halves r).
    torch.manual_seed(0)
    gated = _randomize(ParallaxAttention(32, 4, 2, 8, probe_gate="head", probe_norm=False))
    with torch.no_grad():
        gated.r_gate.weight.zero_()
    plain = ParallaxAttention(32, 4, 2, 8, probe_norm=False)
    sd = {k: v for k, v in gated.state_dict().items() if not k.startswith("r_gate")}
    sd["r_proj.weight"] = sd["r_proj.weight"] / 2
    plain.load_state_dict(sd)
    x = torch.randn(2, 11, 32)
    torch.testing.assert_close(gated(x), plain(x), rtol=1e-5, atol=1e-6)
    out = gated(x)
    out.square().sum().backward()
    assert gated.r_gate.weight.grad is not None and gated.r_gate.weight.grad.abs().max() > 0


@pytest.mark.parametrize("attention", ["parallax", "softmax"])
def test_kv_cache_steps_equal_full_forward(attention):
    torch.manual_seed(0)
    layer = _randomize(ParallaxAttention(32, 4, 2, 8, attention=attention, layer_idx=0)).eval()
    x = torch.randn(2, 32, 32)
    full = layer(x)
    cache = DynamicCache()
    with torch.no_grad():
        parts = [layer(x[:, :5], cache=cache)]
        parts += [layer(x[:, i:i + 1], cache=cache) for i in range(5, 9)]
        parts.append(layer(x[:, 9:12], cache=cache))    # a short chunk after the cache (decode op)
        parts.append(layer(x[:, 12:], cache=cache))     # a long chunk (training op on the cache)
    assert cache.get_seq_length() == 32
    # Only k and v are cached.
    assert cache.layers[0].keys.shape == (2, 2, 32, 8)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [(-1, -1), (2, -1), (2, 1)])
@pytest.mark.parametrize("attention", ["parallax", "softmax"])
def test_left_padding_mask(attention, window):
    # A left-padded row gives the same outputs on its real tokens as the row alone; the padded
    # path's mask is the op's (causal clamps a right window to 0).
    torch.manual_seed(0)
    layer = _randomize(ParallaxAttention(32, 4, 2, 8, attention=attention, window_size=window))
    x = torch.randn(1, 7, 32)
    pad = torch.randn(1, 3, 32) * 5
    xp = torch.cat([pad, x], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    pos = torch.tensor([[0, 0, 0] + list(range(7))])
    out = layer(xp, attention_mask=mask, position_ids=pos)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 3:], layer(x), rtol=1e-5, atol=1e-5)


def test_rmsnorm_and_rotary_relative_positions():
    norm = RMSNorm(8, eps=0.0)
    x = torch.randn(5, 8)
    torch.testing.assert_close(norm(x).square().mean(-1), torch.ones(5))
    # RoPE makes q.k depend on the position difference only.
    rot = RotaryEmbedding(8, theta=100.0)
    from parallax_attention.nn import apply_rotary
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def dot(i, j):
        ci, si = rot(torch.tensor([[i]]), torch.float32)
        cj, sj = rot(torch.tensor([[j]]), torch.float32)
        return (apply_rotary(q, ci, si) * apply_rotary(k, cj, sj)).sum()

    torch.testing.assert_close(dot(7, 3), dot(14, 10), rtol=1e-5, atol=1e-5)
    assert abs(dot(7, 3) - dot(7, 4)) > 1e-4


def test_argument_errors():
    with pytest.raises(ValueError, match="attention"):
        ParallaxAttention(32, 4, attention="linear")
    with pytest.raises(ValueError, match="num_kv_heads"):
        ParallaxAttention(32, 4, 3)
    with pytest.raises(ValueError, match="probe_gate"):
        ParallaxAttention(32, 4, probe_gate="token")
    with pytest.raises(ValueError, match="window_size"):
        ParallaxAttention(32, 4, window_size=(-2, 0))
    with pytest.raises(ValueError, match="head_dim"):
        ParallaxAttention(30, 4)
    layer = ParallaxAttention(32, 4)
    with pytest.raises(ValueError, match="attention_mask"):
        layer(torch.randn(2, 5, 32), attention_mask=torch.ones(2, 4))
