"""Convert a Hugging Face Qwen3, Qwen2 or Llama checkpoint into a parallax_qwen3 checkpoint.

The probe projection r_proj is added as zeros (r_norm weights one), so the converted model computes
exactly the source model's function (Parallax with r = 0 is softmax attention) and is ready to
fine-tune. Every other tensor keeps its name: the source models use the same Hugging Face names.

The destination is written into a temporary directory beside it and renamed into place at the end,
so a failed or interrupted conversion leaves no partial checkpoint behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .._files import atomic_directory, check_destination

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Files copied along when present: tokenizer, chat template, generation defaults.
EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
               "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
               "generation_config.json")
MAX_SHARD_BYTES = 4 * 1024**3
# Keys some older checkpoints carry that are derived state, not weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(ValueError):
    """The source checkpoint cannot be converted (unsupported, missing or inconsistent)."""


# ---------------------------------------------------------------------------------------------
# Config


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope scaling dict or None) from a config in either the 4.x or 5.x layout."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or None
    if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
        raise ConversionError(f"config.json: per-layer-type rope_parameters are not supported: {params}")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise ConversionError(f"config.json: rope scaling type {kind!r} is not supported "
                                  f"(supported: none, 'linear', 'llama3')")
        if kind == "default":
            scaling = None
        else:
            keys = ("factor",) if kind == "linear" else ("factor", "low_freq_factor", "high_freq_factor",
                                                         "original_max_position_embeddings")
            missing = [k for k in keys if k not in scaling]
            if missing:
                raise ConversionError(f"config.json: rope scaling {kind!r} lacks {missing}")
            scaling = {"rope_type": kind, **{k: scaling[k] for k in keys}}
    partial = cfg.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConversionError(f"config.json: partial_rotary_factor={partial} is not supported (expected 1.0)")
    return float(theta), scaling


def parallax_config_from_hf(cfg: dict):
    """Map a Qwen3 / Qwen2 / Llama config dict to a ParallaxConfig with a zero probe."""
    from .configuration import ParallaxConfig

    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"config.json: model_type {model_type!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(cfg.get(key), int):
            raise ConversionError(f"config.json: expected an integer {key!r}, got {cfg.get(key)!r}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"config.json: hidden_act {act!r} is not supported (expected 'silu')")
    if cfg.get("use_sliding_window") or any(t != "full_attention" for t in cfg.get("layer_types") or []):
        raise ConversionError("config.json: sliding-window layers (use_sliding_window / layer_types) are not "
                              "supported; convert a full-attention checkpoint")
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    theta, scaling = _rope(cfg)

    if model_type == "qwen3":
        bias = bool(cfg.get("attention_bias", False))
        qkv_bias, o_bias, qk_norm, mlp_bias = bias, bias, True, False
    elif model_type == "qwen2":
        qkv_bias, o_bias, qk_norm, mlp_bias = True, False, False, False
    else:
        bias = bool(cfg.get("attention_bias", False))
        qkv_bias, o_bias, qk_norm, mlp_bias = bias, bias, False, bool(cfg.get("mlp_bias", False))

    return ParallaxConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        initializer_range=cfg.get("initializer_range", 0.02), rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), rope_theta=theta,
        rope_scaling_params=scaling, attention_bias=bool(qkv_bias and o_bias), qkv_bias=qkv_bias, o_bias=o_bias,
        mlp_bias=mlp_bias, qk_norm=qk_norm, attention="parallax", probe_norm=True, probe_rope=True,
        probe_init="zeros", probe_gate=None, pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
    )


# ---------------------------------------------------------------------------------------------
# Source tensors


class _Source:
    """Lazy access to the tensors of a checkpoint directory (safetensors or PyTorch .bin, sharded or not)."""

    def __init__(self, src: Path):
        self.src = src
        self.where: dict[str, Path] = {}
        self.kind = None
        for kind, single, index in (("safetensors", "model.safetensors", "model.safetensors.index.json"),
                                    ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json")):
            if (src / index).is_file():
                try:
                    weight_map = json.loads((src / index).read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConversionError(f"{index}: not a valid weight index ({e})") from None
                missing = sorted({f for f in weight_map.values() if not (src / f).is_file()})
                if missing:
                    raise ConversionError(f"{index}: lists shard files that are missing from {src}: {missing}")
                self.where = {k: src / f for k, f in weight_map.items()}
                self.kind = kind
                break
            if (src / single).is_file():
                self.kind = kind
                if kind == "safetensors":
                    from safetensors import safe_open
                    with safe_open(src / single, framework="pt") as f:
                        self.where = {k: src / single for k in f.keys()}
                else:
                    self.where = {k: src / single for k in self._load_bin(src / single)}
                break
        if self.kind is None:
            raise ConversionError(f"{src}: no weights found (expected model.safetensors, "
                                  f"model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json)")
        self._bins: dict[Path, dict] = {}

    @staticmethod
    def _load_bin(path: Path) -> dict:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - the legacy (non-zip) format cannot be memory-mapped
            pass
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise ConversionError(f"{path.name}: cannot read PyTorch weights ({e})") from None

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        path = self.where[name]
        if self.kind == "safetensors":
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                sl = f.get_slice(name)
                dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                         "F64": torch.float64}.get(sl.get_dtype())
                if dtype is None:
                    raise ConversionError(f"{path.name}: tensor {name} has unsupported dtype {sl.get_dtype()}")
                return tuple(sl.get_shape()), dtype
        t = self.get(name)
        return tuple(t.shape), t.dtype

    def get(self, name: str) -> torch.Tensor:
        path = self.where[name]
        if self.kind == "safetensors":
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(name)
        if path not in self._bins:
            self._bins = {path: self._load_bin(path)}  # one shard in memory at a time
        return self._bins[path][name]


# ---------------------------------------------------------------------------------------------
# Conversion


def _expected_tensors(config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the parallax checkpoint's tensors (tied lm_head excluded)."""
    from .modeling import ParallaxForCausalLM
    with torch.device("meta"):
        model = ParallaxForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _is_probe(name: str) -> bool:
    return ".self_attn.r_proj." in name or ".self_attn.r_norm." in name


