"""Per-head RMSNorm followed by RoPE in one pass, forward and backward.

An eager decoder layer spends about a dozen small kernel launches per tensor on the per-head
norm (upcast, square, mean, rsqrt, scale, downcast, weight) and RoPE (two products, a rotated
copy, a sum), for q, k and the probe r alike, and about twice that in the backward, each a full
pass over the tensor. A decode step is bound by those launches on the host and a training step
by their memory traffic, so one kernel per tensor and direction matters for both. Rows are
(token, head) pairs of a contiguous (B, L, H, D) tensor; each program normalises BLOCK_R rows and
rotates their two halves.

Rounding follows the eager modules: the norm rounds to the input dtype before the weight, and the
product with the weight to the output dtype (the promotion of input and weight dtypes, float32
under autocast with float32 weights); the rotation rounds each product and the sum. With 2-byte
inputs RoPE alone matches eager bit for bit; the norm's mean of squares is summed in another
order than torch's, which can move a result by one unit in the last place.

The backward works in float32 from the same formulas without the roundings. The weight's
gradient is summed per program into a (programs, D) float32 buffer and then over programs, so
it is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import on_input_device


@triton.jit
def _rope_tables(COS, SIN, rows, cols, mask, seqlen, heads, stride_cb, stride_cl, HALF: tl.constexpr,
                 COS_BATCH: tl.constexpr):
    """cos and sin of both halves for rows (token, head) of a (B, L, H) row order, in float32."""
    pos = (rows // heads) % seqlen
    cb = (rows // (heads * seqlen)).to(tl.int64) if COS_BATCH else 0
    c_off = (cb * stride_cb + pos.to(tl.int64) * stride_cl)[:, None] + cols[None, :]
    c1 = tl.load(COS + c_off, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + c_off + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + c_off, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + c_off + HALF, mask=mask, other=0.0).to(tl.float32)
    return c1, c2, s1, s2


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
    xdtype = X.dtype.element_ty
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D + eps)
        w1 = tl.load(W + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(W + HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        x1 = ((x1 * rstd[:, None]).to(xdtype).to(tl.float32) * w1[None, :]).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd[:, None]).to(xdtype).to(tl.float32) * w2[None, :]).to(dtype).to(tl.float32)
    if HAS_ROPE:
        c1, c2, s1, s2 = _rope_tables(COS, SIN, rows, cols, mask, seqlen, heads, stride_cb, stride_cl, HALF,
                                      COS_BATCH)
        # Each product rounded to the input dtype before the sum, as the eager x*cos + rotate_half(x)*sin
        # does (for 2-byte inputs the fp32 products are exact, so this matches eager bit for bit).
        y1 = (x1 * c1).to(dtype).to(tl.float32) - (x2 * s1).to(dtype).to(tl.float32)
        y2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
    else:
        y1 = x1
        y2 = x2
    tl.store(Y + base, y1.to(dtype), mask=mask)
    tl.store(Y + base + HALF, y2.to(dtype), mask=mask)


@triton.jit
def _norm_rope_bwd_kernel(X, W, COS, SIN, DY, DX, DW, n_rows, seqlen, heads, stride_cb, stride_cl, eps,
                          D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                          HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, COS_BATCH: tl.constexpr,
                          NEED_DW: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < n_rows)[:, None] & (cols < HALF)[None, :]
    base = rows.to(tl.int64)[:, None] * D + cols[None, :]
    g1 = tl.load(DY + base, mask=mask, other=0.0).to(tl.float32)
    g2 = tl.load(DY + base + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_ROPE:
        # The transpose of the rotation y1 c1 - y2 s1, y2 c2 + y1 s2.
        c1, c2, s1, s2 = _rope_tables(COS, SIN, rows, cols, mask, seqlen, heads, stride_cb, stride_cl, HALF,
                                      COS_BATCH)
        t1 = g1 * c1 + g2 * s2
        g2 = g2 * c2 - g1 * s1
        g1 = t1
    if HAS_NORM:
        x1 = tl.load(X + base, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + base + HALF, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D + eps)
        xh1 = x1 * rstd[:, None]
        xh2 = x2 * rstd[:, None]
        w1 = tl.load(W + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(W + HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        if NEED_DW:
            # The forward multiplies the weight by the normalised input rounded to the input dtype.
            xdtype = X.dtype.element_ty
            n1 = xh1.to(xdtype).to(tl.float32)
            n2 = xh2.to(xdtype).to(tl.float32)
            tl.store(DW + pid * D + cols, tl.sum(g1 * n1, 0), mask=cols < HALF)
            tl.store(DW + pid * D + HALF + cols, tl.sum(g2 * n2, 0), mask=cols < HALF)
        dn1 = g1 * w1[None, :]
        dn2 = g2 * w2[None, :]
        c = (tl.sum(dn1 * xh1, 1) + tl.sum(dn2 * xh2, 1)) / D
        g1 = rstd[:, None] * (dn1 - xh1 * c[:, None])
        g2 = rstd[:, None] * (dn2 - xh2 * c[:, None])
    tl.store(DX + base, g1.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + base + HALF, g2.to(DX.dtype.element_ty), mask=mask)


def _blocks(d: int) -> tuple[int, int]:
    block_h = triton.next_power_of_2(d // 2)
    return block_h, max(1, min(64, 4096 // block_h))


def output_dtype(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor | None) -> torch.dtype | None:
    """The dtype the eager modules produce, or None when the kernel cannot follow their roundings
    (the rotation would promote the norm's output once more)."""
    dtype = torch.promote_types(x.dtype, weight.dtype) if weight is not None else x.dtype
    if cos is not None and torch.promote_types(dtype, cos.dtype) != dtype:
        return None
    return dtype


@on_input_device
def _forward(x, weight, eps, cos, sin):
    bsz, seqlen, heads, d = x.shape
    y = torch.empty(x.shape, dtype=output_dtype(x, weight, cos), device=x.device)
    n_rows = bsz * seqlen * heads
    if n_rows == 0:
        return y
    block_h, block_r = _blocks(d)
    has_rope = cos is not None
    _norm_rope_kernel[(triton.cdiv(n_rows, block_r),)](
        x, weight if weight is not None else x, cos if has_rope else x, sin if has_rope else x, y, n_rows, seqlen,
        heads, cos.stride(0) if has_rope else 0, cos.stride(1) if has_rope else 0, float(eps),
        D=d, HALF=d // 2, BLOCK_H=block_h, BLOCK_R=block_r, HAS_NORM=weight is not None, HAS_ROPE=has_rope,
        COS_BATCH=has_rope and cos.shape[0] > 1, num_warps=4)
    return y


class _NormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, cos, sin):
        ctx.save_for_backward(x, weight, cos, sin)
        ctx.eps = eps
        return _forward(x, weight, eps, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        x, weight, cos, sin = ctx.saved_tensors
        dy = dy.contiguous()
        bsz, seqlen, heads, d = x.shape
        n_rows = bsz * seqlen * heads
        block_h, block_r = _blocks(d)
        programs = triton.cdiv(n_rows, block_r)
        need_dw = weight is not None and ctx.needs_input_grad[1]
        dx = torch.empty_like(x)
        dw_part = torch.empty(programs if need_dw else 1, d, dtype=torch.float32, device=x.device)
        has_rope = cos is not None
        if n_rows:
            _norm_rope_bwd_kernel[(programs,)](
                x, weight if weight is not None else x, cos if has_rope else x, sin if has_rope else x, dy, dx,
                dw_part, n_rows, seqlen, heads, cos.stride(0) if has_rope else 0, cos.stride(1) if has_rope else 0,
                float(ctx.eps), D=d, HALF=d // 2, BLOCK_H=block_h, BLOCK_R=block_r, HAS_NORM=weight is not None,
                HAS_ROPE=has_rope, COS_BATCH=has_rope and cos.shape[0] > 1, NEED_DW=need_dw, num_warps=4)
        dw = dw_part.sum(0).to(weight.dtype) if need_dw and n_rows else (
            torch.zeros_like(weight) if need_dw else None)
        return dx if ctx.needs_input_grad[0] else None, dw, None, None, None


def norm_rope_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor | None,
                     sin: torch.Tensor | None) -> torch.Tensor:
    """RMSNorm (when weight is given) then RoPE (when cos, sin are given) of x, differentiable in x and weight.

    x: contiguous (B, L, H, D) with D even; weight (D,) or None; cos, sin contiguous (B or 1, L, D) or
    None, of a dtype the norm's output does not promote (see output_dtype).
    """
    if output_dtype(x, weight, cos) is None:
        raise TypeError(f"cos: dtype {cos.dtype} would promote the norm's output; expected at most "
                        f"{torch.promote_types(x.dtype, weight.dtype) if weight is not None else x.dtype}")
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        return _NormRope.apply(x, weight, eps, cos, sin)
    return _forward(x, weight, eps, cos, sin)
