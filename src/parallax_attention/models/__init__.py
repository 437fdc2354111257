"""Qwen3-style Parallax models on Hugging Face transformers, and checkpoint conversion.

Importing this package registers model_type "parallax_qwen3" with AutoConfig, AutoModel and
AutoModelForCausalLM.
"""

from .configuration import MODEL_TYPE, PRESETS, ParallaxConfig
from .modeling import ParallaxDecoderLayer, ParallaxForCausalLM, ParallaxModel, ParallaxPreTrainedModel
from .registration import register

register()

__all__ = ["MODEL_TYPE", "PRESETS", "ParallaxConfig", "ParallaxDecoderLayer", "ParallaxForCausalLM",
           "ParallaxModel", "ParallaxPreTrainedModel", "convert_checkpoint", "register"]


def __getattr__(name):
    # Conversion pulls in safetensors and file handling; load it on first use.
    if name == "convert_checkpoint":
        from .convert import convert_checkpoint
        return convert_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
