"""flash-linear-attention models on CPU (test helper, not a test file).

fla's kernels are Triton kernels. On a machine without a GPU they run only through Triton's
interpreter, which needs three things, all arranged for the tests:
1. ``TRITON_INTERPRET=1`` before fla is first imported (tests/conftest.py sets it for the session);
2. no autotuning: the autotuner benchmarks every config through a GPU driver and fails with
   "0 active drivers" without one. `keep_first_autotune_config` patches
   ``triton.runtime.autotuner.Autotuner.prune_configs`` to keep only the first config (a config
   list of length one is never benchmarked); the interpreter ignores warps/stages anyway;
3. float32, short inputs (T <= 64: fla's layers then take their fused-recurrent paths) and eval mode.
The interpreter compiles nothing but runs every program instance in Python: the first call of each
kernel costs seconds, later calls of the same shapes a fraction of a second.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from .models import VOCAB

FLA_INSTALLED = importlib.util.find_spec("fla") is not None and importlib.util.find_spec("triton") is not None
SKIP_REASON = "flash-linear-attention is not installed (pip install -e '.[dev,fla]')"


def keep_first_autotune_config() -> None:
    """Make every Triton autotuner use its first config without benchmarking (idempotent)."""
    from triton.runtime import autotuner

    original = autotuner.Autotuner.prune_configs
    if getattr(original, "_resona_first_only", False):
        return

    def first_only(self: Any, kwargs: dict) -> list:
        return original(self, kwargs)[:1]

    first_only._resona_first_only = True  # type: ignore[attr-defined]
    autotuner.Autotuner.prune_configs = first_only


# family -> (config class, model class, config kwargs); width 32, 2 layers, float32
FLA_CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gla": ("GLAConfig", "GLAForCausalLM", dict(num_heads=2, expand_k=0.5, expand_v=1)),
    "delta_net": ("DeltaNetConfig", "DeltaNetForCausalLM", dict(num_heads=2)),
    "gated_deltanet": ("GatedDeltaNetConfig", "GatedDeltaNetForCausalLM", dict(num_heads=2, head_dim=16, expand_v=1)),
    "retnet": ("RetNetConfig", "RetNetForCausalLM", dict(num_heads=2)),
    "hgrn2": ("HGRN2Config", "HGRN2ForCausalLM", dict(num_heads=2, expand_ratio=8)),
    "rwkv6": ("RWKV6Config", "RWKV6ForCausalLM", dict(num_heads=2)),
    "rwkv7": ("RWKV7Config", "RWKV7ForCausalLM", dict(head_dim=16)),
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(state_size=4)),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM", dict(num_heads=4, head_dim=16, state_size=8, n_groups=1,
                                                         expand=2, chunk_size=16)),
}


def build_fla(family: str, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A tiny random fla causal LM in eval mode (fused norms/losses off: they are Triton-only)."""
    import fla.models as fla_models

    keep_first_autotune_config()
    cfg_name, model_name, kwargs = FLA_CONFIGS[family]
    config = getattr(fla_models, cfg_name)(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, fuse_norm=False, fuse_swiglu=False,
        fuse_cross_entropy=False, **kwargs,
    )
    torch.manual_seed(seed)
    return getattr(fla_models, model_name)(config).eval()


def restore_transformers_model_types() -> list[str]:
    """Undo fla's takeover of transformers' own model types in the Auto mappings.

    Importing ``fla.models`` registers its Mamba/Mamba2 configs under the model types "mamba" and
    "mamba2" (``AutoConfig.register(..., exist_ok=True)``), so afterwards plain
    ``AutoModelForCausalLM.from_pretrained`` loads a transformers Mamba checkpoint as fla's model.
    resona-adapt's loader resolves classes explicitly and is not affected; this restores the
    mapping for the other tests (transformers itself imports fla as soon as a Qwen3-Next, Qwen3.5,
    OLMo-hybrid, Kimi-Linear or Bailing modeling module loads). Returns the model types restored.
    """
    import sys

    if "fla.models" not in sys.modules:
        return []
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    extra = CONFIG_MAPPING._extra_content
    taken = [k for k, cls in extra.items() if k in CONFIG_MAPPING._mapping and cls.__module__.startswith("fla.")]
    for key in taken:
        del extra[key]
    return taken
