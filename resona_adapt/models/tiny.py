"""Built-in tiny models, built on the fly from a seed: the no-download default for the CLI and tests."""

from __future__ import annotations

from typing import Callable

import torch
from transformers import PreTrainedModel


def _mamba() -> PreTrainedModel:
    from transformers import MambaConfig, MambaForCausalLM

    return MambaForCausalLM(MambaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=12, state_size=8,
                                        expand=2, conv_kernel=4))


def _mamba2() -> PreTrainedModel:
    from transformers import Mamba2Config, Mamba2ForCausalLM

    return Mamba2ForCausalLM(Mamba2Config(vocab_size=512, hidden_size=64, num_hidden_layers=12, state_size=16,
                                          num_heads=8, head_dim=16, n_groups=1, expand=2, chunk_size=64))


def _falcon_mamba() -> PreTrainedModel:
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    return FalconMambaForCausalLM(FalconMambaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=12,
                                                    state_size=8, expand=2, conv_kernel=4))


def _hymba() -> PreTrainedModel:
    from .hymba import HymbaConfig, HymbaForCausalLM

    return HymbaForCausalLM(HymbaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=16, global_attn_idx=[0, 5, 11],
        kv_reuse_group=[[1, 2], [3, 4], [6, 7], [8, 9, 10]], num_memory_tokens=8, mamba_d_state=8, mamba_dt_rank=8,
        max_position_embeddings=1024, orig_max_position_embeddings=512,
    ))


BUILTIN_MODELS: dict[str, Callable[[], PreTrainedModel]] = {
    "tiny-mamba": _mamba,
    "tiny-mamba2": _mamba2,
    "tiny-falcon-mamba": _falcon_mamba,
    "tiny-hymba": _hymba,
}


def build_builtin(name: str, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised tiny model (12 layers, width 64, vocabulary 512), the same for a seed."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = BUILTIN_MODELS[name]()
    finally:
        torch.random.set_rng_state(state)
    model.name_or_path = name
    return model.eval()
