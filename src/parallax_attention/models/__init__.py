"""Qwen3-style Parallax models on Hugging Face transformers, and checkpoint conversion.

Names load on first use, so importing this package (or the `plx` CLI) stays cheap. Loading the
modeling code registers model_type "parallax_qwen3" with AutoConfig, AutoModel and
AutoModelForCausalLM (importing `parallax_attention` arranges that as soon as transformers' Auto
classes are loaded).
"""

from importlib import import_module

_EXPORTS = {
    "MODEL_TYPE": "configuration", "PRESETS": "configuration", "ParallaxConfig": "configuration",
    "ParallaxDecoderLayer": "modeling", "ParallaxForCausalLM": "modeling", "ParallaxModel": "modeling",
    "ParallaxPreTrainedModel": "modeling", "convert_checkpoint": "convert", "ConversionError": "convert",
    "register": "registration", "StaticGenerator": "generation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
