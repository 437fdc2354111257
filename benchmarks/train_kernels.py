"""GPU training kernels: accuracy check and forward / forward+backward timing.

    python benchmarks/train_kernels.py --check            # bf16/fp16 vs float64 reference on a grid
    python benchmarks/train_kernels.py --bench            # timing table vs SDPA (flash, cuDNN) and parallax-kernel
    python benchmarks/train_kernels.py --check --bench --out DIR
    python benchmarks/train_kernels.py --sweep            # launch configurations (with registers, spills)
    python benchmarks/train_kernels.py --overhead --tma-ab  # host vs GPU time; TMA vs pointer loads
    python benchmarks/train_kernels.py --ab dkv_kernel --sweep-shape 1,16,8,4096,128  # interleaved A/B
    python benchmarks/train_kernels.py --ab "dkv_tma=32,128,8,3,0;32,128,4,3,1"       # of configurations
    python benchmarks/train_kernels.py --check-autotune     # PARALLAX_TRAIN_AUTOTUNE=1 against fixed launches

FLOP counts (P = number of visible (query, key) pairs per head, exact for causal
and windows; one matmul over the pairs costs 2 * D * P per head):
  Parallax forward   4 matmuls (QK^T, RK^T, P1 V, P2 V)                  8 D P
  Parallax backward  8 matmuls (QK^T, RK^T, dO V^T, dV, dS1^T Q, dS2^T R, dS1 K, dS2 K)  16 D P
                     (the kernels recompute QK^T, RK^T and dO V^T in both backward kernels, so they
                     execute 11; the count above is the algorithm's, so TFLOP/s is not inflated)
  softmax forward    2 matmuls, backward 5 (FlashAttention's count)       4 D P / 10 D P
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from parallax_attention.ops import parallax_attn, parallax_attn_varlen  # noqa: E402
from parallax_attention.ops.reference import parallax_attn_reference  # noqa: E402


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def visible_pairs(lq, lk, causal, window):
    left, right = window
    i = torch.arange(lq, dtype=torch.int64)
    shift = lk - lq
    lo = torch.zeros_like(i) if left < 0 else (i + shift - left).clamp_min(0)
    hi = torch.full_like(i, lk - 1) if right < 0 else (i + shift + right).clamp(max=lk - 1)
    if causal:
        hi = torch.minimum(hi, i + shift)
    return int((hi - lo + 1).clamp_min(0).sum())


# ------------------------------------------------------------------------------------------
# check
# ------------------------------------------------------------------------------------------

# (B, Hq, Hkv, Lq, Lk, D, causal, window, r_scale)  r_scale multiplies randn for the probe;
# 1/sqrt(D) makes r.k about as large as the scaled q.k, 1.0 is a stress case (|t| ~ sqrt(D)).
CHECK_GRID = [
    (2, 8, 8, 1024, 1024, 128, True, (-1, -1), None),
    (1, 4, 4, 8192, 8192, 128, True, (-1, -1), None),
    (2, 8, 2, 2048, 2048, 128, True, (-1, -1), None),      # GQA
    (1, 8, 8, 1000, 1500, 128, True, (-1, -1), None),      # Lq < Lk
    (1, 4, 4, 1500, 1000, 128, True, (-1, -1), None),      # Lq > Lk: empty leading rows
    (2, 4, 4, 2048, 2048, 128, False, (-1, -1), None),
    (1, 4, 4, 4096, 4096, 128, True, (300, -1), None),     # sliding window, not tile-aligned
    (1, 4, 4, 3000, 3000, 128, False, (257, 100), None),   # two-sided window
    (1, 4, 4, 2048, 2048, 128, True, (-1, -1), 1.0),       # large probe
    (2, 8, 8, 2048, 2048, 64, True, (-1, -1), None),
]
# more head dims (32, 96, 256) and MQA: add rows here; each new (head dim, group, mask kind)
# costs a kernel compile on first use
VARLEN_CHECK = [((0, 700, 2700, 2701, 4100), 8, 8, 128, True, (-1, -1))]


DEV = "cuda"


def _inputs(b, hq, hkv, lq, lk, d, dtype, r_scale):
    dev = DEV
    r_scale = d ** -0.5 if r_scale is None else r_scale
    q = torch.randn(b, lq, hq, d, device=dev).to(dtype)
    r = (torch.randn(b, lq, hq, d, device=dev) * r_scale).to(dtype)
    k = torch.randn(b, lk, hkv, d, device=dev).to(dtype)
    v = torch.randn(b, lk, hkv, d, device=dev).to(dtype)
    do = torch.randn(b, lq, hq, d, device=dev).to(dtype)
    return q, r, k, v, do


def _grads(fn, xs, do):
    xs = [x.detach().requires_grad_() for x in xs]
    o = fn(*xs)
    g = torch.autograd.grad(o, xs, do)
    return (o,) + tuple(g)


@contextlib.contextmanager
def _host_descriptors(on):
    """Every dense Gluon launch with descriptors made on the host (on) or on the device (off)."""
    from parallax_attention.ops.triton import _gluon
    old = _gluon.HOST_DESC, _gluon.HOST_DESC_MIN_WORK
    _gluon.HOST_DESC, _gluon.HOST_DESC_MIN_WORK = on, 0
    try:
        yield
    finally:
        _gluon.HOST_DESC, _gluon.HOST_DESC_MIN_WORK = old


def run_check(log, dtypes, with_compile):
    worst = {}
    rows = []
    names = ("o", "dq", "dr", "dk", "dv")

    def record(tag, dtype, ours, ref):
        errs = [rel(a, b) for a, b in zip(ours, ref)]
        finite = all(bool(torch.isfinite(a).all()) for a in ours)
        key = str(dtype).replace("torch.", "")
        for n, e in zip(names, errs):
            if e > worst.get((key, n), (-1, ""))[0]:
                worst[(key, n)] = (e, tag)
        ok = finite and max(errs) <= (1e-2 if dtype == torch.bfloat16 else 5e-3)
        row = dict(case=tag, dtype=key, finite=finite, ok=ok, **dict(zip(names, errs)))
        rows.append(row)
        log(json.dumps(row))

    for b, hq, hkv, lq, lk, d, causal, window, r_scale in CHECK_GRID:
        tag = f"B{b} H{hq}/{hkv} L{lq}x{lk} D{d} causal={causal} win={window} r={r_scale or 'D^-1/2'}"
        for dtype in dtypes:
            torch.manual_seed(hash((tag, str(dtype))) % 2**31)
            q, r, k, v, do = _inputs(b, hq, hkv, lq, lk, d, dtype, r_scale)
            ref = _grads(lambda *x: parallax_attn_reference(*x, causal=causal, window_size=window),
                         [x.double() for x in (q, r, k, v)], do.double())
            # both ways the Gluon kernels get their copy descriptors: made on the device in every program
            # (these shapes' default) and made on the host (large launches' default)
            for mode in ("device", "host"):
                with _host_descriptors(mode == "host"):
                    ours = _grads(lambda *x: parallax_attn(*x, causal=causal, window_size=window,
                                                           backend="triton"), (q, r, k, v), do)
                record(f"{tag} desc={mode}", dtype, ours, ref)
                del ours
            del ref
            torch.cuda.empty_cache()

    for cu, hq, hkv, d, causal, window in VARLEN_CHECK:
        tag = f"varlen {cu} H{hq}/{hkv} D{d} causal={causal} win={window}"
        cu_t = torch.tensor(cu, dtype=torch.int32, device=DEV)
        lens = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
        for dtype in dtypes:
            torch.manual_seed(len(tag))
            q, r, k, v, do = (x[0] for x in _inputs(1, hq, hkv, cu[-1], cu[-1], d, dtype, None))
            ours = _grads(lambda *x: parallax_attn_varlen(*x, cu_t, cu_t, max(lens), max(lens), causal=causal,
                                                          window_size=window, backend="triton"),
                          (q, r, k, v), do)

            def ref_fn(q, r, k, v):
                outs = []
                for i in range(len(lens)):
                    sl = slice(cu[i], cu[i + 1])
                    outs.append(parallax_attn_reference(q[None, sl], r[None, sl], k[None, sl], v[None, sl],
                                                        causal=causal, window_size=window)[0])
                return torch.cat(outs)
            ref = _grads(ref_fn, [x.double() for x in (q, r, k, v)], do.double())
            record(tag, dtype, ours, ref)

    # determinism, CUDA graph capture and torch.compile of forward + backward
    extra = {}
    extra["isolation"] = run_isolation_check(log)
    # with descriptors made on the host (over the whole dense batch: a tile past a sequence's end must
    # still read zeros), at both head dims
    with _host_descriptors(True):
        extra["isolation_host_desc"] = run_isolation_check(log)
        extra["isolation_host_desc_d64"] = run_isolation_check(log, (3, 8, 2, 1000, 64))
    q, r, k, v, do = _inputs(2, 8, 2, 2048, 2048, 128, torch.bfloat16, None)
    f = lambda *x: parallax_attn(*x, causal=True, backend="triton")  # noqa: E731
    g1 = _grads(f, (q, r, k, v), do)
    g2 = _grads(f, (q, r, k, v), do)
    extra["deterministic"] = all(torch.equal(a, b) for a, b in zip(g1, g2))
    # races show after timing loops and in memory that held something else (see run_repeat_check)
    repeat = [run_repeat_check(log, shape, 6, REPEAT_VARIANTS[:1]) for shape in REPEAT_CHECK_SHAPES]
    extra["repeat_default_ok"] = all(v["ok"] for rep in repeat for v in rep.values())
    try:
        xs = [x.detach().clone().requires_grad_() for x in (q, r, k, v)]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                o = f(*xs)
                o.backward(do)
        torch.cuda.current_stream().wait_stream(s)
        for x in xs:
            x.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o = f(*xs)
            o.backward(do)
        graph.replay()
        torch.cuda.synchronize()
        extra["cuda_graph_max_abs_diff"] = max(
            (a - b).abs().max().item() for a, b in zip([o] + [x.grad for x in xs], g1))
    except Exception as e:  # report, do not hide
        extra["cuda_graph_error"] = repr(e)[:300]
    if with_compile:
        try:
            t0 = time.time()
            cf = torch.compile(f, fullgraph=True)
            gc = _grads(cf, (q, r, k, v), do)
            extra["compile_fullgraph_max_abs_diff"] = max((a - b).abs().max().item() for a, b in zip(gc, g1))
            extra["compile_s"] = time.time() - t0
        except Exception as e:
            extra["compile_error"] = repr(e)[:300]
    log(json.dumps(extra))
    return rows, {f"{k[0]} {k[1]}": v for k, v in worst.items()}, extra


# ------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------

# (B, Hq, Hkv, L, D, window)   all causal bf16
BENCH_GRID = [
    (4, 16, 16, 1024, 128, (-1, -1)),
    (4, 16, 16, 4096, 128, (-1, -1)),
    (2, 16, 16, 8192, 128, (-1, -1)),
    (1, 16, 16, 16384, 128, (-1, -1)),
    (4, 16, 16, 4096, 64, (-1, -1)),
    (4, 32, 8, 4096, 128, (-1, -1)),
    (4, 16, 16, 4096, 128, (1023, -1)),
]


def bench_ms(fn, grad_to_none=None):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def _qrkvdo(b, hq, hkv, L, d):
    """Random bf16 inputs (B, L, H, D) for one shape, with r = 0.1 randn and an output gradient."""
    dt = torch.bfloat16
    q = torch.randn(b, L, hq, d, device="cuda", dtype=dt, requires_grad=True)
    r = (torch.randn(b, L, hq, d, device="cuda", dtype=dt) * 0.1).requires_grad_()
    k = torch.randn(b, L, hkv, d, device="cuda", dtype=dt, requires_grad=True)
    v = torch.randn(b, L, hkv, d, device="cuda", dtype=dt, requires_grad=True)
    do = torch.randn(b, L, hq, d, device="cuda", dtype=dt)
    return q, r, k, v, do


def run_bench(log, plx, grid, atomic=False, rounds=1):
    """Forward and forward+backward medians of ours, SDPA (flash, cuDNN) and parallax-kernel per grid
    shape. With rounds > 1 every implementation is timed once per round, the order reversed every
    other round, and each figure is the median over the rounds: the GPU's clock falls under sustained
    load (power limit), so whatever is timed first in a call runs on a cooler, faster GPU."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    for b, hq, hkv, L, d, window in grid:
        torch.manual_seed(0)
        q, r, k, v, do = _qrkvdo(b, hq, hkv, L, d)
        # heads-first copies for SDPA and parallax-kernel
        qh, rh, kh, vh, doh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, r, k, v, do))
        pairs = visible_pairs(L, L, True, window) * b * hq
        row = dict(B=b, Hq=hq, Hkv=hkv, L=L, D=d, window=list(window), pairs=pairs)
        flops = {"plx": (8 * d * pairs, 24 * d * pairs), "sm": (4 * d * pairs, 14 * d * pairs)}
        impls = []  # (name, forward, leaves, kind, environment while timed)

        def ours():
            return parallax_attn(q, r, k, v, causal=True, window_size=window, backend="triton")
        impls.append(("ours", ours, [q, r, k, v], "ours", {}))
        if atomic:
            impls.append(("ours_atomic_bwd", ours, [q, r, k, v], "ours", {"PARALLAX_TRAIN_BWD": "atomic"}))
        if window == (-1, -1):
            gqa = hq != hkv
            for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                def f(be=be):
                    with sdpa_kernel([be]):
                        return F.scaled_dot_product_attention(qh, kh, vh,
                                                              is_causal=True, enable_gqa=gqa)
                impls.append((name, f, [qh, kh, vh], "sm", {}))
            if plx is not None:
                if gqa:
                    # MHA only: the K/V repeat is part of its cost for a GQA layer
                    def fp():
                        return plx.parallax_func(qh, rh, kh.repeat_interleave(hq // hkv, 1),
                                                 vh.repeat_interleave(hq // hkv, 1), d ** -0.5)
                else:
                    def fp():
                        return plx.parallax_func(qh, rh, kh, vh, d ** -0.5)
                impls.append(("plx_kernel", fp, [qh, rh, kh, vh], "plx", {}))

        times = {name: [] for name, *_ in impls}
        failed = {}
        for rnd in range(rounds):
            for name, fwd, leaves, kind, env in (impls if rnd % 2 == 0 else impls[::-1]):
                if name in failed:
                    continue
                os.environ.update(env)
                try:
                    tf = bench_ms(fwd)

                    def fb():
                        fwd().backward(doh if kind != "ours" else do)
                    tfb = bench_ms(fb, grad_to_none=leaves)
                    # the anchors (../shared/anchors) were timed without clearing the gradients, so each
                    # call also adds into .grad; this is the same harness, for comparing with them
                    times[name].append((tf, tfb, bench_ms(fb)))
                    for x in leaves:
                        x.grad = None
                except Exception as e:
                    failed[name] = repr(e)[:200]
                finally:
                    for key in env:
                        os.environ.pop(key)
        for name, fwd, leaves, kind, env in impls:
            if name in failed:
                row[name] = dict(error=failed[name])
                continue
            tf, tfb, tacc = (sorted(x)[len(x) // 2] for x in zip(*times[name]))
            fl = flops["plx" if kind in ("ours", "plx") else "sm"]
            row[name] = dict(fwd_ms=tf, fwdbwd_ms=tfb, fwd_tflops=fl[0] / tf / 1e9, fwdbwd_tflops=fl[1] / tfb / 1e9,
                             fwdbwd_accum_ms=tacc)
            if rounds > 1:
                row[name]["rounds"] = times[name]
        rows.append(row)
        log(json.dumps(row))
        del q, r, k, v, do, qh, rh, kh, vh, doh
        torch.cuda.empty_cache()
    return rows


# One-warpgroup configurations small enough in shared memory for two programs per SM (their
# warpgroups then overlap like FA3's ping-pong, without a shared barrier) are listed too.
SWEEP = {"fwd": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3),
                 (64, 64, 4, 2), (64, 32, 4, 2)],
         "dq": [(128, 32, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 4), (64, 32, 4, 2), (64, 32, 4, 3),
                (64, 64, 4, 2)],
         "dkv": [(64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                 (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 8, 3), (128, 64, 4, 3)],
         # the descriptor dk/dv kernel: (BLOCK_M, BLOCK_N, warps, stages, warp_specialize)
         # (16 query rows per tile stopped with a misaligned-address fault on the H200: not listed)
         "dkv_tma": [(32, 128, 8, 3, False), (32, 128, 4, 3, True), (32, 128, 8, 2, False), (32, 128, 8, 4, False),
                     (64, 128, 8, 3, False), (64, 128, 8, 2, False), (32, 128, 4, 2, True), (32, 128, 4, 4, True),
                     (64, 128, 4, 2, True), (32, 64, 4, 3, False), (32, 64, 4, 2, False), (64, 64, 4, 2, False),
                     (32, 64, 4, 4, False)]}


def _gluon_module(name):
    """The Gluon kernel module a --ab config name times: "gluon" (dk/dv), "fwd_gluon", "dq_gluon"."""
    from parallax_attention.ops.triton import dkv_gluon, dq_gluon, fwd_gluon
    return {"gluon": dkv_gluon, "fwd_gluon": fwd_gluon, "dq_gluon": dq_gluon}.get(name)


def _config(tr, name, d=128, group=1):
    if _gluon_module(name) is not None:
        return _gluon_module(name).CONFIG[64 if d <= 64 else 128]
    if name == "dkv_tma":
        return tr.DKV_TMA_CONFIG[tr.dkv_tma_key(d, group)]
    return tr.FIXED[name][128 if d <= 128 else 256]


def _set_config(tr, name, cfg, d=128, group=1):
    if _gluon_module(name) is not None:  # a Gluon kernel, switched on while its configurations are timed
        mod = _gluon_module(name)
        mod.CONFIG[64 if d <= 64 else 128] = cfg
        mod.ENABLED = True
    elif name == "dkv_tma":
        tr.DKV_TMA_CONFIG[tr.dkv_tma_key(d, group)] = cfg
    else:
        tr.FIXED[name][128 if d <= 128 else 256] = cfg


def run_sweep(log, b=4, h=16, hkv=None, L=4096, d=128, names=("fwd", "dq", "dkv_tma")):
    """Time each launch configuration on one shape and keep the fastest per kernel; registers and
    spills of each compiled configuration are logged too. "dkv" is the pointer dk/dv kernel (the
    descriptor one is switched off while it is swept), "dkv_tma" the descriptor one."""
    from parallax_attention.ops.triton import train as tr
    torch.manual_seed(0)
    q, r, k, v, do = _qrkvdo(b, h, hkv or h, L, d)
    f = lambda: parallax_attn(q, r, k, v, causal=True, backend="triton")  # noqa: E731

    def fb():
        f().backward(do)
    out = {}
    for name in names:
        best = None
        tr.DKV_TMA = False if name == "dkv" else None
        for cfg in SWEEP[name]:
            _set_config(tr, name, cfg, d, h // (hkv or h))
            try:
                t = bench_ms(f) if name == "fwd" else bench_ms(fb, grad_to_none=[q, r, k, v])
            except Exception as e:
                log(f"sweep {name} {cfg}: {e!r:.200}")
                continue
            ck = tr.LAST_COMPILED.get("dkv" if name == "dkv_tma" else name)
            regs = (getattr(ck, "n_regs", None), getattr(ck, "n_spills", None))
            out[f"{name} {cfg}"] = dict(ms=t, regs=regs[0], spills=regs[1])
            log(f"sweep {name} {cfg}: {t:.3f} ms  regs {regs[0]} spills {regs[1]}")
            if best is None or t < best[0]:
                best = (t, cfg)
        _set_config(tr, name, best[1], d, h // (hkv or h))
    tr.DKV_TMA = None
    chosen = {n: _config(tr, n, d, h // (hkv or h)) for n in ("fwd", "dq", "dkv", "dkv_tma")}
    log("sweep chose " + json.dumps(chosen))
    return out, chosen


def run_tma_ab(log, b=4, h=16, L=4096, d=128, rounds=3):
    """Forward and forward+backward with the forward's K/V through TMA or pointer loads, interleaved
    in one process (clock drift between runs is larger than the difference)."""
    from parallax_attention.ops.triton import train as tr
    torch.manual_seed(0)
    q, r, k, v, do = _qrkvdo(b, h, h, L, d)
    f = lambda: parallax_attn(q, r, k, v, causal=True, backend="triton")  # noqa: E731
    out = {"tma": [], "pointers": []}
    for _ in range(rounds):
        for name, mode in (("tma", True), ("pointers", False)):
            tr.USE_TMA = mode
            out[name].append((bench_ms(f), bench_ms(lambda: f().backward(do), grad_to_none=[q, r, k, v])))
    tr.USE_TMA = None
    log("tma_ab " + json.dumps(out))
    return out


def run_config_ab(log, spec, shape, rounds=3):
    """Forward+backward time of several launch configurations of one kernel, interleaved round by
    round in one process (the GPU's clock drifts by more than the differences between neighbours
    in a sweep). spec: "kernel=cfg;cfg;..." with each cfg comma-separated, e.g.
    "dkv_tma=32,128,8,3,0;32,128,4,3,1"; "gluon=32,3,0,0;16,4,1,0" for the Gluon dk/dv kernel
    (BLOCK_M, stages, dk/dv left in flight, k and v in registers)."""
    from parallax_attention.ops.triton import train as tr
    if spec in VARIANT_AB:
        return run_variant_ab(log, spec, shape, rounds)
    name, cfgs = spec.split("=")
    cfgs = [_parse_config(name, c) for c in cfgs.split(";")]
    b, h, hkv, L, d = shape
    torch.manual_seed(0)
    q, r, k, v, do = _qrkvdo(b, h, hkv, L, d)
    old = _config(tr, name, d, h // hkv)
    tr.DKV_TMA = False if name == "dkv" else None

    def fb():
        parallax_attn(q, r, k, v, causal=True, backend="triton").backward(do)
    times = {c: [] for c in cfgs}
    for _ in range(rounds):
        for c in cfgs:
            _set_config(tr, name, c, d, h // hkv)
            times[c].append(bench_ms(fb, grad_to_none=[q, r, k, v]))
    _set_config(tr, name, old, d, h // hkv)
    tr.DKV_TMA = None
    if _gluon_module(name) is not None:
        _set_kernels()
    out = {str(c): dict(ms=sorted(t)[len(t) // 2], all=t) for c, t in times.items()}
    for c, t in out.items():
        log(f"ab {name} {shape} {c}: median {t['ms']:.3f} ms of {['%.3f' % x for x in t['all']]}")
    return out


_DEFAULTS: dict = {}


def _set_kernels(tma=None, mha128=None, gluon=None, fwd_gluon=None, dq_gluon=None, dq_config=None):
    """The dk/dv kernel (None: descriptors where they apply, False: pointers; gluon: the
    warp-specialized Gluon kernel on or off), optionally the descriptor kernel's MHA D=128 launch,
    the forward (fwd_gluon: the Gluon kernel on or off) and dq/dr (dq_gluon: the Gluon kernel on or
    off; dq_config: its CONFIG entry at D=128); no arguments restore the defaults."""
    from parallax_attention.ops.triton import _gluon, dkv_gluon, dq_gluon as dg, fwd_gluon as fg
    from parallax_attention.ops.triton import train as tr
    if "dkv" not in _DEFAULTS:
        _DEFAULTS.update(dkv=dict(tr.DKV_TMA_CONFIG), gluon=dkv_gluon.ENABLED, fwd_gluon=fg.ENABLED,
                         dq_gluon=dg.ENABLED, dq_config=dict(dg.CONFIG), head_group=_gluon.HEAD_GROUP)
    _gluon.HEAD_GROUP = _DEFAULTS["head_group"]
    dg.ENABLED = _DEFAULTS["dq_gluon"] if dq_gluon is None else dq_gluon
    dg.CONFIG = {**_DEFAULTS["dq_config"], **({128: dq_config} if dq_config else {})}
    dkv_gluon.ENABLED = _DEFAULTS["gluon"] if gluon is None else gluon
    fg.ENABLED = _DEFAULTS["fwd_gluon"] if fwd_gluon is None else fwd_gluon
    tr.DKV_TMA = tma
    tr.DKV_TMA_CONFIG = {**_DEFAULTS["dkv"], **({(128, "mha"): mha128} if mha128 else {})}


def _set_head_group(n):
    from parallax_attention.ops.triton import _gluon
    _set_kernels()
    _gluon.HEAD_GROUP = n


def _set_bwd_mode(mode, worker=None, skip=0):
    """PARALLAX_TRAIN_BWD, and for the fused kernel its worker's (query columns, registers) and the
    timing-only FUSED_SKIP."""
    from parallax_attention.ops.triton import dkv_gluon
    os.environ["PARALLAX_TRAIN_BWD"] = mode
    dkv_gluon.FUSED_SKIP = skip
    if "fused" not in _DEFAULTS:
        _DEFAULTS["fused"] = dict(dkv_gluon.FUSED_CONFIG)
    dkv_gluon.FUSED_CONFIG = dict(_DEFAULTS["fused"])
    if worker:
        dkv_gluon.FUSED_CONFIG[128] = worker if len(worker) == 5 else dkv_gluon.FUSED_CONFIG[128][:2] + worker + (1,)


def _parse_config(name, text):
    """A launch configuration from comma-separated ints; the Gluon kernels' flags become booleans."""
    cfg = tuple(int(x) for x in text.split(","))
    if name == "dkv_tma":
        cfg = cfg[:4] + (bool(cfg[4]),)
    if _gluon_module(name) is not None:
        cfg = cfg[:2] + tuple(bool(x) for x in cfg[2:])
    return cfg


def _set_host_desc(on):
    from parallax_attention.ops.triton import _gluon
    _gluon.HOST_DESC = on


def _set_trim_masked(on):
    from parallax_attention.ops.triton import _gluon
    _gluon.TRIM_MASKED = on


def _set_tma_epilogue(on):
    from parallax_attention.ops.triton import _gluon
    _gluon.TMA_EPILOGUE = on


def _set_dkv_a_regs(on):
    """At D=64: the Gluon dk/dv kernel's score-product k, v operands from registers or shared memory."""
    from parallax_attention.ops.triton import dkv_gluon
    dkv_gluon.CONFIG[64] = dkv_gluon.CONFIG[64][:3] + (on,)


def _set_fast_launch(on):
    from parallax_attention.ops.triton import _gluon
    _gluon.FAST_LAUNCH = on


# --ab NAME: variants of the whole forward+backward, each (label, setter of its setting); the first
# is the default, set again when the comparison ends
VARIANT_AB = {
    "dkv_kernel": [("descriptors", lambda: _set_kernels()), ("pointers", lambda: _set_kernels(tma=False))],
    # the warp-specialized Gluon dk/dv kernel (ops/triton/dkv_gluon.py) against the Triton one
    "dkv_gluon": [("gluon", lambda: _set_kernels(gluon=True)), ("triton", lambda: _set_kernels(gluon=False))],
    # the warp-specialized Gluon forward (ops/triton/fwd_gluon.py) against the Triton one
    "fwd_gluon": [("gluon", lambda: _set_kernels(fwd_gluon=True)), ("triton", lambda: _set_kernels(fwd_gluon=False))],
    # the warp-specialized Gluon dq/dr kernel (ops/triton/dq_gluon.py) against the Triton one, and its
    # 64-key tiles at D=128 (ptxas spills there)
    "dq_gluon": [("gluon", lambda: _set_kernels(dq_gluon=True)),
                 ("gluon 64 keys", lambda: _set_kernels(dq_gluon=True, dq_config=(64, 2))),
                 ("triton", lambda: _set_kernels(dq_gluon=False))],
    # the Gluon kernels' copy-engine descriptors for dense inputs made on the host (kernel arguments) or
    # on the device in every program (_gluon.HOST_DESC)
    "host_desc": [("host", lambda: _set_host_desc(True)), ("device", lambda: _set_host_desc(False))],
    # the Gluon kernels' outputs through shared memory and the copy engine, or stored from registers
    "tma_epilogue": [("copy engine", lambda: _set_tma_epilogue(True)), ("registers", lambda: _set_tma_epilogue(False))],
    # the Gluon kernels' fully masked tiles at a warpgroup's end (forward, dq/dr) or start (dk/dv) skipped
    "trim_masked": [("trimmed", lambda: _set_trim_masked(True)), ("whole range", lambda: _set_trim_masked(False))],
    # D=64: the Gluon dk/dv kernel's score-product A operands (k, v) from registers or shared memory
    "dkv_a_regs64": [("registers", lambda: _set_dkv_a_regs(True)), ("shared memory", lambda: _set_dkv_a_regs(False))],
    # Gluon launches through the cached compiled kernel (_gluon.launch) or Triton's JITFunction.run
    "fast_launch": [("cached", lambda: _set_fast_launch(True)), ("triton run", lambda: _set_fast_launch(False))],
    # the backward: two kernels (dq/dr, dk/dv), or one fused Gluon kernel adding dq/dr by TMA reduce-add
    # in key-block order or in arrival order (PARALLAX_TRAIN_BWD)
    "bwd_fused": [("split", lambda: _set_bwd_mode("deterministic")), ("fused", lambda: _set_bwd_mode("fused")),
                  ("fused atomic", lambda: _set_bwd_mode("fused_atomic"))],
    # the order programs run in (_gluon.HEAD_GROUP: 0 as launched, n: all blocks of n heads at a time;
    # the first call records the defaults)
    "head_group": [(f"head group {n}", (lambda n: lambda: _set_head_group(n))(n)) for n in (0, 2, 4, 8, 16)],
    # timing only, wrong dq/dr: the fused kernel without its reduce-adds (1), also without the dq/dr
    # products (2), also without handing dS over (3)
    "bwd_skip": [("split", lambda: _set_bwd_mode("deterministic"))] + [
        (f"fused atomic skip {n}", (lambda n: lambda: _set_bwd_mode("fused_atomic", skip=n))(n)) for n in range(4)],
    # the fused kernel's (BLOCK_M, stages, worker query columns, worker registers, staging buffers)
    "bwd_staging": [("split", lambda: _set_bwd_mode("deterministic"))] + [
        (f"fused atomic {c}", (lambda c: lambda: _set_bwd_mode("fused_atomic", c))(c))
        for c in ((32, 3, 16, 40, 1), (32, 2, 16, 40, 2), (32, 2, 32, 56, 2), (32, 2, 16, 40, 1))],
    # the fused kernel's dq/dr warpgroup: m64 x 16 products at 40 registers or m64 x 32 at 56
    "bwd_worker": [("split", lambda: _set_bwd_mode("deterministic")),
                   ("fused atomic 16/40", lambda: _set_bwd_mode("fused_atomic", (16, 40))),
                   ("fused atomic 32/56", lambda: _set_bwd_mode("fused_atomic", (32, 56))),
                   ("fused 16/40", lambda: _set_bwd_mode("fused", (16, 40))),
                   ("fused 32/56", lambda: _set_bwd_mode("fused", (32, 56)))],
}


def run_variant_ab(log, name, shape, rounds=3):
    """Forward and forward+backward of the variants VARIANT_AB[name], interleaved round by round,
    after checking that the variants' outputs and gradients agree (norm-relative, to bf16 rounding)."""
    b, h, hkv, L, d = shape
    torch.manual_seed(0)
    q, r, k, v, do = _qrkvdo(b, h, hkv, L, d)

    def fb():
        parallax_attn(q, r, k, v, causal=True, backend="triton").backward(do)

    def fwd():
        with torch.no_grad():
            return parallax_attn(q, r, k, v, causal=True, backend="triton")
    grads = {}
    for label, setter in VARIANT_AB[name]:
        setter()
        for x in (q, r, k, v):
            x.grad = None
        o = fwd()
        fb()
        grads[label] = [o] + [x.grad.clone() for x in (q, r, k, v)]
    first = VARIANT_AB[name][0][0]
    diffs = {label: [float("%.2e" % rel(a, g)) for a, g in zip(gs, grads[first])] for label, gs in grads.items()}
    nonfinite = {label: [int((~torch.isfinite(t)).sum()) for t in gs] for label, gs in grads.items()}
    for label, gs in grads.items():
        for tname, t in zip(("o", "dq", "dr", "dk", "dv"), gs):
            if not torch.isfinite(t).all():
                log(f"ab {name} {shape} {label}: non-finite {tname} at (first, last, count) per dim "
                    f"{json.dumps(_nonfinite_where(t))}")
    times = {label: [] for label, _ in VARIANT_AB[name]}
    times_fwd = {label: [] for label, _ in VARIANT_AB[name]}
    # a race shows after a timing loop more often than in a lone pass, so each round checks too
    failed = {label: 0 for label, _ in VARIANT_AB[name]}
    for _ in range(rounds):
        for label, setter in VARIANT_AB[name]:
            setter()
            times[label].append(bench_ms(fb, grad_to_none=[q, r, k, v]))
            times_fwd[label].append(bench_ms(fwd))
            for x in (q, r, k, v):
                x.grad = None
            fb()
            failed[label] += not all(torch.isfinite(x.grad).all() for x in (q, r, k, v))
    VARIANT_AB[name][0][1]()
    _set_kernels()
    med = lambda t: sorted(t)[len(t) // 2]  # noqa: E731
    out = {label: dict(ms=med(t), all=t, fwd_ms=med(times_fwd[label]), fwd_all=times_fwd[label],
                       diff_to_first=diffs[label], nonfinite=nonfinite[label], rounds_nonfinite=failed[label])
           for label, t in times.items()}
    for label, t in out.items():
        log(f"ab {name} {shape} {label}: f+b median {t['ms']:.3f} ms of {['%.3f' % x for x in t['all']]}; "
            f"fwd median {t['fwd_ms']:.3f} ms of {['%.3f' % x for x in t['fwd_all']]}; "
            f"o, dq, dr, dk, dv against {first}: {t['diff_to_first']}, non-finite elements {t['nonfinite']}; "
            f"rounds with non-finite gradients {t['rounds_nonfinite']}/{rounds}")
    return out


# --check repeats the default launches on these (B, Hq, Hkv, L, D) (MHA takes the descriptor dk/dv
# kernel's "mha" configuration, GQA its "gqa" one)
REPEAT_CHECK_SHAPES = [(4, 16, 16, 4096, 128), (2, 16, 4, 4096, 128)]

# --repeat N: the dk/dv launches whose results are compared run against run
REPEAT_VARIANTS = [("descriptors, default launch", lambda: _set_kernels()),
                   ("pointers", lambda: _set_kernels(tma=False)),
                   ("Gluon warp-specialized", lambda: _set_kernels(gluon=True)),
                   ("Triton forward", lambda: _set_kernels(fwd_gluon=False)),
                   ("Triton dq/dr", lambda: _set_kernels(dq_gluon=False)),
                   ("descriptors, MHA D=128 warp specialized (unsafe)",
                    lambda: _set_kernels(mha128=(32, 128, 4, 3, True)))]


def run_isolation_check(log, shape=(3, 8, 2, 1000, 128)):
    """Each sequence of a batch is computed on its own: with every input and output gradient of the
    other sequences NaN, the middle sequence's output and gradients must be finite and equal to
    those of the sequence run alone (tiles that reach past a sequence's end must not read its
    neighbours' rows; L = 1000 is no multiple of any tile). Dense and packed varlen (with an empty
    sequence before it), with the default kernels and with the Triton ones."""
    b, hq, hkv, L, d = shape
    torch.manual_seed(2)
    q, r, k, v, do = (x.detach() for x in _qrkvdo(b, hq, hkv, L, d))
    dense = lambda *x: parallax_attn(*x, causal=True, backend="triton")  # noqa: E731
    cu = torch.tensor([0, L, L, 2 * L, 3 * L], dtype=torch.int32, device="cuda")
    packed = lambda *x: parallax_attn_varlen(*(t.flatten(0, 1) for t in x), cu, cu, L, L, causal=True,  # noqa: E731
                                             backend="triton").view(b, L, hq, d)
    clean = [x[1:2].clone() for x in (q, r, k, v, do)]
    for x in (q, r, k, v, do):
        x[0] = float("nan")
        x[2] = float("nan")
    names = ("o", "dq", "dr", "dk", "dv")
    out = {}
    for kernels, setter in (("default", lambda: _set_kernels()),
                            ("triton", lambda: _set_kernels(gluon=False, fwd_gluon=False, dq_gluon=False))):
        setter()
        alone = _grads(dense, clean[:4], clean[4])
        for layout, f in (("dense", dense), ("varlen", packed)):
            mixed = _grads(f, (q, r, k, v), do)
            out[f"{kernels} {layout}"] = {
                n: dict(finite=bool(torch.isfinite(m[1]).all()), equal=bool(torch.equal(m[1], a[0])),
                        rel=float("%.2e" % rel(m[1].nan_to_num(1e30), a[0])))
                for n, m, a in zip(names, mixed, alone)}
    _set_kernels()
    # (the packed layout may take other code paths than the dense one, e.g. the dk/dv kernel's row
    # statistics from global instead of shared memory, which ptxas contracts into other FMAs: equal
    # to a few fp32 roundings there, 4e-5 measured; a neighbour's rows would give NaN)
    ok = all(x["finite"] and x["rel"] <= 1e-4 for case in out.values() for x in case.values())
    log(f"isolation {shape}: {'ok' if ok else 'FAILED'} {json.dumps(out)}")
    return dict(ok=ok, **out)


def _poison(like, copies=4):
    """Hand the caching allocator blocks full of NaN in the sizes the next pass allocates, so an
    element a kernel fails to write shows up as non-finite instead of as last run's value."""
    blocks = [torch.full_like(t, float("nan")) for t in like for _ in range(copies)]
    blocks += [torch.full((t.shape[0], t.shape[2], t.shape[1]), float("nan"), device=t.device)
               for t in like[:1] for _ in range(4 * copies)]
    del blocks


def _nonfinite_where(t):
    """(batch, position, head) ranges of t's non-finite elements, for the log."""
    bad = (~torch.isfinite(t)).any(-1).nonzero()
    if not len(bad):
        return None
    return {n: [int(bad[:, i].min()), int(bad[:, i].max()), len(bad[:, i].unique())]
            for i, n in enumerate(("batch", "position", "head"))}


def run_repeat_check(log, shape, n, variants=None):
    """The default backward is deterministic: n forward+backward passes over the same inputs, with
    gradients freshly allocated each time, must give bitwise-equal and finite o, dq, dr, dk, dv.
    Run for each dk/dv launch of REPEAT_VARIANTS; every other pass follows a timing loop (where a
    race inside a kernel shows most) and an extra no-grad forward. Reports the runs that differ
    from the first and the non-finite elements per tensor."""
    b, h, hkv, L, d = shape
    torch.manual_seed(0)
    q, r, k, v, do = _qrkvdo(b, h, hkv, L, d)
    names = ("o", "dq", "dr", "dk", "dv")
    out = {}

    def fb():
        parallax_attn(q, r, k, v, causal=True, backend="triton").backward(do)
    for label, setter in variants or REPEAT_VARIANTS:
        setter()
        first, differ, nonfinite, maxdiff = None, {x: 0 for x in names}, {x: 0 for x in names}, {x: 0.0 for x in names}
        where = {}
        for i in range(n):
            if i % 2:
                bench_ms(fb, grad_to_none=[q, r, k, v])
            for x in (q, r, k, v):  # after the timing loop, which leaves its last gradients
                x.grad = None
            _poison((q, k))
            if i % 2:
                with torch.no_grad():
                    parallax_attn(q, r, k, v, causal=True, backend="triton")
            o = parallax_attn(q, r, k, v, causal=True, backend="triton")
            o.backward(do)
            got = [o.detach()] + [x.grad for x in (q, r, k, v)]
            for name, t in zip(names, got):
                bad = int((~torch.isfinite(t)).sum())
                nonfinite[name] += bad
                if bad and name not in where:
                    where[name] = dict(run=i, elements=bad, at=_nonfinite_where(t))
            if first is None:
                first = [t.clone() for t in got]
                continue
            for name, t, f in zip(names, got, first):
                if not torch.equal(t, f):
                    differ[name] += 1
                    dd = (t.float() - f.float()).abs().nan_to_num(float("inf")).max().item()
                    maxdiff[name] = max(maxdiff[name], dd)
        ok = not any(differ.values()) and not any(nonfinite.values())
        out[label] = dict(ok=ok, runs=n, runs_differing=differ, nonfinite=nonfinite, max_abs_diff=maxdiff,
                          first_nonfinite=where)
        log(f"repeat {shape} {label}: {'ok' if ok else 'FAILED'} {n} runs; differing from the first "
            f"{json.dumps(differ)}; non-finite elements {json.dumps(nonfinite)}; max abs diff {json.dumps(maxdiff)}"
            + (f"; first non-finite {json.dumps(where)}" if where else ""))
    _set_kernels()
    return out


def run_autotune_check(log, shape=(2, 8, 4, 1024, 128)):
    """PARALLAX_TRAIN_AUTOTUNE=1 (tuned launches of the three kernels) against the fixed launches on
    one GQA shape: outputs and gradients must agree to bf16 rounding."""
    b, h, hkv, L, d = shape
    torch.manual_seed(1)
    q, r, k, v, do = _qrkvdo(b, h, hkv, L, d)

    def grads():
        for x in (q, r, k, v):
            x.grad = None
        o = parallax_attn(q, r, k, v, causal=True, backend="triton")
        o.backward(do)
        return [o.detach().clone()] + [x.grad.clone() for x in (q, r, k, v)]
    fixed = grads()
    old = os.environ.get("PARALLAX_TRAIN_AUTOTUNE")
    os.environ["PARALLAX_TRAIN_AUTOTUNE"] = "1"
    try:
        t0 = time.time()
        tuned = grads()
        tune_s = time.time() - t0
    finally:
        if old is None:
            os.environ.pop("PARALLAX_TRAIN_AUTOTUNE")
        else:
            os.environ["PARALLAX_TRAIN_AUTOTUNE"] = old
    errs = {n: rel(a, b_) for n, a, b_ in zip(("o", "dq", "dr", "dk", "dv"), tuned, fixed)}
    ok = all(e < 1e-2 for e in errs.values()) and all(torch.isfinite(t).all().item() for t in tuned)
    log(f"autotune check {shape}: {'ok' if ok else 'FAILED'} tuning {tune_s:.0f} s, "
        f"norm-relative difference to the fixed launches {json.dumps({n: float('%.2e' % e) for n, e in errs.items()})}")
    return dict(ok=ok, tune_s=tune_s, errors=errs)


def _fresh_fwd_bwd(shape, seed=0):
    """Inputs for one (B, Hq, Hkv, L, D) shape and a causal forward+backward over them that starts
    from cleared gradients."""
    torch.manual_seed(seed)
    q, r, k, v, do = _qrkvdo(*shape)

    def fb():
        for x in (q, r, k, v):
            x.grad = None
        parallax_attn(q, r, k, v, causal=True, backend="triton").backward(do)
    return (q, r, k, v), fb


def run_profile(log, shape, iters=5):
    """Kernels of forward+backward on one shape (torch.profiler): GPU time per kernel and per call,
    and the share of the call's wall time the GPU was busy."""
    from torch.profiler import ProfilerActivity, profile
    _, fb = _fresh_fwd_bwd(shape)
    for _ in range(3):
        fb()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(iters):
            fb()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / iters
    rows = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if us > 0:
            rows[e.key] = dict(us_per_call=us / iters, count=e.count / iters)
    busy = sum(x["us_per_call"] for x in rows.values())
    log(f"profile {shape}: wall {wall * 1e3:.3f} ms per call, GPU busy {busy / 1e3:.3f} ms")
    for name, x in sorted(rows.items(), key=lambda kv: -kv[1]["us_per_call"]):
        log(f"  {x['us_per_call'] / 1e3:8.3f} ms  x{x['count']:.0f}  {name[:90]}")
    return dict(wall_ms=wall * 1e3, busy_ms=busy / 1e3, kernels=rows)


def run_ncu_region(log, shape, softmax=True):
    """One warm forward+backward (and, for comparison, cuDNN SDPA's) between cudaProfilerStart and
    cudaProfilerStop, for `ncu --profile-from-start off`: the kernels' hardware counters without the
    warm-up and compile launches."""
    (q, r, k, v), fb = _fresh_fwd_bwd(shape)
    for _ in range(3):
        fb()
    q2, k2, v2 = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    if shape[1] != shape[2]:
        k2, v2 = (x.detach().repeat_interleave(shape[1] // shape[2], 1).requires_grad_() for x in (k2, v2))
    do2 = torch.randn_like(q2)

    def sdpa():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q2, k2, v2, is_causal=True).backward(do2)
    if softmax:
        sdpa()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    fb()
    if softmax:
        sdpa()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    log(f"ncu region done: {shape}")


def run_overhead(log, shapes=((4, 16, 16, 1024, 128), (4, 16, 16, 4096, 128)), profile_host=True):
    """Host time per call against device time (a shape is host-bound when its host time is the larger);
    for short shapes also a cProfile of the Python launch path."""
    out = []
    for b, hq, hkv, L, d in shapes:
        (q, r, k, v), fb = _fresh_fwd_bwd((b, hq, hkv, L, d))
        row = dict(B=b, Hq=hq, L=L, D=d)

        def fwd_nograd():
            with torch.no_grad():
                parallax_attn(q, r, k, v, causal=True, backend="triton")
        for name, fn in (("fwd_nograd", fwd_nograd), ("fwdbwd", fb)):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            n = 30
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            host = (time.perf_counter() - t0) / n
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / n
            row[name] = dict(host_us=host * 1e6, wall_us=wall * 1e6, gpu_us=bench_ms(fn) * 1e3)
        if profile_host and L <= 1024:
            import cProfile
            import io
            import pstats
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(30):
                fb()
            prof.disable()
            torch.cuda.synchronize()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
            log(buf.getvalue())
        out.append(row)
        log("overhead " + json.dumps(row))
        del q, r, k, v, fb
        torch.cuda.empty_cache()
    return out


def table(rows):
    def cell(row, name, key):
        x = row.get(name)
        if not x or key not in x:
            return "-"
        return f"{x[key]:.3f}"
    lines = ["| B,Hq/Hkv,L,D,window | ours fwd ms | ours fwd+bwd ms | ours TFLOP/s fwd / f+b | SDPA flash fwd / f+b ms "
             "| SDPA cuDNN fwd / f+b ms | parallax-kernel fwd / f+b ms | f+b speed-up vs parallax-kernel | f+b / cuDNN "
             "| ours f+b, atomic bwd (opt-in) ms | f+b with .grad accumulated: ours / parallax-kernel ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        o = row.get("ours", {})
        p = row.get("plx_kernel", {})
        c = row.get("sdpa_cudnn", {})
        sp = f"{p['fwdbwd_ms'] / o['fwdbwd_ms']:.2f}x" if "fwdbwd_ms" in p and "fwdbwd_ms" in o else "-"
        rc = f"{o['fwdbwd_ms'] / c['fwdbwd_ms']:.2f}x" if "fwdbwd_ms" in c and "fwdbwd_ms" in o else "-"
        tf = f"{o['fwd_tflops']:.0f} / {o['fwdbwd_tflops']:.0f}" if "fwd_tflops" in o else o.get("error", "-")
        win = "" if row["window"] == [-1, -1] else f",win{tuple(row['window'])}"
        lines.append(f"| {row['B']},{row['Hq']}/{row['Hkv']},{row['L']},{row['D']}{win} | {cell(row, 'ours', 'fwd_ms')} | "
                     f"{cell(row, 'ours', 'fwdbwd_ms')} | {tf} | {cell(row, 'sdpa_flash', 'fwd_ms')} / "
                     f"{cell(row, 'sdpa_flash', 'fwdbwd_ms')} | {cell(row, 'sdpa_cudnn', 'fwd_ms')} / "
                     f"{cell(row, 'sdpa_cudnn', 'fwdbwd_ms')} | {cell(row, 'plx_kernel', 'fwd_ms')} / "
                     f"{cell(row, 'plx_kernel', 'fwdbwd_ms')} | {sp} | {rc} | {cell(row, 'ours_atomic_bwd', 'fwdbwd_ms')} | "
                     f"{cell(row, 'ours', 'fwdbwd_accum_ms')} / {cell(row, 'plx_kernel', 'fwdbwd_accum_ms')} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--dtypes", default="bf16,fp16", help="check dtypes, comma-separated (bf16, fp16)")
    ap.add_argument("--compile", action="store_true", help="also check torch.compile(fullgraph=True)")
    ap.add_argument("--sweep", action="store_true", help="time launch configurations first, keep the fastest")
    ap.add_argument("--sweep-kernels", default="fwd,dq,dkv_tma",
                    help="kernels --sweep tries (comma-separated: fwd, dq, dkv (pointer), dkv_tma)")
    ap.add_argument("--sweep-shape", default="4,16,16,4096,128", help="B,Hq,Hkv,L,D the sweep times")
    ap.add_argument("--shapes", default=None, help="comma-separated indexes into BENCH_GRID (default: all)")
    ap.add_argument("--atomic", action="store_true",
                    help="also time the opt-in fused backward (PARALLAX_TRAIN_BWD=atomic, non-deterministic)")
    ap.add_argument("--bench-rounds", type=int, default=1,
                    help="--bench: time every implementation this many times, interleaved, and take medians")
    ap.add_argument("--no-plx", action="store_true", help="skip parallax-kernel (its first call compiles a while)")
    ap.add_argument("--overhead", action="store_true", help="host vs device time per call")
    ap.add_argument("--profile", action="store_true", help="GPU time per kernel of forward+backward on --sweep-shape")
    ap.add_argument("--ncu", action="store_true",
                    help="one warm forward+backward on --sweep-shape (and cuDNN SDPA's) inside a profiler "
                         "region, for ncu --profile-from-start off")
    ap.add_argument("--no-tma", action="store_true", help="pointer loads only (no tensor descriptors)")
    ap.add_argument("--tma-ab", action="store_true", help="forward K/V through TMA vs pointer loads, interleaved")
    ap.add_argument("--check-autotune", action="store_true",
                    help="PARALLAX_TRAIN_AUTOTUNE=1 launches against the fixed ones on one GQA shape")
    ap.add_argument("--ab", action="append", default=[],
                    help="interleaved forward+backward A/B of launch configurations, 'kernel=cfg;cfg' "
                         "(kernel fwd, dq, dkv or dkv_tma; cfg comma-separated ints), on --sweep-shape; "
                         "or a name of VARIANT_AB: 'dkv_kernel' (the descriptor dk/dv kernel against the pointer "
                         "one), 'dkv_ws' (warp specialization of the MHA dk/dv loop, unsafe: see "
                         "train.DKV_TMA_CONFIG)")
    ap.add_argument("--ab-rounds", type=int, default=3, help="interleaved rounds per --ab variant")
    ap.add_argument("--host-desc-floor", type=int, default=None, metavar="N",
                    help="dense launches of at least N (B x Hq x Lq x Lk) take host-made descriptors "
                         "(_gluon.HOST_DESC_MIN_WORK; 0: every dense launch; --check runs both ways on its own)")
    ap.add_argument("--config", action="append", default=[], metavar="KERNEL@D=CFG",
                    help="run everything with this launch configuration of a Gluon kernel (gluon = dk/dv, "
                         "fwd_gluon, dq_gluon) at head dim D, e.g. 'gluon@64=32,3,0,1'")
    ap.add_argument("--repeat", type=int, default=0, metavar="N",
                    help="N forward+backward runs per dk/dv launch on each --repeat-shapes shape: "
                         "bitwise equal, finite")
    ap.add_argument("--repeat-variants", default=None,
                    help="comma-separated indexes into REPEAT_VARIANTS for --repeat (default: all)")
    ap.add_argument("--repeat-shapes", default="4,16,16,4096,128",
                    help="B,Hq,Hkv,L,D shapes for --repeat, ';'-separated")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("train_kernels.py needs a CUDA GPU")
    if not (args.check or args.bench or args.overhead or args.tma_ab or args.sweep or args.ab or args.check_autotune
            or args.profile or args.repeat or args.ncu):
        args.check = args.bench = True
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "train_kernels.log"), "a")

    def log(s):
        print(s, flush=True)
        logf.write(s + "\n")
        logf.flush()

    import triton

    from parallax_attention.ops.triton import train as tr
    if args.no_tma:
        tr.USE_TMA = False
    env = dict(torch=torch.__version__, triton=triton.__version__, gpu=torch.cuda.get_device_name(),
               autotune=os.environ.get("PARALLAX_TRAIN_AUTOTUNE", "0"), tma=tr.USE_TMA is not False)
    log(json.dumps(env))
    # several calls into one --out (e.g. --check, then --bench) add their sections to one JSON
    json_path = os.path.join(args.out, "train_kernels.json")
    result = {}
    if os.path.exists(json_path):
        with open(json_path) as f:
            result = json.load(f)
    result["env"] = env

    def save():
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, json_path)
    if args.host_desc_floor is not None:
        from parallax_attention.ops.triton import _gluon
        _gluon.HOST_DESC_MIN_WORK = args.host_desc_floor
        log(f"host descriptors from B x Hq x Lq x Lk >= {args.host_desc_floor}")
    for spec in args.config:
        key, cfg = spec.split("=")
        name, d = key.split("@")
        _gluon_module(name).CONFIG[int(d)] = _parse_config(name, cfg)
        log(f"config {name} D={d}: {_gluon_module(name).CONFIG[int(d)]}")
    if args.repeat:
        variants = None if args.repeat_variants is None else \
            [REPEAT_VARIANTS[int(i)] for i in args.repeat_variants.split(",")]
        result["repeat"] = {sh: run_repeat_check(log, tuple(int(x) for x in sh.split(",")), args.repeat, variants)
                            for sh in args.repeat_shapes.split(";")}
        save()
    if args.check_autotune:
        result["autotune_check"] = run_autotune_check(log)
        save()
    if args.ab:
        shape = tuple(int(x) for x in args.sweep_shape.split(","))
        # keyed by variant and shape, so several calls into one --out keep each other's results
        result.setdefault("ab", {}).update(
            {f"{spec} {args.sweep_shape}": run_config_ab(log, spec, shape, args.ab_rounds) for spec in args.ab})
        save()
    if args.tma_ab:
        result["tma_ab"] = run_tma_ab(log)
        save()
    if args.profile:
        result["profile"] = run_profile(log, tuple(int(x) for x in args.sweep_shape.split(",")))
        save()
    if args.ncu:
        run_ncu_region(log, tuple(int(x) for x in args.sweep_shape.split(",")))
    if args.overhead:
        result["overhead"] = run_overhead(log)
        save()
    if args.sweep:
        b_, h_, hkv_, l_, d_ = (int(x) for x in args.sweep_shape.split(","))
        result["sweep"], result["chosen"] = run_sweep(log, b_, h_, hkv_, l_, d_,
                                                      names=tuple(args.sweep_kernels.split(",")))
        save()
    if args.bench:
        plx = None
        if not args.no_plx:
            try:
                import parallax as plx  # parallax-kernel, for comparison
            except Exception:
                traceback.print_exc()
        grid = BENCH_GRID if args.shapes is None else [BENCH_GRID[int(i)] for i in args.shapes.split(",")]
        result["bench"] = run_bench(log, plx, grid, args.atomic, args.bench_rounds)
        save()
        log(table(result["bench"]))
    if args.check:
        t0 = time.time()
        dtypes = [{"bf16": torch.bfloat16, "fp16": torch.float16}[x] for x in args.dtypes.split(",")]
        rows, worst, extra = run_check(log, dtypes, args.compile)
        result.update(check=rows, worst=worst, extra=extra, check_s=time.time() - t0)
        save()
        log("worst norm-relative error per tensor (dtype tensor: error, case):")
        for k, (e, tag) in sorted(result["worst"].items()):
            log(f"  {k}: {e:.2e}  {tag}")
        bad = [r for r in result["check"] if not r["ok"]]
        log(f"check: {len(result['check']) - len(bad)}/{len(result['check'])} ok; repeated passes "
            f"{'ok' if result['extra']['repeat_default_ok'] else 'FAILED'}; extra {json.dumps(result['extra'])}")


if __name__ == "__main__":
    main()
