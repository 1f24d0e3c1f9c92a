"""`HymbaConfig`: the fields of NVIDIA's Hymba ``config.json`` (nvidia/Hymba-1.5B-Base), same names.

Defaults are those of the released 1.5B checkpoint, so ``HymbaConfig()`` describes it. Fields the
released code reads but resona-adapt's implementation ignores are kept so that configs round-trip
(``attn_implementation*``, ``use_mamba_kernels``, ``conv_dim``, ``layer_type``, ``seq_length``,
``calc_logits_for_entire_prompt``, ``num_mamba``, ``kv_weight_reuse``).
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig


class HymbaConfig(PretrainedConfig):
    """Hymba: hybrid-head blocks (attention + SSM heads in parallel), meta tokens, KV sharing, SWA."""

    model_type = "hymba"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32001,
        tie_word_embeddings: bool = True,
        hidden_size: int = 1600,
        intermediate_size: int = 5504,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 25,
        num_key_value_heads: int | None = 5,
        hidden_act: str = "silu",
        mlp_hidden_act: str = "silu",
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        sliding_window: int | None = 1024,
        global_attn_idx: list[int] | None = None,
        max_position_embeddings: int = 8192,
        orig_max_position_embeddings: int | None = 2048,
        attention_dropout: float = 0.0,
        num_experts: int = 1,
        num_experts_per_tok: int = 1,
        output_router_logits: bool = False,
        router_aux_loss_coef: float = 0.001,
        mamba_d_state: int = 16,
        mamba_d_conv: int = 4,
        mamba_expand: int = 2,
        mamba_dt_rank: int | str = "auto",
        mamba_conv_bias: bool = True,
        mamba_proj_bias: bool = False,
        mamba_inner_layernorms: bool = True,
        kv_reuse_every_i_layer: int = -1,
        kv_reuse_group: list[list[int]] | None = None,
        kv_weight_reuse: bool = False,
        num_mamba: int = 1,
        attn_hidden_size: int = -1,
        kq_head_dim: int = -1,
        v_head_dim: int = -1,
        kq_norm: str | None = "none",
        rope: bool = True,
        rope_theta: float = 10000.0,
        rope_type: str | None = "ntk",
        num_memory_tokens: int = 128,
        memory_tokens_interspersed_every: int = 0,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.hidden_act = hidden_act
        self.mlp_hidden_act = mlp_hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.sliding_window = sliding_window
        self.global_attn_idx = list(global_attn_idx) if global_attn_idx is not None else (
            [0, num_hidden_layers // 2 - 1, num_hidden_layers - 1] if sliding_window is not None else None
        )
        self.max_position_embeddings = max_position_embeddings
        self.orig_max_position_embeddings = orig_max_position_embeddings
        self.attention_dropout = attention_dropout
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.output_router_logits = output_router_logits
        self.router_aux_loss_coef = router_aux_loss_coef
        self.mamba_d_state = mamba_d_state
        self.mamba_d_conv = mamba_d_conv
        self.mamba_expand = mamba_expand
        self.mamba_dt_rank = math.ceil(hidden_size / 16) if mamba_dt_rank == "auto" else int(mamba_dt_rank)
        self.mamba_conv_bias = mamba_conv_bias
        self.mamba_proj_bias = mamba_proj_bias
        self.mamba_inner_layernorms = mamba_inner_layernorms
        self.kv_reuse_every_i_layer = kv_reuse_every_i_layer
        self.kv_reuse_group = [list(g) for g in kv_reuse_group] if kv_reuse_group else None
        self.kv_weight_reuse = kv_weight_reuse
        self.num_mamba = num_mamba
        self.attn_hidden_size = attn_hidden_size
        self.kq_head_dim = kq_head_dim
        self.v_head_dim = v_head_dim
        self.kq_norm = kq_norm
        self.rope = rope
        self.rope_theta = rope_theta
        self.rope_type = rope_type
        self.num_memory_tokens = num_memory_tokens
        self.memory_tokens_interspersed_every = memory_tokens_interspersed_every
        # NVIDIA's configs name their attention kernel ("flex"); transformers would read
        # `attn_implementation` as its own setting, so it is kept under the second name they use.
        released = kwargs.pop("attn_implementation", None)
        self.attn_implementation_new = kwargs.pop("attn_implementation_new", released)
        super().__init__(
            pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings, **kwargs,
        )

    # Derived sizes, as NVIDIA's HymbaBlock / HymbaAttention compute them.
    @property
    def ssm_inner_size(self) -> int:
        """Width of the SSM heads and of the attention output: mamba_expand * hidden_size."""
        return int(self.mamba_expand * self.hidden_size)

    @property
    def attn_head_dim(self) -> int:
        """Query/key head dimension."""
        if self.kq_head_dim and self.kq_head_dim > 0:
            return int(self.kq_head_dim)
        width = self.attn_hidden_size if self.attn_hidden_size and self.attn_hidden_size > 0 else self.hidden_size
        return int(width // self.num_attention_heads)

    @property
    def attn_v_head_dim(self) -> int:
        """Value head dimension: the SSM width split over the attention heads (HymbaBlock sets it so)."""
        return self.ssm_inner_size // self.num_attention_heads

    def kv_reuse_layers(self) -> dict[int, int]:
        """consumer layer -> producer layer of its keys/values."""
        out: dict[int, int] = {}
        if self.kv_reuse_group:
            for group in self.kv_reuse_group:
                for consumer in group[1:]:
                    out[int(consumer)] = int(group[0])
        elif self.kv_reuse_every_i_layer and self.kv_reuse_every_i_layer > 0:
            every = self.kv_reuse_every_i_layer
            for i in range(self.num_hidden_layers):
                if i % every:
                    out[i] = i - 1  # keys/values flow down the chain from the group's first layer
        return out

    def uses_sliding_window(self, layer: int) -> bool:
        return self.sliding_window is not None and layer not in (self.global_attn_idx or [])
