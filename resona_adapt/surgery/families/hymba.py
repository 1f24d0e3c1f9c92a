"""Hymba (NVIDIA): hybrid-head blocks, recognised by model type and by the remote-code class names.

Every decoder layer ``model.layers[i]`` runs ``.mamba`` (a ``HymbaBlock``): one input projection
feeds attention heads (``.mamba.self_attn``, sliding-window except the ``global_attn_idx`` layers,
keys/values possibly reused from an earlier layer of its ``kv_reuse_group``) and SSM heads in
parallel; their outputs are normalised per branch, averaged, and projected by ``out_proj``.
The backbone prepends ``num_memory_tokens`` learned meta tokens after the embedding, so the layers
see M + T positions while X (the embedding output) has T: ``prefix_tokens`` tells the Resona
layer to run on the last T positions (see docs/method.md, "Hymba").

Two surgeries: by default Resona is a third branch added to ``.mamba``'s output (function-preserving);
with ``ResonaConfig.replace_attention`` the attention heads ``.mamba.self_attn`` are swapped for a
Resona branch whose output goes through the block's per-branch norm and averaging (the paper's
Table 5 ablation), while the original heads still run to feed the layers that reuse their keys
and values. The same spec serves resona-adapt's own pure-PyTorch Hymba (models/hymba) and
NVIDIA's remote code, whose ``HymbaDecoderLayer`` calls ``self.mamba(..., past_key_value=...)``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...errors import SurgeryError
from ..registry import ArchSpec, register


def kv_groups(config: Any) -> list[list[int]]:
    """The KV-reuse groups of a Hymba config: [producer, consumer, ...] lists."""
    groups = getattr(config, "kv_reuse_group", None)
    if groups:
        return [list(map(int, g)) for g in groups]
    every = int(getattr(config, "kv_reuse_every_i_layer", -1) or -1)
    n = int(getattr(config, "num_hidden_layers", 0))
    if every > 0:
        return [list(range(p, min(p + every, n))) for p in range(0, n, every) if min(p + every, n) - p > 1]
    return []


def _attention_kind(config: Any, index: int) -> str:
    window = getattr(config, "sliding_window", None)
    globals_ = getattr(config, "global_attn_idx", None) or []
    if window is None or index in globals_:
        return "global attention"
    return f"sliding-window attention ({window})"


def locate_hymba(block: nn.Module, index: int, config: Any, spec: ArchSpec) -> tuple[str | None, str, str]:
    mixer = getattr(block, "mamba", None)
    if not isinstance(mixer, nn.Module):
        return None, "other", f"{type(block).__name__} has no .mamba hybrid-head block"
    kv = ""
    for group in kv_groups(config):
        if index == group[0]:
            kv = f"; produces K/V for layers {group[1:]}"
        elif index in group[1:]:
            kv = f"; reuses K/V of layer {group[0]}"
    return "mamba", "recurrent", (
        f"hybrid-head block: {_attention_kind(config, index)} + SSM heads in parallel{kv}; "
        f".mamba is {type(mixer).__name__}; cache keyword past_key_value"
    )


def hymba_prefix(config: Any) -> int:
    """Meta tokens the backbone prepends after the embedding (0 when none)."""
    if int(getattr(config, "memory_tokens_interspersed_every", 0) or 0) > 0:
        raise SurgeryError(
            "this Hymba config intersperses meta tokens every "
            f"{config.memory_tokens_interspersed_every} tokens; Resona supports meta tokens only as a prefix "
            "(memory_tokens_interspersed_every = 0, as in the released checkpoints)"
        )
    return int(getattr(config, "num_memory_tokens", 0) or 0)


register(ArchSpec(
    name="hymba", model_types=("hymba",), class_names=("HymbaForCausalLM", "HymbaModel"),
    mixer_attr="mamba", attention_attrs=("mamba.self_attn",), locate=locate_hymba,
    cache_kwarg="past_key_value", model_cache_kwarg="past_key_values",
    prefix_tokens=hymba_prefix, attention_swap_attr="mamba.self_attn",
    description="Hymba: model.layers[i].mamba (HymbaBlock: attention + SSM heads in parallel)",
    notes="meta tokens are skipped by the branch; replace_attention swaps .mamba.self_attn",
))
