"""Host-side pieces of a launch: the device to launch on (Triton launches its kernels on the current
CUDA device, whatever device the tensors are on) and grid arithmetic."""

from __future__ import annotations

import functools

import torch


def on_input_device(fn):
    """Run fn with the current CUDA device set to its first tensor argument's device (as
    FlashAttention does), so a call on tensors of another GPU than the current one launches there."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = next(a for a in args if isinstance(a, torch.Tensor))
        if t.is_cuda and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return wrapper


# triton.cdiv and triton.next_power_of_2 are constexpr functions: a few microseconds a call on the host
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1
