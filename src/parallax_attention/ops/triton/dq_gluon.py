"""dq/dr of the Parallax backward as a warp-specialized Gluon kernel (Hopper).

The structure of the Gluon forward (fwd_gluon.py): one producer warp streams the K and V tiles of
a CTA's key range through TMA into a ring of shared-memory stages (and the CTA's q, r and dO tiles
once); two consumer warpgroups of 64 query rows each run independently. Per tile a warpgroup
issues its three score products (q k^T, r k^T, dO v^T) together and waits for them one at a time
while it forms the weights, then issues dq += dS1 K and dr += (p (a - beta)) K; a stage goes back
to the producer when both warpgroups' products that read it have completed.

Before its loop each warpgroup computes delta = dO.o and beta = dO.vbar for its rows and stores
them for the dk/dv kernel (as the Triton dq/dr kernel does, so no separate pass reads o and vbar).

Same math, masking and outputs as train._bwd_dq_kernel; deterministic (no atomics). Each program
reads its sequence through descriptors that end at that sequence's last row (made on the host over the
dense batch for large launches, else on the device over the sequence's rows; see fwd_gluon), so rows
past its end are zero-filled, never the next sequence's.
"""

from __future__ import annotations

import os

from . import _gluon
from ._gluon import HAVE_GLUON, LOG2E, MAXNREG

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

    from ._gluon import ROWS_LAYOUT, key_ranges, mask_scores, program_ids, ring_barriers, sequence, store_zeros
    from ._gluon import stream_kv, tile_copy, tiles_to_walk, tma_store_rows

# (BLOCK_N keys per tile, stages of the K/V ring) by head dim; 128 query rows per CTA (64 per
# consumer warpgroup)
CONFIG = {64: (64, 3), 128: (32, 4)}
BLOCK_M = 128


