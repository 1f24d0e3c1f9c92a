"""The architecture registry: where each known family keeps its blocks and its token mixers.

An `ArchSpec` says where the decoder-layer list lives (relative to the model's base model), which
attribute of each block holds the token mixer, and what kind each block is (recurrent, attention,
mlp). Families are matched by ``config.model_type`` first, then by model class name (for
remote-code classes). Unknown architectures go through `discover.generic_discovery` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

BlockKind = str  # "recurrent" | "attention" | "mlp" | "other"
KINDS: tuple[BlockKind, ...] = ("recurrent", "attention", "mlp", "other")


def _all_recurrent(block: nn.Module, index: int, config: Any, spec: "ArchSpec") -> tuple[str | None, BlockKind, str]:
    if not hasattr(block, spec.mixer_attr):
        return None, "other", f"no .{spec.mixer_attr} attribute"
    mixer = getattr(block, spec.mixer_attr)
    return spec.mixer_attr, "recurrent", f"{spec.name} block: .{spec.mixer_attr} is {type(mixer).__name__}"


@dataclass(frozen=True)
class ArchSpec:
    """Where a family keeps its decoder layers and mixers.

    ``locate(block, index, config, spec)`` returns ``(mixer attribute or None, kind, reason)``.
    """

    name: str
    model_types: tuple[str, ...]
    class_names: tuple[str, ...] = ()
    layers_attr: str = "layers"
    mixer_attr: str = "mixer"
    locate: Callable[[nn.Module, int, Any, "ArchSpec"], tuple[str | None, BlockKind, str]] = field(
        default=_all_recurrent, compare=False
    )
    description: str = ""


REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    """Add (or replace) a family in the registry."""
    REGISTRY[spec.name] = spec
    return spec


def spec_for(model: nn.Module) -> ArchSpec | None:
    """The registered family of ``model``, matched by ``config.model_type`` then by class name."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for spec in REGISTRY.values():
        if model_type is not None and model_type in spec.model_types:
            return spec
    names = {cls.__name__ for cls in type(model).__mro__}
    for spec in REGISTRY.values():
        if names & set(spec.class_names):
            return spec
    return None


def supported_architectures() -> list[str]:
    return sorted(REGISTRY)


register(ArchSpec(
    name="mamba", model_types=("mamba",), class_names=("MambaForCausalLM", "MambaModel"),
    description="transformers Mamba: backbone.layers[i].mixer (MambaMixer)",
))
register(ArchSpec(
    name="mamba2", model_types=("mamba2",), class_names=("Mamba2ForCausalLM", "Mamba2Model"),
    description="transformers Mamba2: backbone.layers[i].mixer (Mamba2Mixer)",
))
register(ArchSpec(
    name="falcon_mamba", model_types=("falcon_mamba",),
    class_names=("FalconMambaForCausalLM", "FalconMambaModel"),
    description="transformers FalconMamba: backbone.layers[i].mixer (FalconMambaMixer)",
))
