"""The fused per-head RMSNorm + RoPE kernels (forward and backward) against the layer's modules and float64.

Runs under TRITON_INTERPRET=1 on machines without CUDA (set in conftest).
"""

import pytest
import torch

from parallax_attention.nn import RMSNorm, RotaryEmbedding
from parallax_attention.nn.rotary import apply_rotary
from parallax_attention.ops.triton.norm_rope import norm_rope_triton


def _inputs(b, l, h, d, dtype, cos_batch, seed):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(b, l, h, d, generator=g)).to(dtype)
    norm = RMSNorm(d, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(d, generator=g))
    norm = norm.to(dtype)
    pos = torch.randint(0, 5000, (b if cos_batch else 1, l), generator=g)
    cos, sin = RotaryEmbedding(d, 1e6)(pos, dtype)
    return x, norm, cos.contiguous(), sin.contiguous()


def _ulp(dtype):
    return {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 3, 32), (1, 7, 2, 24), (3, 1, 4, 64)], ids=["d32", "d24_unpadded_half", "decode"])
@pytest.mark.parametrize("cos_batch", [False, True])
@pytest.mark.parametrize("parts", ["norm_rope", "rope_only", "norm_only"])
def test_matches_modules(dtype, shape, cos_batch, parts):
    x, norm, cos, sin = _inputs(*shape, dtype, cos_batch, seed=hash((shape, str(dtype), cos_batch, parts)) % 2**31)
    use_norm, use_rope = parts != "rope_only", parts != "norm_only"
    with torch.no_grad():
        ref = x
        if use_norm:
            ref = norm(ref)
        if use_rope:
            ref = apply_rotary(ref, cos, sin)
        # float64 composition of the same formula, for the size of the error
        exact = x.double()
        if use_norm:
            exact = norm.weight.double() * (exact * torch.rsqrt(exact.pow(2).mean(-1, keepdim=True) + 1e-6))
        if use_rope:
            exact = apply_rotary(exact, cos.double(), sin.double())
        out = norm_rope_triton(x, norm.weight if use_norm else None, norm.eps, cos if use_rope else None,
                               sin if use_rope else None)
    assert out.dtype == dtype and out.shape == x.shape
    if parts == "rope_only" and dtype != torch.float32:
        # products of 2-byte values are exact in fp32: the same roundings as eager, the same bits
        assert torch.equal(out, ref)
    scale = exact.abs().amax().item()
    # one unit in the last place from the norm's summation order, at most
    assert (out.double() - ref.double()).abs().max().item() <= 4 * _ulp(dtype) * scale
    assert (out.double() - exact).abs().max().item() <= 4 * _ulp(dtype) * scale


@pytest.mark.parametrize("qk_norm,probe_norm,probe_rope", [(True, True, True), (False, True, False), (True, False, True)])
def test_layer_uses_the_kernel_like_the_modules(qk_norm, probe_norm, probe_rope, monkeypatch):
    # The layer's wiring of the fused path (weights, eps, positions, probe options): forced on
    # (it runs only for CUDA inference otherwise) against the modules, in fp32.
    import parallax_attention.nn.attention as attn_mod
    from parallax_attention.nn import ParallaxAttention

    torch.manual_seed(0)
    layer = ParallaxAttention(64, 4, 2, 16, qk_norm=qk_norm, probe_norm=probe_norm, probe_rope=probe_rope,
                              backend="torch").eval()
    with torch.no_grad():
        for norm in (layer.q_norm, layer.k_norm, layer.r_norm):
            if norm is not None:
                norm.weight.normal_(1.0, 0.3)
    x = torch.randn(2, 7, 64)
    pos = torch.arange(3, 10)[None]
    with torch.no_grad():
        ref = layer(x, position_ids=pos)
        calls = []
        real = attn_mod._fusable
        monkeypatch.setattr(attn_mod, "_fusable", lambda *a: calls.append(1) or real(*a) or True)
        out = layer(x, position_ids=pos)
    assert len(calls) == 3  # q, k and the probe
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _exact(x, w, cos, sin, eps):
    """float64 composition of the modules' formula."""
    y = x.double()
    if w is not None:
        y = w.double() * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps))
    if cos is not None:
        y = apply_rotary(y, cos.double(), sin.double())
    return y


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                    (torch.float16, torch.float16)], ids=["fp32", "fp16_autocast_w32", "fp16"])
@pytest.mark.parametrize("shape", [(2, 5, 3, 32), (1, 7, 2, 24), (2, 70, 2, 16)], ids=["d32", "d24", "many_programs"])
@pytest.mark.parametrize("cos_batch", [False, True])
@pytest.mark.parametrize("parts", ["norm_rope", "rope_only", "norm_only"])
def test_backward_matches_float64_autograd(dtypes, shape, cos_batch, parts):
    xdt, wdt = dtypes
    x, norm, cos, sin = _inputs(*shape, torch.float32, cos_batch,
                                seed=hash((shape, str(dtypes), cos_batch, parts, "bwd")) % 2**31)
    use_norm, use_rope = parts != "rope_only", parts != "norm_only"
    w = norm.weight.detach().to(wdt).requires_grad_(True) if use_norm else None
    out_dt = torch.promote_types(xdt, wdt) if use_norm else xdt
    cos, sin = (cos.to(out_dt), sin.to(out_dt)) if use_rope else (None, None)
    x = x.to(xdt).requires_grad_(True)
    y = norm_rope_triton(x, w, 1e-6, cos, sin)
    assert y.dtype == out_dt
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(out_dt)
    got = torch.autograd.grad(y, [x] + ([w] if use_norm else []), dy)

    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True) if use_norm else None
    ref = _exact(x64, w64, cos, sin, 1e-6)
    grads = torch.autograd.grad(ref, [x64] + ([w64] if use_norm else []), dy.double())
    tol = 1e-5 if xdt == torch.float32 else 4e-3
    for g, want, dt in zip(got, grads, (xdt, wdt)):
        assert g.dtype == dt
        err = (g.double() - want).norm() / want.norm()
        assert err <= tol, (err.item(), tol)


def test_rejects_a_promoting_cos():
    x, norm, cos, sin = _inputs(1, 3, 2, 16, torch.float16, False, seed=0)
    with pytest.raises(TypeError, match="cos"):
        norm_rope_triton(x, norm.weight, 1e-6, cos.float(), sin.float())


def test_layer_training_grads_match_the_modules(monkeypatch):
    # The layer's training path through the fused autograd function (forced on; it runs on CUDA
    # otherwise) gives the modules' gradients for every parameter, fp32.
    import parallax_attention.nn.attention as attn_mod
    from parallax_attention.nn import ParallaxAttention

    torch.manual_seed(0)
    layer = ParallaxAttention(64, 4, 2, 16, backend="torch")
    with torch.no_grad():
        for norm in (layer.q_norm, layer.k_norm, layer.r_norm):
            norm.weight.normal_(1.0, 0.3)
    x = torch.randn(2, 9, 64)

    def grads():
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        layer(xx).square().sum().backward()
        return [xx.grad] + [p.grad for p in layer.parameters()]

    ref = grads()
    calls = []
    monkeypatch.setattr(attn_mod, "_fusable", lambda *a: calls.append(1) or True)
    got = grads()
    assert len(calls) == 3
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=2e-5, atol=2e-5)
