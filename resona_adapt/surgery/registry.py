"""The architecture registry: where each known family keeps its blocks, its token mixers and its cache.

An `ArchSpec` says where the decoder-layer list lives, which attribute of each block holds the
recurrent mixer (dotted paths allowed, several candidates for families whose blocks differ), what
kind each block is (recurrent, attention, mlp; from ``config.layer_types`` where the config has
them), and under which keyword each mixer receives the model's generation cache. Families are
matched by a structural predicate first (for objects that are not transformers models, such as
mamba-ssm's), then by ``config.model_type``, then by class name (remote-code classes). Specs that
are restricted to some modules (fla's models reuse transformers' ``model_type`` "mamba") win over
unrestricted ones. The families themselves are declared in `surgery.families`; unknown
architectures go through the generic discovery in `surgery.discover`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

from torch import nn

BlockKind = str  # "recurrent" | "attention" | "mlp" | "other"
KINDS: tuple[BlockKind, ...] = ("recurrent", "attention", "mlp", "other")

# Layer-type names used by transformers configs (and a few checkpoints) -> block kind.
RECURRENT_TYPES = frozenset({
    "linear_attention", "mamba", "mamba2", "m", "conv", "hybrid", "h", "recurrent", "rwkv", "mlstm", "ssm",
    "kda", "gdn", "deltanet", "lightning",
})
ATTENTION_TYPES = frozenset({
    "full_attention", "sliding_attention", "attention", "chunked_attention", "global", "local", "*",
})
MLP_TYPES = frozenset({"mlp", "moe", "dense", "sparse", "-", "e"})

_GENERIC_MODULES = ("transformers.modeling_utils", "transformers.generation", "torch.", "builtins")

Locate = Callable[[nn.Module, int, Any, "ArchSpec"], tuple[str | None, BlockKind, str]]


def get_path(module: nn.Module, path: str) -> Any:
    """``module.a.b`` for ``path="a.b"``; raises AttributeError when a part is missing."""
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def find_path(module: nn.Module, candidates: tuple[str, ...]) -> str | None:
    """The first candidate path that names a submodule of ``module``."""
    for path in candidates:
        try:
            if isinstance(get_path(module, path), nn.Module):
                return path
        except AttributeError:
            continue
    return None


def text_config(config: Any) -> Any:
    """The text part of a (possibly multimodal) config."""
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            return get()
        except (TypeError, ValueError):
            return config
    return config


def kind_of_layer_type(name: Any) -> BlockKind | None:
    """Block kind of a ``config.layer_types`` entry, or None when the name is unknown."""
    key = str(name).lower()
    if key in RECURRENT_TYPES:
        return "recurrent"
    if key in ATTENTION_TYPES:
        return "attention"
    if key in MLP_TYPES:
        return "mlp"
    return None


def config_layer_types(config: Any) -> list[Any] | None:
    """``config.layer_types`` (or ``layers_block_type``) of the text config, when it is a list."""
    cfg = text_config(config)
    for attr in ("layer_types", "layers_block_type"):
        value = getattr(cfg, attr, None)
        if isinstance(value, (list, tuple)) and value:
            return list(value)
    return None


def _mixer_reason(spec: "ArchSpec", attr: str, block: nn.Module, kind: BlockKind = "recurrent") -> str:
    mixer = get_path(block, attr)
    cache = ""
    if kind == "recurrent" and spec.cache_kwarg:
        where = f"positional argument {spec.cache_arg_index} ({spec.cache_kwarg})" if spec.cache_arg_index is not None \
            else f"keyword {spec.cache_kwarg}"
        cache = f"; cache {where}"
    return f".{attr} is {type(mixer).__name__}{cache}"


def locate_all_recurrent(block: nn.Module, index: int, config: Any, spec: "ArchSpec") -> tuple[str | None, BlockKind, str]:
    """Every block is recurrent; its mixer is the first of ``spec.mixer_attrs`` that exists."""
    attr = find_path(block, spec.mixer_attrs)
    if attr is None:
        return None, "other", f"{type(block).__name__} has none of {', '.join('.' + a for a in spec.mixer_attrs)}"
    return attr, "recurrent", f"{spec.name} block: {_mixer_reason(spec, attr, block)}"


def locate_by_layer_types(block: nn.Module, index: int, config: Any, spec: "ArchSpec") -> tuple[str | None, BlockKind, str]:
    """Kind from ``config.layer_types[index]``; the module from the spec's attributes for that kind."""
    types = config_layer_types(config)
    if types is None or index >= len(types):
        return locate_all_recurrent(block, index, config, spec)
    name = types[index]
    kind = kind_of_layer_type(name) or "other"
    note = spec.type_notes.get(str(name), "")
    head = f"layer_types[{index}]={name!r}{' (' + note + ')' if note else ''} -> {kind}"
    candidates = {"recurrent": spec.mixer_attrs, "attention": spec.attention_attrs, "mlp": spec.mlp_attrs}.get(kind, ())
    attr = find_path(block, candidates)
    if attr is None:
        where = ", ".join("." + a for a in candidates) or "no attribute declared"
        return None, kind, f"{head}; {type(block).__name__} has no module at {where}"
    return attr, kind, f"{head}; {_mixer_reason(spec, attr, block, kind)}"


