"""`HymbaCache`: what Hymba keeps between decoding steps, per layer.

- keys/values of the attention heads (B, kv_heads, S, d) for the layers that compute their own
  (consumers of a KV-reuse group read their producer's); the full history is kept and the
  sliding window is applied by the attention mask, so cached decoding equals a full forward;
- the SSM heads' convolution window (B, I, d_conv) and scan state (B, I, d_state), in float32;
- ``seen_tokens``: positions processed so far, meta tokens included (positions of new tokens
  start there), and ``real_tokens``: input tokens processed (what ``generate`` slices by).
It subclasses transformers' ``DynamicCache`` only so that generation utilities accept it; its
storage is its own.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache


class HymbaCache(DynamicCache):
    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.key_cache: list[Tensor | None] = [None] * num_layers
        self.value_cache: list[Tensor | None] = [None] * num_layers
        self.conv_states: list[Tensor | None] = [None] * num_layers
        self.ssm_states: list[Tensor | None] = [None] * num_layers
        self.seen_tokens = 0
        self.real_tokens = 0
        self.next_position: Tensor | None = None  # (B,) rotary position of each row's next token
        self.key_kinds: Tensor | None = None  # (B, S) pad / meta / input, for the attention masks

    def __len__(self) -> int:
        return self.num_layers

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(kv_length, kv_offset) for transformers' mask helpers: the full history is kept (the sliding
        window is a mask, not a trim), so every layer sees all positions so far plus the new ones."""
        return self.seen_tokens + query_length, 0

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, cache_kwargs=None) -> tuple[Tensor, Tensor]:
        """Append (B, kvH, q, d) keys/values of layer ``layer_idx``; returns the full history."""
        if self.key_cache[layer_idx] is None:
            self.key_cache[layer_idx], self.value_cache[layer_idx] = key_states, value_states
        else:
            self.key_cache[layer_idx] = torch.cat([self.key_cache[layer_idx], key_states], dim=-2)
            self.value_cache[layer_idx] = torch.cat([self.value_cache[layer_idx], value_states], dim=-2)
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def advance(self, positions: int, real: int) -> None:
        """Record a forward over ``positions`` positions of which ``real`` were input tokens."""
        self.seen_tokens += positions
        self.real_tokens += real

    def _map(self, fn) -> None:
        for store in (self.key_cache, self.value_cache, self.conv_states, self.ssm_states):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = fn(t)
        if self.next_position is not None:
            self.next_position = fn(self.next_position)
        if self.key_kinds is not None:
            self.key_kinds = fn(self.key_kinds)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def crop(self, max_length: int) -> None:
        raise RuntimeError("HymbaCache cannot be cropped: the SSM state cannot be rolled back")
