"""Where a training step's GPU time goes: parallax vs softmax, top kernels by CUDA time.

    PYTHONPATH=src python benchmarks/profile_model.py [--preset 0.6b] [--seqlen 4096]

Runs two warm-up steps, then profiles one forward+backward step (bf16 weights,
random tokens) per attention kind and prints the kernels that take the most GPU
time, so a throughput gap can be attributed to attention, projections or glue.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from parallax_attention.models import ParallaxConfig, ParallaxForCausalLM


def step(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.6b")
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    dev = torch.device("cuda")
    for attention in ("softmax", "parallax"):
        torch.manual_seed(0)
        cfg = ParallaxConfig.from_preset(args.preset, attention=attention)
        model = ParallaxForCausalLM(cfg).to(dev, torch.bfloat16)
        ids = torch.randint(0, cfg.vocab_size, (1, args.seqlen), device=dev)
        for _ in range(2):
            step(model, ids)
            model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            step(model, ids)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        total = sum(e.self_device_time_total for e in events)
        print(f"\n== {attention}: GPU time {total / 1e3:.1f} ms in one fwd+bwd step "
              f"({args.preset}, L={args.seqlen}, bf16)")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:args.top]:
            print(f"{e.self_device_time_total / 1e3:8.2f} ms  {e.count:5d}x  {e.key[:100]}")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
