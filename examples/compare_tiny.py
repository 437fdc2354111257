"""Train a tiny Parallax model and its softmax twin on the embedded corpus, then compare.

    python examples/compare_tiny.py [--steps 400] [--out runs/compare_tiny]

Both runs share the seed, data (Python's standard library, BPE-tokenised; no
download), number of steps and the Muon recipe (Muon for hidden matrices,
AdamW for the rest, WSD schedule with weight-decay annealing). Prints a
side-by-side table and writes OUT/loss_curves.png and OUT/results.json.
Sized for a laptop CPU: about 4-5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--optimizer", default="muon", choices=("muon", "adamw"))
    ap.add_argument("--data", default="embedded", help="prepared directory or 'embedded'")
    ap.add_argument("--out", default="runs/compare_tiny")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()

    from parallax_attention.train import load_config, train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    t_start = time.time()
    for attention in ("parallax", "softmax"):
        print(f"\n== {attention} ==", flush=True)
        cfg = load_config(None, {}, [
            f"preset=tiny", f"attention={attention}", f"optimizer={args.optimizer}", f"steps={args.steps}",
            f"seed={args.seed}", f"data={args.data}", f"seq_len={args.seq_len}", f"batch_size={args.batch_size}",
            f"lr={args.lr}", f"out={out / attention}", f"warmup={max(1, args.steps // 10)}",
            f"eval_every={max(1, args.steps // 4)}", "eval_batches=8", "ckpt_every=0",
            f"progress={'false' if args.no_progress else 'true'}",
        ])
        t0 = time.time()
        results[attention] = train(cfg)
        results[attention]["wall_s"] = time.time() - t0
    total = time.time() - t_start

    p, s = results["parallax"], results["softmax"]
    rows = [
        ("final train loss", f"{p['final_loss']:.4f}", f"{s['final_loss']:.4f}"),
        ("final val loss", f"{p['val_loss']:.4f}", f"{s['val_loss']:.4f}"),
        ("val perplexity", f"{p['val_ppl']:.2f}", f"{s['val_ppl']:.2f}"),
        ("train tokens/s", f"{p['tokens_per_s']:,.0f}", f"{s['tokens_per_s']:,.0f}"),
        ("parameters", f"{p['params']:,}", f"{s['params']:,}"),
        ("wall time (s)", f"{p['wall_s']:.0f}", f"{s['wall_s']:.0f}"),
    ]
    w = max(len(r[0]) for r in rows)
    lines = [f"tiny preset, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, "
             f"{args.optimizer} recipe, seed {args.seed}, embedded corpus",
             f"{'':<{w}}  {'parallax':>12}  {'softmax':>12}", f"{'-' * w}  {'-' * 12}  {'-' * 12}"]
    lines += [f"{name:<{w}}  {a:>12}  {b:>12}" for name, a, b in rows]
    table = "\n".join(lines)

    plot = out / "loss_curves.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for attention, color in (("parallax", "tab:red"), ("softmax", "tab:blue")):
            recs = [json.loads(ln) for ln in (out / attention / "metrics.jsonl").read_text().splitlines()]
            tr = [(r["step"], r["loss"]) for r in recs if "loss" in r]
            ev = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
            ax.plot(*zip(*tr), color=color, alpha=0.35, lw=0.8)
            k = 10  # running mean for readability
            sm = [sum(l for _, l in tr[max(0, i - k + 1):i + 1]) / len(tr[max(0, i - k + 1):i + 1])
                  for i in range(len(tr))]
            ax.plot([st for st, _ in tr], sm, color=color, lw=1.8, label=f"{attention} train (mean of {k})")
            ax.plot(*zip(*ev), "o--", color=color, ms=4, label=f"{attention} val")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"tiny Parallax vs softmax, {args.optimizer} recipe")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = plot.with_name(plot.stem + ".tmp.png")
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, plot)
    except ImportError:
        plot = None
        print("matplotlib is not installed: no plot (pip install -e '.[train]')", file=sys.stderr)

    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({"args": vars(args), "runs": results, "total_s": total}, indent=2))
    os.replace(tmp, out / "results.json")
    print("\n" + table)
    print(f"\ntotal training time {total:.0f} s; curves: {plot}; metrics: {out}/<attention>/metrics.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
