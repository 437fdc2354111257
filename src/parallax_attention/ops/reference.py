"""Direct formulas: Parallax, its analysis helpers, and the family of related mechanisms.

Everything here materialises the (Lq x Lk) score matrix, so it is meant for
ground truth, small problems and diagnostics, not for long sequences. All
functions take FlashAttention's layout, q/r (B, Lq, Hq, D) and k/v (B, Lk, Hkv, D),
are differentiable, and accumulate in float32 (float64 inputs stay float64).

For query i over its visible keys j (DESIGN: section 1):

    p_ij = softmax_j(scale * q_i . k_j)
    t_ij = r_i . k_j                      (never scaled)
    w_ij = p_ij (1 + tbar_i - t_ij),      tbar_i = sum_j p_ij t_ij
    o_i  = sum_j w_ij v_j = vbar_i - Cov_p(v, k) r_i
"""

from __future__ import annotations

import torch

from ._validation import check_dense, check_tensor, check_same_dtype_device, compute_dtype, \
    normalize_window, resolve_softmax_scale
from .masking import visible_mask

__all__ = [
    "parallax_attn_reference",
    "parallax_weights",
    "parallax_decompose",
    "softmax_weights",
    "softmax_attn",
    "lla_attn",
    "affine_linear_attn",
]


def _heads_first(x: torch.Tensor, hq: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, L, H, D) -> (B, Hq, L, D) in the compute dtype, repeating kv heads for GQA."""
    x = x.transpose(1, 2).to(dtype)
    if x.shape[1] != hq:
        x = x.repeat_interleave(hq // x.shape[1], dim=1)
    return x


def _mask(lq: int, lk: int, causal: bool, window, device) -> torch.Tensor | None:
    return visible_mask(torch.arange(lq, device=device), torch.arange(lk, device=device),
                        lk - lq, causal, window)


def _softmax_masked(s: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Row softmax where a row without visible keys is all zeros (never NaN, zero gradient)."""
    if mask is None:
        return torch.softmax(s, dim=-1)
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    d = e.sum(dim=-1, keepdim=True)
    return e / torch.where(d > 0, d, torch.ones_like(d))


def _uniform_weights(lq: int, lk: int, causal: bool, window, device, dtype) -> torch.Tensor:
    mask = _mask(lq, lk, causal, window, device)
    if mask is None:
        return torch.full((lq, lk), 1.0 / lk, device=device, dtype=dtype)
    cnt = mask.sum(dim=-1, keepdim=True)
    return mask.to(dtype) / cnt.clamp_min(1).to(dtype)


def softmax_weights(q, k, *, causal=False, softmax_scale=None, window_size=(-1, -1)) -> torch.Tensor:
    """Base softmax weights p, shape (B, Hq, Lq, Lk), in the compute dtype."""
    check_tensor("q", q, 4, "(batch, seqlen_q, heads_q, head_dim)")
    check_tensor("k", k, 4, "(batch, seqlen_k, heads_kv, head_dim)")
    check_same_dtype_device([("q", q), ("k", k)])
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    window = normalize_window(window_size)
    dt = compute_dtype(q.dtype)
    hq = q.shape[2]
    if hq % k.shape[2] != 0 or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k: expected shape (B, Lk, Hkv, {q.shape[-1]}) with Hkv dividing {hq}, got {tuple(k.shape)}")
    qh, kh = _heads_first(q, hq, dt), _heads_first(k, hq, dt)
    s = scale * (qh @ kh.transpose(-1, -2))
    return _softmax_masked(s, _mask(q.shape[1], k.shape[1], causal, window, q.device))


def parallax_weights(q, r, k, *, causal=False, softmax_scale=None, window_size=(-1, -1)) -> torch.Tensor:
    """Per-token weights w_ij = p_ij (1 + tbar_i - t_ij), shape (B, Hq, Lq, Lk).

    Each row sums to one (zero for a row with no visible key); entries can be
    negative or exceed one.
    """
    p = softmax_weights(q, k, causal=causal, softmax_scale=softmax_scale, window_size=window_size)
    hq = q.shape[2]
    t = _heads_first(r, hq, p.dtype) @ _heads_first(k, hq, p.dtype).transpose(-1, -2)
    tbar = (p * t).sum(dim=-1, keepdim=True)
    return p * (1 + tbar - t)


