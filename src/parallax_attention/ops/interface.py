"""The public op: validation and dispatch to a backend.

Backends:
  "reference"  direct formula (materialises scores); float64-capable ground truth.
  "torch"      memory-efficient streaming implementation for any device.
  "triton"     fused GPU kernels (also runs on CPU under TRITON_INTERPRET=1).
  "auto"       the fastest available for the inputs' device.
"""

from __future__ import annotations

import functools
import os

import torch

from . import reference as _reference
from ._validation import check_backend, check_cu_seqlens, check_dense, check_max_seqlen, check_packed

BACKENDS = ("auto", "reference", "torch", "triton")


@functools.cache
def _have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_usable(q: torch.Tensor) -> bool:
    """Triton kernels can run for q: CUDA with triton installed, or the CPU interpreter."""
    if q.is_cuda:
        return _have_triton()
    return os.environ.get("TRITON_INTERPRET") == "1"


def _resolve_backend(backend: str, q: torch.Tensor) -> str:
    check_backend(backend, BACKENDS)
    if backend == "auto":
        return "triton" if (q.is_cuda and triton_usable(q)) else "torch"
    if backend == "triton" and not triton_usable(q):
        raise ValueError(
            f"backend: 'triton' needs CUDA tensors and the triton package (or TRITON_INTERPRET=1 on CPU); "
            f"got tensors on {q.device}"
        )
    return backend


def parallax_attn(q, r, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), backend="auto"):
    """Parallax attention.

    Args:
        q, r: (batch, seqlen_q, heads_q, head_dim). r is the probe, shaped like q.
        k, v: (batch, seqlen_k, heads_kv, head_dim); heads_kv divides heads_q (GQA/MQA:
            query head h reads kv head h // (heads_q // heads_kv)).
        causal: bottom-right aligned causal mask (query i sees keys j <= i + seqlen_k - seqlen_q).
        softmax_scale: multiplies q.k only (default 1/sqrt(head_dim)); r.k is never scaled.
        window_size: (left, right); query i sees keys in
            [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]; -1 is unbounded.
        backend: "auto", "reference", "torch" or "triton".

    Returns:
        (batch, seqlen_q, heads_q, head_dim) in q's dtype. A query with no visible key
        returns zeros (and receives zero gradients).
    """
    scale, window = check_dense(q, r, k, v, softmax_scale, window_size)
    causal = bool(causal)
    name = _resolve_backend(backend, q)
    if q.shape[1] == 0 or k.shape[1] == 0:
        from .torch_backend import empty_attention
        return empty_attention(q, r, k, v)
    if name == "reference":
        return _reference.parallax_attn_reference(q, r, k, v, causal=causal, softmax_scale=scale,
                                                  window_size=window)
    if name == "torch":
        from .torch_backend import parallax_attn_torch
        return parallax_attn_torch(q, r, k, v, causal, scale, window)
    from .triton import parallax_attn_triton
    return parallax_attn_triton(q, r, k, v, causal, scale, window)


def parallax_attn_varlen(q, r, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                         causal=False, softmax_scale=None, window_size=(-1, -1), backend="auto"):
    """Parallax attention over packed variable-length sequences.

    Args:
        q, r: (total_q, heads_q, head_dim); k, v: (total_k, heads_kv, head_dim).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) cumulative lengths starting at 0.
        max_seqlen_q, max_seqlen_k: the longest query / key sequence.
        Other arguments as parallax_attn; masks apply within each sequence.

    Returns:
        (total_q, heads_q, head_dim) in q's dtype.
    """
    scale, window = check_packed(q, r, k, v, softmax_scale, window_size)
    # Inside CUDA-graph capture the lengths cannot be read on the host: check their form only.
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    cu_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, check_values=not capturing)
    cu_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device,
                            batch=cu_seqlens_q.numel() - 1, check_values=not capturing)
    if not capturing:
        check_max_seqlen("max_seqlen_q", max_seqlen_q, cu_q[1:] - cu_q[:-1])
        check_max_seqlen("max_seqlen_k", max_seqlen_k, cu_k[1:] - cu_k[:-1])
    causal = bool(causal)
    name = _resolve_backend(backend, q)
    if capturing and name != "triton":
        raise ValueError(f"backend: only 'triton' can be captured in a CUDA graph for varlen inputs, got {name!r}")
    if name == "triton":
        from .triton import parallax_attn_varlen_triton
        return parallax_attn_varlen_triton(q, r, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                           max_seqlen_k, causal, scale, window)
    outs = []
    for b in range(cu_q.numel() - 1):
        q0, q1 = int(cu_q[b]), int(cu_q[b + 1])
        k0, k1 = int(cu_k[b]), int(cu_k[b + 1])
        args = [x[None] for x in (q[q0:q1], r[q0:q1], k[k0:k1], v[k0:k1])]
        if q1 == q0 or k1 == k0:
            from .torch_backend import empty_attention
            outs.append(empty_attention(*args)[0])
            continue
        if name == "reference":
            o = _reference.parallax_attn_reference(*args, causal=causal, softmax_scale=scale, window_size=window)
        else:
            from .torch_backend import parallax_attn_torch
            o = parallax_attn_torch(*args, causal, scale, window)
        outs.append(o[0])
    return torch.cat(outs, dim=0)
