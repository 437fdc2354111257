"""The Parallax attention layer (and its softmax baseline) with Hugging Face parameter names.

    q = RoPE(q_norm(W_Q x)),  k = RoPE(k_norm(W_K x)),  v = W_V x
    r = gate(x) * RoPE(r_norm(W_R x))          # the probe, shaped like q
    o = W_O parallax_attn(q, r, k, v, causal)  # = softmax attention - Cov_p(v, k) r

With W_R = 0 the layer is exactly softmax attention, which is how pretrained checkpoints convert.
Only k and v go into a KV cache; r is recomputed every step like q.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._validation import normalize_window
from ..ops.masking import visible_mask as _op_visible_mask
from .kv_cache import StaticKVCache
from .norm import RMSNorm
from .rotary import RotaryEmbedding, apply_rotary

ATTENTIONS = ("parallax", "softmax")
PROBE_INITS = ("normal", "zeros")
PROBE_GATES = (None, "head")

# Decode steps (few new queries against a longer cache, no autograd) go through the KV-cache op,
# which is built for a handful of query rows; longer chunks go through the training op.
_DECODE_MAX_QUERIES = 16


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def _fusable(x: torch.Tensor, norm, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether norm + RoPE can run as the fused Triton kernels: eager CUDA on contiguous tensors whose
    dtypes the kernels follow (under torch.compile the modules are traced and fused by the compiler)."""
    if not x.is_cuda or x.shape[-1] % 2 or not x.is_contiguous() or torch.compiler.is_compiling():
        return False
    if cos.dim() != 3 or cos.dtype != sin.dtype or not (cos.is_contiguous() and sin.is_contiguous()):
        return False
    try:
        from ..ops.triton.norm_rope import output_dtype
    except ImportError:  # no triton
        return False
    return output_dtype(x, norm.weight if norm is not None else None, cos) is not None


def norm_rope(x: torch.Tensor, norm, cos: torch.Tensor, sin: torch.Tensor, rope: bool = True) -> torch.Tensor:
    """Per-head RMSNorm (a module, or None) then RoPE (when rope) of x (batch, seqlen, heads, head_dim).

    On CUDA both run as one Triton kernel per direction (a decode step is bound by kernel launches,
    a training step by the memory traffic of a dozen elementwise passes); other devices and traced
    graphs run the modules.
    """
    if (norm is not None or rope) and _fusable(x, norm, cos, sin):
        from ..ops.triton.norm_rope import norm_rope_triton
        return norm_rope_triton(x, norm.weight if norm is not None else None, norm.eps if norm is not None else 0.0,
                                cos if rope else None, sin if rope else None)
    if norm is not None:
        x = norm(x)
    return apply_rotary(x, cos, sin) if rope else x


def visible_mask(lq: int, lk: int, window: tuple[int, int], device, key_mask=None) -> torch.Tensor:
    """Boolean (batch or 1, 1, lq, lk) mask: the op's bottom-right causal window, minus padded keys."""
    vis = _op_visible_mask(torch.arange(lq, device=device), torch.arange(lk, device=device), lk - lq,
                           True, window)[None, None]
    if key_mask is not None:
        vis = vis & key_mask.bool()[:, None, None, :]
    return vis


def parallax_masked(q, r, k, v, vis, scale) -> torch.Tensor:
    """Parallax attention with an arbitrary boolean mask (batch or 1, 1, Lq, Lk), in float32.

    Materialises the scores, so it is the path for padded batches only. Rows with no visible key
    return zeros.
    """
    hq, hkv = q.shape[2], k.shape[2]
    q32, r32 = q.float().transpose(1, 2), r.float().transpose(1, 2)
    k32 = k.float().transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    v32 = v.float().transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    s = (scale * q32) @ k32.transpose(-1, -2)
    s = s.masked_fill(~vis, float("-inf"))
    any_vis = vis.any(-1, keepdim=True)
    s = torch.where(any_vis, s, torch.zeros_like(s))
    p = torch.softmax(s, dim=-1) * vis
    t = torch.where(vis, r32 @ k32.transpose(-1, -2), torch.zeros_like(s))
    tbar = (p * t).sum(-1, keepdim=True)
    o = (p * (1 + tbar - t)) @ v32
    return o.transpose(1, 2).to(q.dtype)


