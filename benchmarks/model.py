"""Model throughput: Parallax vs softmax attention in the same Qwen3-style model (random init).

    PYTHONPATH=src python benchmarks/model.py [--smoke] [--out DIR]

Sections:
  train     tokens/s of one training step (forward + backward, no optimizer) of the 0.6b preset,
            bf16 weights, L = 4096, batch --train-batch.
  generate  tokens/s of greedy generation at B = 1 and B = 32, prompt 512, 256 new tokens (no early
            stop), counting new tokens only: transformers' generate() with DynamicCache (eager), and
            StaticGenerator (static cache, each decode step one CUDA-graph replay).

Each row runs attention="parallax" and "softmax" on the same shapes; "ratio" = parallax / softmax
throughput (targets: training >= 0.85, generation >= 0.9). --smoke runs a tiny version on the CPU.
Prints a markdown table last; writes JSON to --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from parallax_attention.models import ParallaxConfig, ParallaxForCausalLM  # noqa: E402

T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(preset, attention, dtype, device, backend, seed=0):
    torch.manual_seed(seed)
    cfg = ParallaxConfig.from_preset(preset, attention=attention, attn_backend=backend)
    with torch.device(device):  # initialise on the device: much faster than on the host for 0.6b
        model = ParallaxForCausalLM(cfg)
    return model.to(dtype=dtype)


def bench_train(model, batch, seqlen, steps, device):
    """Median seconds of forward + backward of the LM loss on random tokens."""
    model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seqlen), device=device)
    times = []
    for i in range(steps + 2):  # two warm-up steps (kernel compilation, allocator)
        sync(device)
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    assert torch.isfinite(loss).item(), "non-finite loss"
    return statistics.median(times)


def sdpa_backends(names):
    """A context that restricts torch SDPA to the named backends (None: PyTorch's own choice)."""
    import contextlib
    if not names:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    table = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([table[n] for n in names])


@torch.no_grad()
def bench_generate(model, batch, prompt_len, new_tokens, device, reps):
    """Median seconds of generate() of new_tokens greedy tokens after a prompt_len prompt."""
    model.eval()
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, prompt_len), device=device)
    kw = dict(do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
    model.generate(prompt, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        sync(device)
        times.append(time.perf_counter() - t)
    assert out.shape == (batch, prompt_len + new_tokens), out.shape
    return statistics.median(times)


@torch.no_grad()
def bench_generate_static(model, batch, prompt_len, new_tokens, device, reps):
    """Median seconds of StaticGenerator.generate (static cache; CUDA-graph decode on a GPU)."""
    from parallax_attention.models import StaticGenerator
    model.eval()
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, prompt_len), device=device)
    gen = StaticGenerator(model, batch, prompt_len + new_tokens)
    gen.generate(prompt, max_new_tokens=8)  # warm-up and graph capture
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        out = gen.generate(prompt, max_new_tokens=new_tokens)
        sync(device)
        times.append(time.perf_counter() - t)
    assert out.shape == (batch, prompt_len + new_tokens), out.shape
    # Same tokens as transformers' generate() for the first steps (bf16 near-ties may differ later).
    n = min(16, new_tokens)
    if gen.cuda_graph:
        # Replayed graph against the same steps run eagerly (host-known lengths).
        eager = StaticGenerator(model, batch, prompt_len + new_tokens, cuda_graph=False).generate(prompt, n)
        same = (eager[:, prompt_len:] == out[:, prompt_len:prompt_len + n]).float().mean().item()
        log(f"  CUDA-graph replays vs eager static steps: {same:.0%} of the first {n} new tokens equal")
    consistency(model, prompt, out[:, prompt_len:prompt_len + n], device)
    return statistics.median(times)


