"""`retrofit`: insert Resona branches into a pretrained model in place, freeze the base, and undo it."""

from __future__ import annotations

import importlib

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .version import __version__
from .adapters import AttentionSwap, ResonaBranch, ResonaContext, ResonaLayer, install_hooks
from .config import ResonaConfig
from .errors import SurgeryError
from .surgery import Discovery, cache_argument, discover, get_path, replace_mixer, resolve_layers, restore_mixer

STATE_ATTR = "_resona_state"


@dataclass
class RetrofitState:
    """Everything `retrofit` changed on a model, so it can be saved, inspected and undone."""

    config: ResonaConfig
    layers: list[int]
    discovery: Discovery
    context: ResonaContext
    hooks: list[RemovableHandle]
    originals: dict[int, nn.Module]
    block_path: str | None = None
    mixer_attr: str | None = None
    allow_kinds: tuple[str, ...] = ("recurrent",)
    extra: dict[str, Any] = field(default_factory=dict)
    wrapped_attrs: dict[int, str] = field(default_factory=dict)  # block attribute path wrapped, per layer

    def attr_of(self, index: int) -> str:
        """The attribute path (relative to block ``index``) that holds the Resona wrapper."""
        return self.wrapped_attrs.get(index) or self.discovery.blocks[index].mixer_attr

    def describe(self) -> dict[str, Any]:
        """The ``resona`` section written into config.json."""
        return {
            "format_version": 1,
            "resona_adapt_version": __version__,
            "arch": self.discovery.arch,
            "layers": list(self.layers),
            "config": self.config.to_dict(),
            "block_path": self.block_path,
            "mixer_attr": self.mixer_attr,
            "allow_kinds": list(self.allow_kinds),
            **self.extra,
        }


MergedWriter = Callable[..., Any]
_merged_writer: list[MergedWriter] = []


def register_merged_writer(writer: MergedWriter) -> None:
    """Set the function that writes a merged checkpoint, ``writer(model, save_directory, *args, **kwargs)``.

    `resona_adapt.formats.merged` registers its `save_retrofitted` when it is imported; the first call of
    a `MergedSavePretrained` imports it by name if nothing is registered yet (the package imports its
    modules lazily). The surgery only points ``model.save_pretrained`` at it, so it depends on no
    checkpoint format.
    """
    _merged_writer[:] = [writer]


class MergedSavePretrained:
    """``model.save_pretrained`` of a retrofitted model: writes the merged checkpoint (base + Resona).

    An object that holds its model, not a closure: ``copy.deepcopy`` and pickling rebind it to the
    copy (which then saves its own weights), and the writer is looked up when it is called.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        if not _merged_writer:
            importlib.import_module("resona_adapt.formats.merged")  # registers the writer (a plug-in, by name)
        if not _merged_writer:
            raise SurgeryError("no merged-checkpoint writer is registered: import resona_adapt.formats first")
        return _merged_writer[0](self.model, save_directory, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<merged save_pretrained of {type(self.model).__name__}>"


def accept_base_layout(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook of every Resona wrapper: keys in the base's layout (``...mixer.in_proj``,
    as a merged checkpoint's ``model.safetensors`` holds them) are read as the wrapped module's
    (``...mixer.base_layer.in_proj``), so ``model.load_state_dict`` of a merged checkpoint (what a
    stock ``Trainer`` does on resume) restores the base weights; the Resona weights keep their names."""
    expected = set(module.base_layer.state_dict(keep_vars=True))
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if rest in expected and f"{prefix}base_layer.{rest}" not in state_dict:
            state_dict[f"{prefix}base_layer.{rest}"] = state_dict.pop(key)


def retrofit_state(model: nn.Module) -> RetrofitState | None:
    """The `RetrofitState` of a retrofitted model, or None."""
    return model.__dict__.get(STATE_ATTR)


def is_retrofitted(model: nn.Module) -> bool:
    return retrofit_state(model) is not None or any(isinstance(m, ResonaLayer) for m in model.modules())


def resona_layers(model: nn.Module) -> dict[int, ResonaLayer]:
    """The Resona layers of ``model`` by decoder-layer index."""
    return {m.layer_index: m for m in model.modules() if isinstance(m, ResonaLayer)}


