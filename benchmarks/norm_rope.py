"""Fused per-head RMSNorm + RoPE (Triton, forward and backward) against the eager modules.

    PYTHONPATH=src python benchmarks/norm_rope.py

For the training shapes of the 0.6b preset (q and the probe: 16 heads, k: 8 heads, L = 4096,
head_dim 128), in bf16 and under bf16 autocast with float32 norm weights: the median time of
forward + backward of norm + RoPE (CUDA events), and the norm-relative difference of the output
and of the input and weight gradients between the fused kernels and the modules (both against a
float64 computation of the same formula). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import parallax_attention.nn.attention as attn  # noqa: E402
from parallax_attention.nn import RMSNorm, RotaryEmbedding  # noqa: E402
from parallax_attention.nn.rotary import apply_rotary  # noqa: E402


def run(x, norm, cos, sin, dy, fused: bool, autocast: bool):
    """(output, dx, dweight) of norm + RoPE through the fused kernels or the modules."""
    real = attn._fusable
    if not fused:
        attn._fusable = lambda *a: False
    try:
        xx = x.detach().requires_grad_(True)
        norm.weight.grad = None
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            y = attn.norm_rope(xx, norm, cos, sin)
        y.backward(dy.to(y.dtype))
        return y.detach(), xx.grad, norm.weight.grad
    finally:
        attn._fusable = real


def timed(fn, iters):
    times = []
    for i in range(iters + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/norm_rope.py: needs a CUDA device")
    torch.manual_seed(0)
    dev = "cuda"
    rows = []
    for heads in (16, 8):
        for mode in ("bf16", "autocast"):
            autocast = mode == "autocast"
            wdt = torch.float32 if autocast else torch.bfloat16
            norm = RMSNorm(128).to(dev, wdt)
            with torch.no_grad():
                norm.weight.normal_(1.0, 0.3)
            x = torch.randn(1, args.seqlen, heads, 128, device=dev, dtype=torch.bfloat16) * 3
            # Under autocast the model's hidden states (and so cos, sin) are float32.
            cos, sin = RotaryEmbedding(128, 1e6)(torch.arange(args.seqlen, device=dev)[None],
                                                 torch.float32 if autocast else torch.bfloat16)
            dy = torch.randn(x.shape, device=dev)
            xe, we = x.double().requires_grad_(True), norm.weight.detach().double().requires_grad_(True)
            ye = apply_rotary(we * (xe * torch.rsqrt(xe.pow(2).mean(-1, keepdim=True) + norm.eps)), cos.double(),
                              sin.double())
            ye.backward(dy.double())
            exact = (ye.detach(), xe.grad, we.grad)
            errs = {}
            for fused in (False, True):
                got = run(x, norm, cos, sin, dy, fused, autocast)
                errs[fused] = [((g.double() - e).norm() / e.norm()).item() for g, e in zip(got, exact)]
            ms = {fused: timed(lambda: run(x, norm, cos, sin, dy, fused, autocast), args.iters)
                  for fused in (False, True)}
            rows.append((heads, mode, ms[False], ms[True], errs[False], errs[True]))
            print(f"H={heads} {mode}: modules {ms[False]:.3f} ms, fused {ms[True]:.3f} ms", flush=True)

    print()
    print(f"norm + RoPE forward + backward, (1, {args.seqlen}, H, 128) bf16, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")
    print()
    print("| heads | dtypes | modules (ms) | fused (ms) | speed-up | rel. err. out / dx / dw, modules | fused |")
    print("|---|---|---|---|---|---|---|")
    for heads, mode, m, f, em, ef in rows:
        desc = "bf16" if mode == "bf16" else "bf16 x, fp32 weight (autocast)"
        print(f"| {heads} | {desc} | {m:.3f} | {f:.3f} | {m / f:.1f}x | "
              f"{' / '.join(f'{e:.1e}' for e in em)} | {' / '.join(f'{e:.1e}' for e in ef)} |")


if __name__ == "__main__":
    main()