@torch.no_grad()
def consistency(model, prompt, new, device):
    """Log how closely the static-cache decode steps follow a full forward over the same tokens.

    Teacher-forced, so that one flipped near-tie (common with random weights) does not derail the
    comparison: the logits of each step against those of one uncached forward over prompt + new.
    """
    from parallax_attention.nn import StaticKVCache
    ids = torch.cat([prompt, new], 1)
    full = model(input_ids=ids).logits[:, prompt.shape[1] - 1:-1].float()
    cache = StaticKVCache.for_model(model.config, ids.shape[0], ids.shape[1],
                                    dtype=next(model.parameters()).dtype, device=device)
    steps = [model(input_ids=prompt, cache=cache, logits_to_keep=1).logits[:, -1:]]
    for t in range(new.shape[1] - 1):
        steps.append(model(input_ids=new[:, t:t + 1], cache=cache).logits)
    stepped = torch.cat(steps, 1).float()
    rel = ((stepped - full).abs().max() / full.abs().max()).item()
    agree = (stepped.argmax(-1) == full.argmax(-1)).float().mean().item()
    log(f"  static-cache steps vs one full forward over {new.shape[1]} new tokens: max |logit diff| / max |logit| "
        f"= {rel:.1e}, argmax agreement {agree:.0%}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the script runs)")
    ap.add_argument("--preset", default=None, help="model preset (default 0.6b; tiny with --smoke)")
    ap.add_argument("--seqlen", type=int, default=None, help="training sequence length (default 4096)")
    ap.add_argument("--train-batch", type=int, default=1)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--gen-batches", default=None, help="comma-separated (default 1,32)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt length (default 512)")
    ap.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 256)")
    ap.add_argument("--gen-reps", type=int, default=1)
    ap.add_argument("--backend", default="auto", help="op backend for attention='parallax'")
    ap.add_argument("--sdpa-also", default="flash,efficient",
                    help="also time softmax generation with SDPA limited to these backends (comma-separated; "
                         "'' to skip): PyTorch's default picks cuDNN for decode, whose per-length plans cost "
                         "host time at every step")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        preset, seqlen, gen_batches, prompt, new = "tiny", 64, [1, 2], 16, 8
        args.train_steps = min(args.train_steps, 2)
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/model.py: needs a CUDA device (use --smoke on the CPU)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        preset, seqlen, gen_batches, prompt, new = "0.6b", 4096, [1, 32], 512, 256
    preset = args.preset or preset
    seqlen = args.seqlen or seqlen
    gen_batches = [int(b) for b in args.gen_batches.split(",")] if args.gen_batches else gen_batches
    prompt = args.prompt or prompt
    new = args.new_tokens or new
    log(f"device={device} dtype={dtype} preset={preset} torch={torch.__version__}")

    results = {"config": dict(preset=preset, seqlen=seqlen, train_batch=args.train_batch, gen_batches=gen_batches,
                              prompt=prompt, new_tokens=new, dtype=str(dtype), backend=args.backend,
                              device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
               "rows": []}
    rows = []  # (section, shape, softmax tok/s, parallax tok/s, note)

    def run(attention, fn):
        backend = args.backend if attention == "parallax" else "auto"
        try:
            model = build(preset, attention, dtype, device, backend)
            return fn(model), ""
        except Exception as e:  # noqa: BLE001 - report and go on with the other rows
            traceback.print_exc()
            note = f"{attention} failed: {type(e).__name__}: {str(e)[:80]}"
            if attention == "parallax" and backend != "torch":
                log(f"{note}; retrying with backend='torch'")
                model = build(preset, attention, dtype, device, "torch")
                return fn(model), note + " (torch backend used)"
            return float("nan"), note
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    tokens = args.train_batch * seqlen
    res = {}
    for attention in ("softmax", "parallax"):
        sec, note = run(attention, lambda m: bench_train(m, args.train_batch, seqlen, args.train_steps, device))
        res[attention] = (tokens / sec, note)
        log(f"train {attention}: {sec * 1e3:.1f} ms/step, {tokens / sec:,.0f} tok/s {note}")
    rows.append(("train fwd+bwd", f"B={args.train_batch} L={seqlen}", res["softmax"][0], res["parallax"][0],
                 "; ".join(n for _, n in res.values() if n)))

    also = [x for x in args.sdpa_also.split(",") if x] if device.type == "cuda" else []
    for b in gen_batches:
        res = {}
        for attention in ("softmax", "parallax"):
            sec, note = run(attention, lambda m: bench_generate(m, b, prompt, new, device, args.gen_reps))
            res[attention] = (b * new / sec, note)
            log(f"generate B={b} {attention}: {sec:.2f} s, {b * new / sec:,.0f} new tok/s {note}")
        rows.append(("generate", f"B={b} prompt={prompt} new={new}", res["softmax"][0], res["parallax"][0],
                     "; ".join(n for _, n in res.values() if n)))
        static = {}
        for attention in ("softmax", "parallax"):
            sec, note = run(attention, lambda m: bench_generate_static(m, b, prompt, new, device, args.gen_reps))
            static[attention] = (b * new / sec, note)
            log(f"generate static B={b} {attention}: {sec:.2f} s, {b * new / sec:,.0f} new tok/s {note}")
        rows.append(("generate, StaticGenerator (static cache, CUDA-graph decode)" if device.type == "cuda" else
                     "generate, StaticGenerator (static cache)", f"B={b} prompt={prompt} new={new}",
                     static["softmax"][0], static["parallax"][0], "; ".join(n for _, n in static.values() if n)))
        if also:
            with sdpa_backends(also):
                sec, note = run("softmax", lambda m: bench_generate(m, b, prompt, new, device, args.gen_reps))
            log(f"generate B={b} softmax (SDPA {'/'.join(also)}): {sec:.2f} s, {b * new / sec:,.0f} new tok/s")
            rows.append(("generate, softmax SDPA " + "/".join(also), f"B={b} prompt={prompt} new={new}",
                         b * new / sec, res["parallax"][0], note))

    for sec_name, shape, soft, plx, note in rows:
        results["rows"].append(dict(section=sec_name, shape=shape, softmax_tok_s=soft, parallax_tok_s=plx,
                                    ratio=plx / soft if soft else None, note=note))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "model_bench.json"), "w") as f:
        json.dump(results, f, indent=2)

    print()
    print(f"Model throughput, {preset} preset, {results['config']['device']}, {str(dtype).replace('torch.', '')}, "
          f"random init (tokens/s; ratio = parallax / softmax)")
    print()
    print("| section | shape | softmax tok/s | parallax tok/s | ratio | note |")
    print("|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['section']} | {r['shape']} | {r['softmax_tok_s']:,.0f} | {r['parallax_tok_s']:,.0f} | "
              f"{r['ratio']:.3f} | {r['note']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
