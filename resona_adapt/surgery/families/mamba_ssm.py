"""mamba-ssm's ``MambaLMHeadModel`` (and its ``MixerModel`` backbone), recognised by structure.

mamba-ssm models are plain ``nn.Module``s with a dataclass config (no ``model_type``): the
backbone holds ``embedding`` (nn.Embedding) and ``layers`` (a ModuleList of ``Block``s); each
block's ``forward(hidden_states, residual=None, inference_params=None, **mixer_kwargs)`` returns
``(hidden_states, residual)`` and calls ``self.mixer(hidden_states, inference_params=...)``, which
returns the (B, T, D) mixer output. Layers listed in ``config.attn_layer_idx`` hold mamba-ssm's
``MHA`` instead of Mamba/Mamba2. Nothing here imports mamba-ssm (it cannot even be imported on CPU).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ..registry import ArchSpec, find_path, locate_all_recurrent, register


def is_mamba_ssm_model(model: nn.Module) -> bool:
    """True for a mamba-ssm LM or backbone: embedding + layers of blocks that take (residual, inference_params)."""
    backbone = getattr(model, "backbone", model)
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return False
    if not isinstance(getattr(backbone, "embedding", None), nn.Embedding):
        return False
    block = layers[0]
    params = inspect.signature(block.forward).parameters
    return isinstance(getattr(block, "mixer", None), nn.Module) and "residual" in params and "inference_params" in params


def locate_mamba_ssm(block: nn.Module, index: int, config: Any, spec: ArchSpec) -> tuple[str | None, str, str]:
    attn_layers = set(getattr(config, "attn_layer_idx", None) or ())
    if index in attn_layers:
        attr = find_path(block, spec.attention_attrs)
        name = type(getattr(block, attr)).__name__ if attr else "nothing"
        return attr, "attention", f"config.attn_layer_idx lists layer {index} -> attention; .{attr} is {name}"
    attr, kind, reason = locate_all_recurrent(block, index, config, spec)
    return attr, kind, reason.replace("mamba_ssm block", "mamba-ssm Block (returns (hidden, residual))")


register(ArchSpec(
    name="mamba_ssm", class_names=("MambaLMHeadModel", "MixerModel"), matches=is_mamba_ssm_model,
    mixer_attr="mixer", attention_attrs=("mixer",), locate=locate_mamba_ssm,
    cache_kwarg="inference_params", model_cache_kwarg="inference_params",
    description="mamba-ssm MambaLMHeadModel: backbone.layers[i].mixer (Mamba/Mamba2; MHA in attn_layer_idx)",
    notes="recognised by structure; blocks return (hidden, residual); mixers take inference_params",
))
