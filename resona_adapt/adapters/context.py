"""The per-model store that brings X (the embedding output) of the current forward to every Resona layer.

Two hooks feed it: a forward pre-hook on the module that owns the decoder-layer list (the
backbone) starts a new forward and forgets the previous one, and a forward hook on the input
embedding module records its output. A forward given ``inputs_embeds`` instead of ids takes X
from that argument. Nothing of one forward survives the start of the next.

For incremental decoding the pre-hook also looks at the generation cache the backbone receives
(under ``cache_kwarg``, the family's ``ArchSpec.model_cache_kwarg``): when it already holds
positions, this forward continues a sequence, and every Resona layer must find its state
(`adapters/decode.py`) or fail loudly, never fall back to the full path on the new tokens alone.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import SurgeryError
from ..surgery.cache_args import cache_from_kwargs
from .cache import ResonaCacheState, cache_has_history


class ResonaContext:
    """X, the token ids and the 2-D padding mask of the backbone forward that is running."""

    def __init__(self) -> None:
        self.x: Tensor | None = None  # (B, T, D)
        self.input_ids: Tensor | None = None  # (B, T)
        self.attention_mask: Tensor | None = None  # (B, T_total) 2-D padding mask, if given
        self.forward_count = 0
        self.prefix_tokens = 0  # positions the backbone prepends after the embedding (Hymba meta tokens)
        self.embedding: nn.Module | None = None  # the model's input-embedding module (set by install_hooks)
        self.continuing = False  # the backbone received a generation cache that already holds positions
        self.new_state: ResonaCacheState | None = None  # a decoding state started by this forward (prefill)
        self.cache_kwarg: str | None = None  # the backbone's parameter that carries the generation cache
        self.branches: list[nn.Module] = []  # the Resona branches this context feeds (set by retrofit)
        self.warned_frozen = False
        self._signature: tuple[Any, inspect.Signature] | None = None  # (forward, its signature), cached

    TRANSIENT = ("x", "input_ids", "attention_mask", "new_state", "_signature")

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles keep the configuration, not the tensors of the last forward."""
        state = dict(self.__dict__)
        for name in self.TRANSIENT:
            state[name] = None
        state["continuing"] = False
        return state

    def backbone_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the backbone: start a forward (`begin`) from its arguments."""
        self.check_peft(module)
        forward = module.forward
        if self._signature is None or self._signature[0] != forward:
            self._signature = (forward, inspect.signature(forward))
        sig = self._signature[1]
        bound = _bound_arguments(sig, args, kwargs)
        cache = cache_from_kwargs(_named_arguments(sig, bound), self.cache_kwarg)
        self.begin(bound.get("input_ids"), bound.get("inputs_embeds"), bound.get("attention_mask"), cache)

    def check_peft(self, backbone: nn.Module) -> None:
        """Refuse branches that peft's ``get_peft_model`` wrapped (a target such as ``q_proj`` also
        names the branch's projections), and warn once when a training forward runs with peft layers
        in the model but every Resona parameter frozen (what ``get_peft_model`` does to them)."""
        for branch in self.branches:
            for name, sub in branch.named_modules():
                if type(sub).__module__.startswith("peft."):
                    raise SurgeryError(
                        f"peft wrapped the Resona branch's own {name or 'module'} ({type(sub).__name__}): plain "
                        "get_peft_model targets the branches too and freezes them. Use resona_adapt.lora.add_lora("
                        "model, target_modules=[...]) on the retrofitted model: it excludes the branches from the "
                        "targets and keeps them trainable"
                    )
        if (self.warned_frozen or not self.branches or not backbone.training or not torch.is_grad_enabled()
                or any(p.requires_grad for b in self.branches for p in b.parameters())):
            return
        if any(type(sub).__module__.startswith("peft.") for sub in backbone.modules()):
            self.warned_frozen = True
            warnings.warn(
                "training with peft layers while every Resona parameter is frozen (peft's get_peft_model freezes "
                "them): the branches will not learn. Use resona_adapt.lora.add_lora(model, ...) instead, or set "
                "requires_grad on resona_parameters(model) before building the optimizer", stacklevel=2,
            )

    def embedding_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook on the input embedding: record its output as X."""
        if isinstance(output, Tensor):
            self.record_embeddings(args[0] if args else kwargs.get("input"), output)

    def begin(self, input_ids: Tensor | None, inputs_embeds: Tensor | None, attention_mask: Any,
              cache: Any = None) -> None:
        """Start a backbone forward: forget the previous one. ``cache``: the generation cache the
        backbone received (None when it makes its own, as on a prefill)."""
        self.forward_count += 1
        self.input_ids = input_ids if isinstance(input_ids, Tensor) else None
        self.x = inputs_embeds if isinstance(inputs_embeds, Tensor) else None
        is_2d = isinstance(attention_mask, Tensor) and attention_mask.dim() == 2
        self.attention_mask = attention_mask if is_2d else None
        self.continuing = cache_has_history(cache)
        self.new_state = None

    def check_uncached(self, layer_index: int) -> None:
        """A Resona layer's mixer was called without a generation cache: fine for a full forward,
        an error when the model continues a cached sequence (the branch would see the new tokens only)."""
        if self.continuing:
            raise SurgeryError(
                f"the model continues a cached sequence but the mixer of Resona layer {layer_index} received no "
                "generation cache, so its branch cannot see the earlier tokens; generate with use_cache=False, "
                "or retrofit with the family's cache keyword known (see `resona-adapt inspect`)"
            )

    def record_embeddings(self, input_ids: Tensor | None, x: Tensor) -> None:
        self.x = x
        if isinstance(input_ids, Tensor):
            self.input_ids = input_ids

    def clear(self) -> None:
        self.x = self.input_ids = self.attention_mask = self.new_state = None
        self.continuing = False

    def lead(self, hidden: Tensor) -> int:
        """How many leading positions of the layer input ``hidden`` (B, L, D) come before X: the
        backbone's prefix (meta tokens) when L exceeds X's length by exactly that much, else 0."""
        if self.prefix_tokens and self.x is not None and hidden.shape[1] == self.x.shape[1] + self.prefix_tokens:
            mask = self.attention_mask
            if mask is not None and bool(((mask.cumsum(dim=1) > 0) & (mask == 0)).any()):
                raise SurgeryError(
                    "this model moves padding in front of its meta tokens, so only left padding keeps the input "
                    "tokens aligned with X: pad on the left (tokenizer.padding_side = 'left')"
                )
            return self.prefix_tokens
        return 0

    def embeddings_for(self, hidden: Tensor) -> Tensor:
        """X of the current forward, checked against the layer input ``hidden`` (B, T, D)."""
        if self.x is None:
            raise SurgeryError(
                "a Resona layer ran but no embedding output was recorded for this forward: call the "
                "model (or its backbone) with input_ids or inputs_embeds, not the layers directly"
            )
        if self.x.shape[:2] != hidden.shape[:2]:
            raise SurgeryError(
                f"the embedding output {tuple(self.x.shape)} does not match the layer input "
                f"{tuple(hidden.shape)}; the backbone may add or drop positions between its embedding "
                "and its layers (retrofit this architecture with an explicit embedding override)"
            )
        return self.x

    def embed(self, input_ids: Tensor) -> Tensor:
        """X for token ids (..., T) -> (..., T, D), through the model's input-embedding module without
        firing its hooks (so the current forward's recorded X stays as it is)."""
        if self.embedding is None:
            raise SurgeryError("this Resona context has no embedding module; retrofit the model again")
        return self.embedding.forward(input_ids)

    def left_pad(self, seq_len: int) -> Tensor | None:
        """Left-padding counts (B,) for a full-sequence forward of ``seq_len`` tokens, or None."""
        mask = self.attention_mask
        if mask is None or mask.shape[1] != seq_len:
            return None
        pad = (mask.cumsum(dim=1) == 0).sum(dim=1)  # leading zeros per row  (B,)
        return pad if bool(pad.any()) else None


def _bound_arguments(sig: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by parameter name (positional ones included)."""
    try:
        return dict(sig.bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return dict(kwargs)


def _named_arguments(sig: inspect.Signature, bound: dict[str, Any]) -> dict[str, Any]:
    """A bound call's arguments by name, with those the signature takes through ``**kwargs`` merged in."""
    var = next((p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    extra = bound.get(var) if var else None
    return {**extra, **bound} if isinstance(extra, dict) else bound


def install_hooks(context: ResonaContext, backbone: nn.Module, embedding: nn.Module,
                  cache_kwarg: str | None = None) -> list[RemovableHandle]:
    """Register the two hooks that feed ``context``; returns their handles (remove to undo).
    ``cache_kwarg``: the backbone's parameter that carries the generation cache, if known.

    The hooks are bound methods of ``context`` (no closures), so ``copy.deepcopy`` of the model
    rebinds them to the copy's context and the model can be pickled."""
    context.embedding = embedding
    context.cache_kwarg = cache_kwarg
    return [
        backbone.register_forward_pre_hook(context.backbone_pre_hook, with_kwargs=True),
        embedding.register_forward_hook(context.embedding_hook, with_kwargs=True),
    ]
