"""NVIDIA's remote-code Hymba (``--trust-remote-code``) after transformers 5 loaded it.

The released ``modeling_hymba.py`` computes its rotary tables (``LlamaRotaryEmbedding.inv_freq``, a
non-persistent buffer, so not in the checkpoint) in ``__init__``. transformers 5 builds models on the
meta device and then fills in only the checkpoint's tensors, so those tables come out as
uninitialised memory and every attention head rotates by garbage (measured with
examples/verify_hymba_upstream.py: logits off by ~0.4 on a tiny model, different on every load).
`restore_rotary_tables` recomputes them with the released class itself.
"""

from __future__ import annotations

import torch
from torch import nn


def _is_remote_rotary(module: nn.Module) -> bool:
    return (type(module).__name__ == "LlamaRotaryEmbedding" and type(module).__module__.startswith("transformers_modules")
            and all(hasattr(module, a) for a in ("config", "dim", "base", "inv_freq")))


def restore_rotary_tables(model: nn.Module) -> int:
    """Recompute the rotary ``inv_freq`` (and ``original_inv_freq``) of every remote-code Hymba attention
    module from its config, on CPU, then move them where the old buffer was. Returns how many."""
    count = 0
    for module in model.modules():
        if not _is_remote_rotary(module):
            continue
        old = module.inv_freq
        with torch.device("cpu"):
            fresh = type(module)(config=module.config, dim=module.dim, base=module.base, device=torch.device("cpu"))
        module.register_buffer("inv_freq", fresh.inv_freq.to(old.device), persistent=False)
        if hasattr(fresh, "original_inv_freq"):
            module.original_inv_freq = fresh.original_inv_freq.to(old.device)
        if hasattr(fresh, "max_seq_len_cached"):
            module.max_seq_len_cached = fresh.max_seq_len_cached
        count += 1
    return count
