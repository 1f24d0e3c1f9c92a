"""Find a model's decoder-layer list, its blocks, their token mixers and what kind each block is.

Three ways, in this order: an explicit override (``block_path``/``mixer_attr``), the registry of
known families, and a generic structural search (the largest list of blocks; mixers recognised by
attribute and class name). `Discovery.method` records which one answered, and every `BlockInfo`
carries the reason for its kind, so ``inspect`` can show what was found and why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import SurgeryError
from .registry import (
    ArchSpec, BlockKind, config_layer_types, find_path, get_path, kind_of_layer_type, spec_for,
    supported_architectures,
)

MIXER_ATTRS = (
    "mixer", "mamba", "ssm", "linear_attn", "attn", "self_attn", "attention", "time_mixer",
    "token_mixer", "temporal_block", "mlstm_layer", "conv", "mamba_decoder.mamba", "feed_forward", "mlp",
)
_RECURRENT = re.compile(
    r"mamba|ssm|mixer|rwkv|gla|delta|retention|retnet|hgrn|lightning|linear.?att|recurren|rglru|"
    r"lstm|hyena|gated.?conv|shortconv|s4|s5|kda",
    re.IGNORECASE,
)
_ATTENTION = re.compile(r"attention|attn", re.IGNORECASE)
_MLP = re.compile(r"mlp|ffn|feed.?forward|moe|expert", re.IGNORECASE)


def classify_module(module: nn.Module) -> tuple[BlockKind, str]:
    """Kind of a token mixer by its class name: linear-attention names count as recurrent."""
    name = type(module).__name__
    if _RECURRENT.search(name):
        return "recurrent", f"class {name} looks recurrent"
    if _ATTENTION.search(name):
        return "attention", f"class {name} looks like softmax attention"
    if _MLP.search(name):
        return "mlp", f"class {name} looks like an MLP"
    return "other", f"class {name} is not recognised"


@dataclass
class BlockInfo:
    """One entry of the decoder-layer list."""

    index: int
    block: nn.Module
    mixer_attr: str | None
    kind: BlockKind
    reason: str

    @property
    def mixer(self) -> nn.Module | None:
        return get_path(self.block, self.mixer_attr) if self.mixer_attr else None

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.block.parameters())


@dataclass
class Discovery:
    """What the surgery found in a model."""

    arch: str
    method: str  # "registry" | "generic" | "override"
    root: nn.Module
    backbone: nn.Module
    layers_path: str
    layers: nn.ModuleList
    embedding: nn.Module
    blocks: list[BlockInfo] = field(default_factory=list)
    spec: ArchSpec | None = None
    note: str = ""  # how the layer list was chosen

    def indices_of(self, kind: BlockKind) -> list[int]:
        return [b.index for b in self.blocks if b.kind == kind]


def _parent_path(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _module_lists(root: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(n, m) for n, m in root.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]


def _find_layers(root: nn.Module, attr: str) -> tuple[str, nn.ModuleList]:
    """The shortest-path ModuleList named ``attr`` under ``root``."""
    found = [(n, m) for n, m in _module_lists(root) if n.split(".")[-1] == attr]
    if not found:
        raise SurgeryError(f"no layer list named {attr!r} in {type(root).__name__}")
    return min(found, key=lambda nm: nm[0].count("."))


def _resolve_path(root: nn.Module, path: str) -> tuple[str, nn.ModuleList]:
    candidates = [path]
    base = getattr(root, "base_model_prefix", "")
    if base and not path.startswith(base + "."):
        candidates.append(f"{base}.{path}")
    for cand in candidates:
        try:
            mod = root.get_submodule(cand)
        except AttributeError:
            continue
        if isinstance(mod, (nn.ModuleList, nn.Sequential)):
            return cand, mod
        raise SurgeryError(f"--block-path {cand!r} is a {type(mod).__name__}, not a list of blocks")
    lists = ", ".join(n for n, _ in _module_lists(root)[:12]) or "none"
    raise SurgeryError(f"--block-path {path!r} does not exist in {type(root).__name__}; layer lists found: {lists}")


def _embedding(root: nn.Module, backbone: nn.Module) -> nn.Module:
    get = getattr(root, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Module):
            return emb
    for module in backbone.modules():
        if isinstance(module, nn.Embedding):
            return module
    raise SurgeryError(f"could not find the input embedding module of {type(root).__name__}")


def _generic_locate(block: nn.Module, index: int = 0, config: Any = None) -> tuple[str | None, BlockKind, str]:
    """Find a block's token mixer by attribute name; prefer a recurrent one in hybrid blocks. When the
    config lists ``layer_types``, the kind comes from there and the reason says so."""
    present = [(a, get_path(block, a)) for a in MIXER_ATTRS if find_path(block, (a,)) is not None]
    types = config_layer_types(config)
    if types is not None and index < len(types) and kind_of_layer_type(types[index]) is not None:
        kind = kind_of_layer_type(types[index])
        for attr, mod in present:
            if classify_module(mod)[0] == kind or (kind == "recurrent" and classify_module(mod)[0] == "other"):
                return attr, kind, f"layer_types[{index}]={types[index]!r} -> {kind}; .{attr} is {type(mod).__name__}"
        for attr, mod in present:
            if classify_module(mod)[0] != "mlp" or kind == "mlp":
                return attr, kind, f"layer_types[{index}]={types[index]!r} -> {kind}; .{attr} is {type(mod).__name__}"
    for attr, mod in present:
        kind, reason = classify_module(mod)
        if kind == "recurrent":
            return attr, kind, f".{attr}: {reason}"
    for attr, mod in present:
        kind, reason = classify_module(mod)
        if kind != "other":
            return attr, kind, f".{attr}: {reason}"
    # No known attribute name: any direct child whose class name looks recurrent.
    for attr, mod in block.named_children():
        kind, reason = classify_module(mod)
        if kind == "recurrent":
            return attr, kind, f"child .{attr}: {reason} (no known mixer attribute name)"
    kind, reason = classify_module(block)
    children = ", ".join(f".{n} ({type(m).__name__})" for n, m in block.named_children()) or "none"
    return None, kind if kind != "recurrent" else "other", (
        f"no child looks like a recurrent mixer ({reason}; children: {children}); name it with --mixer-attr"
    )


def _generic_layers(root: nn.Module) -> tuple[str, nn.ModuleList]:
    lists = _module_lists(root)
    if not lists:
        raise SurgeryError(f"{type(root).__name__} has no list of blocks")
    # The decoder-layer list is the one holding the most parameters (ties: the shallowest path).
    return max(lists, key=lambda nm: (sum(p.numel() for p in nm[1].parameters()), -nm[0].count(".")))


def discover(model: nn.Module, block_path: str | None = None, mixer_attr: str | None = None) -> Discovery:
    """Find the blocks of ``model``. ``block_path`` (dotted, e.g. ``backbone.layers``) and
    ``mixer_attr`` (e.g. ``mixer``) override what the registry or the generic search would choose."""
    spec: ArchSpec | None = spec_for(model)
    config: Any = getattr(model, "config", None)
    if block_path:
        layers_path, layers = _resolve_path(model, block_path)
        method = "override"
        note = f"--block-path {block_path}"
    elif spec is not None:
        layers_path, layers = _find_layers(model, spec.layers_attr)
        method = "registry"
        note = f"family {spec.name}: {spec.description}" if spec.description else f"family {spec.name}"
    else:
        layers_path, layers = _generic_layers(model)
        method = "generic"
        n_params = sum(p.numel() for p in layers.parameters())
        note = (f"not a registered family: the layer list holding the most parameters ({n_params:,}); mixers by "
                "attribute name and class name" + ("; kinds from config.layer_types" if config_layer_types(config) else ""))
    backbone = model.get_submodule(_parent_path(layers_path))
    arch = spec.name if spec is not None else (getattr(config, "model_type", None) or type(model).__name__)
    blocks: list[BlockInfo] = []
    for i, block in enumerate(layers):
        if mixer_attr is not None:
            if mixer_attr and find_path(block, (mixer_attr,)) is None:
                attrs = ", ".join(n for n, _ in block.named_children())
                raise SurgeryError(f"block {i} ({type(block).__name__}) has no module .{mixer_attr}; its children: {attrs}")
            mod = get_path(block, mixer_attr) if mixer_attr else block
            kind, reason = classify_module(mod)
            blocks.append(BlockInfo(i, block, mixer_attr, "recurrent" if kind == "other" else kind,
                                    f"--mixer-attr {mixer_attr}: {reason}"))
        elif spec is not None and method == "registry":
            attr, kind, reason = spec.locate(block, i, config, spec)
            blocks.append(BlockInfo(i, block, attr, kind, reason))
        else:
            attr, kind, reason = _generic_locate(block, i, config)
            blocks.append(BlockInfo(i, block, attr, kind, reason))
    disc = Discovery(arch, method, model, backbone, layers_path, layers, _embedding(model, backbone), blocks, spec, note)
    if not disc.indices_of("recurrent") and mixer_attr is None:
        raise SurgeryError(
            f"no linear-recurrent block recognised in {type(model).__name__} ({method} discovery of "
            f"{layers_path!r}, {len(blocks)} blocks). Supported architectures: "
            f"{', '.join(supported_architectures())}. Block 0: {blocks[0].reason if blocks else 'none'}. "
            "For another model name the list and the mixer explicitly: --block-path model.layers --mixer-attr mixer"
        )
    return disc
