"""Rotary position embeddings (half-split layout, as in Llama/Qwen) with optional context scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

ROPE_SCALING_TYPES = ("default", "linear", "llama3")


def check_rope_scaling(scaling: dict | None) -> dict | None:
    """Validate a rope scaling dict ({"rope_type": "linear"|"llama3", ...}); None means plain RoPE."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise TypeError(f"rope_scaling: expected a dict or None, got {type(scaling).__name__}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(f"rope_scaling: rope_type {kind!r} is not supported; supported: {ROPE_SCALING_TYPES}")
    out = {"rope_type": kind}
    if kind == "default":
        return None
    need = ["factor"] if kind == "linear" else ["factor", "low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings"]
    for key in need:
        if key not in scaling:
            raise ValueError(f"rope_scaling: rope_type {kind!r} needs {key!r}, got keys {sorted(scaling)}")
        out[key] = scaling[key]
    return out


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    scaling = check_rope_scaling(scaling)
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths are stretched by `factor`, short ones kept, the band between blended.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Maps position ids (batch, seqlen) to (cos, sin), each (batch, seqlen, head_dim)."""

    def __init__(self, head_dim: int, theta: float = 1e6, scaling: dict | None = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim: RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = float(theta)
        self.scaling = check_rope_scaling(scaling)
        # A plain attribute rather than a buffer: it is derived from the config, so it never belongs
        # in a checkpoint and must survive meta-device construction in from_pretrained.
        self._inv_freq: torch.Tensor | None = None

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(device)
        return self._inv_freq

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}, scaling={self.scaling}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seqlen, heads, head_dim); cos, sin: (batch or 1, seqlen, head_dim)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin
