"""End-to-end training on one GPU: throughput and memory at 0.6b, and short loss curves.

    PYTHONPATH=src python benchmarks/train_e2e.py              # one H200, about 3 minutes
    PYTHONPATH=src python benchmarks/train_e2e.py --smoke      # tiny CPU version

Part A: the 0.6b preset (vocab 151936, tied embeddings), bf16 autocast, L=4096,
Muon recipe: a few optimizer steps each for parallax and softmax attention on
random tokens; median tokens/s over the timed steps and peak allocated memory.
Part B: a few hundred steps of a small model on the embedded corpus (Python's
standard library; no download), parallax vs softmax with the same seed, data
and recipe, through the regular training loop; final losses and a loss-curve
PNG. Prints a table last; writes results.json, table.md and loss_curves.png to
--out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from parallax_attention.eval import lm_loss  # noqa: E402
from parallax_attention.optim import build_optimizer  # noqa: E402

T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def throughput(attention: str, preset: str, seq_len: int, batch: int, steps: int, warmup: int,
               device: torch.device, overrides: dict) -> dict:
    from parallax_attention.models import ParallaxConfig, ParallaxForCausalLM

    torch.manual_seed(0)
    cfg = ParallaxConfig.from_preset(preset, attention=attention, **overrides)
    with torch.device(device):
        model = ParallaxForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    opt = build_optimizer(model, "muon", lr=2e-3)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    g = torch.Generator(device="cpu").manual_seed(1)
    times, losses = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        w = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=g).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        with autocast:
            loss = lm_loss(model, w)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t
        losses.append(float(loss))
        if i >= warmup:
            times.append(dt)
        log(f"  {attention} step {i + 1}/{warmup + steps}: {dt * 1e3:.0f} ms, loss {losses[-1]:.3f}")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    med = statistics.median(times)
    res = {"attention": attention, "preset": preset, "params": n_params, "seq_len": seq_len, "batch": batch,
           "step_ms_median": med * 1e3, "tokens_per_s": batch * seq_len / med, "peak_mem_gib": peak,
           "losses": losses}
    del model, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def loss_curves(args, out: Path, device: torch.device) -> dict:
    from parallax_attention.train import load_config, train

    try:
        import tokenizers  # noqa: F401

        tok = "bpe"
    except ImportError:
        tok = "bytes"
    data = out / f"data-{tok}"
    if not (data / "manifest.json").is_file():
        from parallax_attention.data import prepare

        log(f"preparing the embedded corpus ({tok}) into {data}")
        prepare("embedded", data, tokenizer=tok, vocab_size=4096, progress=False,
                max_bytes=2_000_000 if args.smoke else None)
    runs = {}
    for attention in ("parallax", "softmax"):
        log(f"part B: {attention}, {args.curve_steps} steps")
        over = [f"{k}={v}" for k, v in args.curve_model.items()]
        cfg = load_config(None, {}, [
            "preset=tiny", f"attention={attention}", "optimizer=muon", f"steps={args.curve_steps}", "seed=0",
            f"data={data}", f"seq_len={args.curve_seq_len}", f"batch_size={args.curve_batch}", "lr=3e-3",
            f"out={out / ('curve_' + attention)}", f"warmup={max(1, args.curve_steps // 10)}",
            f"eval_every={max(1, args.curve_steps // 5)}", "eval_batches=8", "ckpt_every=0", "progress=false",
            f"device={device.type}", *over,
        ])
        runs[attention] = train(cfg)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for attention, color in (("parallax", "tab:red"), ("softmax", "tab:blue")):
            recs = [json.loads(ln) for ln in (out / f"curve_{attention}" / "metrics.jsonl").read_text().splitlines()]
            tr = [(r["step"], r["loss"]) for r in recs if "loss" in r]
            ev = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
            ax.plot(*zip(*tr), color=color, lw=0.9, alpha=0.8, label=f"{attention} train")
            ax.plot(*zip(*ev), "o--", color=color, ms=4, label=f"{attention} val")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title("small model on the embedded corpus, Muon recipe")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "loss_curves.png", dpi=120)
    except ImportError:
        log("matplotlib not installed: no plot")
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (for CI)")
    ap.add_argument("--preset", default="0.6b")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--curve-steps", type=int, default=300)
    ap.add_argument("--curve-seq-len", type=int, default=512)
    ap.add_argument("--curve-batch", type=int, default=32)
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    # Part B model: the tiny preset widened to a small model (~12M non-embedding parameters).
    args.curve_model = {"model.hidden_size": 384, "model.num_hidden_layers": 6, "model.num_attention_heads": 6,
                        "model.num_key_value_heads": 2, "model.head_dim": 64, "model.intermediate_size": 1024}
    if args.smoke:
        args.preset, args.seq_len, args.steps, args.warmup = "tiny", 128, 2, 1
        args.curve_steps, args.curve_seq_len, args.curve_batch = 12, 64, 4
        args.curve_model = {"model.num_hidden_layers": 1}
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "a": [], "b": {}}
    if not args.skip_a:
        overrides = {} if args.smoke else {"max_position_embeddings": max(4096, args.seq_len)}
        for attention in ("parallax", "softmax"):
            log(f"part A: {args.preset} {attention} L={args.seq_len} batch {args.batch}")
            try:
                results["a"].append(throughput(attention, args.preset, args.seq_len, args.batch, args.steps,
                                               args.warmup, device, overrides))
            except Exception as e:  # keep going: part B and the table still matter
                traceback.print_exc()
                results["a"].append({"attention": attention, "error": f"{type(e).__name__}: {e}"})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if not args.skip_b:
        try:
            results["b"] = loss_curves(args, out, device)
        except Exception as e:
            traceback.print_exc()
            results["b"] = {"error": f"{type(e).__name__}: {e}"}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))

    lines = [f"Training end to end on {results['device']} (torch {results['torch']})", ""]
    if results["a"]:
        prec = "bf16 autocast" if device.type == "cuda" else "fp32"
        lines += [f"A. {args.preset}, {prec}, L={args.seq_len}, batch {args.batch}, Muon recipe, "
                  f"median of {args.steps} steps after {args.warmup} warm-up", "",
                  "| attention | params | step (ms) | tokens/s | peak memory (GiB) |", "|---|---|---|---|---|"]
        for r in results["a"]:
            if "error" in r:
                lines.append(f"| {r['attention']} | failed: {r['error'][:80]} | | | |")
            else:
                lines.append(f"| {r['attention']} | {r['params'] / 1e6:.1f}M | {r['step_ms_median']:.0f} | "
                             f"{r['tokens_per_s']:,.0f} | {r['peak_mem_gib']:.1f} |")
        ok = [r for r in results["a"] if "error" not in r]
        if len(ok) == 2:
            lines.append(f"\nparallax / softmax step time: {ok[0]['step_ms_median'] / ok[1]['step_ms_median']:.2f}x")
    b = results["b"]
    if b and "error" not in b:
        lines += ["", f"B. small model, embedded corpus, {args.curve_steps} steps x {args.curve_batch} x "
                      f"{args.curve_seq_len}, Muon recipe, seed 0", "",
                  "| attention | final train loss | final val loss | val ppl | tokens/s |", "|---|---|---|---|---|"]
        for att in ("parallax", "softmax"):
            r = b[att]
            lines.append(f"| {att} | {r['final_loss']:.4f} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} | "
                         f"{r['tokens_per_s']:,.0f} |")
    elif b:
        lines.append(f"\nB failed: {b['error']}")
    text = "\n".join(lines)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
