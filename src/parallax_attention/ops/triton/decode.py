"""Split-KV (flash-decoding) Parallax attention against a dense or paged KV cache.

One program handles one (sequence, kv head, split). Every query row that reads
that kv head (the G = Hq / Hkv query heads times the Lq new tokens) sits in the
same tile, so each K/V tile is read from memory once per kv head. The probe r
rides in the same MMA operand as q: the rows of [Q; R] are multiplied by K^T in
a single tl.dot, which also fills the 16-row minimum of the tensor-core MMA when
G * Lq is small. Likewise [P; P*t] @ V is a single tl.dot.

Each split streams its slice of keys with the running statistics of DESIGN
section 1 (m, d1, d2, O1, O2), kept in base 2 (scores are pre-multiplied by
log2 e) so the inner loop uses exp2. A second small kernel merges the splits
exactly: each split's d1, d2, O1, O2 are rescaled by 2^(m_s - m) and summed,
then o = O1/d1 (1 + d2/d1) - O2/d1.

Graph safety: sequence lengths are read on the device, the split grid depends
only on static shapes, and every buffer has a static shape, so one captured
decode step replays with changing cache_seqlens.

Garbage safety: keys at or beyond a sequence's length are never loaded (masked
loads return 0), so stale, inf or NaN slots cannot reach either branch; keys
hidden by the causal/window mask only get -inf scores, and their probe scores
are replaced (not multiplied) by 0.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._device import cdiv, on_input_device

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    Q, R, K, V, BT, SEQ, OUT, PSTAT, PO,
    seq_const, n_new, lq, capacity, num_splits, scale_log2, win_left, win_right,
    stride_qb, stride_qm, stride_qh,
    stride_rb, stride_rm, stride_rh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_btb,
    stride_ob, stride_om, stride_oh,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    PAGED: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    ROW_MASK: tl.constexpr, SINGLE: tl.constexpr, PREC: tl.constexpr, STACKED: tl.constexpr,
    PDL: tl.constexpr, PAGE_SCALAR: tl.constexpr = False, PAGE_PRELOAD: tl.constexpr = 0,
    ONE_TILE_SPLITS: tl.constexpr = False,
):
    if PDL:
        # Let the merge grid launch as soon as every split program has started; it waits for
        # this grid's completion (gdc_wait) before reading the partials, so this only hides
        # the merge's launch latency behind the last wave. Measured on the H200: 0.4-0.9 us
        # saved at B=1 (8-32 merge programs), 2.4 us lost at B=8 L=1024 Hq/Hkv 32/8 (256);
        # so _CONFIG["PDL"] = 2 (the default) enables it only for small merge grids (use_pdl).
        gdc_launch_dependents()
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    kvh = pid_bh % HKV

    # Query rows of this program: row m is query token m // G of head kvh*G + m % G.
    offs_m = tl.arange(0, BLOCK_M)
    row_i = offs_m // G
    row_h = kvh * G + offs_m % G
    row_ok = offs_m < lq * G
    offs_d = tl.arange(0, BLOCK_D)
    # A compile-time all-true column mask when D is a power of two keeps the K/V loads
    # vectorised (16-byte accesses) instead of predicated per element.
    if BLOCK_D == D:
        d_ok = tl.full([BLOCK_D], 1, tl.int1)
    else:
        d_ok = offs_d < D

    if STACKED:
        # [Q; R] stacked along rows: rows [0, BLOCK_M) are q, rows [BLOCK_M, 2 BLOCK_M) are r.
        offs_2m = tl.arange(0, 2 * BLOCK_M)
        is_r = offs_2m >= BLOCK_M
        m2 = offs_2m % BLOCK_M
        i2 = m2 // G
        h2 = kvh * G + m2 % G
        ok2 = (m2 < lq * G)[:, None] & d_ok[None, :]
        q_ptrs = Q + b.to(tl.int64) * stride_qb + i2[:, None] * stride_qm + h2[:, None] * stride_qh \
            + offs_d[None, :]
        r_ptrs = R + b.to(tl.int64) * stride_rb + i2[:, None] * stride_rm + h2[:, None] * stride_rh \
            + offs_d[None, :]
        qv = tl.load(q_ptrs, mask=ok2 & ~is_r[:, None], other=0.0)
        rv = tl.load(r_ptrs, mask=ok2 & is_r[:, None], other=0.0)
        qr = tl.where(is_r[:, None], rv, qv)
    else:
        # Fallback: separate q and r tiles (each BLOCK_M >= 16 rows), two dots per product.
        ok1 = row_ok[:, None] & d_ok[None, :]
        qs = tl.load(Q + b.to(tl.int64) * stride_qb + row_i[:, None] * stride_qm + row_h[:, None] * stride_qh
                     + offs_d[None, :], mask=ok1, other=0.0)
        rs = tl.load(R + b.to(tl.int64) * stride_rb + row_i[:, None] * stride_rm + row_h[:, None] * stride_rh
                     + offs_d[None, :], mask=ok1, other=0.0)

    if PAGED and PAGE_PRELOAD > 0 and ONE_TILE_SPLITS:
        # Splits of one tile (and no left window) start at pid_s * BLOCK_N whatever the length,
        # so the block-table entries are read while the length is still in flight, not after.
        first_page = (pid_s * BLOCK_N) // PAGE
        offs_p, pages = _block_table_entries(BT, b, stride_btb, first_page, capacity, PAGE, PAGE_PRELOAD)
    # Keys this sequence holds after the append; clamped so that a bad length never reads
    # outside the cache.
    if HAS_SEQ:
        n = tl.load(SEQ + b).to(tl.int32) + n_new
    else:
        n = seq_const + n_new
    n = tl.minimum(tl.maximum(n, 0), capacity)

    # Keys any row can see: the window's left edge of the first row up to the last key.
    k_lo = 0
    if HAS_LEFT:
        k_lo = tl.maximum(n - lq - win_left, 0)
    span = tl.maximum(n - k_lo, 0)
    chunk = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
    s_lo = k_lo + pid_s * chunk
    s_hi = tl.minimum(s_lo + chunk, n)

    diag = row_i + n - lq  # the key aligned with each query row (bottom-right)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    d1 = tl.zeros([BLOCK_M], tl.float32)
    d2 = tl.zeros([BLOCK_M], tl.float32)
    if STACKED:
        acc = tl.zeros([2 * BLOCK_M, BLOCK_D], tl.float32)
    else:
        acc1 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    if PAGED and PAGE_PRELOAD > 0 and not ONE_TILE_SPLITS:
        # Every block-table entry this split can touch, read once before the loop: the K/V
        # addresses then come from registers and the pipeliner buffers K/V as for a dense cache,
        # instead of giving a block-table load its own stage in front of each tile.
        first_page = s_lo // PAGE
        offs_p, pages = _block_table_entries(BT, b, stride_btb, first_page, capacity, PAGE, PAGE_PRELOAD)
    for start in range(s_lo, s_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kmask = offs_n < s_hi
        if PAGED and PAGE_PRELOAD > 0:
            # Tiles start at multiples of BLOCK_N, which divides PAGE: one page per tile.
            page = tl.sum(tl.where(offs_p == start // PAGE - first_page, pages, 0)).to(tl.int64)
            # From offs_n, not a loop-invariant arange: Triton hoists an invariant row-offset
            # tensor out of the loop and keeps it live (150 registers against 85 for sm_90a).
            in_page = offs_n % PAGE
            k_row = page * stride_kb + in_page * stride_kt
            v_row = page * stride_vb + in_page * stride_vt
        elif PAGED and PAGE_SCALAR:
            # The tile lies inside one page (tiles start at multiples of BLOCK_N, which divides
            # PAGE): one block-table entry instead of one per key, and contiguous rows as in the
            # dense cache.
            page = tl.load(BT + b.to(tl.int64) * stride_btb + start // PAGE).to(tl.int64)
            in_page = start % PAGE + tl.arange(0, BLOCK_N)
            k_row = page * stride_kb + in_page * stride_kt
            v_row = page * stride_vb + in_page * stride_vt
        elif PAGED:
            page = tl.load(BT + b.to(tl.int64) * stride_btb + offs_n // PAGE, mask=kmask, other=0)
            k_row = page.to(tl.int64) * stride_kb + (offs_n % PAGE) * stride_kt
            v_row = page.to(tl.int64) * stride_vb + (offs_n % PAGE) * stride_vt
        else:
            k_row = b.to(tl.int64) * stride_kb + offs_n.to(tl.int64) * stride_kt
            v_row = b.to(tl.int64) * stride_vb + offs_n.to(tl.int64) * stride_vt
        if BLOCK_D == D:
            lmask = kmask[:, None]
        else:
            lmask = kmask[:, None] & d_ok[None, :]
        k = tl.load(k_base + k_row[:, None] + offs_d[None, :], mask=lmask, other=0.0)
        v = tl.load(v_base + v_row[:, None] + offs_d[None, :], mask=lmask, other=0.0)

        if STACKED:
            st = tl.dot(qr, tl.trans(k), input_precision=PREC)          # (2M, N): [q.k ; r.k]
            st = tl.permute(tl.reshape(st, (2, BLOCK_M, BLOCK_N)), (1, 2, 0))
            s, t = tl.split(st)
        else:
            s = tl.dot(qs, tl.trans(k), input_precision=PREC)
            t = tl.dot(rs, tl.trans(k), input_precision=PREC)

        vis = kmask[None, :]
        if ROW_MASK:
            kk = offs_n[None, :]
            if HAS_RIGHT:
                vis = vis & (kk <= diag[:, None] + win_right)
            if HAS_LEFT:
                vis = vis & (kk >= diag[:, None] - win_left)
        s = tl.where(vis, s * scale_log2, float("-inf"))
        t = tl.where(vis, t, 0.0)

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        pt = p * t
        d1 = d1 * alpha + tl.sum(p, 1)
        d2 = d2 * alpha + tl.sum(pt, 1)
        if STACKED:
            p12 = tl.reshape(tl.permute(tl.join(p, pt), (2, 0, 1)), (2 * BLOCK_M, BLOCK_N))
            alpha2 = tl.reshape(tl.permute(tl.join(alpha, alpha), (1, 0)), (2 * BLOCK_M,))
            acc = acc * alpha2[:, None] + tl.dot(p12.to(v.dtype), v, input_precision=PREC)
        else:
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            acc2 = acc2 * alpha[:, None] + tl.dot(pt.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    if STACKED:
        o12 = tl.permute(tl.reshape(acc, (2, BLOCK_M, BLOCK_D)), (1, 2, 0))
        o1, o2 = tl.split(o12)
    else:
        o1 = acc1
        o2 = acc2
    if SINGLE:
        has = d1 > 0
        inv = tl.where(has, 1.0 / tl.where(has, d1, 1.0), 0.0)
        o = o1 * (inv * (1.0 + d2 * inv))[:, None] - o2 * inv[:, None]
        o_ptrs = OUT + b.to(tl.int64) * stride_ob + row_i[:, None] * stride_om + row_h[:, None] * stride_oh \
            + offs_d[None, :]
        tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        # Partials laid out (B, Lq, Hq, splits, ...): row (i, h) of sequence b.
        prow = ((b.to(tl.int64) * lq + row_i) * (HKV * G) + row_h) * num_splits + pid_s
        tl.store(PSTAT + prow * 4 + 0, m_i, mask=row_ok)
        tl.store(PSTAT + prow * 4 + 1, d1, mask=row_ok)
        tl.store(PSTAT + prow * 4 + 2, d2, mask=row_ok)
        po = PO + prow[:, None] * (2 * D) + offs_d[None, :]
        smask = row_ok[:, None] & d_ok[None, :]
        tl.store(po, o1, mask=smask)
        tl.store(po + D, o2, mask=smask)


@triton.jit
def _block_table_entries(BT, b, stride_btb, first_page, capacity, PAGE: tl.constexpr, COUNT: tl.constexpr):
    """COUNT consecutive block-table entries of sequence b from first_page (0 past the table)."""
    offs_p = tl.arange(0, COUNT)
    pages = tl.load(BT + b.to(tl.int64) * stride_btb + first_page + offs_p,
                    mask=(first_page + offs_p) < capacity // PAGE, other=0)
    return offs_p, pages


@triton.jit
def _decode_merge_kernel(
    PSTAT, PO, OUT, lq, num_splits,
    stride_ob, stride_om, stride_oh,
    HQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:
        # Launched programmatically dependent on the split grid: wait until all of its
        # partials are written and visible.
        gdc_wait()
    row = tl.program_id(0)          # (b * lq + i) * HQ + h
    h = row % HQ
    bi = row // HQ
    i = bi % lq
    b = bi // lq
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    prow = row.to(tl.int64) * num_splits + offs_s
    m_s = tl.load(PSTAT + prow * 4 + 0, mask=s_ok, other=float("-inf"))
    d1_s = tl.load(PSTAT + prow * 4 + 1, mask=s_ok, other=0.0)
    d2_s = tl.load(PSTAT + prow * 4 + 2, mask=s_ok, other=0.0)
    omask = s_ok[:, None] & d_ok[None, :]
    o1_s = tl.load(PO + prow[:, None] * (2 * D) + offs_d[None, :], mask=omask, other=0.0)
    o2_s = tl.load(PO + prow[:, None] * (2 * D) + D + offs_d[None, :], mask=omask, other=0.0)

    m = tl.max(m_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(m_s - m_use)        # 0 for empty splits (m_s = -inf)
    d1 = tl.sum(w * d1_s, 0)
    d2 = tl.sum(w * d2_s, 0)
    o1 = tl.sum(w[:, None] * o1_s, 0)
    o2 = tl.sum(w[:, None] * o2_s, 0)
    has = d1 > 0
    inv = tl.where(has, 1.0 / tl.where(has, d1, 1.0), 0.0)
    o = o1 * (inv * (1.0 + d2 * inv)) - o2 * inv
    tl.store(OUT + b.to(tl.int64) * stride_ob + i * stride_om + h * stride_oh + offs_d, o.to(OUT.dtype.element_ty),
             mask=d_ok)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms(device: torch.device) -> int:
    """The device's SM count; an H200's (132) for decisions made off the GPU (tests, the interpreter)."""
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# Why a wave model: the kernel is memory-bound and every program streams the same number of
# keys, so what decides the time is how the programs fill the SMs. On the H200 (132 SMs) the
# previous rule (about 4 programs per SM) left 1.3-1.5 waves at B=8 and B=1 (the second wave
# mostly empty) and 2.6 waves at B=128; the paged kernel, whose occupancy differs, landed on
# 1.9 waves at B=128 and was faster than dense there, and on 1.1-1.5 waves at B=8/B=32 and was
# slower. So the split count and the pipeline depth are chosen together, per shape.
#
# Resident programs per SM for the launch configurations used here, from Triton 3.6's own
# resource report for this kernel (BLOCK_N 64, D 128, 16 MMA rows, 4 warps, 16-bit K/V):
# dense 3 stages: 71.7 KB shared (two K/V buffers) -> 3 per SM; dense 2 stages: 38.9 KB (one
# buffer), 80 registers -> 5 per SM; paged: the pipeliner gives the block-table load its own
# stage, so K/V keep one buffer whatever num_stages is (39.2 KB), and 117 registers -> 4 per SM.
# Other head dims and tiles use the same formula for shared memory (an estimate).
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED = 1024              # per program, by the driver
REG_LIMIT = {False: 5, True: 4}   # programs per SM allowed by registers (dense, paged)
# Programs per SM needed to keep HBM busy: with two K/V buffers 3 were enough in the first H200
# run (98-99% of the roofline at B=32 L=16384, 3 per SM in 2 full waves); with one buffer 4
# (paged at B=128: 100-102% with 4 per SM, 72-83% where a wave had 1-2 per SM).
# MODEL 1 (the first default, WAVE_MODEL_1): SATURATE = {1: 4, 2: 3}, a fixed
# program overhead of 1 tile, splits of at least MIN_KEYS (128) keys.
#
# MODEL 2 (the default; chosen from the 2026-11-29 sweep, then measured on the whole grid).
# Lowering the one-buffer value alone does not help: 2 stages x 8 splits at B=8 is
# 4 programs per SM either way and ties with 3 stages x 6 splits (3 per SM, tiles of 3 + 1). What
# the sweep shows instead: (a) programs per SM needed, by K/V buffers (Little's law: about 4
# tiles in flight per SM): one buffer 4 (paged B=8 L=16384 with 2/3/4 per SM: 73/89/93% of the
# roofline; paged B=32 L=4096 with 2/4: 72/93%; dense 2 stages B=8 L=16384 with 3/4: 86/96%), two
# buffers 2 (dense 3 stages, B=32 L=4096 32/8, one split = 2 per SM: 99%); (b) a two-buffer
# pipeline issues two tiles before it uses the first, which short splits do not amortise (B=1
# L=4096: 3 stages x 32 splits of 2 tiles 10.4 us, 2 stages x 64 splits of 1 tile 8.4; B=8 L=1024
# 32/8: 3 stages x 4 splits 13.7 us, 2 stages x 8 splits 12.2), so the overhead depends on the
# depth; (c) 1-tile splits (min keys = BLOCK_N). With these the model picks the fastest measured
# configuration at 8 of the 9 sweep shapes (B=128 L=4096: (3, 1), 503 us against (3, 5) 490).
SATURATE_BY_MODEL = {1: {1: 4, 2: 3}, 2: {1: 4, 2: 2}}
# Fixed cost of a program (prologue, pipeline fill, partial store), in K/V tiles, by buffers.
PROGRAM_OVERHEAD_BY_MODEL = {1: {1: 1.0, 2: 1.0}, 2: {1: 0.5, 2: 1.5}}
# Fixed cost of the merge launch, in K/V tiles.
MERGE_LAUNCH_TILES = 2.0
# With PDL = 2 the merge is launched programmatically dependent only when its grid has at most
# this fraction of an SM count of programs (see the split kernel's gdc_launch_dependents).
PDL_MAX_MERGE_PER_SM = 0.25


def _programs_per_sm(paged: bool, stages: int, mma_rows: int, block_n: int, block_d: int, esize: int) -> int:
    tile = 2 * block_n * block_d * esize                       # one K and one V tile
    bufs = 1 if paged else max(1, stages - 1)
    smem = bufs * tile + mma_rows * (block_d + block_n) * esize + SMEM_RESERVED   # + [Q;R] and [P;P*t]
    return max(1, min(REG_LIMIT[paged], SMEM_PER_SM // smem))


def _model_time(base: int, keys: int, splits: int, occ: int, depth: int, rows: int, d: int, block_n: int,
                esize: int, sms: int) -> tuple[float, int]:
    """Estimated time, in units of one K/V tile streamed per SM, and the splits actually used.

    Programs run in waves of sms * occ; a wave costs (tiles + overhead) times the programs per
    SM it holds, but never less than SATURATE_BY_MODEL programs' worth (fewer cannot keep HBM busy).
    Splits add the merge: a launch plus writing and reading the (m, d1, d2, O1, O2) partials.
    """
    chunk = cdiv(cdiv(keys, splits), block_n) * block_n
    used = cdiv(keys, chunk)          # splits that get keys when the cache is full
    programs = base * used
    model = _CONFIG["MODEL"]
    per_program = chunk // block_n + PROGRAM_OVERHEAD_BY_MODEL[model][depth]
    t, left = 0.0, programs
    while left > 0:
        wave = min(left, sms * occ)
        t += per_program * max(cdiv(wave, sms), SATURATE_BY_MODEL[model][depth])
        left -= wave
    if used > 1:
        tile = 2 * block_n * d * esize
        t += MERGE_LAUNCH_TILES + programs * rows * (2 * d + 4) * 4 * 2 / (sms * tile)
    return t, used


def launch_config(batch: int, heads_kv: int, rows: int, keys: int, d: int, esize: int, paged: bool,
                  device: torch.device) -> tuple[int, int]:
    """(num_stages, num_splits) from static shapes only, so a captured graph replays for any lengths.

    rows: query rows per program (G * Lq); keys: the most keys a sequence can attend (the
    capacity, or the window plus Lq when the window has a left edge).
    """
    sms = _sms(device)
    # Decisions are made per whole K/V tile, so a cache that grows by one token per step (transformers'
    # DynamicCache) reuses one decision for BLOCK_N steps.
    keys = cdiv(keys, _CONFIG["BLOCK_N"]) * _CONFIG["BLOCK_N"]
    return _choose(batch, heads_kv, rows, keys, d, esize, paged, sms, tuple(sorted(_CONFIG.items())))


@functools.lru_cache(maxsize=4096)
def _choose(batch: int, heads_kv: int, rows: int, keys: int, d: int, esize: int, paged: bool, sms: int,
            config: tuple) -> tuple[int, int]:
    block_n = _CONFIG["BLOCK_N"]
    block_m = max(8 if _CONFIG["STACKED"] else 16, 1 << max(0, (rows - 1).bit_length()))
    block_d = max(16, 1 << max(0, (d - 1).bit_length()))
    base = batch * heads_kv
    if _CONFIG["MODEL"] == 2:
        # 1-tile splits pay only when they give an SM more than one program. When even 1-tile splits
        # of every (sequence, kv head) fit one wave at one program per SM, each program's fixed cost
        # dominates and half as many 2-tile splits win (H200, B=1 L=1024 Hq/Hkv 32/8: 8 splits
        # 6.5 us, 16 splits 7.5 us).
        min_keys = block_n if base * cdiv(keys, block_n) > sms else 2 * block_n
    else:
        min_keys = _CONFIG["MIN_KEYS"]
    max_splits = int(min(MAX_SPLITS, max(1, keys // min_keys)))
    if _CONFIG["num_stages"]:
        stage_opts = [_CONFIG["num_stages"]]
    else:
        stage_opts = [3] if paged else [3, 2]
    if _CONFIG["PROGRAMS_PER_SM"]:
        # The first rule, kept for comparison: a fixed number of programs per SM.
        want = max(1, math.ceil(_CONFIG["PROGRAMS_PER_SM"] * sms / base))
        return stage_opts[0], int(min(want, max_splits))
    best = None
    for stages in stage_opts:
        occ = _programs_per_sm(paged, stages, 2 * block_m, block_n, block_d, esize)
        depth = 1 if paged or stages <= 2 else 2
        for splits in range(1, max_splits + 1):
            t, used = _model_time(base, keys, splits, occ, depth, rows, d, block_n, esize, sms)
            if best is None or t < best[0] - 1e-9:   # ties: more stages, fewer splits
                best = (t, stages, used)
    return best[1], best[2]


def use_pdl(merge_programs: int, sms: int) -> bool:
    """Whether to launch the merge programmatically dependent on the split grid (static shapes).

    _CONFIG["PDL"]: 0 never, 1 always, 2 (the default) only for a small merge grid: at
    B=1 PDL hid 0.4-0.9 us of launch latency (8-32 merge programs), at B=8 Hq=32 it cost 2.4 us
    (256 merge programs).
    """
    mode = _CONFIG["PDL"]
    if mode != 2:
        return mode == 1
    return merge_programs <= PDL_MAX_MERGE_PER_SM * sms


def merge_warps(block_s: int, block_d: int) -> int:
    """Warps per merge program: as few as hold the (O1, O2) partials of all splits at 64 fp32
    registers per thread, at most 4.

    _CONFIG["MERGE_WARPS"] > 0 forces a count. Measured on the H200 against the previous fixed 4,
    whose layout spreads the splits over the warps and reduces them through shared memory: with 8
    splits 1 warp took 10.6-10.7 against 11.6-11.7 us (B=8 L=1024 Hq/Hkv 32/8), 6.0-6.1 against 6.4
    (B=1 L=1024) and 1899 against 1918-1920 us (B=128 L=16384, 5 splits). With 64 splits (B=1
    L=4096 32/8) 4 warps are best: 1 warp (512 values per thread) 32 us, 2 warps 9.5, 8 warps 10.3,
    4 warps 8.6-8.7.
    """
    if _CONFIG["MERGE_WARPS"]:
        return _CONFIG["MERGE_WARPS"]
    return max(1, min(4, block_s * block_d * 2 // (32 * 64)))


def use_page_scalar(programs: int, sms: int) -> bool:
    """Whether a paged cache is read with one block-table entry per K/V tile (where a tile cannot
    cross a page) instead of one per key.

    _CONFIG["PAGE_SCALAR"]: 0 never, 1 always, 2 (the default) only when the split grid fits one
    wave at one program per SM. Measured on the H200 with 64-key pages: the per-tile read saves
    0.6 us there (B=1 L=1024 Hq/Hkv 32/8: 6.4 against 7.1 us), but where programs stream many tiles
    it stalls the pipelined K/V loads (B=8 L=16384 8/8: 172.6 against 130.5 us).
    """
    mode = _CONFIG["PAGE_SCALAR"]
    if mode != 2:
        return mode == 1
    return programs <= sms


# The most block-table entries a split preloads (a power of two). 32 covers the short splits of
# small grids, where the per-key read left the paged kernel up to 1.3x behind the dense one (H200);
# longer splits stream enough tiles to stay within 1.06x with it, so larger preloads were not tried.
PAGE_PRELOAD_MAX = 32


def preload_entries(capacity: int, num_splits: int, page: int, block_n: int) -> int:
    """Block-table entries a split reads up front (a power of two), or 0 when more than
    PAGE_PRELOAD_MAX could be needed. From static shapes: a split holds at most the tiles of the
    full capacity's chunk and may start inside a page, hence the one extra entry."""
    chunk = cdiv(cdiv(capacity, num_splits), block_n) * block_n
    need = (chunk - 1) // page + 2
    n = 1 << (need - 1).bit_length()
    return n if n <= PAGE_PRELOAD_MAX else 0


