"""The Parallax forward as a warp-specialized Gluon kernel (Hopper).

The Triton forward (train._fwd_kernel) runs 128 query rows on 8 warps that share one instruction
stream: each warp-group MMA is waited for right after it is issued, and the tensor cores idle
while the warps do a tile's softmax (Nsight Compute on the H200: tensor pipe 58% busy, 255
registers with spills). Here, as in FlashAttention 3:

* one producer warp streams the K and V tiles of the CTA's key range through TMA into a ring of
  shared-memory stages (and the CTA's q and r tiles once);
* two consumer warpgroups of 64 query rows each run independently (no CTA barrier between
  them): each issues a tile's two score products (q k^T and r k^T) together, forms the weights
  from the first while the second runs, then issues the two value products (P1 V, P2 V); while one
  warpgroup does elementwise work the other's MMAs keep the tensor cores busy. A stage goes back
  to the producer when both warpgroups' value products that read it have completed (one mbarrier
  arrival from each).

The value products are retired at the end of each tile: the two fp32 output accumulators of 64 x D
already take 128 registers per thread at D = 128, and keeping them in flight into the next tile's
score products needs more than a warpgroup's 240.

Both warpgroups walk the whole key range of the CTA's 128 rows (under a causal mask the first
warpgroup's last tile is then fully masked: it has the same number of tiles as the second, so
the CTA takes no longer); a tile is masked only where it reaches past the warpgroup's fully
visible interior (the row bounds are exact at every row, whatever the tile alignment).

Same math and outputs as the Triton kernel (see train.py): o, vbar = O1/d1 (input dtype), and per
row lse2 = m + log2 d1 (+inf for a row with no visible key) and tbar = d2/d1. Dense (B, L, H, D)
and packed varlen (total, H, D) inputs: each program reads its sequence through descriptors that end
at that sequence's last row, so rows past its end are zero-filled by the copy engine, never the next
sequence's: for large dense launches descriptors made on the host over (B, L, H x D) (see
_gluon.HOST_DESC), else ones made on the device over the sequence's rows alone.
"""

from __future__ import annotations

import os

from . import _gluon
from ._gluon import HAVE_GLUON, MAXNREG

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

    from ._gluon import ROWS_LAYOUT, key_ranges, mask_scores, program_ids, ring_barriers, sequence, store_zeros
    from ._gluon import stream_kv, tile_copy, tiles_to_walk, tma_store_rows

# (BLOCK_N keys per tile, stages of the K/V ring) by head dim; 128 query rows per CTA (64 per
# consumer warpgroup)
CONFIG = {64: (128, 3), 128: (64, 3)}
BLOCK_M = 128


