"""The Resona part of a generation cache: what incremental decoding keeps between forward calls.

Each wrapped mixer finds the generation cache in its own call, where its family passes it
(``ResonaLayer.cache_in_call``: ``ArchSpec.cache_kwarg`` / ``cache_arg_index``, or the mixer's
signature for unknown architectures). The Resona state hangs on that object (`state_home`):
- a cache object (transformers' ``DynamicCache`` and friends, fla's ``Cache``, ``HymbaCache``,
  mamba-ssm's ``InferenceParams``) carries it as an attribute, and its batch operations
  (``reorder_cache`` for beam search, ``batch_select_indices``, ``batch_repeat_interleave``,
  ``crop``, ``reset``) are extended on that instance so that they apply to the Resona state too;
- a list or tuple of state tensors (RWKV's ``state``, xLSTM's per-layer state) cannot take
  attributes, so the state hangs on its first tensor, which these families update in place for
  the whole of a ``generate()`` call (they have no beam search: transformers refuses to reorder them).
Either way a new ``generate()`` call, which makes a new cache, starts clean, and nothing of one
sequence reaches the next. A cache that already holds positions but no Resona state
(`cache_has_history`) cannot be continued; the decode path raises instead of decoding wrongly.

What is stored is small by design (see `ResonaCacheState.nbytes`):
- the context once for all Resona layers, as token ids ``(B, L)`` int32 (4 bytes per token);
- per Resona layer, the unit embeddings of completed chunks ``(B, N, E)`` fp32
  (``4 * E / U`` bytes per token and layer);
- per row, the number of left-padding positions at prefill.
Keys and values are never cached: a decode step re-embeds the ids of the few selected chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MethodType
from typing import Any

import torch
from torch import Tensor

from ..errors import SurgeryError

STATE_ATTR = "_resona_cache"


@dataclass
class ResonaCacheState:
    """Resona's incremental-decoding state for one generation cache.

    Positions live in the padded frame of the prefill: row ``b`` has ``pad[b]`` left-padding
    positions, and its chunk ``c`` covers ``[pad[b] + c*U, pad[b] + (c+1)*U)``.
    """

    ids: Tensor  # (B, L) int32, every token seen so far (pads included)
    pad: Tensor  # (B,) long, left-padding positions per row
    chunk_size: int  # U, shared by every Resona layer of the model
    prefill_forward: int  # ResonaContext.forward_count of the prefill
    forward_id: int  # forward_count of the last forward that appended ids
    new_tokens: int  # tokens appended by that forward
    summaries: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B, N, E) fp32 unit chunk embeddings
    done: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B,) long, valid summaries per row
    synced: dict[int, int] = field(default_factory=dict)  # layer -> length at its last summary update
    error: str | None = None  # set when this cache cannot be continued, with the reason
    _pad_residues: frozenset[int] | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.ids.shape[0]

    @property
    def length(self) -> int:
        """Positions seen so far, pads included."""
        return self.ids.shape[1]

    def append(self, new_ids: Tensor, forward_id: int) -> None:
        """Add the ids ``(B, Tn)`` of a continuation forward."""
        self.ids = torch.cat([self.ids, new_ids.to(device=self.ids.device, dtype=self.ids.dtype)], dim=1)  # (B, L+Tn)
        self.forward_id = forward_id
        self.new_tokens = new_ids.shape[1]

    def select(self, index: Tensor) -> None:
        """Keep / reorder rows: ``index`` (B',) long (beam search's ``beam_idx``)."""
        index = index.to(self.ids.device).long()
        self.ids = self.ids.index_select(0, index)
        self.pad = self.pad.index_select(0, index.to(self.pad.device))
        self.summaries = {i: s.index_select(0, index.to(s.device)) for i, s in self.summaries.items()}
        self.done = {i: d.index_select(0, index.to(d.device)) for i, d in self.done.items()}
        self._pad_residues = None

    def repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times in place (``[a, b] -> [a, a, b, b]``)."""
        self.select(torch.arange(self.batch_size, device=self.ids.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``|tokens_to_remove|`` positions (transformers' negative ``crop`` convention)."""
        n = abs(int(tokens_to_remove))
        if n == 0:
            return
        self.ids = self.ids[:, : max(0, self.length - n)]
        complete = self.complete_chunks()  # (B,)
        self.done = {i: torch.minimum(d, complete.to(d.device)) for i, d in self.done.items()}
        self.synced.clear()

    def chunk_completed_since(self, length: int) -> bool:
        """Whether some row completed a chunk at a position in ``[length, self.length)`` (no tensor ops
        for the usual one-token step: a row completes a chunk when its real length is a multiple of U)."""
        if self.length - length > self.chunk_size:
            return True
        if self._pad_residues is None:
            self._pad_residues = frozenset(p % self.chunk_size for p in self.pad.tolist())
        return any((n % self.chunk_size) in self._pad_residues for n in range(length + 1, self.length + 1))

    def complete_chunks(self) -> Tensor:
        """(B,) long: chunks of each row that are complete within the positions seen so far."""
        real = (self.length - self.pad).clamp(min=0)  # (B,)
        return torch.div(real, self.chunk_size, rounding_mode="floor")

    def nbytes(self) -> int:
        """Bytes held: the ids plus every layer's chunk summaries (the per-row counters aside)."""
        total = self.ids.numel() * self.ids.element_size()
        return total + sum(s.numel() * s.element_size() for s in self.summaries.values())

    def bytes_per_token(self) -> float:
        """Bytes held per context position of one row."""
        return self.nbytes() / max(1, self.batch_size * self.length)


def state_home(cache: Any) -> Any:
    """The object that carries the Resona state of ``cache``: the cache itself, or, for a list /
    tuple / dict of state tensors (RWKV, xLSTM), its first tensor."""
    if isinstance(cache, (list, tuple, dict)):
        anchor = _first_tensor(cache)
        if anchor is None:
            raise SurgeryError(
                f"the generation cache ({type(cache).__name__} without tensors) cannot hold Resona's decoding "
                "state; generate with use_cache=False (every step then runs a full forward)"
            )
        return anchor
    return cache


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for item in items:
        if (found := _first_tensor(item)) is not None:
            return found
    return None


def resona_cache(cache: Any) -> ResonaCacheState | None:
    """The Resona state of a generation cache (e.g. ``out.cache_params``, RWKV's ``out.state``), or None."""
    if cache is None:
        return None
    try:
        home = state_home(cache)
    except SurgeryError:
        return None
    return getattr(home, STATE_ATTR, None)


def attach(cache: Any, state: ResonaCacheState) -> None:
    """Hang ``state`` on ``cache`` (or on its first tensor, see `state_home`) and make the cache's
    batch operations apply to it."""
    home = state_home(cache)
    try:
        setattr(home, STATE_ATTR, state)
    except (AttributeError, TypeError) as exc:
        raise SurgeryError(
            f"the generation cache ({type(cache).__name__}) cannot hold Resona's decoding state; "
            "generate with use_cache=False (every step then runs a full forward)"
        ) from exc
    if home is not cache:  # a tensor inside a list / tuple: those families have no batch operations
        return
    for name, patch in _PATCHES.items():
        if callable(getattr(type(cache), name, None)):
            setattr(cache, name, MethodType(patch, cache))


def cache_has_history(cache: Any) -> bool:
    """Whether a generation cache handed to the model already holds positions of a sequence.

    Conservative: False when the cache type tells nothing. RWKV passes its state list only once a
    forward has filled it; xLSTM and mamba-ssm count ``seqlen_offset``; Hymba ``seen_tokens``;
    transformers' caches mark their layers initialised; fla's count seen tokens.
    """
    if cache is None:
        return False
    if isinstance(cache, (list, tuple)):
        return len(cache) > 0
    for name in ("seqlen_offset", "seen_tokens"):
        value = getattr(cache, name, None)
        if isinstance(value, (int, Tensor)) and not isinstance(value, bool):
            return bool((torch.as_tensor(value) > 0).any())
    layers = getattr(cache, "layers", None)
    if isinstance(layers, (list, tuple)) and layers:
        return any(_layer_filled(layer) for layer in layers)
    get = getattr(cache, "get_seq_length", None)
    if callable(get):
        try:
            return int(get()) > 0
        except Exception:  # noqa: BLE001 - some caches cannot say (e.g. linear-attention-only ones)
            return False
    return False


def _layer_filled(layer: Any) -> bool:
    """One layer of a transformers / fla cache holds positions (``is_initialized`` alone does not
    say so: static layers preallocate and transformers' ``DummyLayer`` of MLP layers is always set)."""
    for name in ("is_conv_states_initialized", "is_recurrent_states_initialized", "has_previous_state"):
        flags = getattr(layer, name, None)  # linear-attention layers
        if isinstance(flags, dict) and any(bool(v) for v in flags.values()):
            return True
    for name in ("cumulative_length", "_seen_tokens"):  # static layers, fla layers
        value = getattr(layer, name, None)
        if isinstance(value, (int, Tensor)) and not isinstance(value, bool):
            return bool((torch.as_tensor(value) > 0).any())
    keys = getattr(layer, "keys", None)  # dynamic key/value layers
    return isinstance(keys, Tensor) and keys.numel() > 0


# The patched methods call the cache class's own method first (which may refuse, e.g. crop on a
# recurrent layer that records no past), then apply the same operation to the Resona state. They
# are bound to the instance (not closures), so a deep copy of the cache rebinds them to the copy.

def _reorder_cache(self: Any, beam_idx: Tensor) -> Any:
    out = type(self).reorder_cache(self, beam_idx)
    if (state := resona_cache(self)) is not None:
        state.select(beam_idx)
    return out


def _batch_select_indices(self: Any, indices: Tensor) -> Any:
    out = type(self).batch_select_indices(self, indices)
    if (state := resona_cache(self)) is not None:
        idx = torch.as_tensor(indices, device=state.ids.device)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        state.select(idx)
    return out


def _batch_repeat_interleave(self: Any, repeats: int) -> Any:
    out = type(self).batch_repeat_interleave(self, repeats)
    if (state := resona_cache(self)) is not None:
        state.repeat_interleave(repeats)
    return out


def _crop(self: Any, tokens_to_remove: int) -> Any:
    out = type(self).crop(self, tokens_to_remove)
    if (state := resona_cache(self)) is not None:
        state.crop(tokens_to_remove)
    return out


def _reset(self: Any, *args: Any, **kwargs: Any) -> Any:
    out = type(self).reset(self, *args, **kwargs)  # mamba-ssm's InferenceParams.reset takes arguments
    self.__dict__.pop(STATE_ATTR, None)
    return out


_PATCHES = {
    "reorder_cache": _reorder_cache,
    "batch_select_indices": _batch_select_indices,
    "batch_repeat_interleave": _batch_repeat_interleave,
    "crop": _crop,
    "reset": _reset,
}
