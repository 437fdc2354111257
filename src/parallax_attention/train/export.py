"""Export a training run's checkpoint as a Hugging Face model directory.

`plx train` checkpoints hold everything a resume needs (optimizer, data position, RNG); a model
directory holds what inference needs: config.json, model.safetensors and, for runs on a BPE
tokenizer, the tokenizer files, so that

    AutoModelForCausalLM.from_pretrained(DST)   # model_type parallax_qwen3
    AutoTokenizer.from_pretrained(DST)

load it, and `plx generate DST` samples from it. The directory is written atomically.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .._files import atomic_directory, check_destination

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _checkpoint_path(run: Path, step: int | None) -> Path:
    from . import checkpoint as ckpt

    found = ckpt.list_checkpoints(run)
    if not found:
        raise FileNotFoundError(f"run: no checkpoints under {ckpt.checkpoint_dir(run)}; is {run} a `plx train` "
                                f"output directory (with ckpt_every > 0)?")
    if step is None:
        return found[-1][1]
    for s, path in found:
        if s == step:
            return path
    raise ValueError(f"step: no checkpoint of step {step} in {run}; available: {[s for s, _ in found]}")


def _data_dir(cfg) -> Path:
    from .loop import embedded_data_dir

    return embedded_data_dir(cfg.tokenizer, cfg.vocab_size) if cfg.data == "embedded" else Path(cfg.data)


def export_run(run, dst, *, step: int | None = None, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write the model of `run`'s latest checkpoint (or of `step`) to the model directory `dst`.

    The tokenizer is read from the run's prepared data directory (its manifest names it). A BPE
    tokenizer is written as a transformers fast tokenizer with its end-of-text token as eos and
    pad; a byte-level run has no tokenizer files (its token ids are the UTF-8 bytes).
    """
    from ..data.shards import read_manifest
    from ..data.tokenizer import BPETokenizer
    from . import checkpoint as ckpt
    from .config import TrainConfig
    from .loop import build_model

    run, dst = Path(run), Path(dst)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)} or None, got {dtype!r}")
    check_destination(dst, overwrite)
    path = _checkpoint_path(run, step)
    state = ckpt.load_checkpoint(path)
    cfg = TrainConfig(**state["config"])
    data = _data_dir(cfg)
    manifest = read_manifest(data)
    model = build_model(cfg, manifest["vocab_size"], torch.device("cpu"))
    model.load_state_dict(state["model"])
    del state
    if dtype is not None:
        model = model.to(DTYPES[dtype])
    spec = manifest["tokenizer"]
    tokenizer = None
    if spec["kind"] == "bpe":
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(data / spec.get("file", "tokenizer.json")),
                                            eos_token=BPETokenizer.EOS, pad_token=BPETokenizer.EOS)
        for cfg_ in (model.config, model.generation_config):
            cfg_.eos_token_id = cfg_.pad_token_id = tokenizer.eos_token_id
    with atomic_directory(dst) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return dst


def add_arguments(parser) -> None:
    parser.add_argument("run", help="a `plx train` output directory (holds checkpoints/)")
    parser.add_argument("dst", help="the model directory to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast the weights (default: as trained, float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")


def run(args) -> int:
    try:
        out = export_run(args.run, args.dst, step=args.step, dtype=args.dtype, overwrite=args.overwrite)
    except (FileNotFoundError, ValueError) as e:
        print(f"plx export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