class ParallaxAttention(nn.Module):
    """Multi-head (GQA) attention layer: Parallax, or softmax attention as the baseline.

    Args:
        hidden_size: model width (input and output features).
        num_heads: query (and probe) heads.
        num_kv_heads: key/value heads; divides num_heads (default num_heads).
        head_dim: per-head width (default hidden_size // num_heads).
        attention: "parallax" or "softmax" (the same module without the probe; SDPA path).
        qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3); off for Llama/Qwen2.
        probe_norm: per-head RMSNorm on the probe r.
        rope_theta, rope_scaling: RoPE base and optional scaling ({"rope_type": "linear"|"llama3", ...}).
        probe_rope: apply RoPE to r with the query's positions.
        probe_init: "normal" (initialised like q_proj) or "zeros" (exact softmax attention at start).
        probe_gate: None, or "head": r is multiplied by a per-head sigmoid(g . x).
        window_size: (left, right) key window around the aligned position, -1 unbounded.
        attention_bias: bias on q/k/v/o projections (Qwen3/Llama `attention_bias`).
        qkv_bias: override for the q/k/v (and r) bias alone (Qwen2: True, with o_bias False).
        o_bias: override for the o_proj bias.
        rms_norm_eps: epsilon of the per-head norms.
        layer_idx: index in the model (the KV-cache slot).
        backend: op backend ("auto", "torch", "triton", "reference").
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, *, attention: str = "parallax", qk_norm: bool = True,
                 probe_norm: bool = True, rope_theta: float = 1e6, rope_scaling: dict | None = None,
                 probe_rope: bool = True, probe_init: str = "normal", probe_gate: str | None = None,
                 window_size=(-1, -1), attention_bias: bool = False, qkv_bias: bool | None = None,
                 o_bias: bool | None = None, rms_norm_eps: float = 1e-6, layer_idx: int | None = None,
                 backend: str = "auto"):
        super().__init__()
        _check_choice("attention", attention, ATTENTIONS)
        _check_choice("probe_init", probe_init, PROBE_INITS)
        _check_choice("probe_gate", probe_gate, PROBE_GATES)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: expected a positive divisor of num_heads={num_heads}, "
                             f"got {num_kv_heads}")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"head_dim: hidden_size={hidden_size} is not divisible by num_heads={num_heads}; "
                                 f"pass head_dim explicitly")
            head_dim = hidden_size // num_heads
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = \
            hidden_size, num_heads, num_kv_heads, head_dim
        self.attention = attention
        self.probe_rope = probe_rope
        self.probe_init = probe_init
        self.window_size = normalize_window(window_size)
        self.layer_idx = layer_idx
        self.backend = backend
        self.scale = 1.0 / math.sqrt(head_dim)
        qkv_bias = attention_bias if qkv_bias is None else qkv_bias
        o_bias = attention_bias if o_bias is None else o_bias

        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias)
        self.q_norm = RMSNorm(head_dim, rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, rms_norm_eps) if qk_norm else None
        self.r_proj = self.r_norm = self.r_gate = None
        if attention == "parallax":
            self.r_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
            # Marks the probe for zero init; the model's weight init reads it too.
            self.r_proj._parallax_zero_init = probe_init == "zeros"
            if probe_init == "zeros":
                nn.init.zeros_(self.r_proj.weight)
                if self.r_proj.bias is not None:
                    nn.init.zeros_(self.r_proj.bias)
            self.r_norm = RMSNorm(head_dim, rms_norm_eps) if probe_norm else None
            if probe_gate == "head":
                self.r_gate = nn.Linear(hidden_size, num_heads, bias=False)
        self.rotary = RotaryEmbedding(head_dim, rope_theta, rope_scaling)

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.view(*x.shape[:-1], heads, self.head_dim)

    def probe(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The probe r (batch, seqlen, heads, head_dim) for input x; used by diagnostics too."""
        r = norm_rope(self._heads(self.r_proj(x), self.num_heads), self.r_norm, cos, sin, self.probe_rope)
        if self.r_gate is not None:
            r = r * torch.sigmoid(self.r_gate(x)).unsqueeze(-1)
        return r

    def forward(self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, cache=None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: (batch, seqlen, hidden_size).
            position_embeddings: (cos, sin) from a shared RotaryEmbedding; computed here from
                position_ids (default: positions after the cached tokens) when None.
            attention_mask: optional (batch, cached + seqlen) keep-mask of keys (1 keep, 0 padding).
            cache: optional transformers Cache (e.g. DynamicCache) or StaticKVCache; k and v are
                appended in place (after a StaticKVCache step, the caller calls cache.advance).
            position_ids: (batch or 1, seqlen) positions, used only without position_embeddings.
        Returns:
            (batch, seqlen, hidden_size).
        """
        bsz, lq, _ = x.shape
        if position_embeddings is None:
            if position_ids is None:
                past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
                position_ids = torch.arange(past, past + lq, device=x.device)[None]
            position_embeddings = self.rotary(position_ids, x.dtype)
        cos, sin = position_embeddings

        q = norm_rope(self._heads(self.q_proj(x), self.num_heads), self.q_norm, cos, sin)
        k = norm_rope(self._heads(self.k_proj(x), self.num_kv_heads), self.k_norm, cos, sin)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        r = self.probe(x, cos, sin) if self.attention == "parallax" else None

        if cache is not None and self.layer_idx is None:
            raise ValueError("cache: the layer needs a layer_idx to use a KV cache")
        if isinstance(cache, StaticKVCache):
            if attention_mask is not None:
                raise ValueError("attention_mask: a StaticKVCache keeps each sequence's length in cache.seqlens "
                                 "instead of a key mask; for prompts of different lengths use "
                                 "StaticGenerator.generate(attention_mask=...), or DynamicCache")
            o = self._attend_static(q, r, k, v, cache)
            return self.o_proj(o.reshape(bsz, lq, self.num_heads * self.head_dim))

        past = 0
        if cache is not None:
            if getattr(cache, "is_compileable", False):
                raise NotImplementedError("cache: transformers' static caches are not supported; use DynamicCache, "
                                          "or parallax_attention.nn.StaticKVCache (CUDA-graph decoding)")
            # transformers caches are (batch, heads, seqlen, head_dim); the op reads (batch, seqlen, heads,
            # head_dim), and strided views of the cache are fine for it.
            k_all, v_all = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            past = k_all.shape[2] - lq
            if past > 0:
                k, v = k_all.transpose(1, 2), v_all.transpose(1, 2)
        lk = past + lq

        key_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != (bsz, lk):
                raise ValueError(f"attention_mask: expected a (batch, keys) = ({bsz}, {lk}) keep-mask of 0/1, "
                                 f"got shape {tuple(attention_mask.shape)}")
            if not bool(attention_mask.bool().all()):
                key_mask = attention_mask
        o = self._attend(q, r, k, v, key_mask)
        return self.o_proj(o.reshape(bsz, lq, self.num_heads * self.head_dim))

    def _attend(self, q, r, k, v, key_mask):
        # Under autocast the norms (float32 weights) return float32 while v comes out of a linear
        # layer in the autocast dtype; the ops want one dtype.
        dt = v.dtype
        q, k = q.to(dt), k.to(dt)
        r = r.to(dt) if r is not None else None
        lq, lk = q.shape[1], k.shape[1]
        window = self.window_size
        if key_mask is not None:
            vis = visible_mask(lq, lk, window, q.device, key_mask)
            if self.attention == "parallax":
                return parallax_masked(q, r, k, v, vis, self.scale)
            return self._sdpa(q, k, v, vis)
        if self.attention == "softmax":
            if lq == lk and window == (-1, -1):
                return self._sdpa(q, k, v, None, causal=True)
            if lq == 1 and window[0] < 0:
                return self._sdpa(q, k, v, None)
            return self._sdpa(q, k, v, visible_mask(lq, lk, window, q.device))

        from ..ops import parallax_attn, parallax_attn_with_kvcache
        no_grad = not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, r, k, v)))
        if no_grad and lk > lq and lq <= _DECODE_MAX_QUERIES:
            backend = "torch" if self.backend == "reference" else self.backend
            return parallax_attn_with_kvcache(q, r, k, v, causal=True, window_size=window,
                                              softmax_scale=self.scale, backend=backend)
        if lk > lq:
            # Keys are strided views of the cache here (chunked prefill); the training kernels
            # expect the (batch, seqlen, heads, head_dim) layout in memory.
            k, v = k.contiguous(), v.contiguous()
        return parallax_attn(q, r, k, v, causal=True, window_size=window, softmax_scale=self.scale,
                             backend=self.backend)

    def _attend_static(self, q, r, k, v, cache: StaticKVCache):
        """Append k, v to a StaticKVCache and attend. Decode steps touch lengths only on the device, so
        they can be captured in a CUDA graph; longer chunks (prefill) need the host to know the length."""
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, r, k, v)):
            raise ValueError("cache: StaticKVCache is for inference; run under torch.no_grad() (or train "
                             "without a cache)")
        dt = v.dtype
        q, k = q.to(dt), k.to(dt)
        r = r.to(dt) if r is not None else None
        bsz, lq = q.shape[:2]
        cache.check_step(bsz, lq)
        kc, vc = cache.layer(self.layer_idx)
        if lq <= _DECODE_MAX_QUERIES:
            if self.attention == "parallax":
                from ..ops import parallax_attn_with_kvcache
                backend = "torch" if self.backend == "reference" else self.backend
                # A host-known length is passed as an int: no device read to validate it.
                seqlens = cache.length if cache.length is not None else cache.seqlens
                return parallax_attn_with_kvcache(q, r, kc, vc, k, v, cache_seqlens=seqlens, causal=True,
                                                  window_size=self.window_size, softmax_scale=self.scale,
                                                  backend=backend)
            cache.write(self.layer_idx, k, v)
            return self._sdpa_cache(q, kc, vc, cache)
        if cache.length is None:
            raise ValueError(f"cache: a chunk of {lq} tokens needs the host to know the cached length; call "
                             f"cache.set_length(n) after replayed steps")
        past = cache.length
        cache.write(self.layer_idx, k, v)
        if past:
            k, v = kc[:, :past + lq].contiguous(), vc[:, :past + lq].contiguous()
        return self._attend(q, r, k, v, None)

    def _sdpa_cache(self, q, kc, vc, cache: StaticKVCache):
        """Softmax attention of a few new queries against the whole capacity under the cache's mask.

        The query heads that share a kv head are folded into the query rows, so SDPA sees plain
        multi-head attention and may take its memory-efficient kernel with a mask.
        """
        bsz, lq, hq, d = q.shape
        hkv = kc.shape[2]
        g = hq // hkv
        qg = q.reshape(bsz, lq, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(bsz, hkv, g * lq, d)
        mask = cache.visible(lq, self.window_size, g)
        o = F.scaled_dot_product_attention(qg, kc.transpose(1, 2), vc.transpose(1, 2), attn_mask=mask,
                                           scale=self.scale)
        return o.reshape(bsz, hkv, g, lq, d).permute(0, 3, 1, 2, 4)

    def _sdpa(self, q, k, v, vis, causal=False):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask = None
        if vis is not None:
            # An additive mask with the dtype's minimum (not -inf) keeps fully padded rows finite.
            mask = torch.zeros(vis.shape, dtype=q.dtype, device=q.device).masked_fill(~vis, torch.finfo(q.dtype).min)
        gqa = q.shape[1] != k.shape[1]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                           enable_gqa=gqa)
        return o.transpose(1, 2)

    def extra_repr(self) -> str:
        return (f"attention={self.attention}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, window_size={self.window_size}")
