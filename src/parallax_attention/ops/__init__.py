"""The Parallax attention op and its backends."""

from .interface import BACKENDS, parallax_attn, parallax_attn_varlen
from .kvcache import parallax_attn_with_kvcache

__all__ = ["BACKENDS", "parallax_attn", "parallax_attn_varlen", "parallax_attn_with_kvcache"]
