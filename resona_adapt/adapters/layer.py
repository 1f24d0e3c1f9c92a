"""`ResonaLayer`: wraps a block's recurrent mixer in place, keeping the original as ``base_layer``.

The wrapper takes the mixer's place in its block (``block.mixer = ResonaLayer(block.mixer, ...)``),
so the decoder-layer list, its indices and everything the model looks up by list position stay as
they were. It calls the original mixer with exactly the arguments it was given, mixes the Resona
branch into the first output, and returns the same type the mixer returned. When the call carries
a generation cache (``cache_params=`` / ``past_key_values=``), the branch runs incrementally with
its state on that cache (`decode.py`). Attributes it does not
have are looked up on the original mixer (``layer_idx`` and friends).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from ..errors import SurgeryError
from .branch import ResonaBranch
from .cache import generation_cache
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
                 context: ResonaContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.resona = branch
        self.layer_index = layer_index
        object.__setattr__(self, "_context", context)  # shared by all layers; not a submodule

    @property
    def context(self) -> ResonaContext:
        return self._context

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = hidden_from_call(args, kwargs)  # (B, T, D)
        out = self.base_layer(*args, **kwargs)
        y_m, rebuild = split_output(out)  # (B, T, D)
        cache = generation_cache(kwargs)
        if cache is not None:  # prefill or incremental decoding (adapters/decode.py)
            return rebuild(cached_branch_forward(self.resona, self.layer_index, self._context, cache, hidden, y_m))
        x = self._context.embeddings_for(hidden)  # (B, T, D)
        pad = self._context.left_pad(hidden.shape[1])  # (B,) or None
        return rebuild(self.resona(hidden, x, y_m, pad=pad))

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
