"""FSDP2 + Muon across several GPUs (or CPU processes with gloo): scaling, loss agreement, Muon check.

    PYTHONPATH=src python benchmarks/multi_gpu.py --gpus 1,2,4,8 --micro-batch 4 --global-batch 32
    PYTHONPATH=src python benchmarks/multi_gpu.py --gpus 1 ... --out A; ... --gpus 1,4 --reuse A/results.json
    PYTHONPATH=src python benchmarks/multi_gpu.py --phases --gpus 1,2     # time of each part of a step
    PYTHONPATH=src python benchmarks/multi_gpu.py --cpu --smoke           # 1 and 2 gloo processes, tiny
    torchrun --nproc_per_node 2 benchmarks/multi_gpu.py --check-muon      # only the Muon check

For every N in --gpus it launches `plx train --parallel fsdp` with N processes
(torchrun) and the same seed and global batch (micro-batch per GPU fixed,
gradient accumulation makes up the rest), then reports tokens/s per GPU
(median over steps after the warm-up), scaling efficiency against the
1-process run, and the largest loss difference from the 1-process run over
the first 50 steps; a 1-process run with the batch cut into other micro-batches gives the
rounding noise to judge that difference by (--no-noise-ref skips it). --reuse takes runs of the
same shape from an earlier results.json, so a long 1-GPU baseline can come from another call.
Last, with the largest N, one Muon update under FSDP2 is
compared with a single-process computation of the same update (full-matrix
Newton-Schulz), and with the wrong, shard-wise orthogonalisation for contrast.
Prints a table last; writes results.json and table.md to --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def python(nproc: int) -> list[str]:
    """The interpreter, under torchrun with nproc local processes when nproc > 1."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def launch(nproc: int, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`python -m parallax_attention.cli ARGS` in nproc processes (torchrun when nproc > 1)."""
    return subprocess.run(python(nproc) + ["-m", "parallax_attention.cli"] + args, env=_env(), timeout=timeout,
                          capture_output=True, text=True)


# ------------------------------------------------------------------ Muon check (runs inside torchrun)


