"""Where a training step's GPU time goes, or a generation step's host time: parallax vs softmax.

    PYTHONPATH=src python benchmarks/profile_model.py [--preset 0.6b] [--seqlen 4096] [--host]
    PYTHONPATH=src python benchmarks/profile_model.py --generate [--gen-batch 1]

Training: two warm-up steps, then one profiled forward+backward step (bf16 weights, random
tokens) per attention kind; prints the kernels that take the most GPU time, so a throughput gap
can be attributed to attention, projections or glue.

--generate: greedy generate() of --new-tokens tokens after a 512-token prompt, profiled; prints
host and device time per new token and the operators that take the most host (CPU) time, so a
host-bound decode loop can be attributed.
"""

from __future__ import annotations

import argparse

import torch
from torch.autograd import DeviceType
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
    ap.add_argument("--generate", action="store_true", help="profile generation instead of training")
    ap.add_argument("--host", action="store_true", help="training: also list the host (Python) time of one step")
    ap.add_argument("--gen-batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    dev = torch.device("cuda")
    if args.generate:
        return profile_generate(args, dev)
    for attention in ("softmax", "parallax"):
        torch.manual_seed(0)
        cfg = ParallaxConfig.from_preset(args.preset, attention=attention)
        model = ParallaxForCausalLM(cfg).to(dev, torch.bfloat16)
        ids = torch.randint(0, cfg.vocab_size, (1, args.seqlen), device=dev)
        for _ in range(2):
            step(model, ids)
            model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        import time
        walls = []
        for _ in range(3):
            t0 = time.perf_counter()
            step(model, ids)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            step(model, ids)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        # Kernels only: operator rows repeat the time of the kernels they launch.
        total = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
        print(f"\n== {attention}: GPU time {total / 1e3:.1f} ms in one fwd+bwd step "
              f"({args.preset}, L={args.seqlen}, bf16); unprofiled wall time {min(walls) * 1e3:.1f} ms")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:args.top]:
            print(f"{e.self_device_time_total / 1e3:8.2f} ms  {e.count:5d}x  {e.key[:100]}")
        if args.host:
            import cProfile
            import io
            import pstats
            cprof = cProfile.Profile()
            cprof.enable()
            step(model, ids)
            cprof.disable()
            torch.cuda.synchronize()
            buf = io.StringIO()
            pstats.Stats(cprof, stream=buf).sort_stats("tottime").print_stats(args.top)
            print(f"-- {attention}: Python functions by own host time in one step (cProfile):")
            print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[-6000:])
        del model
        torch.cuda.empty_cache()


@torch.no_grad()
def profile_generate(args, dev) -> None:
    import time
    for attention in ("softmax", "parallax"):
        torch.manual_seed(0)
        cfg = ParallaxConfig.from_preset(args.preset, attention=attention)
        with torch.device(dev):
            model = ParallaxForCausalLM(cfg)
        model = model.to(torch.bfloat16).eval()
        prompt = torch.randint(0, cfg.vocab_size, (args.gen_batch, 512), device=dev)
        kw = dict(do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kw)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.new_tokens
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events if e.device_time_total > 0)
        import cProfile
        import io
        import pstats
        cprof = cProfile.Profile()
        cprof.enable()
        model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
        cprof.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(cprof, stream=buf).sort_stats("tottime").print_stats(args.top)
        host_top = buf.getvalue()
        print(f"\n== generate {attention}: B={args.gen_batch}, {wall * 1e3:.2f} ms per new token (unprofiled), "
              f"device time {gpu / 1e3 / args.new_tokens:.2f} ms per new token")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
            print(f"{e.self_cpu_time_total / 1e3 / args.new_tokens:8.3f} ms/token host  {e.count:6d}x  "
                  f"{e.self_device_time_total / 1e3 / args.new_tokens:8.3f} ms/token device  {e.key[:80]}")
        print(f"-- Python functions by own host time, {args.new_tokens} new tokens (cProfile):")
        print(host_top)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
