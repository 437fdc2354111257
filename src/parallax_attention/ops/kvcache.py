"""Parallax attention of new query tokens against a (dense or paged) KV cache.

FlashAttention's ``flash_attn_with_kvcache`` conventions, plus the probe r.
Forward only: this is the op for generation and serving; train with
``parallax_attn``.
"""

from __future__ import annotations


import torch

from ._validation import check_backend, check_qrkv_heads, check_same_dtype_device, check_tensor, \
    compute_dtype, normalize_window, resolve_softmax_scale
from .interface import triton_usable as _triton_usable
from .masking import effective_bounds

KVCACHE_BACKENDS = ("auto", "torch", "triton")

# Key positions per step of the torch backend's stream over the cache.
TORCH_CHUNK = 1024


def _is_capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_int(name: str, val) -> int:
    if isinstance(val, bool) or not isinstance(val, int):
        raise TypeError(f"{name}: expected an int, got {type(val).__name__}")
    return val


def parallax_attn_with_kvcache(q, r, k_cache, v_cache, k=None, v=None, *, cache_seqlens=None, block_table=None,
                               causal=True, window_size=(-1, -1), softmax_scale=None, num_splits=0,
                               backend="auto"):
    """Parallax attention of q (with probe r) against a KV cache, optionally appending k, v first.

    Args:
        q, r: (batch, seqlen_q, heads_q, head_dim), seqlen_q >= 1 (1 for decode; more for
            chunked prefill or speculative verification).
        k_cache, v_cache: dense (batch, capacity, heads_kv, head_dim), or paged
            (num_blocks, block_size, heads_kv, head_dim) with block_table; block_size is a power
            of two >= 16. heads_kv divides heads_q (query head h reads kv head h // (Hq // Hkv)).
        k, v: optional (batch, seqlen_new, heads_kv, head_dim). Written into the cache *in place*
            at positions cache_seqlens .. cache_seqlens + seqlen_new - 1 before attending, and
            attended to.
        cache_seqlens: int, or (batch,) int32 tensor on q's device: the valid tokens of each
            sequence before this call. None means the whole capacity is valid (then k, v cannot
            be appended).
        block_table: (batch, max_blocks) int32 on q's device; block j of sequence b holds its
            positions [j * block_size, (j + 1) * block_size). Entries past a sequence's last
            used block are never read and may hold anything (e.g. -1).
        causal: bottom-right aligned: query i of seqlen_q sees keys j <= i + n - seqlen_q, where
            n = cache_seqlens + seqlen_new is the number of keys of the sequence.
        window_size: (left, right), FlashAttention's convention around the aligned key; -1 is
            unbounded.
        softmax_scale: multiplies q.k only (default 1/sqrt(head_dim)); r.k is never scaled.
        num_splits: key splits per (sequence, kv head) of the Triton kernel; 0 picks from static
            shapes (so a captured CUDA graph replays for any lengths). The result does not depend
            on it beyond rounding. Ignored by the torch backend.
        backend: "torch" (any device), "triton" (GPU kernel; CPU under TRITON_INTERPRET=1,
            float16/float32 only there) or "auto" (triton on CUDA, else torch).

    Returns:
        (batch, seqlen_q, heads_q, head_dim) in q's dtype.

    Cache slots at or beyond a sequence's length may hold anything (stale values, inf, NaN):
    they are never mixed into the output. With causal=True a query needs at least seqlen_q keys
    (every query row must have its aligned key); fewer raises ValueError. Value checks on device
    tensors (lengths, block table entries) need one host synchronisation; they are skipped while
    a CUDA graph is being captured, where out-of-range lengths are clamped to the capacity.

    Forward only: raises ValueError when autograd would need gradients.
    """
    check_tensor("q", q, 4, "(batch, seqlen_q, heads_q, head_dim)")
    check_tensor("r", r, 4, "(batch, seqlen_q, heads_q, head_dim), the shape of q")
    check_tensor("k_cache", k_cache, 4, "(batch, capacity, heads_kv, head_dim) or (num_blocks, block_size, "
                 "heads_kv, head_dim)")
    check_tensor("v_cache", v_cache, 4, "the shape of k_cache")
    check_same_dtype_device([("q", q), ("r", r), ("k_cache", k_cache), ("v_cache", v_cache)])
    check_qrkv_heads(q, r, k_cache, v_cache)
    bsz, lq, hq, d = q.shape
    hkv = k_cache.shape[2]
    if lq < 1:
        raise ValueError(f"q: expected seqlen_q >= 1, got shape {tuple(q.shape)}")
    if bsz < 1:
        raise ValueError(f"q: expected batch >= 1, got shape {tuple(q.shape)}")
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, r, k_cache, v_cache, k, v)):
        raise ValueError("q: parallax_attn_with_kvcache is forward-only; expected inputs that do not require "
                         "grad (or torch.no_grad()), got requires_grad=True; use parallax_attn for training")
    scale = resolve_softmax_scale(softmax_scale, d)
    window = normalize_window(window_size)
    causal = bool(causal)
    check_backend(backend, KVCACHE_BACKENDS)
    num_splits = _check_int("num_splits", num_splits)
    if num_splits < 0:
        raise ValueError(f"num_splits: expected 0 (heuristic) or a positive int, got {num_splits}")

    # Cache layout.
    paged = block_table is not None
    if paged:
        if not isinstance(block_table, torch.Tensor):
            raise TypeError(f"block_table: expected an int32 torch.Tensor (batch, max_blocks), "
                            f"got {type(block_table).__name__}")
        if block_table.dtype != torch.int32:
            raise TypeError(f"block_table: expected dtype torch.int32, got {block_table.dtype}")
        if block_table.dim() != 2 or block_table.shape[0] != bsz or block_table.shape[1] < 1:
            raise ValueError(f"block_table: expected shape (batch={bsz}, max_blocks >= 1), "
                             f"got {tuple(block_table.shape)}")
        if block_table.device != q.device:
            raise ValueError(f"block_table: expected device {q.device} (the device of q), got {block_table.device}")
        page = k_cache.shape[1]
        if page < 16 or page & (page - 1):
            raise ValueError(f"k_cache: with block_table, expected a paged cache (num_blocks, block_size, heads_kv, "
                             f"head_dim) with block_size a power of two >= 16, got shape {tuple(k_cache.shape)}; "
                             f"pass block_table=None for a dense cache")
        capacity = block_table.shape[1] * page
    else:
        if k_cache.shape[0] != bsz:
            raise ValueError(f"k_cache: without block_table, expected a dense cache (batch={bsz}, capacity, "
                             f"heads_kv, head_dim), got shape {tuple(k_cache.shape)}; pass block_table for a "
                             f"paged cache")
        capacity = k_cache.shape[1]
    if capacity < 1:
        raise ValueError(f"k_cache: expected a capacity of at least one token, got shape {tuple(k_cache.shape)}")

    # New keys.
    if (k is None) != (v is None):
        raise ValueError(f"k, v: expected both or neither, got k={'None' if k is None else 'a tensor'} "
                         f"and v={'None' if v is None else 'a tensor'}")
    n_new = 0
    if k is not None:
        check_tensor("k", k, 4, "(batch, seqlen_new, heads_kv, head_dim)")
        check_tensor("v", v, 4, "(batch, seqlen_new, heads_kv, head_dim)")
        check_same_dtype_device([("q", q), ("k", k), ("v", v)])
        if k.shape[0] != bsz or k.shape[2:] != k_cache.shape[2:]:
            raise ValueError(f"k: expected shape (batch={bsz}, seqlen_new, heads_kv={hkv}, head_dim={d}), "
                             f"got {tuple(k.shape)}")
        if v.shape != k.shape:
            raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
        n_new = k.shape[1]
        if n_new > capacity:
            raise ValueError(f"k: appending {n_new} tokens needs a cache capacity >= {n_new}, got capacity "
                             f"{capacity}")

    # Lengths.
    seqlens = None
    seq_const = 0
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens: expected an int or a (batch,) int32 tensor when k, v are appended "
                             "(None means the cache is full), got None")
        seq_const = capacity
    elif isinstance(cache_seqlens, torch.Tensor):
        if cache_seqlens.dtype != torch.int32:
            raise TypeError(f"cache_seqlens: expected dtype torch.int32, got {cache_seqlens.dtype}")
        if cache_seqlens.shape != (bsz,):
            raise ValueError(f"cache_seqlens: expected shape (batch={bsz},), got {tuple(cache_seqlens.shape)}")
        if cache_seqlens.device != q.device:
            raise ValueError(f"cache_seqlens: expected device {q.device} (the device of q), "
                             f"got {cache_seqlens.device}")
        seqlens = cache_seqlens
    else:
        seq_const = _check_int("cache_seqlens", cache_seqlens)
    _check_values(seqlens, seq_const, n_new, capacity, lq, causal, block_table, k_cache.shape[0],
                  k_cache.shape[1] if paged else None, q.device)

    name = backend
    if backend == "auto":
        name = "triton" if (q.is_cuda and _triton_usable(q) and q.dtype != torch.float64) else "torch"
    elif backend == "triton":
        if not _triton_usable(q):
            raise ValueError(f"backend: 'triton' needs CUDA tensors and the triton package (or TRITON_INTERPRET=1 "
                             f"on CPU), got tensors on {q.device}")
        if q.dtype == torch.float64:
            raise TypeError("q: backend 'triton' expects float32, float16 or bfloat16, got torch.float64")

    with torch.no_grad():
        if k is not None:
            _append(k_cache, v_cache, k, v, seqlens, seq_const, block_table)
        if name == "torch":
            return _kvcache_torch(q, r, k_cache, v_cache, block_table, seqlens, seq_const, n_new, causal, scale,
                                  window, capacity)
        from .triton.decode import decode_triton
        return decode_triton(q, r, k_cache, v_cache, block_table, seqlens, seq_const, n_new, causal, scale,
                             window, num_splits)