if HAVE_GLUON:
    @gluon.jit
    def _weights(s, m_i, o1, o2, scale_log2, rows_acc: gl.constexpr):
        """One tile's unnormalized weights e = exp2(scale_log2 s - m) from its raw (masked) scores s,
        the factor alpha the running sums are rescaled by, the new running max, and the rescaled
        accumulators."""
        # (the max of the raw scores, scaled after: scale_log2 > 0, and exp2 takes s * scale - m as
        # one fused multiply-add)
        m_new = gl.maximum(m_i, gl.max(s, 1) * scale_log2)
        # a row that has seen no visible key keeps m = -inf: subtract 0 instead so exp2 gives 0
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_safe)
        alpha_acc = gl.convert_layout(alpha, rows_acc)
        o1 = o1 * alpha_acc[:, None]
        o2 = o2 * alpha_acc[:, None]
        e = gl.exp2(s * scale_log2 - m_safe[:, None])
        return e, alpha, m_new, o1, o2

    @gluon.jit
    def _fwd_consumer(p, scale_log2, D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, WG: gl.constexpr,
                      TRIM: gl.constexpr = True):
        (q_smem, r_smem, k_bufs, v_bufs, q_bar, ready, empty, q_desc, r_desc, k_desc, v_desc, O, VB, LSE, TB,
         io_base, stride_ql, s_base, b32, h, hk, m0, lq, lk, shift, left, right, start, n_tiles, epi) = p
        HALF: gl.constexpr = 64
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, D, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        keys_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        rows_acc: gl.constexpr = gl.SliceLayout(1, acc_layout)
        dtype: gl.constexpr = q_smem.dtype

        m0w = m0 + WG * HALF
        q_t = q_smem.slice(WG * HALF, HALF)
        r_t = r_smem.slice(WG * HALF, HALF)
        offs_m = m0w + gl.arange(0, HALF, layout=rows_s)
        # this warpgroup's fully visible keys [a, c); tiles outside them are masked
        _s, a, c, hi_w = key_ranges(m0w, HALF, lq, lk, shift, left, right, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        n_w = tiles_to_walk(n_tiles, hi_w, start, BLOCK_N, TRIM)
        zero_s = gl.zeros([HALF, BLOCK_N], gl.float32, s_layout)
        o1 = gl.zeros([HALF, D], gl.float32, acc_layout)
        o2 = gl.zeros([HALF, D], gl.float32, acc_layout)
        d1 = gl.zeros([HALF], gl.float32, rows_s)
        d2 = gl.zeros([HALF], gl.float32, rows_s)
        m_i = gl.full([HALF], float("-inf"), gl.float32, rows_s)
        mbarrier.wait(q_bar, 0)
        # n_tiles >= 1 (see the kernel), restated where the compiler sees it: a loop that may run zero
        # times makes ptxas serialize every warp-group MMA (see dkv_gluon)
        for it in range(gl.maximum(n_w, 1)):
            stage = it % STAGES
            mbarrier.wait(ready.index(stage), (it // STAGES) & 1)
            k_t = k_bufs.index(stage)
            v_t = v_bufs.index(stage)
            s = warpgroup_mma(q_t, k_t.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            t = warpgroup_mma(r_t, k_t.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
            s = mask_scores(s, start + it * BLOCK_N, a, c, offs_m, lk, shift, left, right, BLOCK_N, HAS_LEFT,
                            HAS_RIGHT, keys_s)
            e, alpha, m_i, o1, o2 = _weights(s, m_i, o1, o2, scale_log2, rows_acc)
            d1 = d1 * alpha + gl.sum(e, 1)
            p1 = gl.convert_layout(e.to(dtype), op_layout)
            t = warpgroup_mma_wait(num_outstanding=0, deps=(t,))
            et = e * t
            d2 = d2 * alpha + gl.sum(et, 1)
            p2 = gl.convert_layout(et.to(dtype), op_layout)
            o1 = warpgroup_mma(p1, v_t, o1, is_async=True)
            o2 = warpgroup_mma(p2, v_t, o2, is_async=True)
            o1, o2 = warpgroup_mma_wait(num_outstanding=0, deps=(o1, o2))
            mbarrier.arrive(empty.index(stage))

        has = d1 > 0.0
        inv = gl.where(has, 1.0 / gl.where(has, d1, 1.0), 0.0)
        tb = d2 * inv
        lse2 = gl.where(has, m_i + gl.log2(gl.where(has, d1, 1.0)), float("inf"))
        s_off = s_base + offs_m
        in_q = offs_m < lq
        gl.store(LSE + s_off, lse2, mask=in_q)
        gl.store(TB + s_off, tb, mask=in_q)
        inv_acc = gl.convert_layout(inv, rows_acc)
        tb_acc = gl.convert_layout(tb, rows_acc)
        vb = o1 * inv_acc[:, None]
        o = vb * (1.0 + tb_acc)[:, None] - o2 * inv_acc[:, None]
        if len(epi) == 2:
            # through shared memory and the copy engine (descriptors made on the host), staged in this
            # warpgroup's own q and r rows, which only its own products read
            tma_store_rows(epi[0], b32, m0w, h * D, o.to(dtype), q_smem, WG * HALF)
            tma_store_rows(epi[1], b32, m0w, h * D, vb.to(dtype), r_smem, WG * HALF)
            tma.store_wait(0)
        else:
            rows = m0w + gl.arange(0, HALF, layout=rows_acc)
            cols = gl.arange(0, D, layout=gl.SliceLayout(0, acc_layout))
            off = io_base + rows[:, None].to(gl.int64) * stride_ql + cols[None, :]
            mask = (rows < lq)[:, None] & (cols < D)[None, :]
            gl.store(O + off, o.to(O.dtype.element_ty), mask=mask)
            gl.store(VB + off, vb.to(VB.dtype.element_ty), mask=mask)

    @gluon.jit
    def _fwd_producer(p, scale_log2, D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, WG: gl.constexpr):
        (q_smem, r_smem, k_bufs, v_bufs, q_bar, ready, empty, q_desc, r_desc, k_desc, v_desc, O, VB, LSE, TB,
         io_base, stride_ql, s_base, b32, h, hk, m0, lq, lk, shift, left, right, start, n_tiles, epi) = p
        mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
        tile_copy(q_desc, b32, m0, h * D, q_bar, q_smem)
        tile_copy(r_desc, b32, m0, h * D, q_bar, r_smem)
        stream_kv(k_desc, v_desc, k_bufs, v_bufs, ready, empty, start, n_tiles, hk * D, b32, BLOCK_N, STAGES)

    @gluon.jit
    def _store_keyless(O, VB, LSE, TB, io_base, stride_ql, s_base, m0, lq, D: gl.constexpr, BLOCK_M: gl.constexpr):
        """Rows of a sequence without keys: o = vbar = 0, lse2 = +inf, tbar = 0."""
        store_zeros(O, io_base, stride_ql, m0, lq, BLOCK_M, D)
        store_zeros(VB, io_base, stride_ql, m0, lq, BLOCK_M, D)
        row_l: gl.constexpr = gl.SliceLayout(1, ROWS_LAYOUT)
        rows = m0 + gl.arange(0, BLOCK_M, layout=row_l)
        gl.store(LSE + s_base + rows, gl.full([BLOCK_M], float("inf"), gl.float32, row_l), mask=rows < lq)
        gl.store(TB + s_base + rows, gl.zeros([BLOCK_M], gl.float32, row_l), mask=rows < lq)

    @gluon.jit
    def _fwd_ws_kernel(
        Q, R, K, V, O, VB, LSE, TB, CUQ, CUK,
        stride_sb, stride_sh, seqlen_q, seqlen_k, scale_log2, left, right,
        HQ: gl.constexpr, HKV: gl.constexpr, G: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr, VARLEN: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
        TRIM: gl.constexpr = True, HEAD_GROUP: gl.constexpr = 0,
        # descriptors made on the host (dense inputs, large launches; see _gluon.HOST_DESC), else None
        QD=None, RD=None, KD=None, VD=None, OD=None, VBD=None,
    ):
        BLOCK_M: gl.constexpr = 128
        pid_bh, blk = program_ids(HEAD_GROUP)
        # heaviest row blocks (most keys under a causal mask) first
        pid_m = gl.num_programs(1) - 1 - blk
        b32 = pid_bh // HQ
        h = pid_bh % HQ
        hk = h // G
        qs, lq, _ks, lk, q_row0, k_row0 = sequence(CUQ, CUK, b32, seqlen_q, seqlen_k, VARLEN)
        m0 = pid_m * BLOCK_M
        if (m0 < lq) & (lk == 0):
            _store_keyless(O, VB, LSE, TB, q_row0.to(gl.int64) * (HQ * D) + h * D, HQ * D,
                           b32.to(gl.int64) * stride_sb + h * stride_sh + qs, m0, lq, D, BLOCK_M)
        elif m0 < lq:
            shift = lk - lq
            start, _a, _c, hi = key_ranges(m0, BLOCK_M, lq, lk, shift, left, right, BLOCK_N, HAS_LEFT, HAS_RIGHT)
            # at least one tile, even for rows that see no key (outside every window): it is fully
            # masked and those rows store o = 0 and lse2 = +inf
            n_tiles = gl.maximum(gl.cdiv(hi - start, BLOCK_N), 1)

            # descriptors over this sequence's rows only: the copy engine zero-fills rows past its end
            # instead of reading the next sequence's (whose NaN would reach this one through 0 * NaN)
            q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], Q.dtype.element_ty)
            kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], K.dtype.element_ty)
            q_off = q_row0.to(gl.int64) * (HQ * D)
            k_off = k_row0.to(gl.int64) * (HKV * D)
            if QD is None:
                q_desc = tma.make_tensor_descriptor(Q + q_off, [lq, HQ * D], [HQ * D, 1], [BLOCK_M, D], q_layout)
                r_desc = tma.make_tensor_descriptor(R + q_off, [lq, HQ * D], [HQ * D, 1], [BLOCK_M, D], q_layout)
                k_desc = tma.make_tensor_descriptor(K + k_off, [lk, HKV * D], [HKV * D, 1], [BLOCK_N, D], kv_layout)
                v_desc = tma.make_tensor_descriptor(V + k_off, [lk, HKV * D], [HKV * D, 1], [BLOCK_N, D], kv_layout)
            else:
                q_desc, r_desc, k_desc, v_desc = QD, RD, KD, VD
            q_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [BLOCK_M, D], q_layout)
            r_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [BLOCK_M, D], q_layout)
            k_bufs = gl.allocate_shared_memory(K.dtype.element_ty, [STAGES, BLOCK_N, D], kv_layout)
            v_bufs = gl.allocate_shared_memory(K.dtype.element_ty, [STAGES, BLOCK_N, D], kv_layout)
            q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            mbarrier.init(q_bar, count=1)
            ready, empty = ring_barriers(STAGES)

            io_base = q_off + h * D
            s_base = b32.to(gl.int64) * stride_sb + h * stride_sh + qs
            p = (q_smem, r_smem, k_bufs, v_bufs, q_bar, ready, empty, q_desc, r_desc, k_desc, v_desc, O, VB, LSE,
                 TB, io_base, HQ * D, s_base, b32, h, hk, m0, lq, lk, shift, left, right, start, n_tiles,
                 (q_bar,) if OD is None else (OD, VBD))
            gl.warp_specialize([
                (_fwd_consumer, (p, scale_log2, D, BLOCK_N, STAGES, HAS_LEFT, HAS_RIGHT, 0, TRIM)),
                (_fwd_consumer, (p, scale_log2, D, BLOCK_N, STAGES, HAS_LEFT, HAS_RIGHT, 1, TRIM)),
                (_fwd_producer, (p, scale_log2, D, BLOCK_N, STAGES, HAS_LEFT, HAS_RIGHT, 0)),
            ], [4, 1], [240, 24])  # _gluon.CONSUMER_REGS, PRODUCER_REGS


