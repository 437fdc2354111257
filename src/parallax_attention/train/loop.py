"""The training loop: composes model, data, optimizer, schedule, checkpoints and parallelism.

Each of those pieces knows nothing of the others; only this file wires them up.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..data.shards import TokenShards, WindowSampler, atomic_write_json, read_manifest
from ..eval.perplexity import evaluate_loss, lm_loss
from ..optim import Schedule, apply_schedule, build_optimizer
from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import (all_reduce_mean, barrier, clip_grad_norm_, init_distributed, shutdown, unwrap,
                          wrap_model)

EXIT_OK, EXIT_NONFINITE = 0, 3


class MetricsLog:
    """DIR/metrics.jsonl, one JSON object per line; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None, tensorboard_dir: Path | None):
        self.path, self.enabled = path, enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is None:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("")
            os.replace(tmp, path)
        elif path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, path)
        self.f = open(path, "a")
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("warning: --tensorboard needs `pip install tensorboard`; logging to metrics.jsonl only",
                      file=sys.stderr)
            else:
                self.tb = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


class _PlainProgress:
    """Stand-in for tqdm where it is not installed: a line every 5% of the run."""

    def __init__(self, total, initial=0, **_):
        self.total, self.n, self.every, self.post = total, initial, max(1, total // 20), ""

    def update(self, k):
        self.n += k

    def set_postfix(self, **kw):
        if self.n % self.every == 0 or self.n == self.total:
            print(f"step {self.n}/{self.total} " + " ".join(f"{k}={v}" for k, v in kw.items()),
                  file=sys.stderr, flush=True)

    def close(self):
        pass


def embedded_data_dir(tokenizer: str, vocab_size: int) -> Path:
    """Where the embedded corpus is prepared (once per tokenizer and Python version)."""
    root = os.environ.get("PLX_DATA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "parallax-attention", "data")
    tag = "bytes" if tokenizer == "bytes" else f"bpe{vocab_size}"
    return Path(root) / f"embedded-{tag}-py{sys.version_info.major}.{sys.version_info.minor}"


def resolve_data(cfg: TrainConfig, info) -> Path:
    if cfg.data != "embedded":
        read_manifest(cfg.data)  # clear error if it is not prepared
        return Path(cfg.data)
    path = embedded_data_dir(cfg.tokenizer, cfg.vocab_size)
    if info.is_main and not (path / "manifest.json").is_file():
        from ..data.prepare import prepare

        print(f"preparing the embedded corpus into {path} (once)", file=sys.stderr)
        prepare("embedded", path, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, progress=cfg.progress)
    barrier(info)
    return path


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device):
    from ..models import ParallaxConfig, ParallaxForCausalLM

    overrides = dict(cfg.model)
    # Round the embedding up to a multiple of 64 (tensor-core friendly); extra ids are never seen.
    overrides.setdefault("vocab_size", int(math.ceil(vocab_size / 64) * 64))
    if overrides["vocab_size"] < vocab_size:
        raise ValueError(f"model.vocab_size={overrides['vocab_size']} is smaller than the data's vocabulary "
                         f"({vocab_size})")
    mcfg = ParallaxConfig.from_preset(cfg.preset, attention=cfg.attention, **overrides)
    with torch.device(device):
        model = ParallaxForCausalLM(mcfg)
    return model


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _grad_sync(model, enabled: bool):
    """Skip gradient all-reduce on all but the last micro-batch (DDP no_sync / FSDP2 flag)."""
    if hasattr(model, "no_sync") and not enabled:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns a summary. See `plx train --help` for the knobs."""
    cfg.validate()
    info = init_distributed(cfg.parallel, cfg.device)
    try:
        summary = _train(cfg, info)
    except BaseException:
        shutdown(info, finished=False)
        raise
    shutdown(info)
    return summary


def _train(cfg: TrainConfig, info) -> dict:
    out = Path(cfg.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(info)
    device = info.device
    _seed_everything(cfg.seed)
    data_dir = resolve_data(cfg, info)
    manifest = read_manifest(data_dir)
    train_data = TokenShards(data_dir, "train", cfg.seq_len)
    val_data = TokenShards(data_dir, "val", cfg.seq_len)
    if len(val_data) == 0:
        val_data = None

    model = build_model(cfg, manifest["vocab_size"], device)
    n_params = sum(p.numel() for p in model.parameters())
    model = wrap_model(model, cfg.parallel, info, cfg.fsdp_reshard_after_forward)
    optimizer = build_optimizer(unwrap(model), cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                adamw_lr=cfg.adamw_lr, adjust_lr=cfg.adjust_lr, momentum=cfg.momentum,
                                betas=(cfg.beta1, cfg.beta2))
    schedule = Schedule(cfg.schedule, total=cfg.steps, warmup=min(cfg.warmup, cfg.steps),
                        decay_frac=cfg.decay_frac, min_ratio=cfg.min_lr_ratio, wd_gamma=cfg.wd_gamma)
    sampler = WindowSampler(len(train_data), seed=cfg.seed)
    autocast_dtype = _autocast_dtype(cfg, device)
    micro = cfg.batch_size
    global_batch = micro * cfg.grad_accum * info.world_size
    eval_bs = cfg.eval_batch_size or micro

    step = 0
    resumed_from = None
    if cfg.resume:
        path = ckpt.latest_checkpoint(out)
        if path is not None:
            state = ckpt.load_checkpoint(path)
            ckpt.load_model_state(model, state["model"])
            ckpt.load_optimizer_state(model, optimizer, state["optimizer"])
            sampler.load_state_dict(state["data"])
            rngs = state["rng"]
            ckpt.set_rng_state(rngs[info.rank] if info.rank < len(rngs) else rngs[0])
            step = int(state["step"])
            resumed_from = str(path)
            del state
    log = MetricsLog(out / "metrics.jsonl", info.is_main, step if resumed_from else None,
                     out / "tensorboard" if cfg.tensorboard else None)
    if info.is_main:
        try:
            import yaml

            name, text = "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        except ImportError:
            name, text = "config.json", json.dumps(cfg.to_dict(), indent=2)
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)
        where = f"resuming from {resumed_from}" if resumed_from else "starting"
        print(f"{where}: {cfg.preset} {cfg.attention} {cfg.optimizer}, {n_params / 1e6:.2f}M params, "
              f"{info.world_size} process(es) on {device.type}, global batch {global_batch} x {cfg.seq_len}",
              file=sys.stderr)

    def save(at_step: int) -> Path | None:
        state = {
            "step": at_step,
            "model": ckpt.model_state(model),
            "optimizer": ckpt.optimizer_state(model, optimizer),
            "data": sampler.state_dict(),
            "rng": ckpt.gather_rng_states(),
            "schedule": vars(schedule) if not hasattr(schedule, "__dataclass_fields__") else
            {k: getattr(schedule, k) for k in schedule.__dataclass_fields__},
            "config": cfg.to_dict(),
        }
        path = ckpt.save_checkpoint(state, out, at_step, cfg.keep_last) if info.is_main else None
        barrier(info)
        return path

    def evaluate(at_step: int) -> dict | None:
        if val_data is None:
            return None
        r = evaluate_loss(model, val_data, eval_bs, cfg.eval_batches, device, autocast_dtype,
                          info.rank, info.world_size)
        log.write({"step": at_step, **r})
        return r

    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, step + cfg.stop_after)
    bar = None
    if info.is_main and cfg.progress:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = _PlainProgress
        bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)
    model.train()
    tokens_per_step = global_batch * cfg.seq_len
    train_time, train_tokens = 0.0, 0
    last_loss, last_eval, status = float("nan"), None, "completed"
    while step < end:
        t0 = time.perf_counter()
        lr_factor = apply_schedule(optimizer, schedule, step)
        windows = sampler.next_global(global_batch)
        loss_sum = torch.zeros((), device=device)
        for m in range(cfg.grad_accum):
            # Global batch order: micro-batch m of rank r is slice (m * world + r); the
            # same windows are seen whatever the number of ranks.
            s = (m * info.world_size + info.rank) * micro
            batch = torch.from_numpy(train_data.batch(windows[s:s + micro])).to(device, non_blocking=True)
            with _grad_sync(model, m == cfg.grad_accum - 1):
                ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
                with ctx:
                    loss = lm_loss(model, batch)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        loss_val = all_reduce_mean(loss_sum / cfg.grad_accum, info).item()
        grad_norm = float("nan")
        if math.isfinite(loss_val) and cfg.grad_clip > 0:
            grad_norm = clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not (math.isfinite(loss_val) and (cfg.grad_clip <= 0 or math.isfinite(grad_norm))):
            # Stop before the update so the parameters (and the checkpoints on disk) stay good.
            optimizer.zero_grad(set_to_none=True)
            last_good = ckpt.latest_checkpoint(out)
            what = "loss" if not math.isfinite(loss_val) else "gradient norm"
            msg = (f"non-finite {what} at step {step + 1} (loss={loss_val}, grad_norm={grad_norm}); "
                   f"stopping without updating. Last good checkpoint: {last_good or 'none'}. "
                   f"Try a lower lr, more warmup or a smaller grad_clip.")
            if info.is_main:
                print(f"error: {msg}", file=sys.stderr)
                log.write({"step": step + 1, "error": msg})
            status = "nonfinite"
            break
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        step += 1
        train_time += dt
        train_tokens += tokens_per_step
        last_loss = loss_val
        lr_now = optimizer.param_groups[0]["lr"]
        if step % cfg.log_every == 0 or step == end:
            log.write({"step": step, "loss": loss_val, "lr": lr_now, "lr_factor": lr_factor,
                       "grad_norm": grad_norm, "tokens": step * tokens_per_step,
                       "tokens_per_s": tokens_per_step / dt})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr_now:.2e}", tok_s=f"{train_tokens / train_time:,.0f}")
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            last_eval = evaluate(step)
        # ckpt_every=0 turns checkpoints off entirely (benchmarks); otherwise also save on the last step.
        if cfg.ckpt_every and (step % cfg.ckpt_every == 0 or step == end):
            save(step)
    if bar is not None:
        bar.close()
    log.close()
    summary = {
        "status": status, "step": step, "steps": cfg.steps, "attention": cfg.attention,
        "optimizer": cfg.optimizer, "preset": cfg.preset, "params": n_params, "final_loss": last_loss,
        "val_loss": last_eval["val_loss"] if last_eval else None,
        "val_ppl": last_eval["val_ppl"] if last_eval else None,
        "tokens_per_s": train_tokens / train_time if train_time else None,
        "train_seconds": train_time, "world_size": info.world_size, "resumed_from": resumed_from,
    }
    if info.is_main:
        atomic_write_json(out / "summary.json", summary)
    return summary