def paged_launch_config(batch: int, heads_kv: int, rows: int, keys: int, capacity: int, d: int, esize: int,
                        page: int, has_left: bool, num_splits: int, device: torch.device) -> tuple[int, int, int]:
    """(num_stages, num_splits, block-table entries preloaded per split) for a dense (page 0) or
    paged cache, from static shapes only; num_splits > 0 is the caller's forced count.

    Without a left window every split starts at a multiple of BLOCK_N (chunks are whole tiles), so
    with BLOCK_N dividing the page a tile never crosses a page, and when the entries a split can
    touch fit the preload it streams like a dense split and takes the dense configuration. Except
    on a one-wave grid with pages of one tile, where one entry read per tile (use_page_scalar) was
    faster (H200, B=1 L=1024 8/8, 64-token blocks: 6.4 against 6.7-6.9 us); with 256-token blocks
    the preload was the faster one there (6.7-6.8 against 6.9-7.0 us in two sweeps).
    """
    stages, splits = launch_config(batch, heads_kv, rows, keys, d, esize, page > 0, device)
    block_n = _CONFIG["BLOCK_N"]
    if page > 0 and page % block_n == 0 and not has_left and _CONFIG["PAGE_PRELOAD"]:
        dense_stages, dense_splits = launch_config(batch, heads_kv, rows, keys, d, esize, False, device)
        preload = preload_entries(capacity, num_splits if num_splits > 0 else dense_splits, page, block_n)
        one_wave = use_page_scalar(batch * heads_kv * (num_splits if num_splits > 0 else splits), _sms(device))
        if preload and not (one_wave and page == block_n):
            return dense_stages, dense_splits, preload
    return stages, splits, 0


