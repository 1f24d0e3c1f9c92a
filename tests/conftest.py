"""Shared fixtures: one torch thread, tiny random models of each Mamba family, built on the fly."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
if not torch.cuda.is_available():
    # flash-linear-attention's Triton kernels run on CPU only through Triton's interpreter, which must
    # be chosen before fla is first imported (its @triton.jit decorators read it at import time), and
    # transformers imports fla as soon as a Qwen3-Next/Qwen3.5/OLMo-hybrid/Kimi/Bailing modeling module
    # loads. So it is set here, for the whole session. See tests/fla_support.py.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB = 64


@pytest.fixture(autouse=True)
def _transformers_keeps_its_model_types():
    """After each test, undo fla's re-registration of "mamba"/"mamba2" (see fla_support)."""
    yield
    from fla_support import restore_transformers_model_types

    restore_transformers_model_types()


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


FAMILIES = ("mamba", "mamba2", "falcon_mamba")


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def randomize_resona(model: torch.nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Give every Resona parameter non-zero values, as training would (so tests exercise a live branch)."""
    from resona_adapt import resona_parameters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in resona_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * scale)