def parallax_decompose(q, r, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1)):
    """(softmax_output, correction), each (B, Lq, Hq, D): output = softmax_output - correction.

    correction_i = Cov_p(v, k) r_i = sum_j p_ij (t_ij - tbar_i) v_j.
    """
    check_dense(q, r, k, v, softmax_scale, window_size)
    p = softmax_weights(q, k, causal=causal, softmax_scale=softmax_scale, window_size=window_size)
    hq = q.shape[2]
    kh, vh = _heads_first(k, hq, p.dtype), _heads_first(v, hq, p.dtype)
    t = _heads_first(r, hq, p.dtype) @ kh.transpose(-1, -2)
    tbar = (p * t).sum(dim=-1, keepdim=True)
    base = p @ vh
    corr = (p * (t - tbar)) @ vh
    return base.transpose(1, 2).to(q.dtype), corr.transpose(1, 2).to(q.dtype)


def parallax_attn_reference(q, r, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1)):
    """Parallax attention by the direct formula; output (B, Lq, Hq, D) in q's dtype."""
    check_dense(q, r, k, v, softmax_scale, window_size)
    w = parallax_weights(q, r, k, causal=causal, softmax_scale=softmax_scale, window_size=window_size)
    out = w @ _heads_first(v, q.shape[2], w.dtype)
    return out.transpose(1, 2).to(q.dtype)


def softmax_attn(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1)):
    """Softmax attention (the W_R = 0 member of the family), same conventions as parallax_attn."""
    p = softmax_weights(q, k, causal=causal, softmax_scale=softmax_scale, window_size=window_size)
    check_tensor("v", v, 4, "(batch, seqlen_k, heads_kv, head_dim)")
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    out = p @ _heads_first(v, q.shape[2], p.dtype)
    return out.transpose(1, 2).to(q.dtype)


def lla_attn(q, k, v, *, ridge: float = 1.0, causal=False, softmax_scale=None, window_size=(-1, -1)):
    """Exact Local Linear Attention: the intercept of a p-weighted ridge fit of v on (k - q).

        mu = kbar - q,  S = sum_j p_j (k_j - q)(k_j - q)^T + ridge I,  rho = S^-1 mu
        o  = sum_j p_j (1 - rho.(k_j - q)) v_j / (1 - mu.rho)

    One D x D solve per query: for reference and small experiments only.
    """
    if not (isinstance(ridge, (int, float)) and not isinstance(ridge, bool)) or not ridge > 0:
        raise ValueError(f"ridge: expected a positive number, got {ridge!r}")
    p = softmax_weights(q, k, causal=causal, softmax_scale=softmax_scale, window_size=window_size)
    hq = q.shape[2]
    dt = p.dtype
    qh, kh, vh = _heads_first(q, hq, dt), _heads_first(k, hq, dt), _heads_first(v, hq, dt)
    kbar = p @ kh                                               # (B,H,Lq,D)
    mu = kbar - qh
    # sum_j p_j (k_j - q)(k_j - q)^T = E_p[k k^T] - kbar q^T - q kbar^T + q q^T
    ekk = torch.einsum("bhij,bhjd,bhje->bhide", p, kh, kh)
    S = ekk - kbar[..., :, None] * qh[..., None, :] - qh[..., :, None] * kbar[..., None, :] \
        + qh[..., :, None] * qh[..., None, :]
    eye = torch.eye(q.shape[-1], dtype=dt, device=q.device)
    rho = torch.linalg.solve(S + ridge * eye, mu.unsqueeze(-1)).squeeze(-1)
    t = (rho @ kh.transpose(-1, -2)) - (rho * qh).sum(-1, keepdim=True)   # rho . (k_j - q)
    num = (p * (1 - t)) @ vh
    den = 1 - (mu * rho).sum(-1, keepdim=True)
    has_keys = p.sum(-1, keepdim=True) > 0
    out = torch.where(has_keys, num / torch.where(has_keys, den, torch.ones_like(den)), torch.zeros_like(num))
    return out.transpose(1, 2).to(q.dtype)


def affine_linear_attn(q, r, k, v, *, causal=True, window_size=(-1, -1)):
    """Uniform weights over the visible keys with the learned probe (DESIGN: section 2).

    o_i = vbar_i - Cov_u(v, k) r_i with u uniform over visible keys. q only fixes
    the query length and is otherwise unused (the weights do not depend on it);
    it is taken so that every family member shares parallax_attn's signature.
    """
    check_dense(q, r, k, v, None, window_size)
    window = normalize_window(window_size)
    hq = q.shape[2]
    dt = compute_dtype(q.dtype)
    u = _uniform_weights(q.shape[1], k.shape[1], causal, window, q.device, dt)
    kh, vh = _heads_first(k, hq, dt), _heads_first(v, hq, dt)
    t = _heads_first(r, hq, dt) @ kh.transpose(-1, -2)
    tbar = (u * t).sum(-1, keepdim=True)
    out = (u * (1 + tbar - t)) @ vh
    return out.transpose(1, 2).to(q.dtype)
