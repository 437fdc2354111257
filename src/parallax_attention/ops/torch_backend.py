"""Memory-efficient Parallax attention in plain PyTorch, for any device.

The forward streams K/V in tiles and keeps, per query row, the running max m
and the five accumulators of DESIGN section 1:

    d1 = sum e^(s-m)        O1 = sum e^(s-m) v
    d2 = sum e^(s-m) t      O2 = sum e^(s-m) t v
    o  = O1/d1 (1 + d2/d1) - O2/d1

with t taken relative to a per-row shift (see the forward) for accuracy.

It saves per-row statistics (lse = m + log d1, tbar = d2/d1 and vbar = O1/d1),
and the backward recomputes each tile from them, so no Lq x Lk tensor is ever
kept. Tiles that no query of a row block can see are skipped (causal halves the
work); only tiles cut by a mask boundary build a mask.

Query heads that share a kv head are folded into the row dimension, so a tile
step is one matmul per product for the whole group and K/V are never repeated.
"""

from __future__ import annotations

import torch

from ._validation import compute_dtype
from .masking import block_fully_visible, key_range, visible_mask

BLOCK_Q = 128
BLOCK_K = 128


def _tiles(lq: int, lk: int, causal: bool, window, block_q: int, block_k: int):
    """Yield (q0, q1, [(k0, k1, needs_mask), ...]) for every row block."""
    shift = lk - lq
    for q0 in range(0, lq, block_q):
        q1 = min(lq, q0 + block_q)
        ks, ke = key_range(q0, q1, lk, shift, causal, window)
        cols = []
        # Align column tiles to the block grid so tiles are shared across row blocks.
        for k0 in range((ks // block_k) * block_k, ke, block_k):
            a, b = max(k0, ks), min(ke, k0 + block_k)
            if a >= b:
                continue
            cols.append((a, b, not block_fully_visible(q0, q1, a, b, shift, causal, window)))
        yield q0, q1, cols


def _group_rows(x: torch.Tensor, hkv: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, L, Hq, D) -> (B, Hkv, G, L, D): query heads grouped under their kv head."""
    b, l, hq, d = x.shape
    return x.to(dtype).view(b, l, hkv, hq // hkv, d).permute(0, 2, 3, 1, 4)


def _tile_mask(q0, q1, k0, k1, shift, causal, window, device):
    return visible_mask(torch.arange(q0, q1, device=device), torch.arange(k0, k1, device=device),
                        shift, causal, window)


def _tile_scores(qr, kt, gn, g, q0, q1, k0, k1, needs_mask, shift, causal, window):
    """[s; t] = [scale q; r] K^T for one tile, with invisible scores set to -inf (t is left as is)."""
    st = qr @ kt.transpose(-1, -2)
    s, t = st[:, :, :gn], st[:, :, gn:]
    if needs_mask:
        mask = _tile_mask(q0, q1, k0, k1, shift, causal, window, qr.device)
        s.view(*s.shape[:2], g, q1 - q0, k1 - k0).masked_fill_(~mask, float("-inf"))
    return st, s, t


class _ParallaxAttnTorch(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, r, k, v, causal, scale, window, block_q, block_k):
        b, lq, hq, d = q.shape
        lk, hkv = k.shape[1], k.shape[2]
        g = hq // hkv
        dt = compute_dtype(q.dtype)
        shift = lk - lq
        qg, rg = _group_rows(q, hkv, dt), _group_rows(r, hkv, dt)       # (B,Hkv,G,Lq,D)
        kh = k.to(dt).transpose(1, 2)                                   # (B,Hkv,Lk,D)
        vh = v.to(dt).transpose(1, 2)
        out = torch.zeros(b, hkv, g, lq, d, dtype=dt, device=q.device)
        lse = torch.full((b, hkv, g, lq), float("inf"), dtype=dt, device=q.device)
        tbar = torch.zeros(b, hkv, g, lq, dtype=dt, device=q.device)
        vbar = torch.zeros(b, hkv, g, lq, d, dtype=dt, device=q.device)
        neg_inf = float("-inf")
        for q0, q1, cols in _tiles(lq, lk, causal, window, block_q, block_k):
            n = q1 - q0
            gn = g * n
            # Scaled q rows stacked over r rows: one matmul gives both s and t, and the
            # tile of [e; e*t] then meets V in one matmul for O1 and O2 together.
            qr = torch.cat([qg[:, :, :, q0:q1].reshape(b, hkv, gn, d) * scale,
                            rg[:, :, :, q0:q1].reshape(b, hkv, gn, d)], dim=2)
            m = torch.full((b, hkv, gn, 1), neg_inf, dtype=dt, device=q.device)
            c = torch.zeros(b, hkv, gn, 1, dtype=dt, device=q.device)
            d12 = torch.zeros(b, hkv, 2 * gn, 1, dtype=dt, device=q.device)   # [d1; d2]
            o12 = torch.zeros(b, hkv, 2 * gn, d, dtype=dt, device=q.device)   # [O1; O2]
            for k0, k1, needs_mask in cols:
                kt, vt = kh[:, :, k0:k1], vh[:, :, k0:k1]
                st, s, t = _tile_scores(qr, kt, gn, g, q0, q1, k0, k1, needs_mask, shift, causal, window)
                tile_max, arg = s.max(dim=-1, keepdim=True)
                m_new = torch.maximum(m, tile_max)
                # A row that has seen no visible key yet keeps m = -inf; use 0 so exp gives 0, not NaN.
                m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
                alpha = torch.exp(m - m_safe)
                # The output only depends on t - tbar, so t may be shifted by any per-row constant c.
                # Re-centring c on t at the current argmax keeps d2 and O2 small when the softmax is
                # peaked and |t| is large, where O1/d1 (1 + d2/d1) - O2/d1 would otherwise cancel.
                c_new = torch.where(tile_max > m, t.gather(-1, arg), c)
                alpha2 = torch.cat([alpha, alpha], dim=2)
                d12.mul_(alpha2)
                o12.mul_(alpha2)
                dc = c - c_new
                d12[:, :, gn:] += dc * d12[:, :, :gn]
                o12[:, :, gn:] += dc * o12[:, :, :gn]
                c = c_new
                e = s.sub_(m_safe).exp_()
                t.sub_(c).mul_(e)                                        # st now holds [e; e * (t - c)]
                d12 += st.sum(dim=-1, keepdim=True)
                o12 += st @ vt
                m = m_new
            d1, d2 = d12[:, :, :gn], d12[:, :, gn:]
            o1, o2 = o12[:, :, :gn], o12[:, :, gn:]
            has = d1 > 0
            inv = torch.where(has, 1.0 / torch.where(has, d1, torch.ones_like(d1)), torch.zeros_like(d1))
            vb = o1 * inv
            tb_shifted = d2 * inv
            ob = vb * (1 + tb_shifted) - o2 * inv
            tb = tb_shifted + c
            lse_b = torch.where(has, m + torch.log(torch.where(has, d1, torch.ones_like(d1))),
                                torch.full_like(d1, float("inf")))
            out[:, :, :, q0:q1] = ob.reshape(b, hkv, g, n, d)
            vbar[:, :, :, q0:q1] = vb.reshape(b, hkv, g, n, d)
            tbar[:, :, :, q0:q1] = tb.reshape(b, hkv, g, n)
            lse[:, :, :, q0:q1] = lse_b.reshape(b, hkv, g, n)
        ctx.save_for_backward(q, r, k, v, out, lse, tbar, vbar)
        ctx.conf = (causal, scale, window, block_q, block_k)
        return out.permute(0, 3, 1, 2, 4).reshape(b, lq, hq, d).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, r, k, v, out, lse, tbar, vbar = ctx.saved_tensors
        causal, scale, window, block_q, block_k = ctx.conf
        b, lq, hq, d = q.shape
        lk, hkv = k.shape[1], k.shape[2]
        g = hq // hkv
        dt = out.dtype
        shift = lk - lq
        qg, rg, dog = _group_rows(q, hkv, dt), _group_rows(r, hkv, dt), _group_rows(dout, hkv, dt)
        kh, vh = k.to(dt).transpose(1, 2), v.to(dt).transpose(1, 2)
        delta = (dog * out).sum(-1)                                     # dO . o
        beta = (dog * vbar).sum(-1)                                     # dO . vbar
        dq = torch.zeros_like(qg)
        dr = torch.zeros_like(rg)
        dk = torch.zeros_like(kh)
        dv = torch.zeros_like(vh)
        for q0, q1, cols in _tiles(lq, lk, causal, window, block_q, block_k):
            n = q1 - q0

            def rows(x):
                return x[:, :, :, q0:q1].reshape(b, hkv, g * n, *x.shape[4:])

            gn = g * n
            qr = torch.cat([rows(qg) * scale, rows(rg)], dim=2)           # [scale q; r], as in the forward
            dob = rows(dog)
            lse_b, tb = rows(lse)[..., None], rows(tbar)[..., None]
            delta_b, beta_b = rows(delta)[..., None], rows(beta)[..., None]
            dqr = torch.zeros_like(qr)                                     # [dq / scale; dr]
            for k0, k1, needs_mask in cols:
                kt, vt = kh[:, :, k0:k1], vh[:, :, k0:k1]
                st, s, t = _tile_scores(qr, kt, gn, g, q0, q1, k0, k1, needs_mask, shift, causal, window)
                p = s.sub_(lse_b).exp_()                                   # lse = +inf on empty rows -> p = 0
                tc = t.neg_().add_(tb)                                     # tbar_i - t_ij
                a = dob @ vt.transpose(-1, -2)                             # dO_i . v_j
                pa = p * (a - beta_b)
                # dS1 = p[a - delta + (tbar - t)(a - beta)],  dS2 = -p (a - beta)
                ds12 = torch.cat([p * (a - delta_b) + pa * tc, pa.neg_()], dim=2)
                dv[:, :, k0:k1] += (p * (1 + tc)).transpose(-1, -2) @ dob
                dk[:, :, k0:k1] += ds12.transpose(-1, -2) @ qr
                dqr += ds12 @ kt
            dq[:, :, :, q0:q1] = (dqr[:, :, :gn] * scale).reshape(b, hkv, g, n, d)
            dr[:, :, :, q0:q1] = dqr[:, :, gn:].reshape(b, hkv, g, n, d)

        def back(x, like):
            return x.permute(0, 3, 1, 2, 4).reshape(like.shape).to(like.dtype)

        return (back(dq, q), back(dr, r), dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype),
                None, None, None, None, None)


class _EmptyAttention(torch.autograd.Function):
    """Output for problems with no queries or no keys: zeros, with zero gradients for all inputs."""

    @staticmethod
    def forward(ctx, q, r, k, v):
        ctx.shapes = [(x.shape, x.dtype, x.device) for x in (q, r, k, v)]
        return torch.zeros_like(q)

    @staticmethod
    def backward(ctx, dout):
        return tuple(torch.zeros(s, dtype=dt, device=dev) for s, dt, dev in ctx.shapes)


def empty_attention(q, r, k, v) -> torch.Tensor:
    return _EmptyAttention.apply(q, r, k, v)


def parallax_attn_torch(q, r, k, v, causal: bool, scale: float, window: tuple[int, int],
                        block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> torch.Tensor:
    """Streaming Parallax attention; inputs already validated, layout (B, L, H, D)."""
    if q.shape[1] == 0 or k.shape[1] == 0:
        return empty_attention(q, r, k, v)
    return _ParallaxAttnTorch.apply(q, r, k, v, causal, scale, window, block_q, block_k)
