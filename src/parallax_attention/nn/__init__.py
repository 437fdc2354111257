"""Layers: the Parallax attention layer, rotary embeddings, norms, the SwiGLU MLP."""

from .attention import ParallaxAttention
from .mlp import SwiGLU
from .norm import RMSNorm
from .rotary import RotaryEmbedding, apply_rotary, rope_inv_freq

__all__ = ["ParallaxAttention", "RMSNorm", "RotaryEmbedding", "SwiGLU", "apply_rotary", "rope_inv_freq"]
