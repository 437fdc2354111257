"""What the warp-specialized Gluon kernels (fwd_gluon, dq_gluon, dkv_gluon) share: the register
budget of their partitions, a program's sequence bounds, the K/V ring a producer warp streams, the
stores for rows no descriptor can cover, and the gate."""

from __future__ import annotations

import functools
import os

import torch

try:  # Gluon ships with Triton >= 3.5; without it the Triton kernels run
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language._core import builtin
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
    from triton._C.libtriton import ir as _ir
    HAVE_GLUON = True
except (ImportError, AttributeError):  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

LOG2E = 1.4426950408889634

# Every kernel runs a default partition (consumer warpgroup 0) and two workers: consumer warpgroup 1
# with CONSUMER_REGS registers per thread and one producer warp with PRODUCER_REGS. The kernel
# launches with MAXNREG per thread: 12 warps (4 + 4 + the producer's, rounded up to a warpgroup) x 32
# x 168 fit the 65,536 registers of an SM and leave the first consumer (12 x 168 - 4 x 240 - 4 x 24)
# / 4 = 240.
CONSUMER_REGS = 240
PRODUCER_REGS = 24
MAXNREG = 168


if HAVE_GLUON:
    @builtin
    def tma_reduce_add(tensor_desc, coord, src, _semantic=None):
        """src (shared memory) added element-wise into the tile of tensor_desc at coord by the copy engine
        (cp.reduce.async.bulk.tensor .add): Triton 3.6 builds the op (ttng.async_tma_reduce) but Gluon
        has no wrapper for it. Completes like a TMA store (tma.store_wait); rows and columns past the
        descriptor's shape are skipped."""
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                  src.handle)

    # rows of D columns over a kernel's 4 warps, 8 contiguous columns a thread: for the plain loads
    # and stores outside the warp-group MMAs
    ROWS_LAYOUT = gl.constexpr(gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0]))

    @gluon.jit
    def sequence(CUQ, CUK, b32, seqlen_q, seqlen_k, VARLEN: gl.constexpr):
        """Sequence b32's first query and key (qs, ks: offsets into the statistics and the packed
        rows; 0 for a dense batch), lengths, and first rows in the (rows, H * D) view of the tensors."""
        if VARLEN:
            qs = gl.load(CUQ + b32)
            lq = gl.load(CUQ + b32 + 1) - qs
            ks = gl.load(CUK + b32)
            lk = gl.load(CUK + b32 + 1) - ks
            q_row0 = qs
            k_row0 = ks
        else:
            qs = 0
            lq = seqlen_q
            ks = 0
            lk = seqlen_k
            q_row0 = b32 * seqlen_q
            k_row0 = b32 * seqlen_k
        return qs, lq, ks, lk, q_row0, k_row0

    @gluon.jit
    def key_ranges(m0, rows: gl.constexpr, lq, lk, shift, left, right, BLOCK_N: gl.constexpr,
                   HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):
        """Keys seen by query rows [m0, m0 + rows): tiles from start (BLOCK_N-aligned) up to hi;
        those in [a, c) are visible to every one of the rows (train._key_ranges, in Gluon)."""
        m_last = gl.minimum(m0 + rows, lq) - 1
        lo = 0
        full_lo = 0
        if HAS_LEFT:
            lo = gl.maximum(0, m0 + shift - left)
            full_lo = (gl.maximum(0, m_last + shift - left) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        hi = lk
        upper = lk
        if HAS_RIGHT:
            hi = gl.minimum(lk, m_last + shift + right + 1)
            upper = gl.minimum(lk, m0 + shift + right + 1)
        hi = gl.maximum(hi, lo)
        start = lo // BLOCK_N * BLOCK_N
        full_hi = gl.maximum(upper, 0) // BLOCK_N * BLOCK_N
        a = gl.minimum(gl.maximum(full_lo, start), hi)
        c = gl.maximum(a, gl.minimum(full_hi, hi))
        return start, a, c, hi

    @gluon.jit
    def tiles_to_walk(n_tiles, hi_w, start, BLOCK_N: gl.constexpr, TRIM: gl.constexpr):
        """How many of the CTA's n_tiles key tiles (from start) a consumer warpgroup whose rows see keys
        below hi_w walks. With TRIM it stops after its last visible key: the trailing tiles (the first
        warpgroup's last 64 keys under a causal mask) are fully masked for its rows, and their products
        would only take tensor-core time from the other warpgroup. At most 64 keys are skipped, which
        the ring's stages hold (asserted at launch), so the producer never waits for a release of a
        tile this warpgroup skipped."""
        n_w = n_tiles
        if TRIM:
            n_w = gl.minimum(n_tiles, gl.maximum(gl.cdiv(hi_w - start, BLOCK_N), 1))
        return n_w

    @gluon.jit
    def program_ids(HEAD_GROUP: gl.constexpr):
        """(batch x head index, block index) of this program. With HEAD_GROUP = 0 as launched: the
        grid's first axis (batch x heads) varies fastest, so the CTAs resident at once hold one or two
        blocks of every head and each head's tiles are read from memory about once per resident
        block. With HEAD_GROUP = n the same grid is walked n heads at a time, every block of those
        heads (in the launched block order, the heads interleaved) before the next n heads: the
        resident CTAs share a few heads' K/V (or Q/R/dO) tiles, which then come from L2."""
        if HEAD_GROUP == 0:
            bh = gl.program_id(0)
            blk = gl.program_id(1)
        else:
            nbh = gl.num_programs(0)
            per = HEAD_GROUP * gl.num_programs(1)
            lin = gl.program_id(1) * nbh + gl.program_id(0)
            group = lin // per
            first = group * HEAD_GROUP
            size = gl.minimum(nbh - first, HEAD_GROUP)
            within = lin - group * per
            bh = first + within % size
            blk = within // size
        return bh, blk

    @gluon.jit
    def mask_scores(s, n0, a, c, offs_m, lk, shift, left, right, BLOCK_N: gl.constexpr, HAS_LEFT: gl.constexpr,
                    HAS_RIGHT: gl.constexpr, keys_layout: gl.constexpr):
        """A (rows x BLOCK_N keys from n0) score tile with -inf where a key is out of range or outside
        a row's window; tiles inside the rows' fully visible keys [a, c) pass as they are."""
        if (n0 < a) | (n0 + BLOCK_N > c):
            offs_n = n0 + gl.arange(0, BLOCK_N, layout=keys_layout)
            vis = (offs_n[None, :] < lk) & (offs_m[:, None] >= 0)
            if HAS_LEFT:
                vis = vis & (offs_n[None, :] >= offs_m[:, None] + shift - left)
            if HAS_RIGHT:
                vis = vis & (offs_n[None, :] <= offs_m[:, None] + shift + right)
            s = gl.where(vis, s, float("-inf"))
        return s

    @gluon.jit
    def ring_barriers(STAGES: gl.constexpr):
        """The ring's barriers: ready[i] (the producer's copies into stage i landed) and empty[i]
        (both consumer warpgroups are done with stage i: one arrival from each)."""
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)
        return ready, empty

    @gluon.jit
    def stream_kv(k_desc, v_desc, k_bufs, v_bufs, ready, empty, start, n_tiles, col, batch, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr):
        """The producer's loop: K and V tiles of keys [start + i BLOCK_N, ...) of columns [col, col + D),
        i < n_tiles, into the ring (batch: the sequence, for descriptors made on the host)."""
        for it in range(n_tiles):
            stage = it % STAGES
            # a fresh mbarrier counts as having completed the phase before phase 0
            mbarrier.wait(empty.index(stage), ((it // STAGES) & 1) ^ 1)
            bar = ready.index(stage)
            mbarrier.expect(bar, 2 * k_desc.block_type.nbytes)
            n0 = start + it * BLOCK_N
            tile_copy(k_desc, batch, n0, col, bar, k_bufs.index(stage))
            tile_copy(v_desc, batch, n0, col, bar, v_bufs.index(stage))

    @gluon.jit
    def tile_copy(desc, batch, row, col, bar, dst):
        """The copy engine's copy of the tile at (row, col) of desc into dst: a descriptor made on the
        device over one sequence's (rows, H * D), or one made on the host over the whole dense batch
        (batch, rows, H * D), which zero-fills past each sequence's end just the same."""
        if len(desc.block_shape) == 3:
            tma.async_copy_global_to_shared(desc, [batch, row, col], bar,
                                            dst._reinterpret(dst.dtype, desc.block_shape, desc.layout))
        else:
            tma.async_copy_global_to_shared(desc, [row, col], bar, dst)

    @gluon.jit
    def stats_copy(desc, batch, head, row, flat, bar, dst):
        """The copy of a row statistic's tile (rows from row of a query head): by its flat offset in a
        descriptor made on the device over one sequence's heads, or by (batch, head, row) in one made on
        the host over the dense (batch, heads, rows)."""
        if len(desc.block_shape) == 3:
            tma.async_copy_global_to_shared(desc, [batch, head, row], bar,
                                            dst._reinterpret(dst.dtype, desc.block_shape, desc.layout))
        else:
            tma.async_copy_global_to_shared(desc, [flat], bar, dst)

    @gluon.jit
    def tma_store_rows(desc, batch, row, col, value, tile, first: gl.constexpr):
        """value (rows x D in registers) into the tile at (batch, row, col) of a host-made descriptor,
        by the copy engine from rows [first, first + rows) of the shared-memory tile (rows past the batch
        entry's end are skipped); the caller waits with tma.store_wait before tile is used again.

        A swizzled tile wider than the 128-byte swizzle span (D = 128 in 2-byte types) keeps each row in
        64-column chunks, chunk-major, so a slice of its rows is one contiguous piece per chunk, not
        one piece: desc then has 64-column blocks and each chunk goes out as its own copy."""
        ROWS: gl.constexpr = desc.block_shape[1]
        WIDTH: gl.constexpr = desc.block_shape[2]
        CHUNKS: gl.constexpr = tile.shape[1] // WIDTH
        staging = tile.slice(first, ROWS)
        staging.store(value)
        fence_async_shared()
        gl.thread_barrier()
        if CHUNKS == 1:
            tma.async_copy_shared_to_global(desc, [batch, row, col],
                                            staging._reinterpret(staging.dtype, desc.block_shape, desc.layout))
        else:
            chunk_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([tile.shape[0], WIDTH], tile.dtype)
            chunks = tile._reinterpret(tile.dtype, [CHUNKS, tile.shape[0], WIDTH], chunk_layout)
            for c in gl.static_range(CHUNKS):
                piece = chunks.index(c).slice(first, ROWS)
                tma.async_copy_shared_to_global(desc, [batch, row, col + c * WIDTH],
                                                piece._reinterpret(tile.dtype, desc.block_shape, desc.layout))

    @gluon.jit
    def store_zeros(P, base, stride_l, row0, limit, ROWS: gl.constexpr, D: gl.constexpr):
        """Zeros into rows [row0, min(row0 + ROWS, limit)) of a (rows, D) view at P + base (rows of a
        sequence that no descriptor can cover: one of zero rows cannot be made)."""
        layout: gl.constexpr = ROWS_LAYOUT
        rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
        off = base + rows[:, None].to(gl.int64) * stride_l + cols[None, :]
        mask = (rows < limit)[:, None] & (cols < D)[None, :]
        gl.store(P + off, gl.zeros([ROWS, D], P.dtype.element_ty, layout), mask=mask)


FAST_LAUNCH = os.environ.get("PARALLAX_FAST_LAUNCH", "1") != "0"
# compiled kernels by (kernel, device, Triton's specialization of the arguments, launch options, the
# debug knobs that change what Triton compiles); see launch()
_COMPILED: dict = {}


def _current_stream(device):
    return torch._C._cuda_getCurrentRawStream(device)


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs) with less of Triton's per-call Python. The arguments are bound and
    specialized by Triton's own (native) binder, so the key below tells apart exactly the kernels
    Triton would compile separately; the first launch of a key goes through JITFunction.run (which
    compiles), later ones call that compiled kernel's launcher directly. What is skipped: the device
    and stream lookups through torch.cuda, the cache-key string, the check of global values. On the
    H200 machine's host a forward+backward at L=1024 is bound by its launch path."""
    from triton import knobs
    caches = getattr(kernel, "device_caches", None)
    if not FAST_LAUNCH or caches is None or kernel.pre_run_hooks:
        return kernel[grid](*args, **kwargs)
    device = args[0].device.index
    binder = caches[device][-1]
    bound, specialization, options = binder(*args, **kwargs)
    key = (kernel, device, tuple(specialization), tuple(sorted(options.items())), knobs.runtime.debug,
           getattr(knobs.compilation, "instrumentation_mode", None))
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = kernel[grid](*args, **kwargs)
        _COMPILED[key] = compiled
        return compiled
    params = bound.values()
    stream = _current_stream(device)
    grid = tuple(grid) + (1,) * (3 - len(grid))
    # as JITFunction.run launches (the metadata is None unless a launch hook is installed)
    metadata = compiled.launch_metadata(grid, stream, *params)
    compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, metadata,
                 knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *params)
    return compiled


_GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@functools.lru_cache(maxsize=None)
def _tile_layout(block, dtype):
    return gl.NVMMASharedLayout.get_default_for(list(block), getattr(gl, _GL_DTYPES[dtype]))


def host_descriptor(t, shape, strides, block):
    """A copy-engine descriptor made on the host (a kernel argument, so the kernel does not build one
    in every program) over a dense tensor viewed as shape/strides, with the shared-memory layout the
    kernels allocate for its tiles (cached: computing it costs more than the rest)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    return TensorDescriptor(t, list(shape), list(strides), list(block), _tile_layout(tuple(block), t.dtype))


def row_tiles(t, rows: int, cols: int | None = None):
    """A dense (batch, rows, heads, D) tensor's descriptor for tiles of rows x cols (cols: one head's D
    columns unless given)."""
    b, n, h, d = t.shape
    return host_descriptor(t, (b, n, h * d), (t.stride(0), t.stride(1), 1), (1, rows, cols or d))


def output_tiles(t, rows: int):
    """The descriptor tma_store_rows writes t's rows x D output tiles through: 64-column blocks (one
    per swizzled chunk of the staging tile; the whole row when D <= 64)."""
    return row_tiles(t, rows, min(t.shape[-1], 64))


# Dense inputs of at least HOST_DESC_MIN_WORK (batch x query heads x query rows x key rows) take
# descriptors made on the host; PARALLAX_HOST_DESC=0 makes them on the device in every program, as packed
# varlen inputs and smaller launches always do. Measured on the H200 (bf16, causal, interleaved A/B,
# forward+backward medians): 2.246 against 2.405 ms at B=4 H=16 L=4096 D=64, 4.126 against 4.303 at
# D=128, 14.46 against 14.71 at B=1 H=16 L=16384; the device-side ones cost each program a few
# microseconds before its first copy. But each host descriptor costs the launch path about 10 us, and
# where the host sets the pace that shows: 1.018 against 0.474 ms at B=4 H=16 L=1024, and (with the
# descriptors built without TensorDescriptor's checks, a few microseconds cheaper each) 1.205 against
# 1.038 ms at B=1 H=16 L=4096 D=128 (2^28); hence the floor above that.
HOST_DESC = os.environ.get("PARALLAX_HOST_DESC", "1") != "0"
HOST_DESC_MIN_WORK = 1 << 29


# With host descriptors, the kernels' outputs leave through shared memory and the copy engine
# (PARALLAX_TMA_EPILOGUE=0: stores from the accumulators' registers), staged in the consumer warpgroup's
# own 64-row slice of its q/r (k/v) tile, one copy per 64-column swizzled chunk (tma_store_rows).
# Measured on the H200 (bf16, causal, interleaved A/B, forward+backward medians, bitwise the same
# outputs): 2.169 against 2.250 ms at B=4 H=16 L=4096 D=64; 3.976 against 4.126 ms at D=128 (forward
# 1.026 against 1.062). Only for rows in whole 64-row tiles, the case checked on the device (the copy
# engine drops the rows of a ragged last tile that fall past the sequence, but that clipping has not
# been checked there yet).
TMA_EPILOGUE = os.environ.get("PARALLAX_TMA_EPILOGUE", "1") != "0"


# Under a causal mask (or any right window bound) the first consumer warpgroup's last 64 keys in the
# forward and dq/dr kernels, and the second one's first 64 queries in the dk/dv kernel (one query
# head per KV head), are fully masked: the warpgroup skips those tiles and leaves the tensor cores to
# the other (PARALLAX_TRIM_MASKED=0: both walk the CTA's whole range). Measured on the H200 (bf16,
# causal, interleaved A/B, 5 rounds, bitwise the same outputs): forward+backward 3.943 against 3.987 ms
# at B=4 H=16 L=4096 D=128 (forward 0.999 against 1.017), 2.132 against 2.153 at D=64, level at B=1
# H=16 L=16384 (14.25 against 14.24; forward 3.643 against 3.683); forward 0.106 against 0.111 ms at
# L=1024.
# The order programs run in (program_ids): 4 heads at a time. Measured on the H200 (bf16, causal,
# 3 interleaved rounds, forward+backward medians, against the launched order): 3.819 against 3.940 ms
# at B=4 H=16 L=4096 D=128 (forward 0.949 against 1.000), 7.504 against 7.755 at B=4 H=32/8, 2.032
# against 2.168 at D=64; level at B=1 H=16 L=16384 (14.45 against 14.39). 8 heads: the same within
# the rounds' spread; 16: 1-3% slower. 0 launches the grid as it is.
HEAD_GROUP = int(os.environ.get("PARALLAX_HEAD_GROUP", "4"))
TRIM_MASKED = os.environ.get("PARALLAX_TRIM_MASKED", "1") != "0"


def tma_epilogue(d: int, rows: int) -> bool:
    return TMA_EPILOGUE and d in (64, 128) and rows % 64 == 0


def use_host_desc(meta, batch: int, heads: int, rows_q: int, rows_k: int) -> bool:
    return HOST_DESC and not meta["VARLEN"] and batch * heads * rows_q * rows_k >= HOST_DESC_MIN_WORK


def usable(q, d: int, head_dims, tensors) -> bool:
    """Whether a Gluon kernel can run: Gluon present, Hopper (sm_90: warp-group MMAs), not the
    interpreter (Gluon kernels do not run there), a 2-byte dtype, a head dim in head_dims, and
    contiguous 16-byte aligned tensors."""
    if not HAVE_GLUON or d not in head_dims or q.element_size() != 2:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if any(t.data_ptr() % 16 or not t.is_contiguous() for t in tensors):
        return False
    return q.is_cuda and torch.cuda.get_device_capability(q.device) == (9, 0)
