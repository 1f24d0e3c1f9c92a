"""Tiny random models of every transformers family the registry knows (test helper, not a test file).

Each builder returns a causal LM in eval mode, width 32 (64 for xLSTM, whose cache needs
``hidden_size * qk_dim_factor`` to be a multiple of 64: the known upstream bug with
qk_dim_factor != 1 is avoided, not tested), vocabulary 64, 4-5 layers, with at least one layer of
each kind for hybrids. ``torch_fallback_kernels`` makes transformers use its own PyTorch
implementations where, with flash-linear-attention installed, it would bind fla's Triton kernels
(which need a GPU driver on this CPU-only machine).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from .models import VOCAB

_TOK = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family -> (config class, model class, config kwargs)
CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "rwkv": ("RwkvConfig", "RwkvForCausalLM", dict(hidden_size=32, num_hidden_layers=4, context_length=64,
                                                     rescale_every=2)),
    "jamba": ("JambaConfig", "JambaForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
        num_experts=2, num_experts_per_tok=1, expert_layer_period=2, expert_layer_offset=1, attn_layer_period=4,
        attn_layer_offset=2, mamba_d_state=4, use_mamba_kernels=False)),
    "zamba": ("ZambaConfig", "ZambaForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=2, num_key_value_heads=2,
        n_mamba_heads=2, attn_layer_period=3, attn_layer_offset=1, mamba_d_state=4, use_mamba_kernels=False)),
    "zamba2": ("Zamba2Config", "Zamba2ForCausalLM", dict(
        hidden_size=32, num_hidden_layers=5, num_attention_heads=2, num_key_value_heads=2, n_mamba_heads=2,
        mamba_d_state=4, mamba_ngroups=1, chunk_size=16, use_mamba_kernels=False,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "mamba"])),
    "bamba": ("BambaConfig", "BambaForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
        attn_layer_indices=[2], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=16)),
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
        mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=16)),
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
        full_attn_idxs=[2], block_multiple_of=16)),
    "lfm2_moe": ("Lfm2MoeConfig", "Lfm2MoeForCausalLM", dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, num_dense_layers=1, num_experts=2, num_experts_per_tok=1,
        layer_types=["conv", "conv", "full_attention", "conv"])),
    "lfm3": ("Lfm3Config", "Lfm3ForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, sliding_window=8, layer_types=["conv", "conv", "full_attention", "conv"], **_TOK)),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=4, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=2,
        num_experts_per_tok=1)),
    "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=4)),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=2, num_experts_per_tok=1)),
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
        num_local_experts=2, num_experts_per_tok=1, shared_intermediate_size=32,
        layer_types=["mamba", "mamba", "attention", "mamba"], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
        mamba_chunk_size=16)),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=16, n_groups=1, chunk_size=16, num_hidden_layers=5,
        layers_block_type=["mamba", "mlp", "attention", "mamba", "mamba"])),
    "recurrent_gemma": ("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, lru_width=32,
        attention_window_size=16)),
    "xlstm": ("xLSTMConfig", "xLSTMForCausalLM", dict(
        hidden_size=64, num_hidden_layers=4, num_heads=2, qk_dim_factor=1.0, chunk_size=4)),
    "kimi_linear": ("KimiLinearConfig", "KimiLinearForCausalLM", dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=8,
        num_experts_per_tok=1, num_local_experts=2, linear_head_dim=8, linear_num_heads=2,
        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"], **_TOK)),
    "olmo_hybrid": ("OlmoHybridConfig", "OlmoHybridForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, linear_num_key_heads=2,
        linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=16, pad_token_id=0,
        eos_token_id=2)),
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, num_local_experts=2, num_experts_per_tok=1, block_size=8)),
    "bailing_hybrid": ("BailingHybridConfig", "BailingHybridForCausalLM", dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=8,
        num_experts_per_tok=1, num_local_experts=2, n_group=1, topk_group=1, head_dim=16, layer_group_size=2,
        first_k_dense_replace=1, pad_token_id=0, eos_token_id=2)),
}


def torch_fallback_kernels() -> None:
    """Point transformers' modeling modules back at their PyTorch kernels.

    ``use_kernel_func_from_hub_with_fallback`` binds fla's (or mamba-ssm's) function at import time
    when the package can be imported, and keeps the PyTorch version as ``__wrapped__``. fla imports
    fine on CPU but its kernels need a GPU driver, so for these tests the module-level names are
    reset to the PyTorch implementation.
    """
    for name, module in list(sys.modules.items()):
        if not name.startswith("transformers.models.") or not name.rsplit(".", 1)[-1].startswith("modeling_"):
            continue
        for attr, value in list(vars(module).items()):
            code = getattr(value, "__code__", None)
            if code is not None and "implementation" in code.co_freevars and hasattr(value, "__wrapped__"):
                setattr(module, attr, value.__wrapped__)


def build_family(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of a transformers family, in eval mode."""
    import transformers

    cfg_name, model_name, kwargs = CONFIGS[family]
    config = getattr(transformers, cfg_name)(vocab_size=VOCAB, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    torch_fallback_kernels()
    return model