def check_muon(device_type: str, seed: int = 0) -> dict:
    """One Muon step under FSDP2 vs. the same step in one process; returns relative errors (rank 0)."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from parallax_attention.optim import MuonAdamW, zeropower_via_newtonschulz

    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dev = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")

    # Odd shapes: 75 rows do not split evenly over ranks (FSDP2 pads the last shard), the
    # one-row matrix leaves every rank but the first with an empty shard, and the two 40 x 40
    # matrices go through one batched Newton-Schulz where one rank owns both (3 ranks).
    def make():
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(48, 75, bias=False), nn.Tanh(), nn.Linear(75, 40, bias=False), nn.Tanh(),
                          nn.Linear(40, 40, bias=False), nn.Tanh(), nn.Linear(40, 40, bias=False), nn.Tanh(),
                          nn.Linear(40, 1, bias=False))
        for layer in m[::2]:
            layer.weight.data.normal_(0, 0.2)
        return m.to(dev)

    torch.manual_seed(seed + 1)
    x = torch.randn(8 * world, 48, device=dev)
    y = torch.randn(8 * world, 1, device=dev)

    ref = make()
    before = [p.detach().clone() for p in ref.parameters()]
    mesh = init_device_mesh(device_type, (world,))
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr="match_rms_adamw", ns_dtype=torch.float32)
    opt_ref = MuonAdamW([dict(kind="muon", params=list(ref.parameters()))], **kw)
    # Reference: the whole batch in one process.
    nn.functional.mse_loss(ref(x), y).backward()
    grads_ref = [p.grad.detach().clone() for p in ref.parameters()]
    opt_ref.step()
    # FSDP2: each rank its slice of the batch; gradients are averaged by reduce-scatter.
    # Both ways of orthogonalising full matrices: one owner rank per matrix, or all ranks.
    # "round_robin, small buckets": one matrix per gather bucket, so several collectives per step.
    from parallax_attention.optim import muon as muon_module

    modes = {}
    bucket_default = muon_module.GATHER_BUCKET_NUMEL
    # "hybrid mesh": a (1, world) mesh, i.e. HSDP placements (Replicate, Shard(0)), which take the
    # one-matrix-at-a-time DTensor path.
    hybrid = init_device_mesh(device_type, (1, world), mesh_dim_names=("replicate", "shard"))
    for mode in ("round_robin", "redundant", "round_robin, small buckets", "round_robin, hybrid mesh"):
        muon_module.GATHER_BUCKET_NUMEL = 1 if "small" in mode else bucket_default
        sharded = make()
        for layer in sharded[::2]:
            fully_shard(layer, mesh=hybrid if "hybrid" in mode else mesh)
        fully_shard(sharded, mesh=hybrid if "hybrid" in mode else mesh)
        opt_sh = MuonAdamW([dict(kind="muon", params=list(sharded.parameters()))],
                           distributed_ns=mode.split(",")[0], **kw)
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        nn.functional.mse_loss(sharded(xs), ys).backward()
        opt_sh.step()
        modes[mode] = [p.full_tensor().detach() for p in sharded.parameters()]
    muon_module.GATHER_BUCKET_NUMEL = bucket_default

    out = {"world_size": world, "params": []}
    for i, (p_ref, b, g) in enumerate(zip(ref.parameters(), before, grads_ref)):
        d_ref = p_ref.detach() - b
        rel = {m: float(((full[i] - b) - d_ref).norm() / d_ref.norm()) for m, full in modes.items()}
        # What orthogonalising each rank's shard on its own would have produced.
        rows = g.shape[0]
        step = -(-rows // world)
        naive = torch.cat([zeropower_via_newtonschulz(g[r * step:(r + 1) * step], dtype=torch.float32)
                           for r in range(world) if r * step < rows])
        d_naive = -0.02 * 0.1 * b - 0.02 * 0.2 * max(g.shape) ** 0.5 * naive
        rel_naive = float((d_naive - d_ref).norm() / d_ref.norm())
        out["params"].append({"shape": list(g.shape), "rel_err_fsdp": max(rel.values()),
                              "rel_err_by_mode": rel, "rel_err_shardwise": rel_naive, "split": rows > step})
    out["max_rel_err_fsdp"] = max(p["rel_err_fsdp"] for p in out["params"])
    # A matrix that fits in one rank's shard is orthogonalised whole either way.
    out["min_rel_err_shardwise"] = min(p["rel_err_shardwise"] for p in out["params"] if p["split"])
    return out


# ------------------------------------------------------------------ step phases (runs inside torchrun or alone)


def profile_phases(args) -> dict:
    """Wall time of each part of a training step (forward+backward, clip, optimizer), synchronised.

    Same model, wrapping and optimizer as `plx train`, on random tokens. With --trace, rank 0 also
    prints torch.profiler's top operators of one step, by host and by device time.
    """
    import torch

    from parallax_attention.eval.perplexity import lm_loss
    from parallax_attention.optim import build_optimizer
    from parallax_attention.train.config import TrainConfig
    from parallax_attention.train.distributed import (barrier, clip_grad_norm_, init_distributed, unwrap,
                                                      wrap_model)
    from parallax_attention.train.loop import build_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = "fsdp" if world > 1 else "none"
    cfg = TrainConfig(preset=args.preset, attention=args.attention, parallel=parallel,
                      device="cpu" if args.cpu else "cuda", seq_len=args.seq_len, batch_size=args.micro_batch)
    info = init_distributed(parallel, cfg.device)
    dev = info.device
    vocab = 151936 if args.preset != "tiny" else 256
    torch.manual_seed(0)
    model = wrap_model(build_model(cfg, vocab, dev), parallel, info, not args.no_reshard)
    opt = build_optimizer(unwrap(model), "muon")
    gen = torch.Generator(device="cpu").manual_seed(info.rank)
    batch = torch.randint(0, vocab, (args.micro_batch, args.seq_len + 1), generator=gen).to(dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else None

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        barrier(info)

    def step(times: dict | None):
        marks = [time.perf_counter()]
        for m in range(args.phase_accum):
            if amp is not None:
                with amp:
                    loss = lm_loss(model, batch)
            else:
                loss = lm_loss(model, batch)
            (loss / args.phase_accum).backward()
        sync()
        marks.append(time.perf_counter())
        clip_grad_norm_(model.parameters(), 1.0)
        sync()
        marks.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        marks.append(time.perf_counter())
        if times is not None:
            for k, a, b in zip(("fwd_bwd", "clip", "optimizer"), marks, marks[1:]):
                times.setdefault(k, []).append(1e3 * (b - a))

    for _ in range(3):
        step(None)
    times: dict = {}
    for _ in range(args.phase_steps):
        step(times)
    res = {"world_size": info.world_size, "micro_batch": args.micro_batch, "accum": args.phase_accum,
           **{k + "_ms": statistics.median(v) for k, v in times.items()},
           "peak_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None}
    if args.trace and info.rank == 0:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            step(None)
        ka = prof.key_averages()
        print(ka.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
        if dev.type == "cuda":
            print(ka.table(sort_by="self_cuda_time_total", row_limit=25), flush=True)
    elif args.trace:
        step(None)  # the other ranks take part in the traced step's collectives
    return res


# ------------------------------------------------------------------ driver


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def run_phases(args) -> int:
    """--phases: the step's parts with 1 process and with each N of --gpus (FSDP2)."""
    counts = [int(c) for c in args.gpus.split(",")] if args.gpus else [1, 2]
    worker = ["--phase-worker", "--preset", args.preset, "--attention", args.attention, "--seq-len",
              str(args.seq_len), "--micro-batch", str(args.micro_batch), "--phase-steps", str(args.phase_steps),
              "--phase-accum", str(args.phase_accum)]
    worker += (["--cpu"] if args.cpu else []) + (["--trace"] if args.trace else []) + \
        (["--no-reshard"] if args.no_reshard else [])
    rows = []
    for n in counts:
        proc = subprocess.run(python(n) + [str(Path(__file__).resolve())] + worker, env=_env(), timeout=args.timeout,
                              capture_output=True, text=True)
        print(proc.stdout, flush=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PHASES ")]
        if not line:
            print(proc.stderr[-4000:])
            continue
        rows.append(json.loads(line[-1][len("PHASES "):]))
    print(f"{args.preset} {args.attention}, L={args.seq_len}, FSDP2 reshard after forward: {not args.no_reshard}\n")
    print("| N | micro-batch x accum | forward+backward ms | clip ms | optimizer ms | peak memory per GPU (GiB) |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        print(f"| {r['world_size']} | {r['micro_batch']} x {r['accum']} | {r['fwd_bwd_ms']:.1f} | {r['clip_ms']:.1f} | "
              f"{r['optimizer_ms']:.1f} | {peak} |")
    return 0 if len(rows) == len(counts) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", default=None, help="comma-separated process counts (default 1,2,4,8 capped by GPUs)")
    ap.add_argument("--cpu", action="store_true", help="gloo processes on CPU instead of GPUs")
    ap.add_argument("--smoke", action="store_true", help="tiny preset, short sequences, a few steps")
    ap.add_argument("--preset", default="0.6b")
    ap.add_argument("--attention", default="parallax", choices=("parallax", "softmax"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per forward")
    ap.add_argument("--global-batch", type=int, default=None, help="default: micro-batch x largest N")
    ap.add_argument("--no-noise-ref", dest="noise_ref", action="store_false",
                    help="skip the 1-process run with the whole batch in one micro-batch (the rounding-noise "
                         "reference for the loss comparison)")
    ap.add_argument("--reuse", default=None, metavar="RESULTS_JSON",
                    help="take runs of the same shape from an earlier results.json instead of running them "
                         "again (e.g. the long 1-GPU baseline measured in another call)")
    ap.add_argument("--compare-steps", type=int, default=50, help="loss compared over the first K steps")
    ap.add_argument("--data", default=None, help="prepared data directory (default: embedded corpus, bytes)")
    ap.add_argument("--timeout", type=float, default=580.0, help="seconds per launched run")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--check-muon", action="store_true", help="(inside torchrun) only the Muon check")
    ap.add_argument("--phases", action="store_true",
                    help="time the parts of a step (forward+backward, clip, optimizer) with 1 and N processes")
    ap.add_argument("--phase-steps", type=int, default=8)
    ap.add_argument("--phase-accum", type=int, default=1, help="micro-batches per step in --phases")
    ap.add_argument("--no-reshard", action="store_true",
                    help="FSDP2 blocks keep their gathered parameters from forward to backward "
                         "(train's fsdp_reshard_after_forward=false)")
    ap.add_argument("--trace", action="store_true", help="with --phases: torch.profiler top operators")
    ap.add_argument("--phase-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.check_muon:
        import torch

        dev = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
        res = check_muon(dev)
        if int(os.environ.get("RANK", "0")) == 0:
            print("MUON_CHECK " + json.dumps(res), flush=True)
        import torch.distributed as dist
        dist.barrier()
        # Every rank is done; leave without the process-group teardown, where gloo's threads now and
        # then abort a CPU run at exit ("terminate called without an active exception", exit -6)
        # after the result is out.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    if args.phase_worker:
        res = profile_phases(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print("PHASES " + json.dumps(res), flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if args.smoke:
        args.cpu = True
        args.preset, args.steps, args.seq_len, args.compare_steps = "tiny", 6, 64, 6
    if args.phases:
        return run_phases(args)

    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_dev = os.cpu_count() if args.cpu else torch.cuda.device_count()
    counts = [int(c) for c in args.gpus.split(",")] if args.gpus else [n for n in (1, 2, 4, 8) if n <= max(1, n_dev)]
    if args.cpu and not args.gpus:
        counts = [1, 2]
    if counts[0] != 1:
        counts = [1] + counts
    global_batch = args.global_batch or args.micro_batch * max(counts)
    for n in counts:
        if global_batch % (n * args.micro_batch):
            raise SystemExit(f"--global-batch {global_batch} is not a multiple of micro-batch x {n}")

    data = args.data
    if data is None:
        data = str(out / "data-bytes")
        if not (Path(data) / "manifest.json").is_file():
            sys.path.insert(0, str(SRC))
            from parallax_attention.data import prepare

            prepare("embedded", Path(data), tokenizer="bytes", progress=False,
                    max_bytes=2_000_000 if args.smoke else None)

    results = {"preset": args.preset, "attention": args.attention, "seq_len": args.seq_len,
               "global_batch": global_batch, "steps": args.steps,
               "fsdp_reshard_after_forward": not args.no_reshard,
               "device": "cpu (gloo)" if args.cpu else torch.cuda.get_device_name(0), "runs": []}
    base_losses = None
    base_tps = None
    plan = [(n, args.micro_batch, global_batch // (n * args.micro_batch), f"fsdp_{n}") for n in counts]
    if args.noise_ref and global_batch > args.micro_batch:
        # The same global batch on one process, cut into micro-batches differently: only the order
        # of the floating-point sums changes, so its distance from the base run is the rounding
        # noise against which the N-process runs' losses are judged.
        if args.micro_batch % 2 == 0:
            plan.insert(1, (1, args.micro_batch // 2, 2 * plan[0][2], "noise_ref"))
        else:
            plan.insert(1, (1, global_batch, 1, "noise_ref"))
    reused = {}
    if args.reuse:
        prev = json.loads(Path(args.reuse).read_text())
        prev_steps = prev.get("steps", max((len(r.get("losses", [])) for r in prev["runs"]), default=0))
        same = all(prev.get(k) == results[k] for k in ("preset", "seq_len", "global_batch", "device")) and \
            prev_steps == args.steps and prev.get("attention", "parallax") == args.attention
        if not same:
            raise SystemExit(f"--reuse {args.reuse}: its preset, attention, seq_len, global batch, steps or device "
                             f"differ from this run's")
        reused = {(r["n"], r["micro_batch"], r["grad_accum"]): r for r in prev["runs"] if "error" not in r}
    for n, micro, accum, name in plan:
        run_dir = out / name
        if (n, micro, accum) in reused:
            row = dict(reused[(n, micro, accum)], reused_from=str(args.reuse))
            print(f"[{n} process(es)] {micro} x {accum}: taken from {args.reuse}", flush=True)
            losses, tps = row["losses"], row["tokens_per_s"]
            if base_losses is None:
                base_losses, base_tps = losses, tps
            results["runs"].append(row)
            continue
        cli = ["train", "--preset", args.preset, "--attention", args.attention, "--steps", str(args.steps),
               "--out", str(run_dir), "--data", data, "--seq-len", str(args.seq_len),
               "--batch-size", str(micro), "--grad-accum", str(accum), "--no-progress",
               "--parallel", "fsdp" if n > 1 else "none", "--device", "cpu" if args.cpu else "cuda",
               "eval_every=0", "ckpt_every=0", "warmup=10", "log_every=1",
               f"fsdp_reshard_after_forward={str(not args.no_reshard).lower()}"]
        if args.preset != "tiny":
            cli.append("model.vocab_size=151936")  # the preset's real embedding size
        if name == "noise_ref" and args.compare_steps < args.steps:
            # Only its losses over the compared steps count; the schedule still spans --steps.
            cli += ["--stop-after", str(args.compare_steps)]
        t0 = time.time()
        print(f"[{n} process(es)] plx {' '.join(cli)}", flush=True)
        proc = launch(n, cli, args.timeout)
        wall = time.time() - t0
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n")
            results["runs"].append({"n": n, "run": name, "error": proc.stderr[-2000:]})
            continue
        lines = [r for r in read_metrics(run_dir) if "loss" in r]
        losses = [r["loss"] for r in lines]
        skip = min(5, len(lines) - 1)
        tps = statistics.median(r["tokens_per_s"] for r in lines[skip:])
        row = {"n": n, "run": name, "micro_batch": micro, "grad_accum": accum, "tokens_per_s": tps,
               "tokens_per_s_per_gpu": tps / n, "wall_s": wall, "final_loss": losses[-1], "losses": losses}
        if base_losses is None:
            base_losses, base_tps = losses, tps
        if base_tps and name != "noise_ref":
            row["scaling_efficiency"] = (tps / n) / base_tps
        if base_losses:
            k = min(args.compare_steps, len(losses), len(base_losses))
            row["max_abs_loss_diff_first_k"] = max(abs(a - b) for a, b in zip(losses[:k], base_losses[:k]))
            row["compare_k"] = k
        results["runs"].append(row)

    nmax = max(counts)
    if nmax > 1:
        cmd = python(nmax) + [str(Path(__file__).resolve()), "--check-muon"] + (["--cpu"] if args.cpu else [])
        proc = subprocess.run(cmd, env=_env(), timeout=args.timeout, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MUON_CHECK ")]
        results["muon_check"] = json.loads(line[-1][len("MUON_CHECK "):]) if line else {"error": proc.stderr[-2000:]}

    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "results.json")
    table = [f"FSDP2 {args.preset} {args.attention}, L={args.seq_len}, global batch {global_batch}, "
             f"{results['device']}", "",
             "| N | micro-batch x accum | tokens/s | tokens/s per GPU | scaling eff. | "
             "max abs(loss - loss(1)), first K steps |",
             "|---|---|---|---|---|---|"]
    for r in results["runs"]:
        shape = f"{r.get('micro_batch', '?')} x {r.get('grad_accum', '?')}"
        if "error" in r:
            table.append(f"| {r['n']} | {shape} | failed | | | |")
            continue
        eff = f"{100 * r['scaling_efficiency']:.1f}%" if "scaling_efficiency" in r else "-"
        table.append(f"| {r['n']} | {shape} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | {eff} | "
                     f"{r.get('max_abs_loss_diff_first_k', 0):.2e} (K={r.get('compare_k', '-')}) |")
    mc = results.get("muon_check")
    if mc and "error" not in mc:
        table += ["", f"Muon under FSDP2 ({mc['world_size']} ranks) vs one process: max relative update error "
                      f"{mc['max_rel_err_fsdp']:.2e}; shard-wise orthogonalisation would give "
                      f">= {mc['min_rel_err_shardwise']:.2e}"]
    elif mc:
        table += ["", "Muon check failed: " + mc["error"][-500:]]
    text = "\n".join(table)
    (out / "table.md").write_text(text + "\n")
    print(text)
    ok = all("error" not in r for r in results["runs"]) and (not mc or "error" not in mc)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
