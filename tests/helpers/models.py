"""Tiny random causal LMs of the Mamba families, and live Resona branches (test helper, not a test file)."""

from __future__ import annotations

import torch

VOCAB = 64
FAMILIES = ("mamba", "mamba2", "falcon_mamba")


def build_tiny(family: str, layers: int = 4, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of the family ("mamba", "mamba2", "falcon_mamba"), in eval mode."""
    from transformers import (
        FalconMambaConfig, FalconMambaForCausalLM, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM,
    )

    torch.manual_seed(seed)
    if family == "mamba":
        model = MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, state_size=4))
    elif family == "mamba2":
        model = Mamba2ForCausalLM(Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, state_size=8,
                                               num_heads=4, head_dim=16, n_groups=1, expand=2, chunk_size=16))
    elif family == "falcon_mamba":
        model = FalconMambaForCausalLM(FalconMambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                                                         state_size=4))
    else:
        raise ValueError(family)
    return model.eval()


def randomize_resona(model: torch.nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Give every Resona parameter non-zero values, as training would (so tests exercise a live branch)."""
    from resona_adapt import resona_parameters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in resona_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def tiny_text_model(vocab: int = 256) -> torch.nn.Module:
    """A tiny random Mamba2 with a byte-sized vocabulary (for `text_tokenizers.byte_tokenizer`), in eval mode."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    return Mamba2ForCausalLM(Mamba2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, state_size=8,
                                          num_heads=4, head_dim=16, n_groups=1, expand=2, chunk_size=16)).eval()
