"""A fixed-capacity KV cache whose decode steps can be captured in a CUDA graph.

transformers' DynamicCache grows by concatenation, so every step allocates and the step cannot be
replayed from a graph. StaticKVCache preallocates (batch, heads_kv, capacity, head_dim) per layer
(the layout of transformers' StaticCache) and keeps each sequence's length in a device tensor,
``seqlens``: a decode step reads and advances it on the device, so one captured step replays for
every position. Slots at or past a sequence's length may hold anything; no path reads them.

The model drives it: layers append their k, v at ``seqlens`` and attend; after the last layer the
model calls ``advance``. A layer used on its own must be followed by ``advance`` the same way.
"""

from __future__ import annotations

import torch

from ..ops.kvcache import _append


class StaticKVCache:
    """Preallocated KV cache for `num_layers` layers.

    Args:
        num_layers: layers that write to it (a layer's ``layer_idx`` indexes it).
        batch_size, capacity: sequences and the tokens each can hold (prompt + generated).
        num_kv_heads, head_dim: the layers' key/value shape.
        dtype, device: of the keys and values (the model's compute dtype and device).

    Attributes:
        seqlens: (batch,) int32 on `device`, tokens cached per sequence before the current step.
        length: the same as a host int while it is known and equal for all sequences (after
            ``reset`` and eager steps); None once steps ran where the host cannot follow them
            (graph replays), until ``set_length``. Prefill chunks longer than a decode step need it.
    """

    def __init__(self, num_layers: int, batch_size: int, capacity: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        for name, val in (("num_layers", num_layers), ("batch_size", batch_size), ("capacity", capacity),
                          ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}: expected a positive int, got {val!r}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.batch_size, self.capacity, self.num_layers = batch_size, capacity, num_layers
        self.num_kv_heads, self.head_dim, self.dtype, self.device = num_kv_heads, head_dim, dtype, device
        self.length: int | None = 0
        self._masks: dict = {}

    @classmethod
    def for_model(cls, config, batch_size: int, capacity: int, *, dtype: torch.dtype,
                  device: torch.device | str) -> "StaticKVCache":
        """A cache shaped for a ParallaxConfig (or any config with the Qwen3 attribute names)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, batch_size, capacity, config.num_key_value_heads, head_dim,
                   dtype=dtype, device=device)

    def reset(self) -> None:
        """Forget all sequences (lengths to zero); the storage is reused as is."""
        self.seqlens.zero_()
        self.length = 0
        self._masks.clear()

    def set_length(self, length: int) -> None:
        """Tell the host the common length of all sequences (e.g. after replayed graph steps)."""
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self.capacity:
            raise ValueError(f"length: expected an int in [0, capacity={self.capacity}], got {length!r}")
        self.length = length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached (the longest sequence); a host synchronisation when the host does not know it."""
        return self.length if self.length is not None else int(self.seqlens.max())

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer_idx`'s keys and values as (batch, capacity, heads_kv, head_dim) strided views."""
        if not 0 <= layer_idx < self.num_layers:
            raise IndexError(f"layer_idx: expected 0 <= layer_idx < {self.num_layers}, got {layer_idx}")
        return self.keys[layer_idx].transpose(1, 2), self.values[layer_idx].transpose(1, 2)

    def check_step(self, batch_size: int, new_tokens: int) -> None:
        """Raise before a step that would not fit (when the host knows the length)."""
        if batch_size != self.batch_size:
            raise ValueError(f"input: expected batch {self.batch_size} (the cache's batch_size), got {batch_size}")
        if self.length is not None and self.length + new_tokens > self.capacity:
            raise ValueError(f"cache: {self.length} cached + {new_tokens} new tokens exceed the capacity "
                             f"{self.capacity}; build the StaticKVCache with a larger capacity")

    def write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (batch, seqlen_new, heads_kv, head_dim) at positions seqlens .. seqlens + seqlen_new - 1."""
        kc, vc = self.layer(layer_idx)
        if self.length is not None:
            kc[:, self.length:self.length + k.shape[1]] = k
            vc[:, self.length:self.length + k.shape[1]] = v
        else:
            _append(kc, vc, k, v, self.seqlens, 0, None)

    def visible(self, new_tokens: int, window: tuple[int, int], group: int = 1) -> torch.Tensor:
        """Boolean (batch, 1, group * new_tokens, capacity) mask of the keys each new query sees this step.

        Query i of a sequence with n cached tokens sits at position n + i and sees keys j <= n + i
        (and j >= n + i - window[0] when window[0] >= 0). The query rows repeat `group` times so that
        the query heads sharing a kv head can be folded into the row dimension. Built once per step
        and shared by the layers; ``advance`` drops it.
        """
        key = (new_tokens, window, group)
        mask = self._masks.get(key)
        if mask is None:
            j = torch.arange(self.capacity, device=self.device)
            pos = self.seqlens.to(torch.int64)[:, None] + torch.arange(new_tokens, device=self.device)
            mask = j <= pos[..., None]
            if window[0] >= 0:
                mask = mask & (j >= pos[..., None] - window[0])
            mask = mask[:, None, None].expand(-1, 1, group, -1, -1).reshape(self.batch_size, 1,
                                                                            group * new_tokens, self.capacity)
            self._masks[key] = mask
        return mask

    def advance(self, new_tokens: int) -> None:
        """End a step that added `new_tokens` to every sequence."""
        self.seqlens.add_(new_tokens)
        if self.length is not None:
            self.length += new_tokens
        self._masks.clear()

    def __repr__(self) -> str:
        return (f"StaticKVCache(layers={self.num_layers}, batch_size={self.batch_size}, capacity={self.capacity}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, length={self.length})")