def default_num_splits(batch: int, heads_kv: int, capacity: int, device: torch.device, rows: int = 1,
                       d: int = 128, esize: int = 2, paged: bool = False) -> int:
    """Splits per (sequence, kv head) that decode_triton picks for these static shapes."""
    return launch_config(batch, heads_kv, rows, capacity, d, esize, paged, device)[1]


MAX_SPLITS = 128

# Launch configuration; the benchmark overrides these through set_config. num_stages 0 and
# PROGRAMS_PER_SM 0 mean "chosen per shape by launch_config"; MODEL 1 or 2 picks the wave-model
# constants (above); PDL 0 never, 1 always, 2 by shape (use_pdl). The default is wave model 2 with
# PDL by merge-grid size; benchmarks/decode.py also times the earlier rule, WAVE_MODEL_1.
# PAGE_SCALAR: how a paged cache reads its block table (use_page_scalar); PAGE_PRELOAD 1: a split
# whose block-table entries fit PAGE_PRELOAD_MAX reads them all before its loop (preload_entries);
# ONE_TILE 1: with splits of one tile it reads them before the sequence length arrives.
# MERGE_WARPS: warps per merge program, 0 for the default (merge_warps).
_CONFIG = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 0, "PROGRAMS_PER_SM": 0, "MIN_KEYS": 128, "STACKED": 1,
           "PDL": 2, "MODEL": 2, "PAGE_SCALAR": 2, "PAGE_PRELOAD": 1, "ONE_TILE": 1,
           "MERGE_WARPS": 0}