def resona_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every Resona branch, found by walking the Resona layers."""
    return [
        (f"layers.{i}.{name}", p)
        for i, layer in sorted(resona_layers(model).items())
        for name, p in layer.resona.named_parameters()
    ]


def _model_width(disc: Discovery) -> int:
    emb = disc.embedding
    width = getattr(emb, "embedding_dim", None) or getattr(getattr(emb, "weight", None), "shape", [None, None])[1]
    if width is None:
        raise SurgeryError(f"cannot tell the width of the embedding module {type(emb).__name__}")
    return int(width)


def _param_like(module: nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return None, None


def retrofit(
    model: nn.Module,
    layers: Sequence[int] | str | None = None,
    config: ResonaConfig | None = None,
    *,
    block_path: str | None = None,
    mixer_attr: str | None = None,
    allow_kinds: Sequence[str] = ("recurrent",),
    freeze_base: bool = True,
) -> nn.Module:
    """Insert Resona branches into ``model`` in place and return it.

    layers: decoder-layer indices (negative from the end) or ``"0,12,-1"``; None = shallowest,
        middle and deepest recurrent layers (the paper's default).
    config: the `ResonaConfig` of every branch (default ``ResonaConfig()``).
    block_path / mixer_attr: override where the decoder-layer list and the mixers are, for
        architectures the registry does not know (e.g. ``"model.layers"``, ``"mixer"``).
    allow_kinds: block kinds that may be wrapped; add ``"attention"`` to wrap attention layers.
    freeze_base: freeze every base parameter (only Resona parameters train).

    The family (surgery/registry.py) decides where the branch goes: the recurrent mixer of each
    chosen decoder layer, wrapped in place. Hybrid-head families (Hymba) take
    ``config.replace_attention`` to swap their attention heads for the branch instead.

    With a function-preserving ``config.mix`` (the default) the model's outputs are unchanged
    until the branches are trained. ``model.save_pretrained(dir)`` then writes a merged
    checkpoint that `load_retrofitted` reads back.
    """
    if is_retrofitted(model):
        existing = sorted(resona_layers(model))
        raise SurgeryError(
            f"{type(model).__name__} is already retrofitted (Resona layers {existing}); retrofit the base "
            "model instead, or call unretrofit(model) first"
        )
    config = config or ResonaConfig()
    disc = discover(model, block_path=block_path, mixer_attr=mixer_attr)
    chosen = resolve_layers(layers, disc, allow_kinds=tuple(allow_kinds))
    width = _model_width(disc)
    hidden = getattr(getattr(model, "config", None), "hidden_size", width)
    if hidden != width:
        raise SurgeryError(f"embedding width {width} differs from hidden size {hidden}; Resona needs them equal")

    config = config.resolved(width)
    spec = disc.spec
    swap_attr = _swap_attr(disc, config)
    context = ResonaContext()
    if spec is not None and spec.prefix_tokens is not None:
        context.prefix_tokens = spec.prefix_tokens(getattr(model, "config", None))
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    originals: dict[int, nn.Module] = {}
    attrs: dict[int, str] = {}
    hooks: list[RemovableHandle] = []
    for i in chosen:
        info = disc.blocks[i]
        attr = swap_attr or info.mixer_attr
        target = get_path(info.block, attr) if attr else None
        dtype, device = _param_like(target) if target is not None else (None, None)
        if dtype is None:
            dtype, device = _param_like(info.block)
        scale = None
        if spec is not None and spec.branch_scale is not None:
            scale = partial(spec.branch_scale, model, i)  # picklable, and rebound to the copy by deepcopy

        def make(mixer: nn.Module, i: int = i, dtype=dtype, device=device, scale=scale) -> nn.Module:
            if swap_attr:
                width_out = _output_width(mixer, info.block, swap_attr)
                branch = ResonaBranch(width, config, dtype=dtype, device=device, out_dim=width_out)
                return AttentionSwap(mixer, branch, i, context)
            return ResonaLayer(mixer, ResonaBranch(width, config, dtype=dtype, device=device), i, context, scale)

        originals[i] = target
        attrs[i] = attr
        wrapper = replace_mixer(info, make, attr)
        context.branches.append(wrapper.resona)
        wrapper.register_load_state_dict_pre_hook(accept_base_layout)
        # where this module receives the generation cache: the one lookup of the decode path
        wrapper.cache_kwarg, wrapper.cache_arg_index = cache_argument(
            target, spec.cache_kwarg if spec is not None else None, spec.cache_arg_index if spec is not None else None)
        if isinstance(wrapper, AttentionSwap):
            owner = get_path(info.block, attr.rpartition(".")[0]) if "." in attr else info.block
            hooks.append(owner.register_forward_pre_hook(wrapper.capture_input, with_kwargs=True))
    model_cache, _ = cache_argument(disc.backbone, spec.model_cache_kwarg if spec is not None else None)
    hooks += install_hooks(context, disc.backbone, disc.embedding, model_cache)
    state = RetrofitState(config, chosen, disc, context, hooks, originals, block_path, mixer_attr, tuple(allow_kinds),
                          wrapped_attrs=attrs)
    model.__dict__[STATE_ATTR] = state
    if getattr(model, "config", None) is not None:
        model.config.resona = state.describe()
    model.__dict__["save_pretrained"] = MergedSavePretrained(model)
    return model


def unretrofit(model: nn.Module) -> nn.Module:
    """Remove every Resona branch and hook: the model is its base again (weights untouched)."""
    state = retrofit_state(model)
    if state is None:
        raise SurgeryError(f"{type(model).__name__} is not retrofitted")
    for i, original in state.originals.items():
        restore_mixer(state.discovery.blocks[i], original, state.attr_of(i))
    for h in state.hooks:
        h.remove()
    state.context.clear()
    del model.__dict__[STATE_ATTR]
    model.__dict__.pop("save_pretrained", None)
    if getattr(model, "config", None) is not None and hasattr(model.config, "resona"):
        del model.config.resona
    return model


def _swap_attr(disc: Discovery, config: ResonaConfig) -> str | None:
    """The attention-heads path to swap when ``config.replace_attention`` asks for it (hybrid-head families)."""
    if not config.replace_attention:
        return None
    spec = disc.spec
    if spec is None or not spec.attention_swap_attr:
        raise SurgeryError(
            f"replace_attention is for hybrid-head blocks whose attention heads run beside SSM heads (hymba); "
            f"{disc.arch} has no such heads. Drop replace_attention to add Resona beside the mixer instead"
        )
    return spec.attention_swap_attr


def _output_width(heads: nn.Module, block: nn.Module, attr: str) -> int:
    """Width of the attention heads' output in a hybrid-head block (Hymba: num_heads * v_head_dim)."""
    owner = get_path(block, attr.rpartition(".")[0]) if "." in attr else block
    norm = getattr(owner, "pre_avg_layernorm1", None)
    weight = getattr(norm, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    heads_n, v_dim = getattr(heads, "num_heads", None), getattr(heads, "v_head_dim", None)
    if heads_n and v_dim:
        return int(heads_n) * int(v_dim)
    raise SurgeryError(f"cannot tell the output width of the attention heads {type(heads).__name__}")