def _check_values(seqlens, seq_const, n_new, capacity, lq, causal, block_table, num_blocks, page, device):
    """Checks that read lengths and block ids; one host synchronisation, skipped under graph capture."""
    if seqlens is None:
        lo = hi = seq_const
        bt_lo = bt_hi = None
        if block_table is not None:
            used = block_table[:, : -(-(seq_const + n_new) // page)] if seq_const + n_new > 0 else block_table[:, :0]
            if used.numel() and not _is_capturing(device):
                vals = torch.stack([used.min(), used.max()]).tolist()
                bt_lo, bt_hi = vals
    else:
        if _is_capturing(device):
            return
        stats = [seqlens.min(), seqlens.max()]
        if block_table is not None:
            n = (seqlens.to(torch.int64) + n_new).clamp(0, capacity)
            blocks = torch.arange(block_table.shape[1], device=device)
            used = blocks[None, :] * page < n[:, None]
            big = torch.iinfo(torch.int32).max
            stats += [torch.where(used, block_table, big).min(), torch.where(used, block_table, -big).max(),
                      used.any()]
        vals = torch.stack([x.to(torch.int64) for x in stats]).tolist()
        lo, hi = vals[0], vals[1]
        bt_lo, bt_hi = (vals[2], vals[3]) if block_table is not None and vals[4] else (None, None)
    if lo < 0 or hi + n_new > capacity:
        raise ValueError(f"cache_seqlens: expected values in [0, capacity - seqlen_new] = [0, {capacity - n_new}] "
                         f"(capacity {capacity}, {n_new} appended), got values in [{lo}, {hi}]")
    if lo + n_new < 1:
        raise ValueError(f"cache_seqlens: expected at least one key per sequence after the append, got a sequence "
                         f"with {lo} cached and {n_new} appended")
    if causal and lo + n_new < lq:
        raise ValueError(f"q: with causal=True every query row needs its aligned key, so seqlen_q ({lq}) must not "
                         f"exceed the keys of any sequence (cache_seqlens + seqlen_new), got a sequence with "
                         f"{lo + n_new} keys")
    if bt_lo is not None and (bt_lo < 0 or bt_hi >= num_blocks):
        raise ValueError(f"block_table: expected block ids in [0, num_blocks - 1] = [0, {num_blocks - 1}] for the "
                         f"blocks in use, got values in [{bt_lo}, {bt_hi}]")


def _append(k_cache, v_cache, k, v, seqlens, seq_const, block_table):
    """Write k, v at positions cache_seqlens .. + seqlen_new - 1 in place (graph-safe index_put)."""
    bsz, n_new = k.shape[:2]
    device = k.device
    if block_table is None and seqlens is None:
        k_cache[:, seq_const:seq_const + n_new] = k
        v_cache[:, seq_const:seq_const + n_new] = v
        return
    offs = torch.arange(n_new, device=device)
    pos = offs[None, :] + (seq_const if seqlens is None else seqlens.to(torch.int64)[:, None])
    rows = torch.arange(bsz, device=device)[:, None].expand(bsz, n_new)
    if block_table is None:
        k_cache[rows, pos] = k
        v_cache[rows, pos] = v
        return
    page = k_cache.shape[1]
    pos = pos.expand(bsz, n_new)
    blk = block_table[rows, pos // page].to(torch.int64)
    k_cache[blk, pos % page] = k
    v_cache[blk, pos % page] = v


def _kvcache_torch(q, r, k_cache, v_cache, block_table, seqlens, seq_const, n_new, causal, scale, window,
                   capacity):
    """Stream over the cache capacity in chunks with the running (m, d1, d2, O1, O2).

    Works on any device without reading lengths on the host: every chunk up to the capacity is
    visited and masked, so the cost follows the capacity, not the lengths. Slots past a
    sequence's length are replaced by zeros before any arithmetic (never multiplied by 0).
    """
    bsz, lq, hq, d = q.shape
    hkv = k_cache.shape[2]
    g = hq // hkv
    dt = compute_dtype(q.dtype)
    device = q.device
    if seqlens is None:
        n = torch.full((bsz,), seq_const + n_new, device=device, dtype=torch.int64)
    else:
        n = seqlens.to(torch.int64) + n_new
    n = n.clamp(0, capacity)
    lo, hi = effective_bounds(causal, window)
    # Rows grouped by kv head: (B, Hkv, G*Lq, D) with row = g * Lq + i.
    qg = q.to(dt).view(bsz, lq, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(bsz, hkv, g * lq, d)
    rg = r.to(dt).view(bsz, lq, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(bsz, hkv, g * lq, d)
    row_i = torch.arange(lq, device=device).repeat(g)                      # (G*Lq,)
    diag = row_i[None, :] + (n - lq)[:, None]                              # (B, G*Lq)
    rows = g * lq
    m = torch.full((bsz, hkv, rows), float("-inf"), device=device, dtype=dt)
    d1 = torch.zeros((bsz, hkv, rows), device=device, dtype=dt)
    d2 = torch.zeros_like(d1)
    o1 = torch.zeros((bsz, hkv, rows, d), device=device, dtype=dt)
    o2 = torch.zeros_like(o1)
    page = k_cache.shape[1] if block_table is not None else None
    chunk = TORCH_CHUNK if page is None else max(page, (TORCH_CHUNK // page) * page)
    for c0 in range(0, capacity, chunk):
        c1 = min(capacity, c0 + chunk)
        if page is None:
            kc, vc = k_cache[:, c0:c1], v_cache[:, c0:c1]
        else:
            ids = block_table[:, c0 // page: -(-c1 // page)].to(torch.int64).clamp(0, k_cache.shape[0] - 1)
            kc = k_cache[ids].flatten(1, 2)
            vc = v_cache[ids].flatten(1, 2)
        pos = torch.arange(c0, c1, device=device)
        valid = pos[None, :] < n[:, None]                                   # (B, C)
        kc = torch.where(valid[:, :, None, None], kc, 0).to(dt).permute(0, 2, 1, 3)  # (B, Hkv, C, D)
        vc = torch.where(valid[:, :, None, None], vc, 0).to(dt).permute(0, 2, 1, 3)
        vis = valid[:, None, :].expand(bsz, rows, c1 - c0)                  # (B, rows, C)
        if hi is not None:
            vis = vis & (pos[None, None, :] <= diag[:, :, None] + hi)
        if lo is not None:
            vis = vis & (pos[None, None, :] >= diag[:, :, None] - lo)
        vis = vis[:, None]                                                   # (B, 1, rows, C)
        s = torch.where(vis, scale * (qg @ kc.transpose(-1, -2)), float("-inf"))
        t = torch.where(vis, rg @ kc.transpose(-1, -2), 0)
        m_new = torch.maximum(m, s.amax(-1))
        m_use = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m - m_use)
        p = torch.exp(s - m_use[..., None])
        pt = p * t
        d1 = d1 * alpha + p.sum(-1)
        d2 = d2 * alpha + pt.sum(-1)
        o1 = o1 * alpha[..., None] + p @ vc
        o2 = o2 * alpha[..., None] + pt @ vc
        m = m_new
    inv = torch.where(d1 > 0, 1 / torch.where(d1 > 0, d1, torch.ones_like(d1)), torch.zeros_like(d1))
    o = o1 * (inv * (1 + d2 * inv))[..., None] - o2 * inv[..., None]      # (B, Hkv, G*Lq, D)
    o = o.view(bsz, hkv, g, lq, d).permute(0, 3, 1, 2, 4).reshape(bsz, lq, hq, d)
    return o.to(q.dtype)
