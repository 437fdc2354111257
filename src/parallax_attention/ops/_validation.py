"""Argument checks shared by every public op.

Each check raises ValueError or TypeError whose message names the argument,
what was expected and what was received, so that bad input fails at the
boundary instead of deep inside a kernel.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(
            f"{name}: expected a {ndim}-D tensor of shape {layout}, got shape {tuple(x.shape)} ({x.dim()}-D)"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected dtype float64, float32, float16 or bfloat16, got {x.dtype}"
        )


def check_same_dtype_device(named: Sequence[tuple[str, torch.Tensor]]) -> None:
    first_name, first = named[0]
    for name, x in named[1:]:
        if x.dtype != first.dtype:
            raise TypeError(
                f"{name}: expected dtype {first.dtype} (the dtype of {first_name}), got {x.dtype}"
            )
        if x.device != first.device:
            raise ValueError(
                f"{name}: expected device {first.device} (the device of {first_name}), got {x.device}"
            )


def check_qrkv_heads(q: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shapes shared by dense and packed layouts: (..., H, D) on the last two dims."""
    if r.shape != q.shape:
        raise ValueError(f"r: expected the shape of q {tuple(q.shape)}, got {tuple(r.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"k: expected head_dim {q.shape[-1]} (the head_dim of q), got {k.shape[-1]}"
        )
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv < 1 or hq < 1 or hq % hkv != 0:
        raise ValueError(
            f"k: expected a number of kv heads that divides the {hq} query heads, got {hkv}"
        )
    if q.shape[-1] < 1:
        raise ValueError(f"q: expected head_dim >= 1, got {q.shape[-1]}")


def resolve_softmax_scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, torch.Tensor):
        if softmax_scale.numel() != 1:
            raise ValueError(
                f"softmax_scale: expected a positive finite number, got a tensor of shape {tuple(softmax_scale.shape)}"
            )
        softmax_scale = softmax_scale.item()
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(
            f"softmax_scale: expected a positive finite number or None, got {type(softmax_scale).__name__}"
        )
    scale = float(softmax_scale)
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"softmax_scale: expected a positive finite number, got {softmax_scale!r}")
    return scale


def normalize_window(window_size) -> tuple[int, int]:
    """FlashAttention's (left, right) window; -1 means unbounded on that side."""
    if window_size is None:
        return (-1, -1)
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise TypeError(
            f"window_size: expected a pair (left, right) of ints >= -1, got {window_size!r}"
        ) from None
    out = []
    for side, val in (("left", left), ("right", right)):
        if isinstance(val, torch.Tensor) and val.numel() == 1:
            val = val.item()
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(
                f"window_size: expected a pair (left, right) of ints >= -1, got {window_size!r} "
                f"({side} is {type(val).__name__})"
            )
        if val < -1:
            raise ValueError(
                f"window_size: expected {side} >= -1 (-1 = unbounded), got {val} in {tuple(window_size)!r}"
            )
        out.append(int(val))
    return out[0], out[1]


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device,
                     batch: int | None = None, check_values: bool = True) -> torch.Tensor | None:
    """Validate cumulative sequence lengths; returns them as a CPU int64 tensor for host-side use.

    With check_values=False (inside CUDA-graph capture, where reading device memory on the host is
    not allowed) only dtype, shape and device are checked and None is returned.
    """
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name}: expected an int32 torch.Tensor of length batch+1, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(
            f"{name}: expected a 1-D tensor of length batch+1 >= 2, got shape {tuple(cu.shape)}"
        )
    if batch is not None and cu.numel() != batch + 1:
        raise ValueError(
            f"{name}: expected length batch+1 = {batch + 1}, got {cu.numel()}"
        )
    if cu.device != device:
        raise ValueError(f"{name}: expected device {device} (the device of q), got {cu.device}")
    if not check_values:
        return None
    host = cu.detach().to("cpu", torch.int64)
    if host[0].item() != 0:
        raise ValueError(f"{name}: expected the first value to be 0, got {host[0].item()}")
    if bool((host[1:] < host[:-1]).any()):
        raise ValueError(f"{name}: expected non-decreasing values, got {host.tolist()}")
    if host[-1].item() != total:
        raise ValueError(
            f"{name}: expected the last value to equal the packed length {total}, got {host[-1].item()}"
        )
    return host


def check_backend(backend: str, valid: Sequence[str]) -> str:
    if not isinstance(backend, str) or backend not in valid:
        raise ValueError(f"backend: expected one of {', '.join(repr(b) for b in valid)}, got {backend!r}")
    return backend


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_dense(q, r, k, v, softmax_scale, window_size) -> tuple[float, tuple[int, int]]:
    """Validate the (B, L, H, D) calling convention; returns (scale, window)."""
    check_tensor("q", q, 4, "(batch, seqlen_q, heads_q, head_dim)")
    check_tensor("r", r, 4, "(batch, seqlen_q, heads_q, head_dim), the shape of q")
    check_tensor("k", k, 4, "(batch, seqlen_k, heads_kv, head_dim)")
    check_tensor("v", v, 4, "(batch, seqlen_k, heads_kv, head_dim)")
    check_same_dtype_device([("q", q), ("r", r), ("k", k), ("v", v)])
    check_qrkv_heads(q, r, k, v)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k: expected batch size {q.shape[0]} (the batch of q), got {k.shape[0]}")
    return resolve_softmax_scale(softmax_scale, q.shape[-1]), normalize_window(window_size)


def check_packed(q, r, k, v, softmax_scale, window_size) -> tuple[float, tuple[int, int]]:
    """Validate the packed (total, H, D) varlen convention; returns (scale, window)."""
    check_tensor("q", q, 3, "(total_q, heads_q, head_dim)")
    check_tensor("r", r, 3, "(total_q, heads_q, head_dim), the shape of q")
    check_tensor("k", k, 3, "(total_k, heads_kv, head_dim)")
    check_tensor("v", v, 3, "(total_k, heads_kv, head_dim)")
    check_same_dtype_device([("q", q), ("r", r), ("k", k), ("v", v)])
    check_qrkv_heads(q, r, k, v)
    return resolve_softmax_scale(softmax_scale, q.shape[-1]), normalize_window(window_size)


def check_max_seqlen(name: str, value, lengths: torch.Tensor) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    longest = int(lengths.max().item()) if lengths.numel() else 0
    if value < longest:
        raise ValueError(f"{name}: expected at least the longest sequence ({longest}), got {value}")
    return value
