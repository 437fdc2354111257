"""ParallaxConfig: the Qwen3 architecture plus the Parallax probe, as a transformers config."""

from __future__ import annotations

import copy

from transformers import PretrainedConfig

from ..nn.attention import ATTENTIONS, PROBE_GATES, PROBE_INITS
from ..nn.rotary import check_rope_scaling

MODEL_TYPE = "parallax_qwen3"

# Qwen3-0.6B and Qwen3-1.7B shapes (plus r_proj); "tiny" is for CPU tests and smoke runs.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                 tie_word_embeddings=True, rope_theta=10000.0),
    "0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                 tie_word_embeddings=True, rope_theta=1000000.0),
    "1.7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                 tie_word_embeddings=True, rope_theta=1000000.0),
}


class ParallaxConfig(PretrainedConfig):
    """Configuration of a Parallax (or softmax-baseline) Qwen3-style decoder.

    Architecture fields follow Qwen3Config. Parallax fields:
        attention: "parallax" or "softmax" (baseline through the same code).
        qk_norm: per-head RMSNorm on q and k (False for converted Llama/Qwen2 checkpoints).
        probe_norm, probe_rope, probe_init, probe_gate: see ParallaxAttention.
        attention_window: left sliding window in keys (None = full causal attention).
        qkv_bias / o_bias: per-projection bias overrides of attention_bias (Qwen2: True / False).
        rope_scaling_params: None, or {"rope_type": "linear"|"llama3", ...} (converted checkpoints).
        attn_backend: the op backend ("auto", "torch", "triton", "reference").
    """

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, vocab_size: int = 151936, hidden_size: int = 1024, intermediate_size: int = 3072,
                 num_hidden_layers: int = 28, num_attention_heads: int = 16, num_key_value_heads: int = 8,
                 head_dim: int = 128, hidden_act: str = "silu", max_position_embeddings: int = 40960,
                 initializer_range: float = 0.02, rms_norm_eps: float = 1e-6, use_cache: bool = True,
                 tie_word_embeddings: bool = True, rope_theta: float = 1000000.0,
                 rope_scaling_params: dict | None = None, attention_bias: bool = False,
                 qkv_bias: bool | None = None, o_bias: bool | None = None, mlp_bias: bool = False,
                 attention_dropout: float = 0.0, attention: str = "parallax", qk_norm: bool = True,
                 probe_norm: bool = True, probe_rope: bool = True, probe_init: str = "normal",
                 probe_gate: str | None = None, attention_window: int | None = None,
                 attn_backend: str = "auto", pad_token_id: int | None = None, bos_token_id: int | None = None,
                 eos_token_id: int | list[int] | None = None, **kwargs):
        for name, value, choices in (("attention", attention, ATTENTIONS), ("probe_init", probe_init, PROBE_INITS),
                                     ("probe_gate", probe_gate, PROBE_GATES), ("hidden_act", hidden_act, ("silu",))):
            if value not in choices:
                raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"num_key_value_heads: expected a divisor of num_attention_heads="
                             f"{num_attention_heads}, got {num_key_value_heads}")
        if attention_window is not None and (not isinstance(attention_window, int) or attention_window < 0):
            raise ValueError(f"attention_window: expected None or an int >= 0, got {attention_window!r}")
        if attention_dropout:
            raise ValueError(f"attention_dropout: not supported (the fused ops have no dropout), "
                             f"got {attention_dropout}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = float(rope_theta)
        self.rope_scaling_params = check_rope_scaling(copy.deepcopy(rope_scaling_params))
        self.attention_bias = attention_bias
        self.qkv_bias = qkv_bias
        self.o_bias = o_bias
        self.mlp_bias = mlp_bias
        self.attention_dropout = attention_dropout
        self.attention = attention
        self.qk_norm = qk_norm
        self.probe_norm = probe_norm
        self.probe_rope = probe_rope
        self.probe_init = probe_init
        self.probe_gate = probe_gate
        self.attention_window = attention_window
        self.attn_backend = attn_backend
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        # Set after the base init, which may reset it from defaults in some versions.
        self.tie_word_embeddings = tie_word_embeddings

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ParallaxConfig":
        """A config with the preset's shapes ("tiny", "0.6b", "1.7b"); keyword arguments override fields."""
        if name not in PRESETS:
            raise ValueError(f"name: unknown preset {name!r}; available: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})
