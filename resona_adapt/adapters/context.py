"""The per-model store that brings X (the embedding output) of the current forward to every Resona layer.

Two hooks feed it: a forward pre-hook on the module that owns the decoder-layer list (the
backbone) starts a new forward and forgets the previous one, and a forward hook on the input
embedding module records its output. A forward given ``inputs_embeds`` instead of ids takes X
from that argument. Nothing of one forward survives the start of the next.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import SurgeryError


class ResonaContext:
    """X, the token ids and the 2-D padding mask of the backbone forward that is running."""

    def __init__(self) -> None:
        self.x: Tensor | None = None  # (B, T, D)
        self.input_ids: Tensor | None = None  # (B, T)
        self.attention_mask: Tensor | None = None  # (B, T_total) 2-D padding mask, if given
        self.forward_count = 0
        self.prefix_tokens = 0  # positions the backbone prepends after the embedding (Hymba meta tokens)
        self.embedding: nn.Module | None = None  # the model's input-embedding module (set by install_hooks)

    def begin(self, input_ids: Tensor | None, inputs_embeds: Tensor | None, attention_mask: Any) -> None:
        """Start a backbone forward: forget the previous one."""
        self.forward_count += 1
        self.input_ids = input_ids if isinstance(input_ids, Tensor) else None
        self.x = inputs_embeds if isinstance(inputs_embeds, Tensor) else None
        is_2d = isinstance(attention_mask, Tensor) and attention_mask.dim() == 2
        self.attention_mask = attention_mask if is_2d else None

    def record_embeddings(self, input_ids: Tensor | None, x: Tensor) -> None:
        self.x = x
        if isinstance(input_ids, Tensor):
            self.input_ids = input_ids

    def clear(self) -> None:
        self.x = self.input_ids = self.attention_mask = None

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


def install_hooks(context: ResonaContext, backbone: nn.Module, embedding: nn.Module) -> list[RemovableHandle]:
    """Register the two hooks that feed ``context``; returns their handles (remove to undo)."""

    sig = inspect.signature(backbone.forward)
    context.embedding = embedding

    def begin(module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = _bound_arguments(sig, args, kwargs)
        context.begin(bound.get("input_ids"), bound.get("inputs_embeds"), bound.get("attention_mask"))

    def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if isinstance(output, Tensor):
            context.record_embeddings(args[0] if args else kwargs.get("input"), output)

    return [
        backbone.register_forward_pre_hook(begin, with_kwargs=True),
        embedding.register_forward_hook(record, with_kwargs=True),
    ]
