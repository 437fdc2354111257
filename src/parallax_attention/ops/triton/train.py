"""Fused Triton forward and backward kernels for Parallax attention (training).

Forward, one program per (sequence, query head, block of BLOCK_M query rows):
one pass over the visible K/V tiles feeds both branches from the same tiles and
the same running max (DESIGN section 1), in base 2 so the inner loop uses exp2:

    s2 = log2(e) * scale * q.k      t = r.k
    d1 = sum 2^(s2-m)               O1 = sum 2^(s2-m) v
    d2 = sum 2^(s2-m) t             O2 = sum 2^(s2-m) t v
    o  = O1/d1 (1 + d2/d1) - O2/d1

Four MMAs per tile (QK^T, RK^T, P1 V, P2 V), operands in the input dtype,
accumulators in fp32. Saved per row: lse2 = m + log2 d1 (+inf for a row with no
visible key, which makes every recomputed probability exactly 0), tbar = d2/d1,
and vbar = O1/d1 (shaped like o, input dtype).

Backward (DESIGN section 1, with a_ij = dO_i.v_j, delta_i = dO_i.o_i,
beta_i = dO_i.vbar_i):

    dS1 = p [a - delta + (tbar - t)(a - beta)]      dS2 = -p (a - beta)
    dq = scale dS1 K      dr = dS2 K      dk = scale dS1^T Q + dS2^T R
    dv = (p (1 + tbar - t))^T dO

Two kernels, no atomics (deterministic) and no Lq x Lk tensor:
  * dq/dr: one program per query block; it first computes delta and beta for its
    rows (so no separate preprocessing pass) and stores them for the next kernel;
  * dk/dv: one program per (sequence, kv head, key block); it walks the query
    heads of its GQA group and their visible query blocks, so dK/dV are reduced to
    the kv heads in registers and repeated K/V never exist. For 2-byte dtypes and
    power-of-two head dims on Hopper, every tile is read through tensor descriptors
    made on the device (_bwd_dkv_tma_kernel: one flat loop over (query head, query
    block), 32 query rows per step, no spills); other inputs use the pointer kernel.

Opt-in (PARALLAX_TRAIN_BWD=atomic): a small kernel computes delta and beta, then one fused
kernel per key block also forms dq/dr from the same tiles and adds them into fp32 buffers
with atomics: 8 matmuls per tile instead of the two-kernel path's 11, but the summation order,
and so the last bits of dq/dr, vary between runs. PARALLAX_TRAIN_BWD=fused / fused_atomic (Hopper,
D = 128): the Gluon dk/dv kernel with a third warpgroup forming dq/dr from the consumers' dS tiles
and adding them with TMA reduce-add, in key-block order (deterministic) or in arrival order
(dkv_gluon.py; measured slower than the default, BENCHMARKS.md).

Masks: each row block's key range is split into a leading boundary part, a fully
visible interior and a trailing boundary part; only boundary tiles build a mask
(window and causal bounds are exact at every row, whatever the tile alignment).

Layouts: dense (B, L, H, D) or packed varlen (total, H, D) with cu_seqlens; both
read through the same kernels (a dense batch is a sequence at b * stride_b).
Head dims that are not powers of two are padded to the next one with masked loads. On Hopper the
forward streams dense 2-byte K/V through TMA tensor descriptors (USE_TMA, below).

On Hopper (sm_90), for 2-byte dtypes and head dims 64 and 128, warp-specialized Gluon kernels with
the same math take over each of the three kernels (fwd_gluon.py, dq_gluon.py, dkv_gluon.py; their
ENABLED switches, PARALLAX_{FWD,DQ,DKV}_GLUON=0, give the Triton kernel back).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import dkv_gluon, dq_gluon, fwd_gluon
from ._device import cdiv, next_pow2, on_input_device

LOG2E = 1.4426950408889634

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _interpreting() -> bool:
    # also set after import (tests switch the interpreter on per session)
    return _INTERPRET or os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------

@triton.jit
def _visible(offs_m, offs_n, shift, lk, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """(M, N) mask: key n is in range and inside [m + shift - left, m + shift + right]."""
    vis = (offs_n[None, :] < lk) & (offs_m[:, None] >= 0)
    if HAS_LEFT:
        vis = vis & (offs_n[None, :] >= offs_m[:, None] + shift - left)
    if HAS_RIGHT:
        vis = vis & (offs_n[None, :] <= offs_m[:, None] + shift + right)
    return vis


@triton.jit
def _seq_bounds(CUQ, CUK, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    if VARLEN:
        qs = tl.load(CUQ + b)
        lq = tl.load(CUQ + b + 1) - qs
        ks = tl.load(CUK + b)
        lk = tl.load(CUK + b + 1) - ks
    else:
        qs = 0
        lq = seqlen_q
        ks = 0
        lk = seqlen_k
    return qs, lq, ks, lk


@triton.jit
def _kv_program(CUQ, CUK, seqlen_q, seqlen_k, HKV: tl.constexpr, VARLEN: tl.constexpr):
    """A dk/dv program's sequence (int32 and 64-bit index), kv head and sequence bounds."""
    pid_bh = tl.program_id(0)
    b32 = pid_bh // HKV
    b = b32.to(tl.int64)
    qs, lq, ks, lk = _seq_bounds(CUQ, CUK, b, seqlen_q, seqlen_k, VARLEN)
    return b32, b, pid_bh % HKV, qs, lq, ks, lk


