"""Decode against a KV cache on the GPU: correctness, then CUDA-graph replay timing.

    PYTHONPATH=src python benchmarks/decode.py [--sweep] [--no-cute] [--out DIR]

Sections:
  check  bf16 kernel vs float64 reference on the valid keys (dense and paged, GQA,
         Lq 1 and 4, windows, append, NaN in unused slots, forced splits), and one
         captured CUDA graph replayed with changed cache_seqlens.
  sweep  (optional) launch configurations on a few shapes, dense cache.
  grid   B in {1, 8, 32, 128} x L in {1024, 4096, 16384} x (Hq, Hkv) in {(8, 8), (32, 8)},
         D = 128, bf16, one new token, full caches: torch SDPA softmax decode (dense),
         ours dense / paged 64 / paged 256, and parallax-kernel's CuTeDSL decode (dense)
         when importable. "roof" = K+V bytes / read bandwidth measured in the same run.

Prints a table last; writes JSON to --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from parallax_attention import parallax_attn_with_kvcache
from parallax_attention.ops.reference import parallax_attn_reference
from parallax_attention.ops.triton import decode as dec

DEV = "cuda"
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def bench_graph(fn, reps, replays=10):
    """Median time (ms) of one fn call, replayed reps times inside a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        g.replay()
        en.record()
        torch.cuda.synchronize()
        times.append(st.elapsed_time(en) / reps)
    times.sort()
    return times[len(times) // 2]


def read_bandwidth():
    x = torch.empty(2 * 1024 ** 3, device=DEV, dtype=torch.uint8)
    x.random_()
    t = do_bench(lambda: x.view(torch.int64).sum(), warmup=25, rep=200, return_mode="median")
    del x
    return 2 * 1024 ** 3 / t / 1e9  # TB/s


def to_paged(kc, vc, page):
    """Scatter a dense (B, L, H, D) cache into randomly placed pages; returns (kp, vp, block_table)."""
    b, l, h, d = kc.shape
    nb = -(-l // page)
    if nb * page != l:   # pad the last page with NaN: never read past a sequence's length
        pad = kc.new_full((b, nb * page - l, h, d), float("nan"))
        kc, vc = torch.cat([kc, pad], 1), torch.cat([vc, pad], 1)
    perm = torch.randperm(b * nb, device=kc.device)
    kp = torch.empty((b * nb, page, h, d), device=kc.device, dtype=kc.dtype)
    vp = torch.empty_like(kp)
    kp[perm] = kc.reshape(b * nb, page, h, d)
    vp[perm] = vc.reshape(b * nb, page, h, d)
    return kp, vp, perm.view(b, nb).to(torch.int32)


def ref_on_valid(q, r, kc, vc, lens, causal=True, window=(-1, -1)):
    outs = []
    for i, n in enumerate(lens):
        outs.append(parallax_attn_reference(q[i:i + 1].double(), r[i:i + 1].double(), kc[i:i + 1, :n].double(),
                                            vc[i:i + 1, :n].double(), causal=causal, window_size=window))
    return torch.cat(outs)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_section(results):
    """bf16 kernel vs float64 on the valid keys: the default config (paged splits preload their
    block-table entries where they fit), then without the preload (entries read per tile on
    one-wave grids, else per key), and per key everywhere. Then repeated calls of the default must
    agree bit for bit."""
    rows = []
    for cfg in ({}, dict(PAGE_PRELOAD=0), dict(PAGE_PRELOAD=0, PAGE_SCALAR=0)):
        old = dec.set_config(**cfg)
        try:
            rows += [dict(r, config=cfg) for r in _check(cfg)]
        finally:
            dec.set_config(**old)
    results["check"] = rows
    results["repeat"] = repeat_check()
    return all(x["ok"] for x in rows) and all(x["ok"] for x in results["repeat"])


def repeat_check(calls=400):
    """Each shape called `calls` times, alternating with a call at other lengths; every output must
    equal the first bit for bit and be finite (the split kernel and the merge read and write
    nothing across programs but the partials, so any difference is a bug)."""
    rows = []
    g = torch.Generator(device=DEV).manual_seed(1)
    for B, L, HQ, HKV, page in ((8, 1024, 32, 8, None), (8, 1024, 32, 8, 64), (1, 4096, 32, 8, 64),
                                (1, 16384, 8, 8, None), (4, 3000, 16, 2, 256)):
        q, r, kc, vc = make_inputs(B, L, HQ, HKV)
        bt = None
        if page:
            kc, vc, bt = to_paged(kc, vc, page)
        seq = torch.randint(L // 2, L + 1, (B,), device=DEV, generator=g).to(torch.int32)
        other = torch.randint(1, L + 1, (B,), device=DEV, generator=g).to(torch.int32)
        fn = lambda s: parallax_attn_with_kvcache(q, r, kc, vc, cache_seqlens=s, block_table=bt, backend="triton")
        first = fn(seq).clone()
        bad = 0
        for _ in range(calls):
            fn(other)
            bad += int(not torch.equal(fn(seq), first))
        torch.cuda.synchronize()
        rows.append(dict(case=[B, L, HQ, HKV, page], calls=calls, mismatches=bad,
                         ok=bad == 0 and bool(torch.isfinite(first).all())))
        log("repeat", rows[-1])
    return rows


def _check(cfg):
    """Every case must be <= 1e-2 norm-relative."""
    rows = []
    dt = torch.bfloat16
    cases = [
        # B, Lq, Hq, Hkv, cap, page, window, lnew, splits
        (4, 1, 32, 8, 3000, None, (-1, -1), 0, 0),
        (4, 1, 8, 8, 4096, 64, (-1, -1), 0, 0),
        (3, 4, 16, 2, 2048, 16, (-1, -1), 4, 0),
        (2, 1, 16, 1, 5000, None, (300, -1), 1, 7),
        (2, 4, 8, 4, 1024, 256, (100, -1), 0, 1),
        (5, 1, 8, 8, 700, 32, (-1, -1), 1, 3),
        # per-shape launch choices (default / candidate): (2, 64) / (2, 64), (3, 6) / (2, 8) without
        # PDL, (2, 2) / (3, 1), (3, 8) / (3, 16), paged (3, 32) / (3, 64), (3, 8) / (3, 8) without PDL,
        # (3, 32) / (2, 64) with 1-tile splits
        (1, 1, 8, 8, 16384, None, (-1, -1), 0, 0),
        (8, 1, 32, 8, 4096, None, (-1, -1), 1, 0),
        (32, 1, 32, 8, 4096, None, (-1, -1), 0, 0),
        (1, 1, 32, 8, 1024, None, (-1, -1), 0, 0),
        (1, 1, 32, 8, 4096, 64, (-1, -1), 0, 0),
        (8, 1, 8, 8, 2048, 256, (-1, -1), 0, 0),
        (1, 1, 8, 8, 4096, None, (-1, -1), 0, 0),
    ]
    g = torch.Generator(device=DEV).manual_seed(0)
    for (B, Lq, Hq, Hkv, cap, page, window, lnew, splits) in cases:
        D = 128
        q = torch.randn(B, Lq, Hq, D, device=DEV, dtype=dt, generator=g)
        r = (0.1 * torch.randn(B, Lq, Hq, D, device=DEV, generator=g)).to(dt)
        kc = torch.randn(B, cap, Hkv, D, device=DEV, dtype=dt, generator=g)
        vc = torch.randn(B, cap, Hkv, D, device=DEV, dtype=dt, generator=g)
        lens = torch.randint(Lq, cap - lnew + 1, (B,), device=DEV, generator=g).to(torch.int32)
        lens[0] = cap - lnew
        knew = torch.randn(B, lnew, Hkv, D, device=DEV, dtype=dt, generator=g) if lnew else None
        vnew = torch.randn(B, lnew, Hkv, D, device=DEV, dtype=dt, generator=g) if lnew else None
        full_k, full_v = kc.clone(), vc.clone()
        for i, n in enumerate(lens.tolist()):
            if lnew:
                full_k[i, n:n + lnew] = knew[i]
                full_v[i, n:n + lnew] = vnew[i]
        tot = [n + lnew for n in lens.tolist()]
        exp = ref_on_valid(q, r, full_k, full_v, tot, window=window)
        for i, n in enumerate(lens.tolist()):   # garbage in every unused slot
            kc[i, n:] = float("nan")
            vc[i, n:] = float("nan")
        if page:
            kc2, vc2, bt = to_paged(kc, vc, page)
        else:
            kc2, vc2, bt = kc, vc, None
        out = parallax_attn_with_kvcache(q, r, kc2, vc2, knew, vnew, cache_seqlens=lens, block_table=bt,
                                         window_size=window, num_splits=splits, backend="triton")
        torch.cuda.synchronize()
        e = rel(out, exp)
        ok = bool(torch.isfinite(out).all()) and e <= 1e-2
        rows.append(dict(case=[B, Lq, Hq, Hkv, cap, page, list(window), lnew, splits], relerr=e, ok=ok))
        log("check", cfg, rows[-1])

    # Graph safety: capture once, change lengths in place, replay (candidate: B=4 plain merge, B=1 PDL).
    for B, lens0, news in ((4, [100, 4096, 7, 2000], ([4096, 1, 3000, 64], [513, 2222, 4095, 1])),
                           (1, [100], ([4096], [513]))):
        Hq, Hkv, D, cap = 32, 8, 128, 4096
        q = torch.randn(B, 1, Hq, D, device=DEV, dtype=dt, generator=g)
        r = (0.1 * torch.randn(B, 1, Hq, D, device=DEV, generator=g)).to(dt)
        kc = torch.randn(B, cap, Hkv, D, device=DEV, dtype=dt, generator=g)
        vc = torch.randn(B, cap, Hkv, D, device=DEV, dtype=dt, generator=g)
        kp, vp, bt = to_paged(kc, vc, 64)
        lens = torch.tensor(lens0, device=DEV, dtype=torch.int32)
        fn = lambda: parallax_attn_with_kvcache(q, r, kp, vp, cache_seqlens=lens, block_table=bt, backend="triton")
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        for new in news:
            lens.copy_(torch.tensor(new, dtype=torch.int32))
            graph.replay()
            torch.cuda.synchronize()
            e = rel(out, ref_on_valid(q, r, kc, vc, new))
            rows.append(dict(case=["graph-replay", new], relerr=e, ok=e <= 1e-2))
            log("check", cfg, rows[-1])
    return rows


def make_inputs(B, L, HQ, HKV, D=128):
    q = torch.randn(B, 1, HQ, D, device=DEV, dtype=torch.bfloat16)
    r = (0.1 * torch.randn(B, 1, HQ, D, device=DEV)).to(torch.bfloat16)
    kc = torch.randn(B, L, HKV, D, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn(B, L, HKV, D, device=DEV, dtype=torch.bfloat16)
    return q, r, kc, vc


def reps_for(roof_us):
    return max(3, min(50, int(3000 / max(roof_us, 10.0))))


SWEEP = [
    # merge programs with warps by split count (the default: 1 warp up to 8 splits at D = 128, 2 for
    # 16, 4 from 32) against the previous fixed 4 (MERGE_WARPS=4) and 1, alternated; "chosen" marks
    # the default's (stages, splits)
    (8, 1024, 32, 8, None, [(2, 8, {}), (2, 8, dict(MERGE_WARPS=4))] * 2),
    (8, 1024, 8, 8, None, [(2, 8, {}), (2, 8, dict(MERGE_WARPS=4))] * 2),
    (4, 4096, 32, 8, None, [(2, 16, {}), (2, 16, dict(MERGE_WARPS=4)), (2, 16, dict(MERGE_WARPS=1))] * 2),
    (4, 1024, 8, 8, None, [(2, 16, {}), (2, 16, dict(MERGE_WARPS=4)), (2, 16, dict(MERGE_WARPS=1))] * 2),
    (2, 4096, 32, 8, None, [(2, 32, {}), (2, 32, dict(MERGE_WARPS=2))] * 2),
    (1, 4096, 32, 8, None, [(2, 64, {}), (2, 64, dict(MERGE_WARPS=2))] * 2),
]


def sweep_section(results, bw, deadline):
    """Forced (num_stages, num_splits) on a few shapes, to check the default config's choice."""
    _sweep(results, bw, deadline)


def _sweep(results, bw, deadline):
    rows = []
    for (B, L, HQ, HKV, page, alts) in SWEEP:
        if time.time() - T0 > deadline:
            break
        q, r, kc, vc = make_inputs(B, L, HQ, HKV)
        seq = torch.full((B,), L, device=DEV, dtype=torch.int32)
        bt = None
        if page:
            kc, vc, bt = to_paged(kc, vc, page)
        roof = B * L * HKV * 128 * 4 / (bw * 1e12) * 1e6
        chosen = dec.paged_launch_config(B, HKV, HQ // HKV, L, L, 128, 2, page or 0, False, 0, q.device)[:2]
        # every variant must give the default's result up to rounding
        ref = parallax_attn_with_kvcache(q, r, kc, vc, cache_seqlens=seq, block_table=bt, backend="triton").float()
        for (stages, splits, extra) in alts:
            if time.time() - T0 > deadline:
                break
            old = dec.set_config(num_stages=stages, **extra)
            try:
                fn = lambda: parallax_attn_with_kvcache(q, r, kc, vc, cache_seqlens=seq, block_table=bt,
                                                        num_splits=splits, backend="triton")
                err = rel(fn().float(), ref)
                if not err < 1e-2:
                    raise RuntimeError(f"variant {extra} differs from the default: {err:.2e}")
                us = bench_graph(fn, reps_for(roof)) * 1e3
                rows.append(dict(B=B, L=L, HQ=HQ, HKV=HKV, page=page, stages=stages, splits=splits, extra=extra,
                                 chosen=list(chosen) if not extra else None, us=us, pct=100 * roof / us,
                                 rel_vs_default=err))
            except Exception as e:
                rows.append(dict(B=B, L=L, HQ=HQ, HKV=HKV, page=page, stages=stages, splits=splits, extra=extra,
                                 error=repr(e)[:200]))
            finally:
                dec.set_config(**old)
            log("sweep", rows[-1])
        del q, r, kc, vc
        torch.cuda.empty_cache()
    results["sweep"] = rows


def with_config(cfg, fn):
    old = dec.set_config(**cfg)
    try:
        return fn()
    finally:
        dec.set_config(**old)


def grid_section(results, bw, plx, budget_s):
    rows = []
    for B in (1, 8, 32, 128):
        for L in (1024, 4096, 16384):
            for (HQ, HKV) in ((8, 8), (32, 8)):
                D = 128
                kv_bytes = B * L * HKV * D * 2 * 2
                if kv_bytes * 3 > 40e9:
                    continue
                row = dict(B=B, L=L, HQ=HQ, HKV=HKV, roof_us=kv_bytes / (bw * 1e12) * 1e6)
                q, r, kc, vc = make_inputs(B, L, HQ, HKV)
                seq = torch.full((B,), L, device=DEV, dtype=torch.int32)
                scale = D ** -0.5
                qh, kh, vh = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
                cands = {
                    "sdpa": lambda: F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=(HQ != HKV)),
                    "ours_dense": lambda: parallax_attn_with_kvcache(q, r, kc, vc, cache_seqlens=seq,
                                                                     backend="triton"),
                }
                paged = {}
                for page in (64, 256):
                    paged[page] = to_paged(kc, vc, page)
                for page, (kp, vp, bt) in paged.items():
                    cands[f"ours_paged{page}"] = (lambda kp=kp, vp=vp, bt=bt: parallax_attn_with_kvcache(
                        q, r, kp, vp, cache_seqlens=seq, block_table=bt, backend="triton"))
                    # The previous default: no preload of the block-table entries, the paged wave model.
                    cands[f"ours_paged{page}_prev"] = (lambda kp=kp, vp=vp, bt=bt: with_config(
                        dict(PAGE_PRELOAD=0), lambda: parallax_attn_with_kvcache(
                            q, r, kp, vp, cache_seqlens=seq, block_table=bt, backend="triton")))
                # The default again, last: the spread between the two is the run-to-run noise.
                cands["ours_dense_again"] = cands["ours_dense"]
                if plx is not None and time.time() - T0 < budget_s:
                    cands["cute"] = lambda: plx.parallax_attn_with_kvcache(q, r, kc, vc, scale=scale)
                row["cfg_dense"] = list(dec.launch_config(B, HKV, HQ // HKV, L, D, 2, False, q.device))
                for page in (64, 256):   # (stages, splits, block-table entries preloaded per split)
                    row[f"cfg_paged{page}"] = list(dec.paged_launch_config(B, HKV, HQ // HKV, L, L, D, 2, page, False,
                                                                           0, q.device))
                row["cfg_paged_prev"] = list(dec.launch_config(B, HKV, HQ // HKV, L, D, 2, True, q.device))
                row["splits"] = row["cfg_dense"][1]
                for name, fn in cands.items():
                    try:
                        fn()
                        torch.cuda.synchronize()
                        t = bench_graph(fn, reps_for(row["roof_us"])) * 1e3
                        row[name] = dict(us=t, pct=100 * row["roof_us"] / t)
                    except Exception as e:
                        row[name] = dict(error=repr(e)[:300])
                if "us" in row["sdpa"]:
                    for name in cands:
                        if name != "sdpa" and "us" in row[name]:
                            row[name]["x_sdpa"] = row[name]["us"] / row["sdpa"]["us"]
                rows.append(row)
                log("grid", json.dumps(row))
                del q, r, kc, vc, paged, cands, qh, kh, vh
                torch.cuda.empty_cache()
    results["grid"] = rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-cute", action="store_true")
    ap.add_argument("--no-grid", action="store_true", help="skip the timing grid (with --sweep)")
    ap.add_argument("--cute-budget", type=float, default=200.0, help="stop timing CuTeDSL after this many seconds")
    ap.add_argument("--sweep-deadline", type=float, default=1e9, help="stop the sweep after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    results = dict(env=dict(torch=torch.__version__, triton=triton.__version__, gpu=torch.cuda.get_device_name(),
                            sms=torch.cuda.get_device_properties(0).multi_processor_count, argv=sys.argv))
    log(results["env"])
    bw = read_bandwidth()
    results["read_TBps"] = bw
    log("read bandwidth TB/s", bw)
    def checked():
        try:
            return check_section(results)
        except Exception:
            traceback.print_exc()
            return False
    ok = checked()
    if not ok:
        log("check failed with the merge launched programmatically dependent; retrying without")
        dec.set_config(PDL=0)
        results["fallback_no_pdl"] = True
        ok = checked()
    if not ok:
        log("check failed with the stacked [Q;R] kernel; retrying with two dots per product")
        dec.set_config(STACKED=0)
        results["fallback_unstacked"] = True
        ok = checked()
    results["check_ok"] = ok
    plx = None
    if not args.no_cute:
        try:
            import parallax as plx_mod
            if getattr(plx_mod, "cute_decode_available", False):
                plx = plx_mod
            else:
                results["cute_error"] = str(getattr(plx_mod, "_cute_err_msg", "unavailable"))[-400:]
        except Exception as e:
            results["cute_error"] = repr(e)[:400]
        log("cute:", plx is not None, results.get("cute_error", ""))
    results["config"] = dict(dec._CONFIG)
    results["grid"] = []
    if not args.no_grid:
        grid_section(results, bw, plx, args.cute_budget)
        with open(os.path.join(args.out, "decode.json"), "w") as f:
            json.dump(results, f, indent=1)
        print_grid(results)
    if args.sweep:
        sweep_section(results, bw, args.sweep_deadline)
        with open(os.path.join(args.out, "decode.json"), "w") as f:
            json.dump(results, f, indent=1)

    print(f"\n==== decode, {results['env']['gpu']}, torch {torch.__version__}, triton {triton.__version__}, "
          f"read {bw:.2f} TB/s, config {results['config']}, check {'PASS' if ok else 'FAIL'} "
          f"(max relerr {max(x['relerr'] for x in results['check']):.2e})")
    print_grid(results)
    if args.sweep:
        print("sweep (B L Hq Hkv page: stages splits us %roof; chosen = the per-shape default):")
        for x in results["sweep"]:
            tag = f"  {x['B']} {x['L']} {x['HQ']} {x['HKV']} {x['page']}: {x['stages']} {x['splits']} {x['extra']}"
            if "us" in x:
                print(tag, f"{x['us']:.1f} {x['pct']:.0f}% (rel {x['rel_vs_default']:.1e})",
                      "chosen" if [x["stages"], x["splits"]] ==
                      x["chosen"] else "")
            else:
                print(tag, "ERR", x["error"][:80])


def print_grid(results):
    print("B L Hq/Hkv (stages,splits) dense | paged 64 / 256 (stages,splits,preload) | previous paged | roof us | "
          "SDPA us | ours dense us %roof xSDPA | paged64 | paged256 | paged64 previous | paged256 previous | "
          "dense again | CuTeDSL")

    def cell(v):
        if not isinstance(v, dict):
            return "-"
        if "error" in v:
            return "ERR"
        s = f"{v['us']:.1f} ({v['pct']:.0f}%"
        return s + (f", {v['x_sdpa']:.2f}x)" if "x_sdpa" in v else ")")
    for row in results["grid"]:
        print(f"{row['B']} {row['L']} {row['HQ']}/{row['HKV']} {tuple(row['cfg_dense'])} | "
              f"{tuple(row['cfg_paged64'])} / {tuple(row['cfg_paged256'])} | {tuple(row['cfg_paged_prev'])} | "
              f"{row['roof_us']:.1f} | {cell(row.get('sdpa'))} | {cell(row.get('ours_dense'))} | "
              f"{cell(row.get('ours_paged64'))} | {cell(row.get('ours_paged256'))} | "
              f"{cell(row.get('ours_paged64_prev'))} | {cell(row.get('ours_paged256_prev'))} | "
              f"{cell(row.get('ours_dense_again'))} | {cell(row.get('cute'))}")
    for name in ("ours_paged64", "ours_paged256", "ours_paged64_prev", "ours_paged256_prev"):
        ratios = [row[name]["us"] / row["ours_dense"]["us"] for row in results["grid"]
                  if "us" in row.get(name, {}) and "us" in row.get("ours_dense", {})]
        if ratios:
            print(f"{name} / dense: within 1.1x at {sum(x <= 1.1 for x in ratios)} of {len(ratios)} points, "
                  f"worst {max(ratios):.2f}x")
    for name in ("ours_dense", "ours_dense_again"):
        ratios = [row[name]["x_sdpa"] for row in results["grid"] if "x_sdpa" in row.get(name, {})]
        if ratios:
            print(f"{name} / SDPA: within 1.1x at {sum(x <= 1.1 for x in ratios)} of {len(ratios)} points, "
                  f"worst {max(ratios):.3f}x")


if __name__ == "__main__":
    main()