@dataclass(frozen=True)
class ArchSpec:
    """Where a family keeps its decoder layers, mixers and cache.

    name: registry key. model_types / class_names: how models are matched. matches: a structural
    predicate for models without a transformers config (mamba-ssm). module_prefixes: restrict the
    spec to classes defined under these modules (checked on the model class's MRO).
    layers_attr: name of the decoder-layer list. mixer_attr: attribute (dotted path allowed) of the
    recurrent mixer, or several candidates tried in order. attention_attrs / mlp_attrs: where the
    attention or MLP module of the other kinds of block is (wrapped only when allowed explicitly).
    locate(block, index, config, spec) -> (module attribute or None, kind, reason).
    cache_kwarg: keyword under which each mixer receives the model's generation cache object;
    cache_arg_index: its position when it is passed positionally. model_cache_kwarg: the keyword
    of the model's forward that carries the cache. branch_scale(model, index): a factor the family
    applies to the mixer output at inference (RWKV's layer rescaling), applied to the branch too.
    prefix_tokens(config): leading positions the backbone adds between its embedding and its layers
    (Hymba's meta tokens); the branch runs on the positions after them. attention_swap_attr: where
    a hybrid-head block keeps its attention heads, for ``ResonaConfig.replace_attention``.
    save_context(model): a context manager the merged-checkpoint writer enters around the base
    model's ``save_pretrained`` (RWKV: write the weights at their training scale).
    """

    name: str
    model_types: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    layers_attr: str = "layers"
    mixer_attr: str | tuple[str, ...] = "mixer"
    attention_attrs: tuple[str, ...] = ("self_attn",)
    mlp_attrs: tuple[str, ...] = ()
    locate: Locate = field(default=locate_all_recurrent, compare=False)
    cache_kwarg: str | None = None
    cache_arg_index: int | None = None
    model_cache_kwarg: str = "past_key_values"
    matches: Callable[[nn.Module], bool] | None = field(default=None, compare=False)
    module_prefixes: tuple[str, ...] = ()
    branch_scale: Callable[[nn.Module, int], float] | None = field(default=None, compare=False)
    prefix_tokens: Callable[[Any], int] | None = field(default=None, compare=False)
    attention_swap_attr: str | None = None
    save_context: Callable[[nn.Module], ContextManager[Any]] | None = field(default=None, compare=False)
    type_notes: dict[str, str] = field(default_factory=dict, compare=False)
    description: str = ""
    notes: str = ""

    @property
    def mixer_attrs(self) -> tuple[str, ...]:
        return (self.mixer_attr,) if isinstance(self.mixer_attr, str) else tuple(self.mixer_attr)

    def defined_in(self, model: nn.Module) -> bool:
        """True when no module restriction applies or a class of the model's MRO (other than the
        generic bases of transformers and torch) is defined under one of ``module_prefixes``."""
        if not self.module_prefixes:
            return True
        return any(
            cls.__module__.startswith(self.module_prefixes) for cls in type(model).__mro__
            if not cls.__module__.startswith(_GENERIC_MODULES)
        )


REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    """Add (or replace) a family in the registry."""
    REGISTRY[spec.name] = spec
    return spec


def spec_for(model: nn.Module) -> ArchSpec | None:
    """The registered family of ``model``: structural predicate, then model_type, then class name."""
    specs = sorted(REGISTRY.values(), key=lambda s: not s.module_prefixes)  # restricted specs first
    for spec in specs:
        if spec.matches is not None and spec.defined_in(model):
            try:
                if spec.matches(model):
                    return spec
            except Exception:  # noqa: BLE001 - a predicate that cannot decide does not match
                continue
    config = getattr(model, "config", None)
    model_types = {getattr(config, "model_type", None), getattr(text_config(config), "model_type", None)} - {None}
    for spec in specs:
        if model_types & set(spec.model_types) and spec.defined_in(model):
            return spec
    names = {cls.__name__ for cls in type(model).__mro__}
    for spec in specs:
        if names & set(spec.class_names) and spec.defined_in(model):
            return spec
    return None


def supported_architectures() -> list[str]:
    return sorted(REGISTRY)


from . import families  # noqa: E402,F401  (registers the known families)