@triton.jit
def _key_ranges(m0, lq, lk, shift, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key tiles seen by rows [m0, m0 + BLOCK_M): [start, a) masked, [a, c) unmasked, [c, end) masked."""
    m_last = tl.minimum(m0 + BLOCK_M, lq) - 1
    lo = 0
    full_lo = 0
    if HAS_LEFT:
        lo = tl.maximum(0, m0 + shift - left)
        # a tile is clear of the left bound when its first key is visible to the last row
        full_lo = (tl.maximum(0, m_last + shift - left) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    hi = lk
    upper = lk
    if HAS_RIGHT:
        hi = tl.minimum(lk, m_last + shift + right + 1)
        # ... and clear of the right bound (and of Lk) when its last key is visible to the first row
        upper = tl.minimum(lk, m0 + shift + right + 1)
    hi = tl.maximum(hi, lo)
    start = lo // BLOCK_N * BLOCK_N
    full_hi = tl.maximum(upper, 0) // BLOCK_N * BLOCK_N
    a = tl.minimum(tl.maximum(full_lo, start), hi)
    c = tl.maximum(a, tl.minimum(full_hi, hi))
    return start, a, c, hi


@triton.jit
def _query_ranges(n0, lq, lk, shift, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query tiles that see keys [n0, n0 + BLOCK_N): [start, a) masked, [a, c) unmasked, [c, end) masked.

    Rows past Lq need no mask here: their lse is +inf, so their probabilities are 0.
    """
    n_last = tl.minimum(n0 + BLOCK_N, lk) - 1
    lo = 0
    full_lo = 0
    if HAS_RIGHT:
        # key j is visible to row i when i >= j - shift - right
        lo = tl.maximum(0, n0 - shift - right)
        full_lo = (tl.maximum(0, n_last - shift - right) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    hi = lq
    upper = (lq + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    if HAS_LEFT:
        # ... and when i <= j - shift + left
        hi = tl.minimum(lq, n_last - shift + left + 1)
        upper = tl.minimum(lq, n0 - shift + left + 1)
    hi = tl.maximum(hi, lo)
    start = lo // BLOCK_M * BLOCK_M
    full_hi = tl.maximum(upper, 0) // BLOCK_M * BLOCK_M
    if not HAS_LEFT:
        full_hi = upper
    a = tl.minimum(tl.maximum(full_lo, start), hi)
    c = tl.maximum(a, tl.minimum(full_hi, hi))
    return start, a, c, hi


@triton.jit
def _rows(P, DESC, b, h, row0, offs, offs_d, dmask, stride_l, limit,
          BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """(BLOCK, BLOCK_D) tile of rows [row0, row0 + BLOCK) of head h; rows >= limit and columns >= D read 0.

    TMA: a (B, L, H, D) tensor descriptor (dense layout only, where limit is the tensor's L and the
    copy engine zero-fills out-of-bounds rows and columns); else masked pointer loads from P, the
    head's first row.
    """
    if TMA:
        return tl.reshape(DESC.load([b, row0, h, 0]), (BLOCK, BLOCK_D))
    else:
        mask = (offs < limit)[:, None] & dmask[None, :]
        return tl.load(P + offs[:, None] * stride_l + offs_d[None, :], mask=mask, other=0.0)


# ----------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------

@triton.jit
def _fwd_tiles(acc1, acc2, d1, d2, m_i, q, r, K, V, KD, VD, b32, hk, offs_m, offs_d, dmask, stride_kl,
               lo, hi, shift, lk, left, right, scale_log2,
               MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _rows(K, KD, b32, hk, n0, offs_n, offs_d, dmask, stride_kl, lk, BLOCK_N, BLOCK_D, TMA)
        v = _rows(V, VD, b32, hk, n0, offs_n, offs_d, dmask, stride_kl, lk, BLOCK_N, BLOCK_D, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        t = tl.dot(r, tl.trans(k), input_precision=PREC)
        if MASK:
            s = tl.where(_visible(offs_m, offs_n, shift, lk, left, right, HAS_LEFT, HAS_RIGHT), s,
                         float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no visible key keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        e = tl.exp2(s - m_safe[:, None])
        et = e * t
        d1 = d1 * alpha + tl.sum(e, 1)
        d2 = d2 * alpha + tl.sum(et, 1)
        acc1 = acc1 * alpha[:, None] + tl.dot(e.to(v.dtype), v, input_precision=PREC)
        acc2 = acc2 * alpha[:, None] + tl.dot(et.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc1, acc2, d1, d2, m_i


@triton.jit
def _fwd_kernel(
    Q, R, K, V, O, VB, LSE, TB, CUQ, CUK, KD, VD,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_sb, stride_sh,
    seqlen_q, seqlen_k, scale_log2, left, right, tune_key,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PREC: tl.constexpr,
    TMA: tl.constexpr = False,
):
    pid_bh = tl.program_id(0)
    # heaviest row blocks (most keys under a causal mask) first
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b32 = pid_bh // HQ
    # 64-bit batch index: b * stride_b overflows int32 once a tensor passes 2^31 elements
    b = b32.to(tl.int64)
    h = pid_bh % HQ
    hk = h // G
    qs, lq, ks, lk = _seq_bounds(CUQ, CUK, b, seqlen_q, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= lq:
        return
    shift = lk - lq
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    row_mask = offs_m < lq
    io_mask = row_mask[:, None] & dmask[None, :]
    q_off = b * stride_qb + (qs + offs_m[:, None]) * stride_ql + h * stride_qh + offs_d[None, :]
    q = tl.load(Q + q_off, mask=io_mask, other=0.0)
    r = tl.load(R + q_off, mask=io_mask, other=0.0)
    kv_base = b * stride_kb + ks * stride_kl + hk * stride_kh
    Kp = K + kv_base
    Vp = V + kv_base

    acc1 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    d1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    d2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    start, a, c, end = _key_ranges(m0, lq, lk, shift, left, right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    acc1, acc2, d1, d2, m_i = _fwd_tiles(acc1, acc2, d1, d2, m_i, q, r, Kp, Vp, KD, VD, b32, hk, offs_m, offs_d,
                                         dmask, stride_kl, start, a, shift, lk, left, right,
                                         scale_log2, True, HAS_LEFT, HAS_RIGHT, BLOCK_N, BLOCK_D, PREC, TMA)
    acc1, acc2, d1, d2, m_i = _fwd_tiles(acc1, acc2, d1, d2, m_i, q, r, Kp, Vp, KD, VD, b32, hk, offs_m, offs_d,
                                         dmask, stride_kl, a, c, shift, lk, left, right,
                                         scale_log2, False, HAS_LEFT, HAS_RIGHT, BLOCK_N, BLOCK_D, PREC, TMA)
    acc1, acc2, d1, d2, m_i = _fwd_tiles(acc1, acc2, d1, d2, m_i, q, r, Kp, Vp, KD, VD, b32, hk, offs_m, offs_d,
                                         dmask, stride_kl, c, end, shift, lk, left, right,
                                         scale_log2, True, HAS_LEFT, HAS_RIGHT, BLOCK_N, BLOCK_D, PREC, TMA)

    has = d1 > 0.0
    inv = tl.where(has, 1.0 / tl.where(has, d1, 1.0), 0.0)
    vb = acc1 * inv[:, None]
    tb = d2 * inv
    o = vb * (1.0 + tb)[:, None] - acc2 * inv[:, None]
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, d1, 1.0)), float("inf"))
    tl.store(O + q_off, o.to(O.dtype.element_ty), mask=io_mask)
    tl.store(VB + q_off, vb.to(VB.dtype.element_ty), mask=io_mask)
    s_off = b * stride_sb + h * stride_sh + qs + offs_m
    tl.store(LSE + s_off, lse2, mask=row_mask)
    tl.store(TB + s_off, tb, mask=row_mask)


# ----------------------------------------------------------------------------------------
# backward: dq, dr (and delta, beta)
# ----------------------------------------------------------------------------------------

@triton.jit
def _dq_tiles(dq, dr, q, r, do, lse2, tb, delta, beta, K, V, KD, VD, b32, hk, offs_m, offs_d, dmask, stride_kl,
              lo, hi, shift, lk, left, right, scale_log2,
              MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _rows(K, KD, b32, hk, n0, offs_n, offs_d, dmask, stride_kl, lk, BLOCK_N, BLOCK_D, TMA)
        v = _rows(V, VD, b32, hk, n0, offs_n, offs_d, dmask, stride_kl, lk, BLOCK_N, BLOCK_D, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        t = tl.dot(r, tl.trans(k), input_precision=PREC)
        if MASK:
            s = tl.where(_visible(offs_m, offs_n, shift, lk, left, right, HAS_LEFT, HAS_RIGHT), s,
                         float("-inf"))
        p = tl.exp2(s - lse2[:, None])
        a = tl.dot(do, tl.trans(v), input_precision=PREC)
        pa = p * (a - beta[:, None])
        ds1 = p * (a - delta[:, None]) + pa * (tb[:, None] - t)
        dq = tl.dot(ds1.to(k.dtype), k, dq, input_precision=PREC)
        dr = tl.dot(pa.to(k.dtype), k, dr, input_precision=PREC)
    return dq, dr


@triton.jit
def _bwd_dq_kernel(
    Q, R, K, V, O, VB, DO, LSE, TB, DELTA, BETA, DQ, DR, CUQ, CUK, KD, VD,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_sb, stride_sh,
    seqlen_q, seqlen_k, scale, scale_log2, left, right, tune_key,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PREC: tl.constexpr,
    TMA: tl.constexpr = False,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b32 = pid_bh // HQ
    # 64-bit batch index: b * stride_b overflows int32 once a tensor passes 2^31 elements
    b = b32.to(tl.int64)
    h = pid_bh % HQ
    hk = h // G
    qs, lq, ks, lk = _seq_bounds(CUQ, CUK, b, seqlen_q, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= lq:
        return
    shift = lk - lq
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    row_mask = offs_m < lq
    io_mask = row_mask[:, None] & dmask[None, :]
    q_off = b * stride_qb + (qs + offs_m[:, None]) * stride_ql + h * stride_qh + offs_d[None, :]
    q = tl.load(Q + q_off, mask=io_mask, other=0.0)
    r = tl.load(R + q_off, mask=io_mask, other=0.0)
    do = tl.load(DO + q_off, mask=io_mask, other=0.0)
    o = tl.load(O + q_off, mask=io_mask, other=0.0).to(tl.float32)
    vb = tl.load(VB + q_off, mask=io_mask, other=0.0).to(tl.float32)
    delta = tl.sum(do.to(tl.float32) * o, 1)
    beta = tl.sum(do.to(tl.float32) * vb, 1)
    s_off = b * stride_sb + h * stride_sh + qs + offs_m
    tl.store(DELTA + s_off, delta, mask=row_mask)
    tl.store(BETA + s_off, beta, mask=row_mask)
    lse2 = tl.load(LSE + s_off, mask=row_mask, other=float("inf"))
    tb = tl.load(TB + s_off, mask=row_mask, other=0.0)

    kv_base = b * stride_kb + ks * stride_kl + hk * stride_kh
    Kp = K + kv_base
    Vp = V + kv_base
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dr = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    start, a, c, end = _key_ranges(m0, lq, lk, shift, left, right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    dq, dr = _dq_tiles(dq, dr, q, r, do, lse2, tb, delta, beta, Kp, Vp, KD, VD, b32, hk, offs_m, offs_d, dmask,
                       stride_kl, start, a, shift, lk, left, right, scale_log2, True, HAS_LEFT, HAS_RIGHT, BLOCK_N,
                       BLOCK_D, PREC, TMA)
    dq, dr = _dq_tiles(dq, dr, q, r, do, lse2, tb, delta, beta, Kp, Vp, KD, VD, b32, hk, offs_m, offs_d, dmask,
                       stride_kl, a, c, shift, lk, left, right, scale_log2, False, HAS_LEFT, HAS_RIGHT, BLOCK_N,
                       BLOCK_D, PREC, TMA)
    dq, dr = _dq_tiles(dq, dr, q, r, do, lse2, tb, delta, beta, Kp, Vp, KD, VD, b32, hk, offs_m, offs_d, dmask,
                       stride_kl, c, end, shift, lk, left, right, scale_log2, True, HAS_LEFT, HAS_RIGHT, BLOCK_N,
                       BLOCK_D, PREC, TMA)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=io_mask)
    # dS2 = -p (a - beta), so dr = -(pa K)
    tl.store(DR + q_off, (-dr).to(DR.dtype.element_ty), mask=io_mask)


# ----------------------------------------------------------------------------------------
# backward: dk, dv
# ----------------------------------------------------------------------------------------

@triton.jit
def _dkv_weights(dv, v, do, st, tt, lse2, tb, delta, beta, scale, PREC: tl.constexpr):
    """One (keys x queries) tile's share of dv, from the masked log2 scores st = (k q^T)^T and
    tt = (k r^T)^T, and the tile's dS1 (scaled) and p (a - beta): dk gets dS1^T q - (p (a - beta))^T r."""
    pt = tl.exp2(st - lse2[None, :])
    tc = tb[None, :] - tt
    dv = tl.dot((pt * (1.0 + tc)).to(do.dtype), do, dv, input_precision=PREC)
    at = tl.dot(v, tl.trans(do), input_precision=PREC)
    pa = pt * (at - beta[None, :])
    ds1 = (pt * (at - delta[None, :]) + pa * tc) * scale
    return dv, ds1, pa


@triton.jit
def _dkv_step(dk, dv, v, q, r, do, st, tt, lse2, tb, delta, beta, scale, PREC: tl.constexpr):
    """One (keys x queries) tile's share of dk and dv (see _dkv_weights); also returns dS1 and
    p (a - beta), which give dq and dr."""
    dv, ds1, pa = _dkv_weights(dv, v, do, st, tt, lse2, tb, delta, beta, scale, PREC)
    dk = tl.dot(ds1.to(q.dtype), q, dk, input_precision=PREC)
    dk = tl.dot((-pa).to(r.dtype), r, dk, input_precision=PREC)
    return dk, dv, ds1, pa


@triton.jit
def _dkv_tiles(dk, dv, k, v, Q, R, DO, QD, RD, DOD, b32, h, LSE, TB, DELTA, BETA, DQA, DRA, offs_n, offs_d, dmask,
               stride_ql, lo, hi, shift, lq, lk, left, right, scale, scale_log2,
               MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, FUSED: tl.constexpr,
               TMA: tl.constexpr):
    # Tiles are held transposed (keys x queries) so that P^T and dS^T feed the MMAs
    # for dv and dk without a register transpose.
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_mask = offs_m < lq
        io_mask = row_mask[:, None] & dmask[None, :]
        q_off = offs_m[:, None] * stride_ql + offs_d[None, :]
        q = _rows(Q, QD, b32, h, m0, offs_m, offs_d, dmask, stride_ql, lq, BLOCK_M, BLOCK_D, TMA)
        r = _rows(R, RD, b32, h, m0, offs_m, offs_d, dmask, stride_ql, lq, BLOCK_M, BLOCK_D, TMA)
        do = _rows(DO, DOD, b32, h, m0, offs_m, offs_d, dmask, stride_ql, lq, BLOCK_M, BLOCK_D, TMA)
        lse2 = tl.load(LSE + offs_m, mask=row_mask, other=float("inf"))
        tb = tl.load(TB + offs_m, mask=row_mask, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=row_mask, other=0.0)
        beta = tl.load(BETA + offs_m, mask=row_mask, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PREC) * scale_log2
        tt = tl.dot(k, tl.trans(r), input_precision=PREC)
        if MASK:
            vis = tl.trans(_visible(offs_m, offs_n, shift, lk, left, right, HAS_LEFT, HAS_RIGHT))
            st = tl.where(vis, st, float("-inf"))
        dk, dv, ds1, pa = _dkv_step(dk, dv, v, q, r, do, st, tt, lse2, tb, delta, beta, scale, PREC)
        if FUSED:
            # opt-in: dq/dr from the same tiles, summed over key blocks with fp32 atomics
            # (3 fewer matmuls per tile than the two-kernel path; the sum order varies run to run)
            dq_t = tl.dot(tl.trans(ds1).to(k.dtype), k, input_precision=PREC)
            dr_t = tl.dot(tl.trans(-pa).to(k.dtype), k, input_precision=PREC)
            tl.atomic_add(DQA + q_off, dq_t, mask=io_mask, sem="relaxed")
            tl.atomic_add(DRA + q_off, dr_t, mask=io_mask, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkv_kernel(
    Q, R, K, V, DO, LSE, TB, DELTA, BETA, DK, DV, DQA, DRA, CUQ, CUK, QD, RD, DOD,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_sb, stride_sh,
    seqlen_q, seqlen_k, scale, scale_log2, left, right, tune_key,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PREC: tl.constexpr,
    FUSED: tl.constexpr = False, TMA: tl.constexpr = False,
):
    b32, b, hk, qs, lq, ks, lk = _kv_program(CUQ, CUK, seqlen_q, seqlen_k, HKV, VARLEN)
    pid_n = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    if n0 >= lk:
        return
    shift = lk - lq
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    kv_mask = (offs_n < lk)[:, None] & dmask[None, :]
    kv_off = b * stride_kb + (ks + offs_n[:, None]) * stride_kl + hk * stride_kh + offs_d[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    start, a, c, end = _query_ranges(n0, lq, lk, shift, left, right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    for g in range(G):
        h = hk * G + g
        q_base = b * stride_qb + qs * stride_ql + h * stride_qh
        s_base = b * stride_sb + h * stride_sh + qs
        Qp = Q + q_base
        Rp = R + q_base
        DOp = DO + q_base
        dk, dv = _dkv_tiles(dk, dv, k, v, Qp, Rp, DOp, QD, RD, DOD, b32, h, LSE + s_base, TB + s_base,
                            DELTA + s_base, BETA + s_base, DQA + q_base, DRA + q_base, offs_n, offs_d, dmask,
                            stride_ql, start, a, shift, lq, lk, left, right, scale, scale_log2, True, HAS_LEFT,
                            HAS_RIGHT, BLOCK_M, BLOCK_D, PREC, FUSED, TMA)
        dk, dv = _dkv_tiles(dk, dv, k, v, Qp, Rp, DOp, QD, RD, DOD, b32, h, LSE + s_base, TB + s_base,
                            DELTA + s_base, BETA + s_base, DQA + q_base, DRA + q_base, offs_n, offs_d, dmask,
                            stride_ql, a, c, shift, lq, lk, left, right, scale, scale_log2, False, HAS_LEFT,
                            HAS_RIGHT, BLOCK_M, BLOCK_D, PREC, FUSED, TMA)
        dk, dv = _dkv_tiles(dk, dv, k, v, Qp, Rp, DOp, QD, RD, DOD, b32, h, LSE + s_base, TB + s_base,
                            DELTA + s_base, BETA + s_base, DQA + q_base, DRA + q_base, offs_n, offs_d, dmask,
                            stride_ql, c, end, shift, lq, lk, left, right, scale, scale_log2, True, HAS_LEFT,
                            HAS_RIGHT, BLOCK_M, BLOCK_D, PREC, FUSED, TMA)
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dkv_tma_kernel(
    Q, R, K, V, DO, LSE, TB, DELTA, BETA, DK, DV, CUQ, CUK,
    stride_kb, stride_kl, stride_kh,
    stride_sb, stride_sh,
    seqlen_q, seqlen_k, scale, scale_log2, left, right, tune_key,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PREC: tl.constexpr,
    WS: tl.constexpr, STATS_TMA: tl.constexpr,
):
    """dk/dv with every tile read through 2-D tensor descriptors made on the device.

    q, r, dO (and k, v) are viewed as (rows, heads * D) matrices over the sequence's rows and the row
    statistics as one flat vector, so a tile is one TMA copy: no address registers and no
    per-element load masks, which leaves room for 128 keys x 32 queries at 8 warps without the
    pointer kernel's spills. The GQA group's query heads and their query blocks are walked as one
    flat loop, every tile masked (rows past the sequence read as zeros and are masked out here, so
    no branch splits the loop), which is also the form Triton's Hopper warp specialization (WS) accepts; WS
    also needs the row statistics through descriptors (STATS_TMA), whose offsets must then be
    16-byte aligned (sequence lengths a multiple of 4, checked by the caller).
    """
    b32, b, hk, qs, lq, ks, lk = _kv_program(CUQ, CUK, seqlen_q, seqlen_k, HKV, VARLEN)
    pid_n = tl.program_id(1)
    q_row0 = qs
    k_row0 = ks
    if not VARLEN:
        q_row0 = b32 * seqlen_q
        k_row0 = b32 * seqlen_k
    n0 = pid_n * BLOCK_N
    shift = lk - lq
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    # descriptors over this sequence's rows only (the statistics: its kv head's query heads' rows,
    # contiguous in the dense layout): the copy engine zero-fills rows past its end instead of
    # reading the next sequence's, whose NaN would reach this one through 0 * NaN in the products
    # (one row at least: a sequence without keys or queries reads nothing it uses)
    q_off = q_row0.to(tl.int64) * (HQ * D)
    k_off = k_row0.to(tl.int64) * (HKV * D)
    s_base = b * stride_sb + hk * G * stride_sh + qs
    lq1 = tl.maximum(lq, 1)
    lk1 = tl.maximum(lk, 1)
    k_desc = tl.make_tensor_descriptor(K + k_off, [lk1, HKV * D], [HKV * D, 1], [BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(V + k_off, [lk1, HKV * D], [HKV * D, 1], [BLOCK_N, D])
    q_desc = tl.make_tensor_descriptor(Q + q_off, [lq1, HQ * D], [HQ * D, 1], [BLOCK_M, D])
    r_desc = tl.make_tensor_descriptor(R + q_off, [lq1, HQ * D], [HQ * D, 1], [BLOCK_M, D])
    do_desc = tl.make_tensor_descriptor(DO + q_off, [lq1, HQ * D], [HQ * D, 1], [BLOCK_M, D])
    # (made only where their base is 16-byte aligned, which STATS_TMA says)
    d_base = 0
    if STATS_TMA:
        d_base = s_base
    n_stats = G * stride_sh
    lse_desc = tl.make_tensor_descriptor(LSE + d_base, [n_stats], [1], [BLOCK_M])
    tb_desc = tl.make_tensor_descriptor(TB + d_base, [n_stats], [1], [BLOCK_M])
    delta_desc = tl.make_tensor_descriptor(DELTA + d_base, [n_stats], [1], [BLOCK_M])
    beta_desc = tl.make_tensor_descriptor(BETA + d_base, [n_stats], [1], [BLOCK_M])
    k = k_desc.load([n0, hk * D])
    v = v_desc.load([n0, hk * D])
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    start, a, c, end = _query_ranges(n0, lq, lk, shift, left, right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    # a program past its sequence's keys (varlen) walks nothing
    blocks = tl.where(n0 < lk, tl.cdiv(end - start, BLOCK_M), 0)
    for it in tl.range(0, G * blocks, warp_specialize=WS):
        g = it // blocks
        m0 = start + (it - g * blocks) * BLOCK_M
        h = hk * G + g
        do = do_desc.load([m0, h * D])
        s_row = g * stride_sh + m0
        offs_m = m0 + tl.arange(0, BLOCK_M)
        if STATS_TMA:
            lse2 = lse_desc.load([s_row])
            tb = tb_desc.load([s_row])
            delta = delta_desc.load([s_row])
            beta = beta_desc.load([s_row])
        else:
            s_ptr = s_base + s_row + tl.arange(0, BLOCK_M)
            s_in = offs_m < lq
            lse2 = tl.load(LSE + s_ptr, mask=s_in, other=0.0)
            tb = tl.load(TB + s_ptr, mask=s_in, other=0.0)
            delta = tl.load(DELTA + s_ptr, mask=s_in, other=0.0)
            beta = tl.load(BETA + s_ptr, mask=s_in, other=0.0)
        q = q_desc.load([m0, h * D])
        r = r_desc.load([m0, h * D])
        st = tl.dot(k, tl.trans(q), input_precision=PREC) * scale_log2
        tt = tl.dot(k, tl.trans(r), input_precision=PREC)
        vis = _visible(offs_m, offs_n, shift, lk, left, right, HAS_LEFT, HAS_RIGHT) & (offs_m < lq)[:, None]
        st = tl.where(tl.trans(vis), st, float("-inf"))
        dk, dv, ds1, pa = _dkv_step(dk, dv, v, q, r, do, st, tt, lse2, tb, delta, beta, scale, PREC)
    kv_mask = (offs_n < lk)[:, None]
    kv_off = b * stride_kb + (ks + offs_n[:, None]) * stride_kl + hk * stride_kh + offs_d[None, :]
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_pre_kernel(O, VB, DO, DELTA, BETA, CUQ,
                    stride_qb, stride_ql, stride_qh, stride_sb, stride_sh, seqlen_q,
                    HQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    VARLEN: tl.constexpr):
    """delta = dO.o and beta = dO.vbar per row (the fused backward needs them before its loop)."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    qs, lq, _, _ = _seq_bounds(CUQ, CUQ, b, seqlen_q, seqlen_q, VARLEN)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < lq
    io_mask = row_mask[:, None] & (offs_d < D)[None, :]
    off = b * stride_qb + (qs + offs_m[:, None]) * stride_ql + h * stride_qh + offs_d[None, :]
    do = tl.load(DO + off, mask=io_mask, other=0.0).to(tl.float32)
    o = tl.load(O + off, mask=io_mask, other=0.0).to(tl.float32)
    vb = tl.load(VB + off, mask=io_mask, other=0.0).to(tl.float32)
    s_off = b * stride_sb + h * stride_sh + qs + offs_m
    tl.store(DELTA + s_off, tl.sum(do * o, 1), mask=row_mask)
    tl.store(BETA + s_off, tl.sum(do * vb, 1), mask=row_mask)


@triton.jit
def _fused_acc_out_kernel(ACC, DQ, DR, T, acc_stride, HQ: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr):
    """dq[t, h, :] = ACC[0, h D : (h + 1) D, t] and dr from ACC[1], in the output dtype: the fused
    backward's fp32 sums (held transposed, as its dq^T = K^T dS^T products come out) to q's layout."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    offs_d = tl.arange(0, D)
    t_mask = offs_t < T
    src = (h * D + offs_d)[:, None].to(tl.int64) * acc_stride + offs_t[None, :]
    dst = offs_t[:, None].to(tl.int64) * (HQ * D) + h * D + offs_d[None, :]
    x = tl.load(ACC + src, mask=t_mask[None, :], other=0.0)
    tl.store(DQ + dst, tl.trans(x).to(DQ.dtype.element_ty), mask=t_mask[:, None])
    x = tl.load(ACC + HQ * D * acc_stride + src, mask=t_mask[None, :], other=0.0)
    tl.store(DR + dst, tl.trans(x).to(DR.dtype.element_ty), mask=t_mask[:, None])


def fused_acc_out(acc, dq, dr):
    """dq, dr (rows, HQ, D) from the fused backward's fp32 (2, HQ * D, >= rows) sums."""
    rows, hq, d = dq.shape[0] if dq.dim() == 3 else dq.shape[0] * dq.shape[1], dq.shape[-2], dq.shape[-1]
    block_t = 64
    if rows:
        _fused_acc_out_kernel[(cdiv(rows, block_t), hq)](acc, dq, dr, rows, acc.stride(1), HQ=hq, D=d,
                                                        BLOCK_T=block_t)
    return dq, dr


# ----------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages).
#
# By default each kernel launches one fixed configuration per head-dim class, chosen for
# register pressure (two fp32 accumulators per program, four score-sized tiles per step)
# and the H200's shared memory: compiling and timing a tuning space costs seconds per
# configuration and mask kind on first use. PARALLAX_TRAIN_AUTOTUNE=1 switches to
# triton.autotune over the small spaces below; its results are cached per
# (sequence-length bucket, head dim, GQA group, mask kind, dtype), never re-tuned per call.
FIXED = {
    "fwd": {128: (128, 64, 8, 3), 256: (64, 32, 4, 2)},
    "dq": {128: (128, 32, 8, 3), 256: (64, 32, 4, 2)},
    "dkv": {128: (64, 128, 8, 3), 256: (32, 64, 4, 2)},
}
# dk/dv through device-made tensor descriptors (_bwd_dkv_tma_kernel): (BLOCK_M, BLOCK_N, num_warps,
# num_stages, warp_specialize) by (head-dim class, "mha" for one query head per kv head or "gqa"),
# used for 2-byte dtypes and power-of-two head dims up to 128 on Hopper or newer (DKV_TMA None:
# there; False: never, the pointer kernel above runs instead).
# Measured on the H200 (bf16, L=4096, kernel alone): 2.02 against the pointer kernel's 2.25 ms at
# B=4 H=16, 0.48 against 0.75 ms at B=1 H=16/8 (the GQA group walked in one loop). Head dims up to
# 64 take 64 query rows per step (no spills there): 2.82 against the pointer kernel's 2.90 ms
# forward+backward at B=4 H=16 L=4096 D=64, where 32 rows took 3.05.
# Triton 3.6's Hopper warp specialization (WS: 4 warps, a TMA producer and two consumer warpgroups)
# is 1-3% faster for MHA (4.641 against 4.687 ms at B=4 H=16 L=4096, 16.19 against 16.63 at
# L=16384) but not safe: its dk/dv came out NaN in 1 of 10 passes after a timing loop and in one
# pass of each of two 20-pass runs, there over one whole 128-key tile of one head (and, with the k tile
# moved to registers, in the first key row of every tile in every pass), timing-dependent, so
# evidently a race in the specialized schedule (Triton has open reports of wrong results from
# warp_specialize=True, e.g. triton-lang/triton#8311). No configuration here turns it on;
# `benchmarks/train_kernels.py --ab dkv_ws` and `--repeat` repeat the measurement and the check.
DKV_TMA = None
DKV_TMA_CONFIG = {(64, "mha"): (64, 128, 8, 3, False), (64, "gqa"): (64, 128, 8, 3, False),
                  (128, "mha"): (32, 128, 8, 3, False), (128, "gqa"): (32, 128, 8, 3, False)}


def dkv_tma_key(d: int, group: int):
    """DKV_TMA_CONFIG's key for head dim d and group size (query heads per kv head)."""
    return 64 if d <= 64 else 128, "mha" if group == 1 else "gqa"


# The opt-in atomic backward's kernel (dk/dv plus dq/dr partials): the dk/dv tiling does not fit
# the H200's shared memory once the dq/dr products are added (247,808 of 232,448 bytes at D = 128);
# 32 query rows do (181,248 bytes, sm_90a, Triton 3.6).
ATOMIC_DKV = {128: (32, 128, 8, 3), 256: (32, 64, 4, 2)}
_FWD_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)]
_DQ_CONFIGS = [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)]
_DKV_CONFIGS = [(64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 3)]
_DKV_TMA_CONFIGS = [(32, 128, 8, 3), (64, 128, 8, 3), (32, 128, 8, 4), (32, 64, 4, 3)]
_TUNE_KEY = ["tune_key", "BLOCK_D", "G", "VARLEN", "HAS_LEFT", "HAS_RIGHT"]

# The interpreter runs one fixed, small configuration (tuning there would only cost time);
# unequal BLOCK_M / BLOCK_N exercise the tile-range arithmetic.
INTERPRET_BLOCKS = {"fwd": (32, 16), "dq": (16, 32), "dkv": (16, 32)}


def _configs(table):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in table]


_fwd_tuned = triton.autotune(_configs(_FWD_CONFIGS), key=_TUNE_KEY)(_fwd_kernel)
# warp specialization stays out of the tuning space (see DKV_TMA_CONFIG)
_dkv_tma_tuned = triton.autotune(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WS": False}, num_warps=w, num_stages=st)
     for bm, bn, w, st in _DKV_TMA_CONFIGS],
    key=["tune_key", "D", "G", "VARLEN", "HAS_LEFT", "HAS_RIGHT"])(_bwd_dkv_tma_kernel)
_dq_tuned = triton.autotune(_configs(_DQ_CONFIGS), key=_TUNE_KEY)(_bwd_dq_kernel)
_dkv_tuned = triton.autotune(_configs(_DKV_CONFIGS), key=_TUNE_KEY)(_bwd_dkv_kernel)


# The compiled kernel of each kernel's last fixed-configuration launch (registers, spills: the
# benchmark's sweep reports them).
LAST_COMPILED = {}


# Tiles streamed in a kernel's inner loop can be read with TMA (tensor descriptors): no per-element
# address registers, and the copy engine zero-fills rows past the end. USE_TMA None: where usable
# (dense layout, 2-byte dtype, 16-byte aligned strides; Hopper or newer, or the interpreter) for the
# kernels in TMA_KERNELS and sequences of TMA_MIN_KEYS keys or more; True: also shorter ones;
# False: never (pointer loads everywhere, as varlen inputs always use).
# Measured on the H200 (B=4 H=16 L=4096 D=128 bf16): the backward kernels spilled more registers
# with descriptors (dq/dr 0 -> 12, dk/dv 30 -> 68) and forward+backward slowed from 4.55 to 4.76 ms,
# and building five descriptors per call made L=1024 host-bound (0.55 -> 0.92 ms); so by default
# only the forward streams K/V through TMA (interleaved A/B, median of 3: forward 1.114 against
# 1.143 ms, forward+backward 4.58 against 4.62 ms), and only for sequences of at least
# TMA_MIN_KEYS keys on a GPU: building the two descriptors costs about 0.15 ms of host time per
# call, which short sequences cannot hide.
USE_TMA = None
TMA_KERNELS = frozenset({"fwd"})
TMA_MIN_KEYS = 2048


def _use_tma(meta, tensors, keys: int | None = None) -> bool:
    if USE_TMA is False or meta["VARLEN"] or not tensors:
        return False
    for t in tensors:
        esize = t.element_size()
        if esize != 2 or t.dim() != 4 or t.stride(-1) != 1 or t.data_ptr() % 16 or \
                any(st * esize % 16 for st in t.stride()[:-1]):
            return False
    t = tensors[0]
    if _interpreting():
        return True
    if keys is not None and keys < TMA_MIN_KEYS and USE_TMA is None:
        return False
    return t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


def _launch(tuned, raw, name, grid_of, head, tail, meta, tiles=(), keys=None):
    """Launch with the fixed (or autotuned) configuration. The kernel's arguments are head, one
    argument per entry of tiles, then tail; tiles are (tensor, "M" or "N"): a (B, L, H, D) tensor
    whose rows the kernel streams in BLOCK_M or BLOCK_N tiles, passed as a tensor descriptor when
    TMA is used and as the tensor (unused) otherwise."""
    tensors = [t for t, _ in tiles]
    if _interpreting():
        (bm, bn), launch = INTERPRET_BLOCKS[name], {}
    elif os.environ.get("PARALLAX_TRAIN_AUTOTUNE") == "1":
        # descriptors are built for one tile shape, so tuned launches use pointer loads
        tuned[grid_of](*head, *tensors, *tail, TMA=False, **meta)
        return
    else:
        bm, bn, w, st = FIXED[name][128 if meta["BLOCK_D"] <= 128 else 256]
        launch = dict(num_warps=w, num_stages=st)
    tma = name in TMA_KERNELS and _use_tma(meta, tensors, keys)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        tensors = [TensorDescriptor(t, list(t.shape), list(t.stride()),
                                    [1, bm if which == "M" else bn, 1, meta["BLOCK_D"]]) for t, which in tiles]
    LAST_COMPILED[name] = raw[grid_of({"BLOCK_M": bm, "BLOCK_N": bn})](
        *head, *tensors, *tail, BLOCK_M=bm, BLOCK_N=bn, TMA=tma, **launch, **meta)


def _dkv_tma_usable(tensors, d: int) -> bool:
    """Whether _bwd_dkv_tma_kernel can read these contiguous tensors: a 2-byte dtype (TMA tiles are
    MMA operands as loaded), a power-of-two head dim from 16 to 128 (a tile is exactly one head's
    columns) and 16-byte aligned bases; on Hopper or newer, or under the interpreter."""
    if DKV_TMA is False or d not in (16, 32, 64, 128) or tensors[0].element_size() != 2:
        return False
    if any(t.data_ptr() % 16 or not t.is_contiguous() for t in tensors):
        return False
    if _interpreting():
        return True
    t = tensors[0]
    return t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


def _scratch(size: int, alignment: int, stream):
    # descriptors made on the device live in a global scratch buffer of 128 bytes each per program
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _with_scratch(launch):
    """Run launch() with an allocator for device-made tensor descriptors: the caller's, if they set
    one with triton.set_allocator, else torch's caching allocator (so CUDA-graph capture works)."""
    try:
        from triton.runtime import _allocation
        current = _allocation._allocator.get()
        if not isinstance(current, _allocation.NullAllocator):
            return launch()
        token = _allocation._allocator.set(_scratch)
    except (ImportError, AttributeError):  # another triton layout: set it for the process
        triton.set_allocator(_scratch)
        return launch()
    try:
        return launch()
    finally:
        _allocation._allocator.reset(token)


def _launch_dkv_tma(q, r, k, v, dout, lse, tbar, delta, beta, dk, dv, cu_q_arg, cu_k_arg, batch, hkv, sk, ss,
                    max_q, max_k, scale, left, right, meta):
    interpret = _interpreting()
    # descriptor offsets along the flat statistics must be 16-byte aligned: rows of a multiple of 4
    # (every BLOCK_M here is a multiple of 4 too); warp specialization needs those descriptor reads
    stats_tma = not meta["VARLEN"] and max_q % 4 == 0
    tuned = not interpret and os.environ.get("PARALLAX_TRAIN_AUTOTUNE") == "1"
    key = dkv_tma_key(meta["D"], meta["G"])
    bm, bn, w, st, ws = DKV_TMA_CONFIG[key]
    if ws and not stats_tma:
        bm, bn, w, st, ws = DKV_TMA_CONFIG[(key[0], "gqa")]
        ws = False
    stats_tma = stats_tma and bm % 4 == 0
    launch = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, WS=ws)
    if interpret:
        bm, bn = INTERPRET_BLOCKS["dkv"]
        launch = dict(BLOCK_M=bm, BLOCK_N=bn, WS=ws)
    args = (q, r, k, v, dout, lse, tbar, delta, beta, dk, dv, cu_q_arg, cu_k_arg, *sk, *ss, max_q, max_k,
            scale, scale * LOG2E, left, right, _tune_key(max_q, max_k))
    consts = dict(HQ=q.shape[-2], HKV=hkv, G=meta["G"], D=meta["D"], VARLEN=meta["VARLEN"],
                  HAS_LEFT=meta["HAS_LEFT"], HAS_RIGHT=meta["HAS_RIGHT"], PREC=meta["PREC"], STATS_TMA=stats_tma)
    if tuned:
        grid = lambda m: (batch * hkv, cdiv(max_k, m["BLOCK_N"]))  # noqa: E731
        _with_scratch(lambda: _dkv_tma_tuned[grid](*args, **consts))
        return
    LAST_COMPILED["dkv"] = _with_scratch(lambda: _bwd_dkv_tma_kernel[(batch * hkv, cdiv(max_k, bn))](
        *args, **consts, **launch))


def _mask_args(causal: bool, left: int, right: int):
    """Fold causality into the right bound: (has_left, left, has_right, right)."""
    has_right = right >= 0 or causal
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left >= 0, max(left, 0), has_right, max(right, 0)


def _tune_key(max_seqlen_q: int, max_seqlen_k: int) -> int:
    return (next_pow2(max(max_seqlen_q, 16)) << 32) | next_pow2(max(max_seqlen_k, 16))


def _layout(q, k, cu_q, varlen: bool, max_q: int, max_k: int):
    """Batch count, per-batch lengths and strides shared by the three kernels."""
    if varlen:
        batch = cu_q.numel() - 1
        hq, d = q.shape[1], q.shape[2]
        hkv = k.shape[1]
        sq = (0, q.stride(0), q.stride(1))
        sk = (0, k.stride(0), k.stride(1))
        ss = (0, q.shape[0])
    else:
        batch, max_q, hq, d = q.shape
        max_k, hkv = k.shape[1], k.shape[2]
        sq = (q.stride(0), q.stride(1), q.stride(2))
        sk = (k.stride(0), k.stride(1), k.stride(2))
        ss = (hq * max_q, max_q)
    return batch, hq, hkv, d, max_q, max_k, sq, sk, ss


def _stats_shape(q, varlen: bool):
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def _prec(dtype):
    # fp32 inputs get full-precision dots (not tf32): they are chosen for accuracy.
    return "ieee" if dtype == torch.float32 else "tf32"


@on_input_device
def fwd(q, r, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float, left: int, right: int):
    """Returns (out, vbar, lse2, tbar); inputs contiguous, same dtype."""
    varlen = cu_q is not None
    batch, hq, hkv, d, max_q, max_k, sq, sk, ss = _layout(q, k, cu_q, varlen, max_q, max_k)
    out = torch.empty_like(q)
    vbar = torch.empty_like(q)
    lse = torch.empty(_stats_shape(q, varlen), device=q.device, dtype=torch.float32)
    tbar = torch.empty_like(lse)
    has_left, left, has_right, right = _mask_args(causal, left, right)
    cu_q_arg = cu_q if varlen else q
    cu_k_arg = cu_k if varlen else q
    meta = dict(HQ=hq, G=hq // hkv, D=d, BLOCK_D=max(16, next_pow2(d)), VARLEN=varlen,
                HAS_LEFT=has_left, HAS_RIGHT=has_right, PREC=_prec(q.dtype))
    if fwd_gluon.ENABLED and fwd_gluon.usable(q, k, d, (q, r, k, v)) and q.numel():
        LAST_COMPILED["fwd"] = _with_scratch(lambda: fwd_gluon.launch(
            q, r, k, v, out, vbar, lse, tbar, cu_q_arg, cu_k_arg, batch, hkv, ss, max_q, max_k, scale * LOG2E,
            left, right, meta))
        return out, vbar, lse, tbar
    head = (q, r, k, v, out, vbar, lse, tbar, cu_q_arg, cu_k_arg)
    tail = (*sq, *sk, *ss, max_q, max_k, scale * LOG2E, left, right, _tune_key(max_q, max_k))
    _launch(_fwd_tuned, _fwd_kernel, "fwd",
            lambda m: (batch * hq, cdiv(max_q, m["BLOCK_M"])), head, tail, meta,
            ((k, "N"), (v, "N")), keys=max_k)
    return out, vbar, lse, tbar


@on_input_device
def bwd(dout, q, r, k, v, out, vbar, lse, tbar, cu_q, cu_k, max_q: int, max_k: int, causal: bool,
        scale: float, left: int, right: int):
    """Returns (dq, dr, dk, dv); dk/dv already reduced over each kv head's query heads."""
    varlen = cu_q is not None
    batch, hq, hkv, d, max_q, max_k, sq, sk, ss = _layout(q, k, cu_q, varlen, max_q, max_k)
    dq = torch.empty_like(q)
    dr = torch.empty_like(r)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    delta = torch.empty_like(lse)
    beta = torch.empty_like(lse)
    has_left, left, has_right, right = _mask_args(causal, left, right)
    cu_q_arg = cu_q if varlen else q
    cu_k_arg = cu_k if varlen else q
    key = _tune_key(max_q, max_k)
    meta = dict(G=hq // hkv, D=d, BLOCK_D=max(16, next_pow2(d)), VARLEN=varlen,
                HAS_LEFT=has_left, HAS_RIGHT=has_right, PREC=_prec(q.dtype))
    tail = (*sq, *sk, *ss, max_q, max_k, scale, scale * LOG2E, left, right, key)
    mode = bwd_mode()
    if mode in ("fused", "fused_atomic") and k.numel() and q.numel() and dkv_gluon.fused_usable(
            q, k, d, (q, r, k, v, out, vbar, dout)):
        return _bwd_fused(q, r, k, v, out, vbar, dout, lse, tbar, delta, beta, dk, dv, cu_q_arg, cu_k_arg,
                          batch, hq, hkv, sq, sk, ss, max_q, max_k, scale, left, right, meta, mode == "fused")
    if mode == "atomic":
        return _bwd_atomic(q, r, k, v, out, vbar, dout, lse, tbar, delta, beta, dk, dv, cu_q_arg, cu_k_arg,
                           batch, hq, hkv, sq, sk, ss, max_q, max_k, scale, left, right, key, meta)
    if dq_gluon.ENABLED and dq_gluon.usable(q, k, d, (q, r, k, v, out, vbar, dout)) and q.numel():
        LAST_COMPILED["dq"] = _with_scratch(lambda: dq_gluon.launch(
            q, r, k, v, out, vbar, dout, lse, tbar, delta, beta, dq, dr, cu_q_arg, cu_k_arg, batch, hkv, ss,
            max_q, max_k, scale, left, right, meta))
    else:
        head = (q, r, k, v, out, vbar, dout, lse, tbar, delta, beta, dq, dr, cu_q_arg, cu_k_arg)
        _launch(_dq_tuned, _bwd_dq_kernel, "dq", lambda m: (batch * hq, cdiv(max_q, m["BLOCK_M"])),
                head, tail, dict(HQ=hq, **meta), ((k, "N"), (v, "N")))
    if k.numel() == 0:
        return dq, dr, dk, dv
    tensors = (q, r, k, v, dout, lse, tbar, delta, beta)
    if dkv_gluon.ENABLED and dkv_gluon.usable(q, k, d, tensors):
        LAST_COMPILED["dkv"] = _with_scratch(lambda: dkv_gluon.launch(
            q, r, k, v, dout, lse, tbar, delta, beta, dk, dv, cu_q_arg, cu_k_arg, batch, hkv, sk, ss,
            max_q, max_k, scale, left, right, meta))
        return dq, dr, dk, dv
    if _dkv_tma_usable(tensors, d):
        _launch_dkv_tma(q, r, k, v, dout, lse, tbar, delta, beta, dk, dv, cu_q_arg, cu_k_arg, batch, hkv, sk, ss,
                        max_q, max_k, scale, left, right, meta)
        return dq, dr, dk, dv
    head = (q, r, k, v, dout, lse, tbar, delta, beta, dk, dv, q, q, cu_q_arg, cu_k_arg)
    _launch(_dkv_tuned, _bwd_dkv_kernel, "dkv", lambda m: (batch * hkv, cdiv(max_k, m["BLOCK_N"])),
            head, tail, dict(HKV=hkv, **meta), ((q, "M"), (r, "M"), (dout, "M")))
    return dq, dr, dk, dv


BWD_MODES = ("deterministic", "atomic", "fused", "fused_atomic")


def bwd_mode() -> str:
    """PARALLAX_TRAIN_BWD: "deterministic" (default: two kernels, no atomics), "atomic" (one fused Triton
    kernel, dq/dr summed with fp32 atomics), "fused" (Hopper, D = 128: one warp-specialized Gluon kernel,
    dq/dr added by TMA reduce-add in key-block order, deterministic) or "fused_atomic" (the same kernel,
    additions in arrival order). Inputs the fused kernels do not take run the default."""
    mode = os.environ.get("PARALLAX_TRAIN_BWD", "deterministic")
    if mode not in BWD_MODES:
        raise ValueError(f"PARALLAX_TRAIN_BWD: expected one of {BWD_MODES}, got {mode!r}")
    return mode


def _delta_beta(out, vbar, dout, delta, beta, cu_q_arg, batch, hq, sq, ss, max_q, meta):
    """delta, beta for the fused backwards (the split one's dq/dr kernel computes them itself)."""
    pre_m = 64
    _bwd_pre_kernel[(batch * hq, cdiv(max_q, pre_m))](
        out, vbar, dout, delta, beta, cu_q_arg, *sq, *ss, max_q, HQ=hq, D=meta["D"], BLOCK_D=meta["BLOCK_D"],
        BLOCK_M=pre_m, VARLEN=meta["VARLEN"])


def _bwd_fused(q, r, k, v, out, vbar, dout, lse, tbar, delta, beta, dk, dv, cu_q_arg, cu_k_arg,
               batch, hq, hkv, sq, sk, ss, max_q, max_k, scale, left, right, meta, ordered):
    _delta_beta(out, vbar, dout, delta, beta, cu_q_arg, batch, hq, sq, ss, max_q, meta)
    # dq^T and dr^T summed in fp32: (query heads x D) rows, a column per query of the batch (TMA rows are
    # 16-byte aligned)
    rows = q.shape[0] if meta["VARLEN"] else batch * max_q
    acc = torch.zeros(2, hq * meta["D"], cdiv(max(rows, 1), 4) * 4, device=q.device, dtype=torch.float32)
    dqa, dra = acc[0, :, :rows], acc[1, :, :rows]
    block_m = dkv_gluon.FUSED_CONFIG[meta["D"]][0]
    sem = torch.zeros(batch * hq * cdiv(max_q, block_m) if ordered else 1, device=q.device, dtype=torch.int32)
    LAST_COMPILED["dkv"] = _with_scratch(lambda: dkv_gluon.launch_fused(
        q, r, k, v, dout, lse, tbar, delta, beta, dk, dv, dqa, dra, sem, cu_q_arg, cu_k_arg, batch, hkv, sk, ss,
        max_q, max_k, scale, left, right, meta, ordered))
    return (*fused_acc_out(acc, torch.empty_like(q), torch.empty_like(r)), dk, dv)


def _bwd_atomic(q, r, k, v, out, vbar, dout, lse, tbar, delta, beta, dk, dv, cu_q_arg, cu_k_arg,
                batch, hq, hkv, sq, sk, ss, max_q, max_k, scale, left, right, key, meta):
    _delta_beta(out, vbar, dout, delta, beta, cu_q_arg, batch, hq, sq, ss, max_q, meta)
    dqa = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    dra = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    if k.numel() > 0:
        args = (q, r, k, v, dout, lse, tbar, delta, beta, dk, dv, dqa, dra, cu_q_arg, cu_k_arg, q, r, dout,
                *sq, *sk, *ss, max_q, max_k, scale, scale * LOG2E, left, right, key)
        # never autotuned: timing runs would add into the accumulators
        interp = _interpreting()
        if interp:
            bm, bn = INTERPRET_BLOCKS["dkv"]
            launch = {}
        else:
            bm, bn, w, st = ATOMIC_DKV[128 if meta["BLOCK_D"] <= 128 else 256]
            launch = dict(num_warps=w, num_stages=st)
        _bwd_dkv_kernel[(batch * hkv, cdiv(max_k, bn))](
            *args, HKV=hkv, BLOCK_M=bm, BLOCK_N=bn, FUSED=True, **meta, **launch)
    return dqa.to(q.dtype), dra.to(r.dtype), dk, dv
