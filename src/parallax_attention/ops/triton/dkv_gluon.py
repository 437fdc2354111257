"""dk/dv of the Parallax backward as a warp-specialized Gluon kernel (Hopper).

The Triton dk/dv kernel (train._bwd_dkv_tma_kernel) waits for every warp-group MMA right after
issuing it (Triton puts a `wgmma.wait_group 0` behind each non-accumulating dot), and its two
warpgroups meet at a CTA barrier on every step, so the tensor cores idle while both warpgroups
do the step's elementwise work: Nsight Compute on the H200 put the tensor pipe at 42% busy and
28% of the warps' stall samples on those waits. Here the schedule is explicit:

* one producer warp streams q, r, dO tiles through TMA into a ring of shared-memory stages
  (and the block's k, v tiles once);
* two consumer warpgroups, 64 keys each, run independently (no CTA barrier between them): each
  issues the step's three score products (k q^T, k r^T, v dO^T) at once and waits for them one at a
  time while it computes the weights, with the dv product in flight while dS is formed; the dk
  products are retired at the end of the step (IN_FLIGHT, leaving them in flight into the next
  step, needs more registers than a warpgroup has: ptxas then serializes every MMA). While one
  warpgroup does elementwise work the other's MMAs keep the tensor cores busy. A stage goes back
  to the producer when both warpgroups' products that read it have completed (one mbarrier
  arrival per warpgroup).

Both partitions receive one argument tuple (Gluon gives every worker partition the same signature).

Same math and tiles as the Triton kernel (keys x queries tiles, a GQA group's query heads walked as
one flat loop), with the elementwise work regrouped into fewer instructions and the mask built only
on steps that reach past the keys all their queries see; deterministic (no atomics).

FUSED (opt-in, PARALLAX_TRAIN_BWD=fused / fused_atomic, D = 128): the producer warp becomes a
warpgroup that also forms dq^T = K^T dS1^T and dr^T = K^T dS2^T from the dS tiles the consumers leave
in shared memory (two buffers), and adds them into fp32 sums with TMA reduce-add; ORDERED makes each
query block's additions come in key-block order (a turn counter per query block, query blocks walked
from the last one so every key block reaches one at the same step). Measured on the H200: correct, and
slower than the split backward (4.69 against 4.33-4.40 ms forward+backward at B=4 H=16 L=4096): the
worker warpgroup, at 40-56 registers, runs its products one at a time and also waits for the additions.
"""

from __future__ import annotations

import os

from . import _gluon
from ._gluon import HAVE_GLUON, LOG2E, MAXNREG

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma_init

    from ._gluon import program_ids, ring_barriers, sequence, stats_copy, store_zeros, tile_copy, tma_reduce_add
    from ._gluon import tma_store_rows

# (BLOCK_M query rows per step, stages of the q/r/dO ring, dk/dv products left in flight into the
# next step, the score products' k and v operands from registers) by head dim; the key block is 128
# (64 per consumer warpgroup). k and v in registers take 32 registers a thread at D = 64 (measured on
# the H200: the kernel 1.041 against 1.107 ms at B=4 H=16 L=4096); at D = 128 they would take 64,
# which the consumers do not have.
CONFIG = {64: (32, 4, False, True), 128: (32, 3, False, False)}
# (64 query rows at D = 128 would halve the shared-memory reads per flop of the score products
# (m64n32k16 with both operands in shared memory reads 192 bytes a clock, more than the 128 an SM
# has), but the per-query statistics take 4 x 64 / 8 registers a thread in this keys x queries
# layout and ptxas spills about 70 values a step even with each statistic read from shared memory
# right before its use; timed on the H200: 4.541 against 4.346 ms forward+backward. Reading the
# statistics right before use at 32 rows cost 3% of the kernel, 1.767 against 1.715 ms.)
BLOCK_N = 128
# the producer also copies each step's row statistics (lse, tbar, delta, beta) into shared memory
# where their rows are 16-byte aligned; else the consumers load them from global memory
STATS_TMA = True


if HAVE_GLUON:
    @gluon.jit
    def _dkv_consumer(p, scale, scale_log2, G: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr,
                      STAGES: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, IN_FLIGHT: gl.constexpr,
                      STATS_TMA: gl.constexpr, FUSED: gl.constexpr, ORDERED: gl.constexpr, A_REGS: gl.constexpr,
                      WG: gl.constexpr, TRIM: gl.constexpr = True):
        (k_smem, v_smem, q_bufs, r_bufs, do_bufs, stat_bufs, kv_bar, ready, empty, q_desc, r_desc, do_desc, k_desc,
         v_desc, stat_descs, LSE, TB, DELTA, BETA, DK, DV, s_base, stride_sh, out_base, stride_kl, n0, lq, lk, shift,
         left, right, start, blocks, steps, q_row0, k_row0, hk, b32, fused) = p
        HALF: gl.constexpr = 64
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_M, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, D, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        keys_l: gl.constexpr = gl.SliceLayout(1, s_layout)
        queries_l: gl.constexpr = gl.SliceLayout(0, s_layout)
        dtype: gl.constexpr = q_bufs.dtype

        k_t = k_smem.slice(WG * HALF, HALF)
        v_t = v_smem.slice(WG * HALF, HALF)
        offs_n = n0 + WG * HALF + gl.arange(0, HALF, layout=keys_l)
        zero_s = gl.zeros([HALF, BLOCK_M], gl.float32, s_layout)
        dk = warpgroup_mma_init(gl.zeros([HALF, D], gl.float32, acc_layout))
        dv = warpgroup_mma_init(gl.zeros([HALF, D], gl.float32, acc_layout))
        mbarrier.wait(kv_bar, 0)
        if A_REGS:
            # the loop-invariant A operands of the score products from registers: with both operands in
            # shared memory an m64n32k16 product reads 3 KB per 16 clocks of math, more than the 128 bytes
            # a clock the SM's shared memory gives; with A in registers 1 KB (32 registers at D = 64)
            a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
            k_a = k_t.load(a_layout)
            v_a = v_t.load(a_layout)
        else:
            k_a = k_t
            v_a = v_t
        it0 = 0
        if TRIM and (WG == 1) and (G == 1) and HAS_RIGHT and (not FUSED) and (not IN_FLIGHT):
            # the leading query blocks that see none of this warpgroup's keys (the first 64 queries of
            # the CTA's key block under a causal mask) are left to the other warpgroup: fully masked
            # here, their products would only take tensor-core time from it. Their stages are
            # released at once; at most 64 queries, which the ring's stages hold, so no stage gets
            # this warpgroup's release twice before the other's
            lo_w = gl.maximum(0, n0 + HALF - shift - right)
            it0 = gl.minimum((lo_w - start) // BLOCK_M, steps - 1)
            for j in range(it0):
                mbarrier.arrive(empty.index(j % STAGES))
        # steps - it0 >= 1 (see the kernel), restated here where the compiler can see it: a loop that
        # may run zero times makes ptxas serialize every warp-group MMA (the accumulators' zero-trip
        # path is a non-MMA definition inside their pipeline stage)
        for j in range(gl.maximum(steps - it0, 1)):
            it = j + it0
            stage = it % STAGES
            mbarrier.wait(ready.index(stage), (it // STAGES) & 1)
            q_s = q_bufs.index(stage)
            r_s = r_bufs.index(stage)
            do_s = do_bufs.index(stage)
            st = warpgroup_mma(k_a, q_s.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            tt = warpgroup_mma(k_a, r_s.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            at = warpgroup_mma(v_a, do_s.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            # the row statistics load while the products run
            g, m0 = _step_rows(it, start, blocks, G, BLOCK_M, FUSED)
            offs_m = m0 + gl.arange(0, BLOCK_M, layout=queries_l)
            in_q = offs_m < lq
            s_off = s_base + g * stride_sh + offs_m
            if STATS_TMA:
                # the producer copied them with the tiles (rows past the sequence are masked below)
                lse2 = stat_bufs.index(stage * 4 + 0).load(queries_l)
                tb = stat_bufs.index(stage * 4 + 1).load(queries_l)
                delta = stat_bufs.index(stage * 4 + 2).load(queries_l)
                beta = stat_bufs.index(stage * 4 + 3).load(queries_l)
            else:
                lse2 = gl.load(LSE + s_off, mask=in_q, other=0.0)
                tb = gl.load(TB + s_off, mask=in_q, other=0.0)
                delta = gl.load(DELTA + s_off, mask=in_q, other=0.0)
                beta = gl.load(BETA + s_off, mask=in_q, other=0.0)
            # few instructions per score element: the scale folded into one FMA, per-query constants
            # formed once per step, dS regrouped (below), and the mask built only on steps that reach
            # past the keys every one of their queries sees (on the H200 3% of the kernel at D = 64)
            n_lo = n0 + WG * HALF
            full = (m0 + BLOCK_M <= lq) & (n_lo + HALF <= lk)
            if HAS_LEFT:
                full = full & (n_lo >= m0 + BLOCK_M - 1 + shift - left)
            if HAS_RIGHT:
                full = full & (n_lo + HALF - 1 <= m0 + shift + right)
            nlse = -lse2
            tb1 = 1.0 + tb
            bds = (beta - delta) * scale
            st = warpgroup_mma_wait(num_outstanding=2, deps=(st,))
            if IN_FLIGHT:
                # in-order completion: the previous step's dv and dk products are done too
                mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=it > 0)
            pt = gl.exp2(gl.fma(st, scale_log2, nlse[None, :]))
            if not full:
                vis = (offs_n[:, None] < lk) & in_q[None, :]
                if HAS_LEFT:
                    vis = vis & (offs_n[:, None] >= offs_m[None, :] + shift - left)
                if HAS_RIGHT:
                    vis = vis & (offs_n[:, None] <= offs_m[None, :] + shift + right)
                # (a select, not a product: exp2 of a key the row never sees may be +inf)
                pt = gl.where(vis, pt, 0.0)
            tt = warpgroup_mma_wait(num_outstanding=1, deps=(tt,))
            # w = p (1 + tbar - t): the dv weights
            w32 = pt * (tb1[None, :] - tt)
            w = gl.convert_layout(w32.to(dtype), op_layout)
            dv = warpgroup_mma(w, do_s, dv, is_async=True)
            at = warpgroup_mma_wait(num_outstanding=1, deps=(at,))
            # nu = beta - a: dS2 = p nu, and dS1 = p (a - delta) + p (a - beta)(tbar - t) regrouped as
            # p (beta - delta) - w nu
            nu = beta[None, :] - at
            ds2 = (pt * nu).to(dtype)
            ds1 = gl.fma(w32, nu * (-scale), pt * bds[None, :]).to(dtype)
            dk = warpgroup_mma(gl.convert_layout(ds1, op_layout), q_s, dk, is_async=True)
            dk = warpgroup_mma(gl.convert_layout(ds2, op_layout), r_s, dk, is_async=True)
            if FUSED and FUSED < 4:
                # this warpgroup's 64 keys of dS1, dS2 (queries x keys) for the worker's dq, dr products
                ds_smem, ds_full, ds_empty = fused[0], fused[1], fused[2]
                buf = it % 2
                mbarrier.wait(ds_empty.index(buf), ((it // 2) & 1) ^ 1)
                ds_smem.index(buf * 4 + WG).store(gl.permute(ds1, (1, 0)))
                ds_smem.index(buf * 4 + 2 + WG).store(gl.permute(ds2, (1, 0)))
                fence_async_shared()
                mbarrier.arrive(ds_full.index(buf))
            if not IN_FLIGHT:
                # retire dk and dv here: keeping them in flight into the next step's score products
                # needs more than 240 registers at 32 query rows (ptxas then serializes every MMA)
                dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))
                mbarrier.arrive(empty.index(stage))
                dk = warpgroup_mma_init(dk)
                dv = warpgroup_mma_init(dv)
        dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))

        if (not FUSED) and len(fused) == 2:
            # through shared memory and the copy engine (descriptors made on the host): whole 128-byte
            # rows instead of the accumulator layout's 4-byte pieces, and rows past the sequence skipped.
            # Staged in this warpgroup's own k and v tiles, which only its own products read
            tma_store_rows(fused[0], b32, n0 + WG * HALF, hk * D, dk.to(dtype), k_smem, WG * HALF)
            tma_store_rows(fused[1], b32, n0 + WG * HALF, hk * D, dv.to(dtype), v_smem, WG * HALF)
            tma.store_wait(0)
        else:
            rows_l: gl.constexpr = gl.SliceLayout(1, acc_layout)
            cols_l: gl.constexpr = gl.SliceLayout(0, acc_layout)
            rows = n0 + WG * HALF + gl.arange(0, HALF, layout=rows_l)
            cols = gl.arange(0, D, layout=cols_l)
            off = out_base + rows[:, None].to(gl.int64) * stride_kl + cols[None, :]
            mask = (rows < lk)[:, None] & (cols < D)[None, :]
            gl.store(DK + off, dk.to(DK.dtype.element_ty), mask=mask)
            gl.store(DV + off, dv.to(DV.dtype.element_ty), mask=mask)

    @gluon.jit
    def _dkv_producer(p, scale, scale_log2, G: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr,
                      STAGES: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, IN_FLIGHT: gl.constexpr,
                      STATS_TMA: gl.constexpr, FUSED: gl.constexpr, ORDERED: gl.constexpr, A_REGS: gl.constexpr,
                      WG: gl.constexpr):
        (k_smem, v_smem, q_bufs, r_bufs, do_bufs, stat_bufs, kv_bar, ready, empty, q_desc, r_desc, do_desc, k_desc,
         v_desc, stat_descs, LSE, TB, DELTA, BETA, DK, DV, s_base, stride_sh, out_base, stride_kl, n0, lq, lk, shift,
         left, right, start, blocks, steps, q_row0, k_row0, hk, b32, fused) = p
        mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes)
        tile_copy(k_desc, b32, n0, hk * D, kv_bar, k_smem)
        tile_copy(v_desc, b32, n0, hk * D, kv_bar, v_smem)
        for it in range(steps):
            _load_step(it, q_bufs, r_bufs, do_bufs, stat_bufs, ready, empty, q_desc, r_desc, do_desc, stat_descs,
                       stride_sh, start, blocks, hk, b32, G, D, BLOCK_M, STAGES, STATS_TMA, FUSED)

if HAVE_GLUON:
    @gluon.jit
    def _load_step(it, q_bufs, r_bufs, do_bufs, stat_bufs, ready, empty, q_desc, r_desc, do_desc, stat_descs,
                   stride_sh, start, blocks, hk, b32, G: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr,
                   STAGES: gl.constexpr, STATS_TMA: gl.constexpr, FUSED: gl.constexpr):
        """The producer's copies for step it: q, r, dO tiles (and the row statistics) into its ring stage,
        once both consumers have released that stage."""
        stage = it % STAGES
        # a fresh mbarrier counts as having completed the phase before phase 0
        mbarrier.wait(empty.index(stage), ((it // STAGES) & 1) ^ 1)
        g, m0 = _step_rows(it, start, blocks, G, BLOCK_M, FUSED)
        col = (hk * G + g) * D
        bar = ready.index(stage)
        if STATS_TMA:
            mbarrier.expect(bar, 3 * q_desc.block_type.nbytes + 4 * BLOCK_M * 4)
            s_row = g * stride_sh + m0
            for j in gl.static_range(4):
                stats_copy(stat_descs[j], b32, hk * G + g, m0, s_row, bar, stat_bufs.index(stage * 4 + j))
        else:
            mbarrier.expect(bar, 3 * q_desc.block_type.nbytes)
        tile_copy(q_desc, b32, m0, col, bar, q_bufs.index(stage))
        tile_copy(r_desc, b32, m0, col, bar, r_bufs.index(stage))
        tile_copy(do_desc, b32, m0, col, bar, do_bufs.index(stage))

    @gluon.jit
    def _step_rows(it, start, blocks, G: gl.constexpr, BLOCK_M: gl.constexpr, FUSED: gl.constexpr):
        """(query head of the GQA group, first query row) of step it of a key block's walk."""
        if FUSED:
            # query blocks from the last one down, the group's heads inner: every key block of a head
            # reaches a given query block at the same step, so the ordered dq/dr additions (key block
            # n after n - 1, which starts no later) seldom wait
            mi = it // G
            g = it - mi * G
            m0 = start + (blocks - 1 - mi) * BLOCK_M
        else:
            g = it // blocks
            m0 = start + (it - g * blocks) * BLOCK_M
        return g, m0

    @gluon.jit
    def _wait_turn(ptr, turn):
        """Spin until the counter at ptr reaches turn (ld.acquire at GPU scope); a counter that never
        gets there (a bug in the turn arithmetic) traps after 2^24 polls (seconds) instead of hanging."""
        gl.inline_asm_elementwise(
            """{
            .reg .pred %p<2>;
            .reg .b32 %v<1>;
            .reg .b32 %n<1>;
            mov.b32 %n0, 0;
            $$L_turn_${:uid}:
            ld.acquire.gpu.global.b32 %v0, [$1];
            add.s32 %n0, %n0, 1;
            setp.gt.s32 %p1, %n0, 16777216;
            @%p1 trap;
            setp.ne.s32 %p0, %v0, $2;
            @%p0 bra $$L_turn_${:uid};
            mov.b32 $0, %v0;
            }""",
            "=r,l,r", [ptr, turn], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _pass_turn(ptr):
        """Hand the counter at ptr to the next key block once this thread's bulk additions have landed in
        global memory (not only been read from shared memory), then one thread of the warpgroup adds 1
        with release semantics."""
        gl.inline_asm_elementwise(
            "cp.async.bulk.wait_group 0;\n\tfence.proxy.async.global;\n\tmov.b32 $0, 0;",
            "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        gl.thread_barrier()
        gl.inline_asm_elementwise(
            """{
            .reg .pred %p<1>;
            .reg .b32 %t<1>;
            mov.u32 %t0, %tid.x;
            and.b32 %t0, %t0, 127;
            setp.eq.u32 %p0, %t0, 0;
            @%p0 red.release.gpu.global.add.s32 [$1], 1;
            mov.b32 $0, 0;
            }""",
            "=r,l", [ptr], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _dkv_dq_worker(p, scale, scale_log2, G: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr,
                       STAGES: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, IN_FLIGHT: gl.constexpr,
                       STATS_TMA: gl.constexpr, FUSED: gl.constexpr, ORDERED: gl.constexpr, A_REGS: gl.constexpr,
                       WG: gl.constexpr):
        """The fused kernel's third warpgroup: the producer's copies, and dq^T = K^T dS1^T, dr^T = K^T dS2^T
        for each step from the consumers' dS tiles in shared memory, added into fp32 dq, dr by TMA
        reduce-add, 16 query rows at a time (the register budget here is 40 a thread)."""
        (k_smem, v_smem, q_bufs, r_bufs, do_bufs, stat_bufs, kv_bar, ready, empty, q_desc, r_desc, do_desc, k_desc,
         v_desc, stat_descs, LSE, TB, DELTA, BETA, DK, DV, s_base, stride_sh, out_base, stride_kl, n0, lq, lk, shift,
         left, right, start, blocks, steps, q_row0, k_row0, hk, b32, fused) = p
        (ds_smem, ds_full, ds_empty, out_smem, dq_desc, dr_desc, SEM, sem_base, sem_stride, pid_n, visible) = fused
        HALF: gl.constexpr = 64
        DC: gl.constexpr = 64
        QC: gl.constexpr = out_smem.shape[2]  # the kernel's WORKER_QC
        LAG: gl.constexpr = STAGES - 1
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, QC, 16])
        zero = gl.zeros([DC, QC], gl.float32, acc_layout)
        mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes)
        tile_copy(k_desc, b32, n0, hk * D, kv_bar, k_smem)
        tile_copy(v_desc, b32, n0, hk * D, kv_bar, v_smem)
        prev_sem = SEM
        for it in range(steps + LAG):
            if it < steps:
                _load_step(it, q_bufs, r_bufs, do_bufs, stat_bufs, ready, empty, q_desc, r_desc, do_desc, stat_descs,
                           stride_sh, start, blocks, hk, b32, G, D, BLOCK_M, STAGES, STATS_TMA, FUSED)
            j = it - LAG
            if j >= 0:
                mbarrier.wait(kv_bar, 0)
                buf = j % 2
                if FUSED < 4:
                    mbarrier.wait(ds_full.index(buf), (j // 2) & 1)
                g, m0 = _step_rows(j, start, blocks, G, BLOCK_M, FUSED)
                # the staging tiles this step writes have been read by the additions issued from them
                PIECES: gl.constexpr = (BLOCK_M // QC) * (D // DC)
                OUT_BUFS: gl.constexpr = out_smem.shape[0] // (2 * PIECES)
                obase = (j % OUT_BUFS) * (2 * PIECES)
                tma.store_wait((OUT_BUFS - 1) * 2 * PIECES)
                for w in gl.static_range(2 if FUSED < 3 else 0):  # dq, dr
                    for qc in gl.static_range(BLOCK_M // QC):
                        b_lo = ds_smem.index(buf * 4 + w * 2 + 0).slice(qc * QC, QC).permute((1, 0))
                        b_hi = ds_smem.index(buf * 4 + w * 2 + 1).slice(qc * QC, QC).permute((1, 0))
                        for dc in gl.static_range(D // DC):
                            a_lo = k_smem.slice(0, HALF).slice(dc * DC, DC, dim=1).permute((1, 0))
                            a_hi = k_smem.slice(HALF, HALF).slice(dc * DC, DC, dim=1).permute((1, 0))
                            acc = warpgroup_mma(a_lo, b_lo, zero, use_acc=False, is_async=True)
                            acc = warpgroup_mma(a_hi, b_hi, acc, is_async=True)
                            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                            out_smem.index(obase + (w * (BLOCK_M // QC) + qc) * (D // DC) + dc).store(acc)
                if FUSED < 4:
                    mbarrier.arrive(ds_empty.index(buf))
                fence_async_shared()
                if visible and FUSED < 2:
                    row = (hk * G + g) * D
                    if ORDERED:
                        sem = SEM + sem_base + g * sem_stride + m0 // BLOCK_M
                        if j > 0:
                            _pass_turn(prev_sem)
                        first = 0
                        if HAS_LEFT:
                            first = gl.maximum(0, (m0 + shift - left) // 128)
                        _wait_turn(sem, pid_n - first)
                        prev_sem = sem
                    for qc in gl.static_range(BLOCK_M // QC):
                        for dc in gl.static_range(D // DC):
                            i = obase + qc * (D // DC) + dc
                            tma_reduce_add(dq_desc, [row + dc * DC, q_row0 + m0 + qc * QC], out_smem.index(i))
                            tma_reduce_add(dr_desc, [row + dc * DC, q_row0 + m0 + qc * QC], out_smem.index(PIECES + i))
        if ORDERED:
            if visible:
                _pass_turn(prev_sem)
        tma.store_wait(0)


    @gluon.jit
    def _dkv_ws_kernel(
        Q, R, K, V, DO, LSE, TB, DELTA, BETA, DK, DV, DQA, DRA, SEM, CUQ, CUK,
        stride_kb, stride_kl, stride_kh, stride_sb, stride_sh,
        seqlen_q, seqlen_k, scale, scale_log2, left, right, sem_blocks, acc_cols, acc_stride,
        HQ: gl.constexpr, HKV: gl.constexpr, G: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr,
        STAGES: gl.constexpr, VARLEN: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
        IN_FLIGHT: gl.constexpr, STATS_TMA: gl.constexpr, FUSED: gl.constexpr, ORDERED: gl.constexpr,
        WORKER_QC: gl.constexpr, WORKER_REGS: gl.constexpr, OUT_BUFS: gl.constexpr, SKIP: gl.constexpr = 0,
        A_REGS: gl.constexpr = False,
        TRIM: gl.constexpr = True, HEAD_GROUP: gl.constexpr = 0,
        # descriptors made on the host (dense inputs, large launches; see _gluon.HOST_DESC), else None
        QD=None, RD=None, DOD=None, KD=None, VD=None, LSED=None, TBD=None, DELTAD=None, BETAD=None,
        DKD=None, DVD=None,
    ):
        BLOCK_N: gl.constexpr = 128
        # (heaviest key blocks, most queries under a causal mask, first)
        pid_bh, blk = program_ids(HEAD_GROUP)
        b32 = pid_bh // HKV
        hk = pid_bh % HKV
        qs, lq, ks, lk, q_row0, k_row0 = sequence(CUQ, CUK, b32, seqlen_q, seqlen_k, VARLEN)
        n0 = blk * BLOCK_N
        shift = lk - lq
        # query blocks that see keys [n0, n0 + BLOCK_N) (see train._query_ranges)
        n_last = gl.minimum(n0 + BLOCK_N, lk) - 1
        lo = 0
        if HAS_RIGHT:
            lo = gl.maximum(0, n0 - shift - right)
        hi = lq
        if HAS_LEFT:
            hi = gl.minimum(lq, n_last - shift + left + 1)
        visible = hi > lo
        hi = gl.maximum(hi, lo)
        start = lo // BLOCK_M * BLOCK_M
        # at least one step, even for a key block that no query sees (outside every window): its
        # tile is fully masked and it stores zeros
        blocks = gl.maximum(gl.where(n0 < lk, gl.cdiv(hi - start, BLOCK_M), 1), 1)
        steps = G * blocks

        out_base = b32.to(gl.int64) * stride_kb + ks.to(gl.int64) * stride_kl + hk * stride_kh
        if (n0 < lk) & (lq == 0):
            # the keys of a sequence without queries (no descriptor can be made over zero rows)
            store_zeros(DK, out_base, stride_kl, n0, lk, BLOCK_N, D)
            store_zeros(DV, out_base, stride_kl, n0, lk, BLOCK_N, D)
        elif n0 < lk:
            # descriptors over this sequence's rows only (the statistics: its query heads' rows): the
            # copy engine zero-fills rows past its end instead of reading the next sequence's, whose
            # NaN would reach this one through 0 * NaN in the products; or those passed in (QD ...),
            # made on the host over the dense (batch, rows, heads x D), where the same rows are past
            # the row dimension's end
            q_off = q_row0.to(gl.int64) * (HQ * D)
            k_off = k_row0.to(gl.int64) * (HKV * D)
            s_base = b32.to(gl.int64) * stride_sb + hk * G * stride_sh + qs
            tile_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], Q.dtype.element_ty)
            kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], K.dtype.element_ty)
            if QD is None:
                q_desc = tma.make_tensor_descriptor(Q + q_off, [lq, HQ * D], [HQ * D, 1], [BLOCK_M, D], tile_layout)
                r_desc = tma.make_tensor_descriptor(R + q_off, [lq, HQ * D], [HQ * D, 1], [BLOCK_M, D], tile_layout)
                do_desc = tma.make_tensor_descriptor(DO + q_off, [lq, HQ * D], [HQ * D, 1], [BLOCK_M, D],
                                                     tile_layout)
                k_desc = tma.make_tensor_descriptor(K + k_off, [lk, HKV * D], [HKV * D, 1], [BLOCK_N, D], kv_layout)
                v_desc = tma.make_tensor_descriptor(V + k_off, [lk, HKV * D], [HKV * D, 1], [BLOCK_N, D], kv_layout)
            else:
                q_desc, r_desc, do_desc, k_desc, v_desc = QD, RD, DOD, KD, VD

            k_smem = gl.allocate_shared_memory(K.dtype.element_ty, [BLOCK_N, D], kv_layout)
            v_smem = gl.allocate_shared_memory(K.dtype.element_ty, [BLOCK_N, D], kv_layout)
            q_bufs = gl.allocate_shared_memory(Q.dtype.element_ty, [STAGES, BLOCK_M, D], tile_layout)
            r_bufs = gl.allocate_shared_memory(Q.dtype.element_ty, [STAGES, BLOCK_M, D], tile_layout)
            do_bufs = gl.allocate_shared_memory(Q.dtype.element_ty, [STAGES, BLOCK_M, D], tile_layout)
            # the four row statistics of each stage, when TMA can copy them (16-byte aligned rows); the
            # group's query heads' rows are contiguous in the dense layout, so one descriptor spans them
            stat_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M], gl.float32)
            stat_bufs = gl.allocate_shared_memory(gl.float32, [STAGES * 4, BLOCK_M], stat_layout)
            # (made only where their base is 16-byte aligned, which STATS_TMA says)
            d_base = 0
            if STATS_TMA:
                d_base = s_base
            n_stats = G * stride_sh
            if QD is None:
                stat_descs = (tma.make_tensor_descriptor(LSE + d_base, [n_stats], [1], [BLOCK_M], stat_layout),
                              tma.make_tensor_descriptor(TB + d_base, [n_stats], [1], [BLOCK_M], stat_layout),
                              tma.make_tensor_descriptor(DELTA + d_base, [n_stats], [1], [BLOCK_M], stat_layout),
                              tma.make_tensor_descriptor(BETA + d_base, [n_stats], [1], [BLOCK_M], stat_layout))
            else:
                stat_descs = (LSED, TBD, DELTAD, BETAD)
            kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            mbarrier.init(kv_bar, count=1)
            ready, empty = ring_barriers(STAGES)

            if FUSED:
                # dS1, dS2 of each step, queries x keys, one tile per (buffer, dS1 | dS2, warpgroup's 64 keys);
                # the dq, dr pieces (16 query rows x D, fp32) that the copy engine adds into DQA, DRA
                ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, 64], Q.dtype.element_ty)
                ds_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [8, BLOCK_M, 64], ds_layout)
                out_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, WORKER_QC], gl.float32)
                out_smem = gl.allocate_shared_memory(
                    gl.float32, [OUT_BUFS * 2 * (BLOCK_M // WORKER_QC) * (D // 64), 64, WORKER_QC], out_layout)
                ds_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
                ds_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
                for i in gl.static_range(2):
                    mbarrier.init(ds_full.index(i), count=2)
                    mbarrier.init(ds_empty.index(i), count=1)
                # dq^T, dr^T: (query head, head-dim) rows x all queries of the batch; a tile reaching past
                # this sequence's queries adds exact zeros to the next one's (its dS columns are 0 there)
                dq_desc = tma.make_tensor_descriptor(DQA, [HQ * D, acc_cols], [acc_stride, 1], [64, WORKER_QC], out_layout)
                dr_desc = tma.make_tensor_descriptor(DRA, [HQ * D, acc_cols], [acc_stride, 1], [64, WORKER_QC], out_layout)
                # turn counters per (sequence, query head, query block)
                sem_base = (b32 * HQ + hk * G).to(gl.int64) * sem_blocks
                fused = (ds_smem, ds_full, ds_empty, out_smem, dq_desc, dr_desc, SEM, sem_base, sem_blocks,
                         blk, visible)
            elif DKD is not None:
                fused = (DKD, DVD)
            else:
                fused = (kv_bar,)
            p = (k_smem, v_smem, q_bufs, r_bufs, do_bufs, stat_bufs, kv_bar, ready, empty, q_desc, r_desc, do_desc,
                 k_desc, v_desc, stat_descs, LSE, TB, DELTA, BETA, DK, DV, s_base, stride_sh, out_base, stride_kl,
                 n0, lq, lk, shift, left, right, start, blocks, steps, q_row0, k_row0, hk, b32, fused)
            # two literal partition lists: warp_specialize needs its partitions as JIT functions, and
            # choosing the third one through a constexpr does not compile in Triton 3.6
            if FUSED:
                FLAG: gl.constexpr = 1 + SKIP
                gl.warp_specialize([
                    (_dkv_consumer, (p, scale, scale_log2, G, D, BLOCK_M, STAGES, HAS_LEFT, HAS_RIGHT, IN_FLIGHT,
                                     STATS_TMA, FLAG, ORDERED, False, 0)),
                    (_dkv_consumer, (p, scale, scale_log2, G, D, BLOCK_M, STAGES, HAS_LEFT, HAS_RIGHT, IN_FLIGHT,
                                     STATS_TMA, FLAG, ORDERED, False, 1)),
                    (_dkv_dq_worker, (p, scale, scale_log2, G, D, BLOCK_M, STAGES, HAS_LEFT, HAS_RIGHT, IN_FLIGHT,
                                      STATS_TMA, FLAG, ORDERED, False, 0)),
                ], [4, 4], [252 - WORKER_REGS // 2, WORKER_REGS])
            else:
                gl.warp_specialize([
                    (_dkv_consumer, (p, scale, scale_log2, G, D, BLOCK_M, STAGES, HAS_LEFT, HAS_RIGHT, IN_FLIGHT,
                                     STATS_TMA, FUSED, ORDERED, A_REGS, 0, TRIM)),
                    (_dkv_consumer, (p, scale, scale_log2, G, D, BLOCK_M, STAGES, HAS_LEFT, HAS_RIGHT, IN_FLIGHT,
                                     STATS_TMA, FUSED, ORDERED, A_REGS, 1, TRIM)),
                    (_dkv_producer, (p, scale, scale_log2, G, D, BLOCK_M, STAGES, HAS_LEFT, HAS_RIGHT, IN_FLIGHT,
                                     STATS_TMA, FUSED, ORDERED, A_REGS, 0)),
                ], [4, 1], [240, 24])  # _gluon.CONSUMER_REGS, PRODUCER_REGS


# The fused kernel by head dim: (BLOCK_M query rows per step, ring stages, query columns of each of the
# dq/dr warpgroup's products, that warpgroup's registers). With W registers there the two consumers
# get 252 - W / 2 each (12 warps x 168 at launch); the dk/dv consumer spills below 232, and the
# worker's m64 x 16 products (8 accumulator registers) fit in 40, m64 x 32 ones do not (ptxas then
# serializes every warp-group MMA of the kernel).
# The last entry: staging buffers for the reduce-adds (2 lets a step's products go on while the
# previous step's additions still read theirs; it fits beside a 2-stage ring).
FUSED_CONFIG = {128: (32, 2, 32, 56, 2)}
# timing only (wrong dq/dr): 1 skips the reduce-adds, 2 also the dq/dr products, 3 also the dS hand-off
FUSED_SKIP = int(os.environ.get("PARALLAX_FUSED_SKIP", "0"))


def usable(q, k, d: int, tensors) -> bool:
    """Whether the Gluon dk/dv kernel can run (see _gluon.usable): head dims 64 and 128."""
    return _gluon.usable(q, d, CONFIG, tensors)


def launch(q, r, k, v, dout, lse, tbar, delta, beta, dk, dv, cu_q_arg, cu_k_arg, batch, hkv, sk, ss,
           max_q, max_k, scale, left, right, meta):
    """dk, dv for train.bwd (same arguments as train._launch_dkv_tma)."""
    block_m, stages, in_flight, a_regs = CONFIG[meta["D"]]
    # the ring holds the 64 queries a consumer warpgroup may skip at the start (see _dkv_consumer)
    assert stages * block_m >= 64, CONFIG[meta["D"]]
    grid = (batch * hkv, (max_k + BLOCK_N - 1) // BLOCK_N)
    # a statistics tile's offset (sequence, head, first row) must be 16-byte aligned for TMA:
    # rows of a multiple of 4 in the dense layout
    stats_tma = STATS_TMA and not meta["VARLEN"] and max_q % 4 == 0
    host = {}
    if stats_tma and _gluon.use_host_desc(meta, batch, q.shape[-2], max_q, max_k):
        host = _host_descriptors(q, r, k, v, dout, (lse, tbar, delta, beta), dk, dv, block_m)
    return _gluon.launch(_dkv_ws_kernel, grid,
        q, r, k, v, dout, lse, tbar, delta, beta, dk, dv, dk, dv, dk, cu_q_arg, cu_k_arg, *sk, *ss, max_q, max_k,
        scale, scale * LOG2E, left, right, 0, 0, 0,
        HQ=q.shape[-2], HKV=hkv, G=meta["G"], D=meta["D"], BLOCK_M=block_m, STAGES=stages,
        VARLEN=meta["VARLEN"], HAS_LEFT=meta["HAS_LEFT"], HAS_RIGHT=meta["HAS_RIGHT"],
        IN_FLIGHT=in_flight, STATS_TMA=stats_tma, FUSED=False, ORDERED=False, WORKER_QC=16, WORKER_REGS=40,
        OUT_BUFS=1, A_REGS=a_regs, TRIM=_gluon.TRIM_MASKED, HEAD_GROUP=_gluon.HEAD_GROUP, **host, num_warps=4,
        maxnreg=MAXNREG)


def _host_descriptors(q, r, k, v, dout, stats, dk, dv, block_m):
    """The dense batch's descriptors for the kernel (its keyword arguments): q, r, dO and k, v as (batch,
    rows, heads x D), the four row statistics as (batch, query heads, rows), and dk, dv for the
    copy-engine epilogue."""
    b, lq, hq = q.shape[:3]
    stat_descs = [_gluon.host_descriptor(t, (b, hq, lq), (t.stride(0), t.stride(1), 1), (1, 1, block_m))
                  for t in stats]
    out = {}
    if _gluon.tma_epilogue(q.shape[-1], k.shape[1]):
        out = dict(DKD=_gluon.output_tiles(dk, BLOCK_N // 2), DVD=_gluon.output_tiles(dv, BLOCK_N // 2))
    return dict(QD=_gluon.row_tiles(q, block_m), RD=_gluon.row_tiles(r, block_m),
                DOD=_gluon.row_tiles(dout, block_m), KD=_gluon.row_tiles(k, BLOCK_N), VD=_gluon.row_tiles(v, BLOCK_N),
                **dict(zip(("LSED", "TBD", "DELTAD", "BETAD"), stat_descs)), **out)


def fused_usable(q, k, d: int, tensors) -> bool:
    """Whether the fused backward kernel can run (see _gluon.usable): head dim 128."""
    return _gluon.usable(q, d, FUSED_CONFIG, tensors)


def launch_fused(q, r, k, v, dout, lse, tbar, delta, beta, dk, dv, dqa, dra, sem, cu_q_arg, cu_k_arg, batch, hkv,
                 sk, ss, max_q, max_k, scale, left, right, meta, ordered: bool):
    """dk, dv, and dq^T, dr^T added into the zeroed fp32 dqa, dra ((query heads x D) rows, one column per
    query of the batch, row stride a multiple of 4) in one kernel; with ordered,
    each query block's additions come in key-block order (sem: zeroed int32 turn counters, one per
    (sequence, query head, BLOCK_M query rows)), so dq and dr are the same on every run."""
    block_m, stages, worker_qc, worker_regs, out_bufs = FUSED_CONFIG[meta["D"]]
    grid = (batch * hkv, (max_k + BLOCK_N - 1) // BLOCK_N)
    stats_tma = STATS_TMA and not meta["VARLEN"] and max_q % 4 == 0
    return _gluon.launch(_dkv_ws_kernel, grid,
        q, r, k, v, dout, lse, tbar, delta, beta, dk, dv, dqa, dra, sem, cu_q_arg, cu_k_arg, *sk, *ss, max_q, max_k,
        scale, scale * LOG2E, left, right, (max_q + block_m - 1) // block_m, dqa.shape[-1], dqa.stride(0),
        HQ=q.shape[-2], HKV=hkv, G=meta["G"], D=meta["D"], BLOCK_M=block_m, STAGES=stages,
        VARLEN=meta["VARLEN"], HAS_LEFT=meta["HAS_LEFT"], HAS_RIGHT=meta["HAS_RIGHT"],
        IN_FLIGHT=False, STATS_TMA=stats_tma, FUSED=True, ORDERED=ordered, WORKER_QC=worker_qc,
        WORKER_REGS=worker_regs, OUT_BUFS=out_bufs, SKIP=FUSED_SKIP, HEAD_GROUP=_gluon.HEAD_GROUP,
        num_warps=4, maxnreg=MAXNREG)


# On by default where usable(); PARALLAX_DKV_GLUON=0 runs the Triton dk/dv kernel instead.
# Measured on the H200 (bf16, causal, interleaved A/B, median of 5 rounds): forward+backward 4.312
# against 4.604 ms at B=4 H=16 L=4096 D=128, 15.01 against 16.40 ms at B=1 H=16 L=16384, 8.34
# against 8.65 ms at B=4 H=32/8 L=4096, 2.78 against 2.85 ms at D=64; the kernel alone 1.67
# against 2.12 ms (Nsight Compute) at B=4 H=16 L=4096.
ENABLED = os.environ.get("PARALLAX_DKV_GLUON", "1") != "0"
