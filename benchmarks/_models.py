"""The models the benchmarks run: Mamba- and Mamba2-shaped LMs of the 130M size, built locally.

Random initialisation (nothing is downloaded); speed and memory do not depend on the weights.
On CPU, transformers runs both families through its pure-PyTorch paths (no mamba-ssm /
causal-conv1d kernels), which is the baseline every ratio here is relative to.
"""

from __future__ import annotations

import torch


def build_lm(family: str, quick: bool = False, seed: int = 0) -> torch.nn.Module:
    """A causal LM in eval mode: ``mamba`` (state-spaces/mamba-130m shape) or ``mamba2``
    (mamba2-130m shape); ``quick`` gives a small model of the same family for smoke runs."""
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    width, layers, vocab = (256, 8, 4096) if quick else (768, 24, None)
    if family == "mamba":
        cfg = MambaConfig(vocab_size=vocab or 50280, hidden_size=width, num_hidden_layers=layers, state_size=16,
                          expand=2, conv_kernel=4, tie_word_embeddings=True)
        model = MambaForCausalLM(cfg)
    elif family == "mamba2":
        cfg = Mamba2Config(vocab_size=vocab or 50288, hidden_size=width, num_hidden_layers=layers,
                           state_size=128, head_dim=64, num_heads=2 * width // 64, n_groups=1, expand=2,
                           conv_kernel=4, chunk_size=256, tie_word_embeddings=True)
        model = Mamba2ForCausalLM(cfg)
    else:
        raise ValueError(f"unknown family {family!r}: use mamba or mamba2")
    return model.eval()


def retrofitted(family: str, quick: bool = False, chunk_size: int = 64, top_k: int = 2) -> torch.nn.Module:
    """The same model (same seed) with Resona branches at the default layers (shallowest, middle,
    deepest: 0, 12, 23 for 24 layers), base frozen; trained-looking branch weights
    (the zero-initialised output projection would otherwise let nothing depend on the branch)."""
    from resona_adapt import ResonaConfig, resona_parameters, retrofit

    model = build_lm(family, quick)
    retrofit(model, config=ResonaConfig(chunk_size=chunk_size, top_k=top_k))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in resona_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model