WAVE_MODEL_1 = {"MODEL": 1, "PDL": 1}


def set_config(**kw) -> dict:
    """Override the launch configuration; returns the previous values of the keys changed."""
    old = {}
    for key, val in kw.items():
        if key not in _CONFIG:
            raise ValueError(f"{key}: expected one of {sorted(_CONFIG)}, got an unknown key")
        old[key] = _CONFIG[key]
        _CONFIG[key] = int(val)
    return old


@on_input_device
def decode_triton(q, r, k_cache, v_cache, block_table, seqlens, seq_const: int, n_new: int, causal: bool,
                  scale: float, window: tuple[int, int], num_splits: int) -> torch.Tensor:
    """Launch the split kernel (and the merge when splits > 1). Inputs are validated by the caller.

    q, r: (B, Lq, Hq, D); k_cache, v_cache dense (B, S, Hkv, D) or paged (blocks, page, Hkv, D);
    seqlens: (B,) int32 on the device or None (then every sequence holds seq_const keys);
    n_new: keys appended by this call (already written into the cache).
    """
    bsz, lq, hq, d = q.shape
    hkv = k_cache.shape[2]
    g = hq // hkv
    paged = block_table is not None
    page = k_cache.shape[1] if paged else 1
    capacity = block_table.shape[1] * page if paged else k_cache.shape[1]
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    has_left, has_right = left >= 0, right >= 0
    # A left window bounds the keys any row reads, statically: lq + left.
    keys = min(capacity, lq + left) if has_left else capacity
    block_n = _CONFIG["BLOCK_N"]
    stages, auto_splits, page_preload = paged_launch_config(bsz, hkv, g * lq, keys, capacity, d, q.element_size(),
                                                            page if paged else 0, has_left, num_splits, q.device)
    page_aligned = paged and page % block_n == 0 and not has_left
    if num_splits <= 0:
        num_splits = auto_splits
    # With one query row the split range already is its window: keys [n-1-left, n-1] with
    # the aligned key last. Several rows need the per-row mask when any bound is finite.
    row_mask = lq > 1 and (has_left or has_right)
    stacked = bool(_CONFIG["STACKED"])
    # The MMA needs >= 16 rows: [Q; R] doubles the rows, so 8 query rows already fill it.
    block_m = max(8 if stacked else 16, triton.next_power_of_2(g * lq))
    block_d = max(16, triton.next_power_of_2(d))
    for name, x in (("q", q), ("r", r), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name}: expected a contiguous last dimension (stride 1), got stride {x.stride(-1)}")
    out = torch.empty_like(q)
    single = num_splits == 1
    if single:
        pstat = po = out  # unused
    else:
        pstat = torch.empty((bsz, lq, hq, num_splits, 4), device=q.device, dtype=torch.float32)
        po = torch.empty((bsz, lq, hq, num_splits, 2, d), device=q.device, dtype=torch.float32)
    seq_arg = seqlens if seqlens is not None else q  # unused pointer when HAS_SEQ is False
    bt = block_table if paged else q
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    # Programmatic dependent launch of the merge (Hopper and newer; not in the interpreter).
    sms = _sms(q.device)
    pdl = (not single and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9
           and use_pdl(bsz * lq * hq, sms))
    launch_kw = dict(launch_pdl=True) if pdl else {}
    page_scalar = page_aligned and not page_preload and use_page_scalar(bsz * hkv * num_splits, sms)
    # Splits of one tile whatever the length: chunk = cdiv(cdiv(span, splits), BLOCK_N) tiles is 1
    # for every span up to the capacity (the kernel's split start is then pid_s * BLOCK_N).
    one_tile = (bool(page_preload) and bool(_CONFIG["ONE_TILE"]) and not has_left
                and cdiv(capacity, num_splits) <= block_n)
    grid = (bsz * hkv, num_splits)
    _decode_split_kernel[grid](
        q, r, k_cache, v_cache, bt, seq_arg, out, pstat, po,
        int(seq_const), int(n_new), lq, capacity, num_splits, float(scale * LOG2E),
        int(left), int(right),
        q.stride(0), q.stride(1), q.stride(2),
        r.stride(0), r.stride(1), r.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        bt.stride(0) if paged else 0,
        out.stride(0), out.stride(1), out.stride(2),
        HKV=hkv, G=g, D=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, PAGE=page,
        PAGED=paged, HAS_SEQ=seqlens is not None, HAS_LEFT=has_left, HAS_RIGHT=has_right,
        ROW_MASK=row_mask, SINGLE=single, PREC=prec, STACKED=stacked, PDL=pdl, PAGE_SCALAR=page_scalar,
        PAGE_PRELOAD=page_preload, ONE_TILE_SPLITS=one_tile,
        num_warps=_CONFIG["num_warps"], num_stages=stages,
    )
    if not single:
        block_s = max(2, triton.next_power_of_2(num_splits))
        _decode_merge_kernel[(bsz * lq * hq,)](
            pstat, po, out, lq, num_splits,
            out.stride(0), out.stride(1), out.stride(2),
            HQ=hq, D=d, BLOCK_D=block_d, BLOCK_S=block_s, PDL=pdl,
            num_warps=merge_warps(block_s, block_d), **launch_kw,
        )
    return out
