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


BUILTIN_MODELS: dict[str, Callable[[], PreTrainedModel]] = {
    "tiny-mamba": _mamba,
    "tiny-mamba2": _mamba2,
    "tiny-falcon-mamba": _falcon_mamba,
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
