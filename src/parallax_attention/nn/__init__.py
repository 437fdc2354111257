"""Layers: the Parallax attention layer, its static KV cache, rotary embeddings, norms, the SwiGLU MLP."""

from .attention import ParallaxAttention
from .kv_cache import StaticKVCache
from .mlp import SwiGLU
from .norm import RMSNorm
from .rotary import RotaryEmbedding, apply_rotary, rope_inv_freq

__all__ = ["ParallaxAttention", "RMSNorm", "RotaryEmbedding", "StaticKVCache", "SwiGLU", "apply_rotary", "rope_inv_freq"]