if HAVE_GLUON:
    @gluon.jit
    def _dq_consumer(p, scale, scale_log2, D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                     HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, WG: gl.constexpr,
                     TRIM: gl.constexpr = True):
        (q_smem, r_smem, do_smem, k_bufs, v_bufs, q_bar, ready, empty, q_desc, k_desc, O, VB, DO, LSE, TB, DELTA,
         BETA, DQ, DR, io_base, stride_ql, s_base, m0, lq, lk, shift, left, right, start, n_tiles, epi) = p
        HALF: gl.constexpr = 64
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, D, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        keys_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        dtype: gl.constexpr = q_smem.dtype

        m0w = m0 + WG * HALF
        q_t = q_smem.slice(WG * HALF, HALF)
        r_t = r_smem.slice(WG * HALF, HALF)
        do_t = do_smem.slice(WG * HALF, HALF)

        # delta = dO.o and beta = dO.vbar of this warpgroup's rows, stored for the dk/dv kernel
        io_l: gl.constexpr = ROWS_LAYOUT
        io_rows = m0w + gl.arange(0, HALF, layout=gl.SliceLayout(1, io_l))
        io_cols = gl.arange(0, D, layout=gl.SliceLayout(0, io_l))
        io_off = io_base + io_rows[:, None].to(gl.int64) * stride_ql + io_cols[None, :]
        io_mask = (io_rows < lq)[:, None] & (io_cols < D)[None, :]
        do_rows = gl.load(DO + io_off, mask=io_mask, other=0.0).to(gl.float32)
        delta_io = gl.sum(do_rows * gl.load(O + io_off, mask=io_mask, other=0.0).to(gl.float32), 1)
        beta_io = gl.sum(do_rows * gl.load(VB + io_off, mask=io_mask, other=0.0).to(gl.float32), 1)
        gl.store(DELTA + s_base + io_rows, delta_io, mask=io_rows < lq)
        gl.store(BETA + s_base + io_rows, beta_io, mask=io_rows < lq)
        delta = gl.convert_layout(delta_io, rows_s)
        beta = gl.convert_layout(beta_io, rows_s)

        offs_m = m0w + gl.arange(0, HALF, layout=rows_s)
        in_q = offs_m < lq
        lse2 = gl.load(LSE + s_base + offs_m, mask=in_q, other=float("inf"))
        tb = gl.load(TB + s_base + offs_m, mask=in_q, other=0.0)
        _s, a, c, hi_w = key_ranges(m0w, HALF, lq, lk, shift, left, right, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        n_w = tiles_to_walk(n_tiles, hi_w, start, BLOCK_N, TRIM)
        nlse = -lse2
        tb1 = 1.0 + tb
        bd = beta - delta
        zero_s = gl.zeros([HALF, BLOCK_N], gl.float32, s_layout)
        dq = gl.zeros([HALF, D], gl.float32, acc_layout)
        dr = gl.zeros([HALF, D], gl.float32, acc_layout)
        mbarrier.wait(q_bar, 0)
        # n_tiles >= 1 (see the kernel), restated where the compiler sees it (see dkv_gluon)
        for it in range(gl.maximum(n_w, 1)):
            stage = it % STAGES
            mbarrier.wait(ready.index(stage), (it // STAGES) & 1)
            k_t = k_bufs.index(stage)
            v_t = v_bufs.index(stage)
            s = warpgroup_mma(q_t, k_t.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            t = warpgroup_mma(r_t, k_t.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            av = warpgroup_mma(do_t, v_t.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            n0 = start + it * BLOCK_N
            s = warpgroup_mma_wait(num_outstanding=2, deps=(s,))
            s = mask_scores(s, n0, a, c, offs_m, lk, shift, left, right, BLOCK_N, HAS_LEFT, HAS_RIGHT, keys_s)
            # the scale folded into one FMA, and dS1 = p (a - delta) + p (a - beta)(tbar - t) regrouped as
            # p (a - beta)(1 + tbar - t) + p (beta - delta): fewer instructions per score element
            pr = gl.exp2(gl.fma(s, scale_log2, nlse[:, None]))
            t = warpgroup_mma_wait(num_outstanding=1, deps=(t,))
            av = warpgroup_mma_wait(num_outstanding=0, deps=(av,))
            pa = pr * (av - beta[:, None])
            dr = warpgroup_mma(gl.convert_layout(pa.to(dtype), op_layout), k_t, dr, is_async=True)
            ds1 = gl.fma(pa, tb1[:, None] - t, pr * bd[:, None])
            dq = warpgroup_mma(gl.convert_layout(ds1.to(dtype), op_layout), k_t, dq, is_async=True)
            dq, dr = warpgroup_mma_wait(num_outstanding=0, deps=(dq, dr))
            mbarrier.arrive(empty.index(stage))

        # dS2 = -p (a - beta), so dr = -(pa K)
        if len(epi) == 2:
            # through shared memory and the copy engine (descriptors made on the host), staged in this
            # warpgroup's own q and r rows, which only its own products read
            col, b32 = q_desc[3], q_desc[4]
            tma_store_rows(epi[0], b32, m0w, col, (dq * scale).to(dtype), q_smem, WG * HALF)
            tma_store_rows(epi[1], b32, m0w, col, (-dr).to(dtype), r_smem, WG * HALF)
            tma.store_wait(0)
        else:
            rows = m0w + gl.arange(0, HALF, layout=gl.SliceLayout(1, acc_layout))
            cols = gl.arange(0, D, layout=gl.SliceLayout(0, acc_layout))
            off = io_base + rows[:, None].to(gl.int64) * stride_ql + cols[None, :]
            mask = (rows < lq)[:, None] & (cols < D)[None, :]
            gl.store(DQ + off, (dq * scale).to(DQ.dtype.element_ty), mask=mask)
            gl.store(DR + off, (-dr).to(DR.dtype.element_ty), mask=mask)

    @gluon.jit
    def _dq_producer(p, scale, scale_log2, D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                     HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, WG: gl.constexpr):
        (q_smem, r_smem, do_smem, k_bufs, v_bufs, q_bar, ready, empty, q_desc, k_desc, O, VB, DO, LSE, TB, DELTA,
         BETA, DQ, DR, io_base, stride_ql, s_base, m0, lq, lk, shift, left, right, start, n_tiles, epi) = p
        q_d, r_d, do_d, col, b32 = q_desc
        k_d, v_d, kcol = k_desc
        mbarrier.expect(q_bar, 3 * q_d.block_type.nbytes)
        tile_copy(q_d, b32, m0, col, q_bar, q_smem)
        tile_copy(r_d, b32, m0, col, q_bar, r_smem)
        tile_copy(do_d, b32, m0, col, q_bar, do_smem)
        stream_kv(k_d, v_d, k_bufs, v_bufs, ready, empty, start, n_tiles, kcol, b32, BLOCK_N, STAGES)

    @gluon.jit
    def _keyless_rows(O, VB, DO, DELTA, BETA, DQ, DR, io_base, stride_ql, s_base, m0, lq, D: gl.constexpr,
                      BLOCK_M: gl.constexpr):
        """Rows of a sequence without keys (no descriptor can be made over zero rows): dq = dr = 0,
        and their delta and beta for the dk/dv kernel."""
        layout: gl.constexpr = ROWS_LAYOUT
        rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
        in_q = rows < lq
        off = io_base + rows[:, None].to(gl.int64) * stride_ql + cols[None, :]
        mask = in_q[:, None] & (cols < D)[None, :]
        do_rows = gl.load(DO + off, mask=mask, other=0.0).to(gl.float32)
        gl.store(DELTA + s_base + rows, gl.sum(do_rows * gl.load(O + off, mask=mask, other=0.0).to(gl.float32), 1),
                 mask=in_q)
        gl.store(BETA + s_base + rows, gl.sum(do_rows * gl.load(VB + off, mask=mask, other=0.0).to(gl.float32), 1),
                 mask=in_q)
        store_zeros(DQ, io_base, stride_ql, m0, lq, BLOCK_M, D)
        store_zeros(DR, io_base, stride_ql, m0, lq, BLOCK_M, D)

    @gluon.jit
    def _dq_ws_kernel(
        Q, R, K, V, O, VB, DO, LSE, TB, DELTA, BETA, DQ, DR, CUQ, CUK,
        stride_sb, stride_sh, seqlen_q, seqlen_k, scale, scale_log2, left, right,
        HQ: gl.constexpr, HKV: gl.constexpr, G: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr, VARLEN: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
        TRIM: gl.constexpr = True, HEAD_GROUP: gl.constexpr = 0,
        # descriptors made on the host (dense inputs, large launches; see _gluon.HOST_DESC), else None
        QD=None, RD=None, DOD=None, KD=None, VD=None, DQD=None, DRD=None,
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
            _keyless_rows(O, VB, DO, DELTA, BETA, DQ, DR, q_row0.to(gl.int64) * (HQ * D) + h * D, HQ * D,
                          b32.to(gl.int64) * stride_sb + h * stride_sh + qs, m0, lq, D, BLOCK_M)
        elif m0 < lq:
            shift = lk - lq
            start, _a, _c, hi = key_ranges(m0, BLOCK_M, lq, lk, shift, left, right, BLOCK_N, HAS_LEFT, HAS_RIGHT)
            # at least one tile, even for rows that see no key (outside every window): it is fully
            # masked and those rows store dq = dr = 0
            n_tiles = gl.maximum(gl.cdiv(hi - start, BLOCK_N), 1)

            q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], Q.dtype.element_ty)
            kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], K.dtype.element_ty)
            q_off = q_row0.to(gl.int64) * (HQ * D)
            k_off = k_row0.to(gl.int64) * (HKV * D)
            if QD is None:
                q_desc = (tma.make_tensor_descriptor(Q + q_off, [lq, HQ * D], [HQ * D, 1], [BLOCK_M, D], q_layout),
                          tma.make_tensor_descriptor(R + q_off, [lq, HQ * D], [HQ * D, 1], [BLOCK_M, D], q_layout),
                          tma.make_tensor_descriptor(DO + q_off, [lq, HQ * D], [HQ * D, 1], [BLOCK_M, D], q_layout),
                          h * D, b32)
                k_desc = (tma.make_tensor_descriptor(K + k_off, [lk, HKV * D], [HKV * D, 1], [BLOCK_N, D], kv_layout),
                          tma.make_tensor_descriptor(V + k_off, [lk, HKV * D], [HKV * D, 1], [BLOCK_N, D], kv_layout),
                          hk * D)
            else:
                q_desc = (QD, RD, DOD, h * D, b32)
                k_desc = (KD, VD, hk * D)
            q_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [BLOCK_M, D], q_layout)
            r_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [BLOCK_M, D], q_layout)
            do_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [BLOCK_M, D], q_layout)
            k_bufs = gl.allocate_shared_memory(K.dtype.element_ty, [STAGES, BLOCK_N, D], kv_layout)
            v_bufs = gl.allocate_shared_memory(K.dtype.element_ty, [STAGES, BLOCK_N, D], kv_layout)
            q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            mbarrier.init(q_bar, count=1)
            ready, empty = ring_barriers(STAGES)

            io_base = q_off + h * D
            s_base = b32.to(gl.int64) * stride_sb + h * stride_sh + qs
            p = (q_smem, r_smem, do_smem, k_bufs, v_bufs, q_bar, ready, empty, q_desc, k_desc, O, VB, DO, LSE, TB,
                 DELTA, BETA, DQ, DR, io_base, HQ * D, s_base, m0, lq, lk, shift, left, right, start, n_tiles,
                 (q_bar,) if DQD is None else (DQD, DRD))
            gl.warp_specialize([
                (_dq_consumer, (p, scale, scale_log2, D, BLOCK_N, STAGES, HAS_LEFT, HAS_RIGHT, 0, TRIM)),
                (_dq_consumer, (p, scale, scale_log2, D, BLOCK_N, STAGES, HAS_LEFT, HAS_RIGHT, 1, TRIM)),
                (_dq_producer, (p, scale, scale_log2, D, BLOCK_N, STAGES, HAS_LEFT, HAS_RIGHT, 0)),
            ], [4, 1], [240, 24])  # _gluon.CONSUMER_REGS, PRODUCER_REGS


def usable(q, k, d: int, tensors) -> bool:
    """Whether the Gluon dq/dr kernel can run (see _gluon.usable): head dims 64 and 128."""
    return _gluon.usable(q, d, CONFIG, tensors)


def launch(q, r, k, v, out, vbar, dout, lse, tbar, delta, beta, dq, dr, cu_q_arg, cu_k_arg, batch, hkv, ss,
           max_q, max_k, scale, left, right, meta):
    """dq, dr (and delta, beta) for train.bwd (the Triton dq/dr kernel's arguments)."""
    hq, d = q.shape[-2], q.shape[-1]
    block_n, stages = CONFIG[d]
    # the ring holds the 64 keys a consumer warpgroup may skip at the end (see _gluon.tiles_to_walk)
    assert stages * block_n >= 64, CONFIG[d]
    grid = (batch * hq, (max_q + BLOCK_M - 1) // BLOCK_M)
    host = {}
    if _gluon.use_host_desc(meta, batch, hq, max_q, max_k):
        host = dict(QD=_gluon.row_tiles(q, BLOCK_M), RD=_gluon.row_tiles(r, BLOCK_M),
                    DOD=_gluon.row_tiles(dout, BLOCK_M), KD=_gluon.row_tiles(k, block_n),
                    VD=_gluon.row_tiles(v, block_n))
        if _gluon.tma_epilogue(d, max_q):
            host.update(DQD=_gluon.output_tiles(dq, BLOCK_M // 2), DRD=_gluon.output_tiles(dr, BLOCK_M // 2))
    return _gluon.launch(_dq_ws_kernel, grid,
        q, r, k, v, out, vbar, dout, lse, tbar, delta, beta, dq, dr, cu_q_arg, cu_k_arg, *ss, max_q, max_k,
        scale, scale * LOG2E, left, right,
        HQ=hq, HKV=hkv, G=hq // hkv, D=d, BLOCK_N=block_n, STAGES=stages, VARLEN=meta["VARLEN"],
        HAS_LEFT=meta["HAS_LEFT"], HAS_RIGHT=meta["HAS_RIGHT"], TRIM=_gluon.TRIM_MASKED, HEAD_GROUP=_gluon.HEAD_GROUP,
        **host,
        num_warps=4, maxnreg=MAXNREG)


# On by default where usable(); PARALLAX_DQ_GLUON=0 runs the Triton dq/dr kernel instead.
# Measured on the H200 (bf16, causal, interleaved A/B, forward+backward medians): 14.96 against 15.58 ms
# at B=1 H=16 L=16384 D=128, 2.51 against 2.66 ms at B=4 H=16 L=4096 D=64; level at B=4 H=16 L=4096
# D=128 (4.42 against 4.39 ms; the kernels 1.27 and 1.26 ms). 64-key tiles at D=128 spill and are
# slower (4.85 ms), so D=128 takes 32 keys; see benchmarks/NOTES_train_kernels.md for why the score
# products, not the schedule, set the pace.
ENABLED = os.environ.get("PARALLAX_DQ_GLUON", "1") != "0"
