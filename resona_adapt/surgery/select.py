"""Which layers to retrofit: parse ``--layers``, apply the paper's default, reject bad choices clearly."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ResonaConfigError
from .discover import Discovery


def parse_layers(text: str | None, flag: str = "--layers") -> list[int] | None:
    """``"0,12,-1"`` -> ``[0, 12, -1]``; None -> None (the default). An empty string, an empty item
    (``"0,,1"``) or a non-integer is an error naming ``flag``, never a silent default."""
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",")]
    example = "such as 0,12,-1"
    if not text.strip():
        raise ResonaConfigError(f"{flag} is empty: give layer indices {example}, or leave it out for the default")
    if any(not part for part in parts):
        raise ResonaConfigError(f"{flag} {text!r} has an empty item: give comma-separated integers {example}")
    try:
        return [int(part) for part in parts]
    except ValueError as exc:
        raise ResonaConfigError(f"{flag} must be a comma list of integers {example}; got {text!r}") from exc


def as_layer_list(requested: Sequence[int] | str | None, flag: str = "layers") -> list[int] | None:
    """A layer selection as given to the API (None, ``"0,-1"`` or a sequence of ints) -> a list or None."""
    if requested is None or isinstance(requested, str):
        return parse_layers(requested, flag)
    if isinstance(requested, (bool, int)) or not isinstance(requested, Sequence):
        raise ResonaConfigError(
            f"{flag} must be a list of layer indices such as [0, 12, -1] (or the string '0,12,-1'), got "
            f"{requested!r}" + (f"; for the single layer {requested} pass [{requested}]" if isinstance(requested, int)
                                and not isinstance(requested, bool) else ""))
    out = list(requested)
    for raw in out:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ResonaConfigError(f"layer indices must be integers, got {raw!r} in {flag}")
    return out


def default_layers(candidates: Sequence[int]) -> list[int]:
    """Shallowest, middle and deepest of ``candidates`` (0, 12, 23 for 24 layers), deduplicated."""
    if not candidates:
        return []
    picks = [candidates[0], candidates[len(candidates) // 2], candidates[-1]]
    return sorted(set(picks))


def resolve_layers(
    requested: Sequence[int] | str | None,
    discovery: Discovery,
    allow_kinds: Sequence[str] = ("recurrent",),
) -> list[int]:
    """Absolute, sorted layer indices to retrofit.

    ``requested`` counts entries of the decoder-layer list (negative indices from the end). A layer
    whose kind is not in ``allow_kinds`` is an error unless the caller allows that kind explicitly.
    """
    requested = as_layer_list(requested)
    n = len(discovery.blocks)
    recurrent = discovery.indices_of("recurrent")
    if requested is None:
        chosen = default_layers([i for i in range(n) if discovery.blocks[i].kind in allow_kinds])
        if not chosen:
            raise ResonaConfigError(f"no layer of kind {'/'.join(allow_kinds)} to retrofit among {n} layers")
        return chosen
    if len(requested) == 0:
        raise ResonaConfigError("no layers given: pass at least one layer index, or none for the default")
    resolved: list[int] = []
    for raw in requested:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ResonaConfigError(f"layer indices must be integers, got {raw!r}")
        if not -n <= raw < n:
            raise ResonaConfigError(
                f"layer {raw} does not exist: the model has {n} layers, indices 0..{n - 1} (or -{n}..-1)"
            )
        idx = raw % n
        if idx in resolved:
            raise ResonaConfigError(f"layer {raw} is listed twice (as index {idx}); list each layer once")
        kind = discovery.blocks[idx].kind
        if kind not in allow_kinds:
            raise ResonaConfigError(
                f"layer {idx} is a {kind} layer ({discovery.blocks[idx].reason}); Resona wraps recurrent "
                f"layers, which here are {_ranges(recurrent)}. Allow other kinds explicitly to wrap it anyway."
            )
        resolved.append(idx)
    return sorted(resolved)


def _ranges(indices: Sequence[int]) -> str:
    if not indices:
        return "none"
    out, start, prev = [], indices[0], indices[0]
    for i in list(indices[1:]) + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}" if start == prev else f"{start}..{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(out)
