"""Process group set-up and model wrapping (DDP or FSDP2); knows nothing of optimizers or data.

Under ``torchrun`` the environment carries RANK/WORLD_SIZE/LOCAL_RANK; NCCL is
used on GPUs and gloo on CPU. Without it everything runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

PARALLEL_MODES = ("none", "ddp", "fsdp")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' requested but no GPU is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    return torch.device("cpu")


def init_distributed(parallel: str = "none", device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; returns rank, world size and device."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and parallel == "none":
        raise ValueError(f"parallel: {world} processes were launched; pass --parallel ddp or --parallel fsdp")
    dev = pick_device(device, local_rank)
    info = DistInfo(rank, world, local_rank, dev)
    if parallel != "none" and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        info.initialized_here = True
        info.rank, info.world_size = dist.get_rank(), dist.get_world_size()
    return info


def shutdown(info: DistInfo, finished: bool = True) -> None:
    """Leave the process group. ``finished``: every rank got here normally, so they meet first.

    Without that meeting a gloo group destroyed while a peer still uses its connections now and
    then aborts the peer after the run has finished ("terminate called without an active
    exception"). After an error there is no meeting: the other ranks may be inside another
    collective, and the teardown is what makes theirs fail instead of hang.
    """
    if info.initialized_here and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if dist.is_initialized() and info.world_size > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= info.world_size
    return x


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if dist.is_initialized() and info.world_size > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@torch.no_grad()  # also DTensor.to_local's fast path: with grad mode on it is an autograd op
def clip_grad_norm_(parameters, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm); returns the total norm before clipping.

    Under FSDP2 every gradient is a DTensor sharded over one mesh: the squared norms of the
    local shards are summed with one all-reduce and the shards scaled in place, instead of
    torch's per-DTensor path, whose host time is several times the kernels'.
    """
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return 0.0
    from torch.distributed.tensor import DTensor, Shard

    mesh = grads[0].device_mesh if isinstance(grads[0], DTensor) else None
    if mesh is None or mesh.ndim != 1 or not all(
            isinstance(g, DTensor) and g.device_mesh == mesh and all(type(pl) is Shard for pl in g.placements)
            for g in grads):
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(total.full_tensor() if isinstance(total, DTensor) else total)
    local = [g.to_local() for g in grads]
    squares = torch.stack([n.float() for n in torch._foreach_norm(local)]).square().sum()
    dist.all_reduce(squares, group=mesh.get_group())
    total = squares.sqrt()
    torch._foreach_mul_(local, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return float(total)


def _block_lists(model: nn.Module) -> list[nn.Module]:
    """Transformer blocks: children of every ModuleList (``model.layers`` in our models)."""
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            blocks.extend(module)
    return blocks


def wrap_model(model: nn.Module, parallel: str, info: DistInfo, reshard_after_forward: bool = True) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` per block, then the root), or the model itself.

    Under FSDP2 ``reshard_after_forward`` frees each block's gathered parameters after its
    forward; the last block keeps them either way, since its backward starts at once and
    resharding would only gather them again.
    """
    if parallel == "none":
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        blocks = _block_lists(model)
        for i, block in enumerate(blocks):
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
