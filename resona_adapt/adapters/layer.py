"""`ResonaLayer`: wraps a block's recurrent mixer in place, keeping the original as ``base_layer``.

The wrapper takes the mixer's place in its block (``block.mixer = ResonaLayer(block.mixer, ...)``),
so the decoder-layer list, its indices and everything the model looks up by list position stay as
they were. It calls the original mixer with exactly the arguments it was given, mixes the Resona
branch into the first output, and returns the same type the mixer returned. When the call carries
a generation cache, the branch runs incrementally with its state on that cache (`decode.py`).
`cache_in_call` is the one place that knows where the cache is: the keyword or position recorded
by `retrofit` (``ArchSpec.cache_kwarg`` / ``cache_arg_index``, or the mixer's signature for
architectures the registry does not know). Attributes it does not have are looked up on the
original mixer (``layer_idx`` and friends).

Two family hooks (set by `retrofit` from the family's ArchSpec):
- ``output_scale()``: a factor the model applies to this mixer's output at inference (RWKV divides
  its output weights by 2**(i // rescale_every) in eval mode). The branch is mixed as
  ``s * mix(y_m / s, y_r)``, so it keeps its weight relative to the mixer in train and eval mode
  (powers of two: exact, so function preservation still holds bit for bit).
- the context's ``prefix_tokens``: positions the backbone prepends after the embedding (Hymba's
  meta tokens). The branch runs on the positions after them; the prefix keeps the mixer output.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import SurgeryError
from ..surgery.cache_args import cache_from_kwargs
from .branch import ResonaBranch
from .context import ResonaContext
from .decode import cached_branch_forward


def split_output(out: Any) -> tuple[Tensor, Callable[[Tensor], Any]]:
    """The mixer output tensor of ``out`` and a function that puts a replacement back in its place."""
    if isinstance(out, Tensor):
        return out, lambda y: y
    if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
        return out[0], lambda y: (y, *out[1:])
    if isinstance(out, list) and out and isinstance(out[0], Tensor):
        return out[0], lambda y: [y, *out[1:]]
    raise SurgeryError(
        f"cannot mix a Resona branch into a mixer output of type {type(out).__name__}: expected a "
        "tensor or a tuple whose first element is the hidden states"
    )


def hidden_from_call(args: tuple, kwargs: dict) -> Tensor:
    """The hidden-states tensor a mixer was called with (first positional tensor or ``hidden_states``)."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    for name in ("hidden_states", "hidden_state", "x", "input"):
        if isinstance(kwargs.get(name), Tensor):
            return kwargs[name]
    raise SurgeryError("could not find the hidden states among the wrapped mixer's arguments")


class ResonaLayer(nn.Module):
    """A recurrent mixer plus its Resona branch: ``Y = mix(Ym, Yr)`` before the block's residual add."""

    def __init__(self, base_layer: nn.Module, branch: ResonaBranch, layer_index: int,
                 context: ResonaContext, output_scale: Callable[[], float] | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.resona = branch
        self.layer_index = layer_index
        object.__setattr__(self, "_context", context)  # shared by all layers; not a submodule
        object.__setattr__(self, "output_scale", output_scale)  # a closure over the model; not a submodule
        # Where the wrapped mixer receives the model's generation cache (set by retrofit from the
        # family's ArchSpec): a keyword, or a positional index when the family passes it positionally.
        self.cache_kwarg: str | None = None
        self.cache_arg_index: int | None = None

    def cache_in_call(self, args: tuple, kwargs: dict) -> Any:
        """The generation cache object this call of the mixer received (None when there is none)."""
        if self.cache_arg_index is not None and len(args) > self.cache_arg_index:
            return args[self.cache_arg_index]
        return cache_from_kwargs(kwargs, self.cache_kwarg)

    def cached_output(self, args: tuple, kwargs: dict, h: Tensor, y: Tensor | None) -> Tensor | None:
        """The branch output of a decoding step (mixed into ``y``, or unmixed when ``y`` is None), or
        None when the full-sequence path must run (no cache in this call, or the prefill)."""
        cache = self.cache_in_call(args, kwargs)
        if cache is None:
            self._context.check_uncached(self.layer_index)
            return None
        return cached_branch_forward(self.resona, self.layer_index, self._context, cache, h, y)

    @property
    def context(self) -> ResonaContext:
        return self._context

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = hidden_from_call(args, kwargs)  # (B, L, D), L = lead + T
        out = self.base_layer(*args, **kwargs)
        y_m, rebuild = split_output(out)  # (B, L, D)
        lead = self._context.lead(hidden)  # meta-token positions before X's first position
        h, y = (hidden[:, lead:], y_m[:, lead:]) if lead else (hidden, y_m)  # (B, T, D)
        scale = self.output_scale() if self.output_scale is not None else 1.0
        if scale != 1.0:
            y = y / scale
        mixed = self.cached_output(args, kwargs, h, y)  # (B, T, D) on a decoding step, else None
        if mixed is None:  # the full-sequence path (also the prefill of a cached forward)
            x = self._context.embeddings_for(h)  # (B, T, D)
            pad = self._context.left_pad(h.shape[1])  # (B,) or None
            mixed = self.resona(h, x, y, pad=pad, ids=self.token_ids(h))  # (B, T, D)
        if scale != 1.0:
            mixed = mixed * scale
        if lead:
            mixed = torch.cat([y_m[:, :lead], mixed], dim=1)  # (B, L, D)
        return rebuild(mixed)

    def token_ids(self, h: Tensor) -> Tensor | None:
        """The forward's token ids (B, T) for h (B, T, D), when the branch needs them (``read_coverage``)
        and the forward was given ids of those positions; else None."""
        ids = self._context.input_ids
        if self.resona.coverage_gate is None or ids is None or tuple(ids.shape) != tuple(h.shape[:2]):
            return None
        return ids.to(h.device)

    def unload_and_optionally_merge_module(self, merge: bool = True, safe_merge: bool = False,
                                           adapter_names: Any = None) -> nn.Module:
        """What peft's ``merge_and_unload()`` / ``unload()`` calls on modules with a ``base_layer``: a
        Resona layer is not a peft layer, so it stays in place (LoRA layers inside its base layer
        are merged on their own)."""
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "resona"):
                raise
            return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        return f"layer_index={self.layer_index}"