def convert_checkpoint(src, dst, dtype=None, *, overwrite: bool = False, progress: bool | None = None) -> Path:
    """Convert the Hugging Face checkpoint directory `src` (Qwen3, Qwen2 or Llama) to a parallax_qwen3
    checkpoint in `dst` with a zero probe. Returns the destination path.

    Args:
        src: directory with config.json and model.safetensors (sharded with an index, or
            pytorch_model.bin). Tokenizer and generation files present are copied along.
        dst: output directory; must not exist or be empty unless overwrite=True.
        dtype: None (keep the source dtypes) or "float32", "bfloat16", "float16" (or a torch dtype).
        overwrite: replace an existing non-empty dst.
        progress: show a progress bar (default: when the checkpoint is larger than 1 GiB).

    Raises:
        ConversionError (a ValueError) for unsupported, missing or inconsistent inputs; nothing is
        written then.
    """
    src, dst = Path(src), Path(dst)
    target_dtype = _check_dtype(dtype)
    if not src.is_dir():
        raise ConversionError(f"src: {src} is not a directory")
    if src.resolve() == dst.resolve():
        raise ConversionError("dst: must differ from src")
    check_destination(dst, overwrite, ConversionError)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"src: {src} has no config.json")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"config.json: invalid JSON ({e})") from None
    config = parallax_config_from_hf(hf_cfg)
    source = _Source(src)

    # Check names and shapes before writing anything.
    expected = _expected_tensors(config)
    present = {k for k in source.where if not k.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        present.discard("lm_head.weight")
    missing = sorted(k for k in expected if not _is_probe(k) and k not in present)
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        raise ConversionError(f"{src}: tensors do not match a {hf_cfg['model_type']} model with this config.json; "
                              f"missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
                              f"unexpected: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    src_dtypes = {}
    for name in sorted(present):
        shape, dt = source.shape_dtype(name)
        if shape != expected[name]:
            raise ConversionError(f"{src}: tensor {name} has shape {shape}, config.json implies {expected[name]}")
        src_dtypes[name] = dt
    default_dtype = target_dtype or _most_common(src_dtypes.values())
    config.dtype = str(default_dtype).replace("torch.", "")

    # Plan shards by size, in a stable order.
    names = list(expected)
    sizes = {n: _numel(expected[n]) * (target_dtype or src_dtypes.get(n, default_dtype)).itemsize for n in names}
    total = sum(sizes.values())
    shards, cur, cur_bytes = [], [], 0
    for n in names:
        if cur and cur_bytes + sizes[n] > MAX_SHARD_BYTES:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(n)
        cur_bytes += sizes[n]
    shards.append(cur)
    show = progress if progress is not None else total > 1024**3

    with atomic_directory(dst) as tmp:
        _write(tmp, config, source, shards, names, expected, src_dtypes, target_dtype, default_dtype, total, show)
        for fname in EXTRA_FILES:
            if (src / fname).is_file():
                shutil.copy2(src / fname, tmp / fname)
    return dst


def _write(tmp, config, source, shards, names, expected, src_dtypes, target_dtype, default_dtype, total, show):
    from safetensors.torch import save_file

    bar = None
    if show:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(names), desc="converting", unit="tensor")
        except ImportError:
            bar = None
    weight_map = {}
    n_shards = len(shards)
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if n_shards == 1 else f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors = {}
        for n in shard:
            dt = target_dtype or src_dtypes.get(n, default_dtype)
            if _is_probe(n):
                # r_proj = 0 (and its bias), r_norm = 1: the probe is exactly zero.
                t = torch.ones(expected[n], dtype=dt) if ".r_norm." in n else torch.zeros(expected[n], dtype=dt)
            else:
                t = source.get(n).to(dt).contiguous()
            tensors[n] = t
            weight_map[n] = fname
            if bar is not None:
                bar.update(1)
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
    if bar is not None:
        bar.close()
    if n_shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config.architectures = ["ParallaxForCausalLM"]
    config.save_pretrained(tmp)


def _check_dtype(dtype):
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ConversionError(f"dtype: expected None or one of {sorted(DTYPES)}, got {dtype!r}")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _most_common(dtypes) -> torch.dtype:
    counts = {}
    for d in dtypes:
        counts[d] = counts.get(d, 0) + 1
    return max(counts, key=counts.get) if counts else torch.float32


# ---------------------------------------------------------------------------------------------
# CLI: plx convert SRC DST [--dtype ...] [--overwrite]


def add_arguments(parser) -> None:
    parser.add_argument("src", help="Hugging Face checkpoint directory (Qwen3, Qwen2 or Llama)")
    parser.add_argument("dst", help="output directory for the parallax_qwen3 checkpoint")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast weights to this dtype (default: keep the source dtypes)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import sys
    try:
        out = convert_checkpoint(args.src, args.dst, args.dtype, overwrite=args.overwrite,
                                 progress=False if args.no_progress else None)
    except ConversionError as e:
        print(f"plx convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
