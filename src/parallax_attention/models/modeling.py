"""A Qwen3-style decoder with Parallax attention, on transformers' PreTrainedModel and GenerationMixin.

Read top to bottom: decoder block, the stack (ParallaxModel), the language model (ParallaxForCausalLM).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..nn import ParallaxAttention, RMSNorm, RotaryEmbedding, StaticKVCache, SwiGLU
from .configuration import ParallaxConfig

# transformers renamed the cache argument and output field from `past_key_values` to `cache`;
# accept both on input and fill whichever the installed output classes have.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} \
    else "past_key_values"


class ParallaxDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ParallaxConfig, layer_idx: int):
        super().__init__()
        window = (-1, -1) if config.attention_window is None else (config.attention_window, 0)
        self.self_attn = ParallaxAttention(
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            attention=config.attention, qk_norm=config.qk_norm, probe_norm=config.probe_norm,
            rope_theta=config.rope_theta, rope_scaling=config.rope_scaling_params, probe_rope=config.probe_rope,
            probe_init=config.probe_init, probe_gate=config.probe_gate, window_size=window,
            attention_bias=config.attention_bias, qkv_bias=config.qkv_bias, o_bias=config.o_bias,
            rms_norm_eps=config.rms_norm_eps, layer_idx=layer_idx, backend=config.attn_backend)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, attention_mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), (cos, sin), attention_mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class ParallaxPreTrainedModel(PreTrainedModel):
    config_class = ParallaxConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ParallaxDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        # A zero-initialised probe (probe_init="zeros") starts as exact softmax attention.
        if isinstance(module, nn.Linear) and getattr(module, "_parallax_zero_init", False):
            nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class ParallaxModel(ParallaxPreTrainedModel):
    """Embeddings, decoder blocks and the final norm; returns hidden states."""

    def __init__(self, config: ParallaxConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(ParallaxDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling_params)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids, inputs_embeds: expected exactly one of them")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache is None:
            # A training forward has no use for a cache; don't hold every layer's k and v.
            use_cache = self.config.use_cache and not self.training
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing:
            use_cache = False  # recomputation would append to the cache twice
        if use_cache and cache is None:
            cache = DynamicCache()
        if not use_cache:
            cache = None
        static = isinstance(cache, StaticKVCache)
        if attention_mask is not None and attention_mask.dim() == 2 and bool(attention_mask.all()):
            # No padding: one host check here instead of one per layer, and the layers take their
            # fast unmasked paths.
            attention_mask = None
        if static:
            cache.check_step(x.shape[0], x.shape[1])
        if position_ids is None:
            if static:
                # Positions from the device-side lengths: a captured decode step replays at any position.
                position_ids = cache.seqlens[:, None].to(torch.int64) + torch.arange(x.shape[1], device=x.device)
            else:
                past = cache.get_seq_length() if cache is not None else 0
                position_ids = torch.arange(past, past + x.shape[1], device=x.device)[None]
        cos, sin = self.rotary_emb(position_ids, x.dtype)

        for layer in self.layers:
            if checkpointing:
                x = checkpoint(layer, x, cos, sin, attention_mask, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attention_mask, cache)
        if static:
            cache.advance(x.shape[1])
        x = self.norm(x)
        return BaseModelOutputWithPast(last_hidden_state=x, **{_CACHE_FIELD: cache})


class ParallaxForCausalLM(ParallaxPreTrainedModel, GenerationMixin):
    """ParallaxModel plus the LM head; `model(input_ids=..., labels=...).loss` is the next-token loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ParallaxConfig):
        super().__init__(config)
        self.model = ParallaxModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, past_key_values=None, **kwargs):
        """
        Args:
            input_ids: (batch, seqlen) token ids (or inputs_embeds (batch, seqlen, hidden)).
            attention_mask: optional (batch, cached + seqlen) 0/1 key mask (left padding).
            labels: optional (batch, seqlen) targets aligned with input_ids (shifted inside;
                -100 is ignored); the mean token cross-entropy is returned as `loss`.
            logits_to_keep: if > 0, only the last that many positions get logits (generation).
        """
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})


def _register():
    from .registration import register
    register()


_register()
