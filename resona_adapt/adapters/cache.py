"""The Resona part of a generation cache: what incremental decoding keeps between forward calls.

The state hangs on the model's own generation cache object (transformers' ``DynamicCache`` passed
to the mixers as ``cache_params`` / ``past_key_values``), so a new ``generate()`` call, which makes
a new cache, starts clean, and nothing of one sequence reaches the next. The cache's batch
operations (``reorder_cache`` for beam search, ``batch_select_indices``,
``batch_repeat_interleave``, ``crop``, ``reset``) are extended on that cache instance so that they
apply to the Resona state too.

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

CACHE_KWARGS: tuple[str, ...] = ("cache_params", "past_key_values", "past_key_value")
"""Keyword names under which a model hands its generation cache to the wrapped mixers."""

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


def generation_cache(kwargs: dict[str, Any]) -> Any | None:
    """The generation cache object among a mixer call's keyword arguments, or None."""
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def resona_cache(cache: Any) -> ResonaCacheState | None:
    """The Resona state of a generation cache (e.g. ``out.cache_params``), or None."""
    return getattr(cache, STATE_ATTR, None) if cache is not None else None


def attach(cache: Any, state: ResonaCacheState) -> None:
    """Hang ``state`` on ``cache`` and make the cache's batch operations apply to it."""
    try:
        setattr(cache, STATE_ATTR, state)
    except (AttributeError, TypeError) as exc:
        from ..errors import SurgeryError

        raise SurgeryError(
            f"the generation cache ({type(cache).__name__}) cannot hold Resona's decoding state; "
            "generate with use_cache=False (every step then runs a full forward)"
        ) from exc
    for name, patch in _PATCHES.items():
        if callable(getattr(type(cache), name, None)):
            setattr(cache, name, MethodType(patch, cache))


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


def _reset(self: Any) -> Any:
    out = type(self).reset(self)
    self.__dict__.pop(STATE_ATTR, None)
    return out


_PATCHES = {
    "reorder_cache": _reorder_cache,
    "batch_select_indices": _batch_select_indices,
    "batch_repeat_interleave": _batch_repeat_interleave,
    "crop": _crop,
    "reset": _reset,
}
