"""Registration of model_type "parallax_qwen3" with the transformers Auto classes."""

from __future__ import annotations


def register() -> None:
    """Register ParallaxConfig / ParallaxModel / ParallaxForCausalLM with AutoConfig / AutoModel /
    AutoModelForCausalLM. Idempotent."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .configuration import MODEL_TYPE, ParallaxConfig
    from .modeling import ParallaxForCausalLM, ParallaxModel

    AutoConfig.register(MODEL_TYPE, ParallaxConfig, exist_ok=True)
    AutoModel.register(ParallaxConfig, ParallaxModel, exist_ok=True)
    AutoModelForCausalLM.register(ParallaxConfig, ParallaxForCausalLM, exist_ok=True)
