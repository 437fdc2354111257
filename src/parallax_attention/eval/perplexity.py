"""Validation loss / perplexity of a causal LM over fixed windows of a token split."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


def lm_loss(model, window: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of windows (batch, L+1): inputs are the first L tokens, targets the last L.

    The loss is computed here from the logits (in fp32) so every target in the
    window counts, whatever label convention the model's own ``labels`` path uses.
    """
    x, y = window[:, :-1], window[:, 1:]
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction=reduction)


@torch.no_grad()
def evaluate_loss(model, shards, batch_size: int, max_batches: int, device: torch.device,
                  autocast_dtype: torch.dtype | None = None, rank: int = 0, world_size: int = 1) -> dict:
    """Mean token loss and perplexity over the first ``batch_size*max_batches`` windows of ``shards``.

    The windows are the same at every call (a fixed validation set). With several
    ranks each takes an equal share (every rank runs the same number of forward
    passes, which FSDP needs) and the sums are all-reduced.
    """
    n = min(len(shards), batch_size * max_batches)
    n -= n % world_size
    if n == 0:
        raise ValueError("validation split has fewer windows than ranks: use more data or a shorter seq_len")
    mine = list(range(rank, n, world_size))
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, token count)
    ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    for i in range(0, len(mine), batch_size):
        w = torch.from_numpy(shards.batch(mine[i:i + batch_size])).to(device)
        with ctx:
            loss = lm_loss(model, w, reduction="sum")
        total[0] += loss.double()
        total[1] += w[:, 1:].numel()
    if dist.is_initialized() and world_size > 1:
        dist.all_reduce(total)
    if was_training:
        model.train()
    val_loss = (total[0] / total[1]).item()
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_tokens": int(total[1].item())}
