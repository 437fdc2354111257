"""Per-head RMSNorm followed by RoPE in one pass (inference).

An eager decoder layer spends about a dozen small kernel launches per tensor on the per-head
norm (upcast, square, mean, rsqrt, scale, downcast, weight) and RoPE (two products, a rotated
copy, a sum), for q, k and the probe r alike. A decode step is bound by those launches on the
host, so one kernel per tensor matters there. Rows are (token, head) pairs of a contiguous
(B, L, H, D) tensor; each program normalises BLOCK_R rows and rotates their two halves.

Rounding follows the eager modules: the norm rounds to the input dtype before the weight and
after it, the rotation rounds each product and the sum. With 2-byte inputs RoPE alone matches
eager bit for bit; the norm's mean of squares is summed in another order than torch's, which
can move a result by one unit in the last place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_kernel(X, W, COS, SIN, Y, n_rows, seqlen, heads, stride_cb, stride_cl, eps,
                      D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                      HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, COS_BATCH: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < n_rows)[:, None] & (cols < HALF)[None, :]
    base = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x1 = tl.load(X + base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + base + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = Y.dtype.element_ty
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D + eps)
        w1 = tl.load(W + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(W + HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        x1 = ((x1 * rstd[:, None]).to(dtype).to(tl.float32) * w1[None, :]).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd[:, None]).to(dtype).to(tl.float32) * w2[None, :]).to(dtype).to(tl.float32)
    if HAS_ROPE:
        pos = (rows // heads) % seqlen
        cb = (rows // (heads * seqlen)).to(tl.int64) if COS_BATCH else 0
        c_off = (cb * stride_cb + pos.to(tl.int64) * stride_cl)[:, None] + cols[None, :]
        c1 = tl.load(COS + c_off, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(COS + c_off + HALF, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + c_off, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + c_off + HALF, mask=mask, other=0.0).to(tl.float32)
        # Each product rounded to the input dtype before the sum, as the eager x*cos + rotate_half(x)*sin
        # does (for 2-byte inputs the fp32 products are exact, so this matches eager bit for bit).
        y1 = (x1 * c1).to(dtype).to(tl.float32) - (x2 * s1).to(dtype).to(tl.float32)
        y2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
    else:
        y1 = x1
        y2 = x2
    tl.store(Y + base, y1.to(dtype), mask=mask)
    tl.store(Y + base + HALF, y2.to(dtype), mask=mask)


def norm_rope_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor | None,
                     sin: torch.Tensor | None) -> torch.Tensor:
    """x: contiguous (B, L, H, D) with D even; weight (D,) or None; cos, sin contiguous (B or 1, L, D) or None."""
    bsz, seqlen, heads, d = x.shape
    half = d // 2
    y = torch.empty_like(x)
    n_rows = bsz * seqlen * heads
    if n_rows == 0:
        return y
    block_h = triton.next_power_of_2(half)
    block_r = max(1, min(64, 4096 // block_h))
    has_rope = cos is not None
    cos_arg = cos if has_rope else x
    sin_arg = sin if has_rope else x
    _norm_rope_kernel[(triton.cdiv(n_rows, block_r),)](
        x, weight if weight is not None else x, cos_arg, sin_arg, y, n_rows, seqlen, heads,
        cos.stride(0) if has_rope else 0, cos.stride(1) if has_rope else 0, float(eps),
        D=d, HALF=half, BLOCK_H=block_h, BLOCK_R=block_r, HAS_NORM=weight is not None, HAS_ROPE=has_rope,
        COS_BATCH=has_rope and cos.shape[0] > 1, num_warps=4)
    return y
