"""CPU benchmark of the op: torch backend vs reference backend vs torch SDPA (softmax).

Each measurement runs in a fresh subprocess so that its peak resident memory
(ru_maxrss, which includes the Python + torch baseline, reported separately)
belongs to that measurement alone.

    python benchmarks/cpu_op.py                 # the table for BENCHMARKS.md
    python benchmarks/cpu_op.py --lengths 512   # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def worker(args) -> None:
    import torch
    import torch.nn.functional as F

    from parallax_attention import parallax_attn

    torch.manual_seed(0)
    b, h, l, d = args.batch, args.heads, args.length, args.head_dim
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    q, r, k, v = [torch.randn(b, l, h, d, requires_grad=True) for _ in range(4)]
    with torch.no_grad():
        r.mul_(0.1)
    dout = torch.randn(b, l, h, d)

    if args.impl == "sdpa":
        def fwd():
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True).transpose(1, 2)
    else:
        def fwd():
            return parallax_attn(q, r, k, v, causal=True, backend=args.impl)

    def fwd_only():
        with torch.no_grad():
            fwd()

    def fwd_bwd():
        fwd().backward(dout)
        q.grad = r.grad = k.grad = v.grad = None

    def median_time(fn):
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    res = dict(impl=args.impl, batch=b, heads=h, length=l, head_dim=d, threads=torch.get_num_threads())
    res["fwd_ms"] = 1e3 * median_time(fwd_only) if not args.memory_only else None
    res["fwd_bwd_ms"] = 1e3 * median_time(fwd_bwd) if not args.memory_only else None
    if args.memory_only:
        fwd_bwd()
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["baseline_rss_mb"] = base_rss / 1024
    print(json.dumps(res))


def run_one(impl, length, heads, head_dim, batch=1, repeats=3, memory_only=False):
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--length", str(length), "--heads", str(heads),
           "--head-dim", str(head_dim), "--batch", str(batch), "--repeats", str(repeats)]
    if memory_only:
        cmd.append("--memory-only")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(impl=impl, length=length, error=proc.stderr.strip().splitlines()[-1:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="torch")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reference-max-length", type=int, default=2048,
                    help="skip the reference backend above this length (it materialises Lq x Lk scores)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    import torch
    rows = []
    for length in args.lengths:
        for impl in ("sdpa", "torch", "reference"):
            if impl == "reference" and length > args.reference_max_length:
                rows.append(dict(impl=impl, length=length, skipped=f"L > {args.reference_max_length}"))
                continue
            print(f"... {impl} L={length}", file=sys.stderr, flush=True)
            rows.append(run_one(impl, length, args.heads, args.head_dim, args.batch, args.repeats))
    print("... memory target: torch backend B=1 H=4 L=16384 D=64 fp32", file=sys.stderr, flush=True)
    mem = run_one("torch", 16384, 4, 64, memory_only=True)

    print(f"\nCPU op benchmark: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{rows[0].get('threads', '?')} threads, B={args.batch} H={args.heads} D={args.head_dim} causal fp32\n")
    print("| L | impl | fwd ms | fwd+bwd ms | fwd+bwd / SDPA | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    sdpa = {row["length"]: row.get("fwd_bwd_ms") for row in rows if row["impl"] == "sdpa"}
    for row in rows:
        name = {"sdpa": "torch SDPA (softmax)", "torch": "parallax torch", "reference": "parallax reference"}[row["impl"]]
        if "skipped" in row or "error" in row:
            print(f"| {row['length']} | {name} | {row.get('skipped') or row.get('error')} | | | |")
            continue
        ratio = row["fwd_bwd_ms"] / sdpa[row["length"]] if sdpa.get(row["length"]) else float("nan")
        print(f"| {row['length']} | {name} | {row['fwd_ms']:.1f} | {row['fwd_bwd_ms']:.1f} | {ratio:.2f}x | "
              f"{row['peak_rss_mb']:.0f} |")
    if "error" in mem:
        print(f"\nmemory target run failed: {mem['error']}")
    else:
        print(f"\nMemory target (torch backend, B=1 H=4 L=16384 D=64 causal fwd+bwd, fp32): "
              f"peak process RSS {mem['peak_rss_mb']:.0f} MB (Python+torch baseline {mem['baseline_rss_mb']:.0f} MB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, memory=mem), f, indent=1)


if __name__ == "__main__":
    main()
