"""TrainConfig: every knob of `plx train`, loadable from YAML and overridable by ``key=value``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    # model
    preset: str = "tiny"
    attention: str = "parallax"
    model: dict = field(default_factory=dict)  # ParallaxConfig overrides, e.g. {"num_hidden_layers": 4}
    # run
    out: str = "runs/train"
    steps: int = 200
    seed: int = 0
    resume: bool = False
    stop_after: int | None = None  # end this invocation after that many steps (the schedule keeps `steps`)
    # data
    data: str = "embedded"  # a prepared directory, or "embedded" (prepared on first use, cached)
    tokenizer: str = "bpe"  # for data="embedded"
    vocab_size: int = 4096  # for data="embedded" with a BPE tokenizer
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch per rank
    grad_accum: int = 1
    # optimizer and schedule
    optimizer: str = "muon"
    lr: float = 3e-3
    adamw_lr: float | None = None  # AdamW groups' lr; None = lr
    weight_decay: float = 0.1
    adjust_lr: str = "match_rms_adamw"
    momentum: float = 0.95
    beta1: float = 0.9
    beta2: float = 0.95
    schedule: str = "wsd"
    warmup: int = 20
    decay_frac: float = 0.2
    min_lr_ratio: float = 0.0
    wd_gamma: float = 2.0
    grad_clip: float = 1.0
    # evaluation, logging, checkpoints
    eval_every: int = 50
    eval_batches: int = 8
    eval_batch_size: int | None = None
    log_every: int = 1
    ckpt_every: int = 100
    keep_last: int = 2
    tensorboard: bool = False
    progress: bool = True
    # hardware
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU; or "bf16" / "fp32"
    parallel: str = "none"
    # FSDP2: free each block's gathered parameters after its forward (less memory; gathered again
    # for the backward) or keep them until the backward (one all-gather per block and micro-batch)
    fsdp_reshard_after_forward: bool = True

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        choices = {"attention": ("parallax", "softmax"), "optimizer": ("muon", "adamw"),
                   "schedule": ("wsd", "cosine", "constant"), "parallel": ("none", "ddp", "fsdp"),
                   "dtype": ("auto", "bf16", "fp32"), "tokenizer": ("bytes", "bpe"),
                   "adjust_lr": ("original", "match_rms_adamw", "none")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        for name in ("steps", "seq_len", "batch_size", "grad_accum", "eval_batches", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "ckpt_every", "keep_last", "warmup"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after: must be >= 1, got {self.stop_after}")
        if not isinstance(self.model, dict):
            raise ValueError(f"model: expected a mapping of model-config overrides, got {self.model!r}")
        return self


def _parse_value(text: str) -> Any:
    try:
        import yaml
    except ImportError:  # minimal images: JSON-ish literals, else the raw string
        import json

        low = text.strip().lower()
        if low in ("true", "false", "null", "none"):
            return {"true": True, "false": False}.get(low)
        try:
            return json.loads(text)
        except ValueError:
            return text
    return yaml.safe_load(text)


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """``key=value`` pairs (YAML values); ``model.NAME=value`` sets a model-config field."""
    names = set(TrainConfig.field_names())
    cfg = dict(cfg)
    cfg["model"] = dict(cfg.get("model") or {})
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected KEY=VALUE (e.g. lr=1e-3 or model.num_hidden_layers=4)")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key.startswith("model."):
            cfg["model"][key[len("model."):]] = _parse_value(value)
        elif key in names:
            cfg[key] = _parse_value(value)
        else:
            raise ValueError(f"override {item!r}: unknown key {key!r}; known: {sorted(names)}")
    return cfg


def load_config(path: str | Path | None = None, cli: dict | None = None,
                overrides: list[str] | None = None) -> TrainConfig:
    """Defaults < YAML file < explicit CLI flags (non-None) < ``key=value`` overrides."""
    cfg: dict = {}
    names = set(TrainConfig.field_names())
    if path is not None:
        import yaml

        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path}: expected a YAML mapping at top level")
        unknown = set(loaded) - names
        if unknown:
            raise ValueError(f"--config {path}: unknown keys {sorted(unknown)}")
        cfg.update(loaded)
    for k, v in (cli or {}).items():
        if v is not None and k in names:
            cfg[k] = v
    cfg = apply_overrides(cfg, overrides or [])
    return TrainConfig(**{k: _coerce(k, v) for k, v in cfg.items()}).validate()


def _coerce(name: str, value: Any) -> Any:
    """Convert to the field's declared type (YAML reads "3e-3" as a string, "1" as an int for a float)."""
    ftype = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}[name]
    if value is None or ftype == "dict":
        return value
    base = ftype.replace(" | None", "")
    try:
        if base == "float":
            return float(value)
        if base == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if base == "str":
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {base}, got {value!r}") from None
    return value
