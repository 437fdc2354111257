"""Checkpoints: one file per saved step, written atomically, the newest N kept.

A checkpoint is a dict of plain state dicts ({"model", "optimizer", "data",
"rng", "step", ...}); the caller decides what goes in. Model and optimizer
state are gathered to full (unsharded) tensors so a checkpoint from FSDP loads
into DDP or a single process and vice versa.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    d = checkpoint_dir(out)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), d / name) for name in os.listdir(d) if (m := _NAME.match(name))]
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def save_checkpoint(state: dict, out: Path, step: int, keep_last: int = 2) -> Path:
    """Write ``state`` as step_XXXXXXXX.pt (temporary file, then rename) and prune old ones."""
    d = checkpoint_dir(out)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step_{step:08d}.pt"
    tmp = d / f".step_{step:08d}.pt.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
    if keep_last > 0:
        for _, old in list_checkpoints(out)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict:
    # weights_only=False: the file also holds Python scalars, dtypes and RNG tuples
    # written by this package; only load checkpoints you trust.
    return torch.load(path, map_location="cpu", weights_only=False)


# ------------------------------------------------------------- state helpers


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload gathers on rank 0 only and needs a process group; one process keeps tensors as they are.
    return StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized(), **kw)


# The distributed state-dict helpers are used in every mode (one process, DDP, FSDP2),
# so a checkpoint has one layout: full tensors, optimizer state keyed by parameter
# name. A run can therefore resume under a different parallelism or world size.


def model_state(model: nn.Module) -> dict:
    """Full model state dict on CPU (gathered under FSDP2; every rank must call this)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return _to_cpu(get_model_state_dict(model, options=_options()))


def load_model_state(model: nn.Module, sd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, sd, options=_options())


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return _to_cpu(get_optimizer_state_dict(model, optimizer, options=_options()))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, sd, options=_options())


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list[dict]:
    """Every rank's RNG state (rank order); collective when distributed."""
    mine = rng_state()
    if dist.is_initialized() and dist.get_world_size() > 1:
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, mine)
        return out
    return [mine]