def usable(q, k, d: int, tensors) -> bool:
    """Whether the Gluon forward can run (see _gluon.usable): head dims 64 and 128."""
    return _gluon.usable(q, d, CONFIG, tensors)


def launch(q, r, k, v, out, vbar, lse, tbar, cu_q_arg, cu_k_arg, batch, hkv, ss, max_q, max_k, scale_log2,
           left, right, meta):
    """out, vbar, lse, tbar for train.fwd (dense (B, L, H, D) or packed varlen (total, H, D) inputs;
    the same arguments as the Triton kernel's)."""
    hq, d = q.shape[-2], q.shape[-1]
    block_n, stages = CONFIG[d]
    # the ring holds the 64 keys a consumer warpgroup may skip at the end (see _gluon.tiles_to_walk)
    assert stages * block_n >= 64, CONFIG[d]
    grid = (batch * hq, (max_q + BLOCK_M - 1) // BLOCK_M)
    host = {}
    if _gluon.use_host_desc(meta, batch, hq, max_q, max_k):
        host = dict(QD=_gluon.row_tiles(q, BLOCK_M), RD=_gluon.row_tiles(r, BLOCK_M),
                    KD=_gluon.row_tiles(k, block_n), VD=_gluon.row_tiles(v, block_n))
        if _gluon.tma_epilogue(d, max_q):
            host.update(OD=_gluon.output_tiles(out, BLOCK_M // 2), VBD=_gluon.output_tiles(vbar, BLOCK_M // 2))
    return _gluon.launch(_fwd_ws_kernel, grid,
        q, r, k, v, out, vbar, lse, tbar, cu_q_arg, cu_k_arg, *ss, max_q, max_k, scale_log2, left, right,
        HQ=hq, HKV=hkv, G=hq // hkv, D=d, BLOCK_N=block_n, STAGES=stages, VARLEN=meta["VARLEN"],
        HAS_LEFT=meta["HAS_LEFT"], HAS_RIGHT=meta["HAS_RIGHT"], TRIM=_gluon.TRIM_MASKED, HEAD_GROUP=_gluon.HEAD_GROUP,
        **host,
        num_warps=4, maxnreg=MAXNREG)


# On by default where usable(); PARALLAX_FWD_GLUON=0 runs the Triton forward instead.
# Measured on the H200 (bf16, causal, interleaved A/B, forward median of 5 rounds): 1.099 against
# 1.112 ms at B=4 H=16 L=4096 D=128, 3.755 against 3.906 ms at B=1 H=16 L=16384, 0.657 against
# 0.687 ms at D=64, 2.124 against 2.199 ms at B=4 H=32/8. Tried and slower: issuing the next tile's
# q k^T behind the value products (1.265 against 1.138 ms at L=4096: the extra MMA in flight delays
# the waits it is queued behind); issuing P1 V before the second branch's weights are formed (behind
# r k^T; 4.041 against 4.014 ms forward+backward, 5 interleaved rounds: level); and moving the
# running max only when it grows by 2^8 to skip most rescales (no faster: the forward is not bound by
# its elementwise work).
ENABLED = os.environ.get("PARALLAX_FWD_GLUON", "1") != "0"
