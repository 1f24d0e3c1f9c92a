"""Tiny Hymba models and checkpoints written in the official layout (test helper, not a test file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from resona_adapt.models.hymba import HymbaConfig, HymbaForCausalLM

from .models import VOCAB

M = 4  # meta tokens

# The structure of nvidia/Hymba-1.5B-Base's config.json, scaled down: 6 layers, global attention in
# layers 0, 3, 5, sliding window elsewhere, layer 2 reusing layer 1's keys/values, 4 meta tokens.
OFFICIAL_CONFIG: dict[str, Any] = {
    "architectures": ["HymbaForCausalLM"],
    "attention_dropout": 0.0,
    "attn_hidden_size": -1,
    "attn_implementation": "flex",
    "attn_implementation_new": "flex",
    "auto_map": {"AutoConfig": "configuration_hymba.HymbaConfig", "AutoModelForCausalLM": "modeling_hymba.HymbaForCausalLM"},
    "bos_token_id": 1,
    "calc_logits_for_entire_prompt": False,
    "conv_dim": {str(i): 64 for i in range(6)},
    "eos_token_id": 2,
    "global_attn_idx": [0, 3, 5],
    "hidden_act": "silu",
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 48,
    "kq_head_dim": -1,
    "kq_norm": "none",
    "kv_reuse_every_i_layer": -1,
    "kv_reuse_group": [[1, 2]],
    "kv_weight_reuse": False,
    "layer_type": ["h"] * 6,
    "mamba_conv_bias": True,
    "mamba_d_conv": 4,
    "mamba_d_state": 4,
    "mamba_dt_rank": 4,
    "mamba_expand": 2,
    "mamba_inner_layernorms": True,
    "mamba_proj_bias": False,
    "max_position_embeddings": 64,
    "memory_tokens_interspersed_every": 0,
    "mlp_hidden_act": "silu",
    "model_type": "hymba",
    "num_attention_heads": 4,
    "num_experts": 1,
    "num_experts_per_tok": 1,
    "num_hidden_layers": 6,
    "num_key_value_heads": 2,
    "num_mamba": 1,
    "num_memory_tokens": M,
    "orig_max_position_embeddings": 32,
    "output_router_logits": False,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-06,
    "rope": True,
    "rope_theta": 10000.0,
    "rope_type": "ntk",
    "router_aux_loss_coef": 0.001,
    "seq_length": 64,
    "sliding_window": 6,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "transformers_version": "4.44.0",
    "use_cache": False,
    "use_mamba_kernels": True,
    "v_head_dim": 16,
    "vocab_size": VOCAB,
}


def tiny_hymba_config(**overrides: Any) -> HymbaConfig:
    fields = {k: v for k, v in OFFICIAL_CONFIG.items() if k not in ("architectures", "auto_map", "transformers_version")}
    return HymbaConfig(**{**fields, **overrides})


def build_hymba(seed: int = 0, **overrides: Any) -> HymbaForCausalLM:
    torch.manual_seed(seed)
    return HymbaForCausalLM(tiny_hymba_config(**overrides)).eval()


def write_official_checkpoint(model: HymbaForCausalLM, path: Path, with_lm_head: bool = False) -> Path:
    """config.json and model.safetensors as NVIDIA's repository lays them out (no code is copied: the
    directory references configuration_hymba.py / modeling_hymba.py through auto_map, as the hub repo does)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(OFFICIAL_CONFIG, indent=2))
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if not with_lm_head:
        tensors.pop("lm_head.weight")  # tied to model.embed_tokens.weight
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
