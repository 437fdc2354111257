"""The Parallax attention op and its backends."""

from .interface import BACKENDS, parallax_attn, parallax_attn_varlen

__all__ = ["BACKENDS", "parallax_attn", "parallax_attn_varlen"]
