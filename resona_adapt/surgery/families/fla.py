"""flash-linear-attention (fla) models: GLA, DeltaNet, GatedDeltaNet, RetNet, HGRN2, RWKV6, RWKV7, Mamba, Mamba2.

fla's blocks keep the token mixer in ``.attn`` (``.mixer`` for its Mamba models), call it with
keywords (``hidden_states=``, ``attention_mask=``, ``past_key_values=`` an fla Cache,
``use_cache=``, ``output_attentions=``) and get a tuple back whose first element is the (B, T, D)
output (RWKV7 adds ``v_first`` as a fourth element, which the wrapper passes through unchanged).
Layers listed in ``config.attn["layers"]`` hold fla's softmax ``Attention`` instead (fla hybrids).
fla's Mamba/Mamba2 reuse transformers' model types "mamba"/"mamba2", so these specs are
restricted to classes defined under ``fla.`` and win over the transformers ones for fla models.
Nothing here imports fla.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..registry import ArchSpec, find_path, locate_all_recurrent, register


def _fla_attention_layers(config: Any) -> set[int]:
    attn = getattr(config, "attn", None)
    specs = [attn] if isinstance(attn, dict) else (attn or [])
    return {int(i) for spec in specs if isinstance(spec, dict) for i in spec.get("layers", ())}


def locate_fla(block: nn.Module, index: int, config: Any, spec: ArchSpec) -> tuple[str | None, str, str]:
    """Recurrent unless ``config.attn["layers"]`` lists the layer (fla's hybrid models)."""
    if index in _fla_attention_layers(config):
        attr = find_path(block, spec.attention_attrs)
        name = type(getattr(block, attr)).__name__ if attr else "nothing"
        return attr, "attention", f"config.attn['layers'] lists layer {index} -> attention; .{attr} is {name}"
    return locate_all_recurrent(block, index, config, spec)


_FLA = (
    ("gla", "GLA", "attn", "GatedLinearAttention"),
    ("delta_net", "DeltaNet", "attn", "DeltaNet"),
    ("gated_deltanet", "GatedDeltaNet", "attn", "GatedDeltaNet"),
    ("retnet", "RetNet", "attn", "MultiScaleRetention"),
    ("hgrn2", "HGRN2", "attn", "HGRN2Attention"),
    ("rwkv6", "RWKV6", "attn", "RWKV6Attention"),
    ("rwkv7", "RWKV7", "attn", "RWKV7Attention"),
    ("mamba", "Mamba", "mixer", "Mamba"),
    ("mamba2", "Mamba2", "mixer", "Mamba2"),
)

for _type, _cls, _attr, _mixer in _FLA:
    register(ArchSpec(
        name=f"fla_{_type}", model_types=(_type,), class_names=(f"{_cls}ForCausalLM", f"{_cls}Model"),
        module_prefixes=("fla.",), mixer_attr=_attr, attention_attrs=("attn",), locate=locate_fla,
        cache_kwarg="past_key_values", model_cache_kwarg="past_key_values",
        description=f"fla {_cls}: layers[i].{_attr} ({_mixer})",
    ))
