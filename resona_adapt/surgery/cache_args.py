"""Where a wrapped module and the backbone receive the model's generation cache.

The family's `ArchSpec` records it (``cache_kwarg`` / ``cache_arg_index`` for the mixers,
``model_cache_kwarg`` for the backbone) and is preferred whenever the module's ``forward`` takes
that parameter; otherwise (architectures the registry does not know, or an attention module a
hybrid passes the cache under another name) the first of `CACHE_PARAMETERS` in the signature is
used, with its position, so a positional call is found too. The result is recorded on each
Resona layer at retrofit time: `ResonaLayer.cache_in_call` is the only lookup at run time. Where
the module takes ``**kwargs``, the caller may use another of transformers' names for the cache than
the record (5.24 renamed them all to ``cache``): `cache_from_kwargs` looks under those too.
"""

from __future__ import annotations

import inspect

from torch import nn

CACHE_PARAMETERS: tuple[str, ...] = (
    "past_key_values", "cache_params", "past_key_value", "inference_params", "state", "cache", "layer_past",
)
"""Parameter names that carry a generation cache in transformers, fla, mamba-ssm and RWKV-style code."""

RENAMED: tuple[str, ...] = ("cache", "past_key_values", "cache_params", "past_key_value")
"""transformers' names for one and the same cache object: up to 5.23 ``past_key_values`` /
``cache_params`` / ``past_key_value``, from 5.24 ``cache``. A module that takes ``**kwargs`` may be
handed either, whatever the family's record says."""


def cache_from_kwargs(kwargs: dict, recorded: str | None) -> object | None:
    """The cache in a call's keyword arguments: under ``recorded``, else (when ``recorded`` is one of
    transformers' names and holds nothing) under another of them; None when there is none."""
    cache = kwargs.get(recorded) if recorded else None
    if cache is not None or recorded not in RENAMED:
        return cache
    return next((kwargs[name] for name in RENAMED if kwargs.get(name) is not None), None)

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _parameters(module: nn.Module) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return []


def cache_argument(module: nn.Module, preferred: str | None = None,
                   preferred_index: int | None = None) -> tuple[str | None, int | None]:
    """(keyword, positional index or None) under which ``module.forward`` receives the cache.

    ``preferred`` / ``preferred_index``: the family's record, kept when the signature has that
    parameter or takes ``**kwargs``. (None, None) when nothing in the signature looks like a cache.
    """
    params = _parameters(module)
    names = [p.name for p in params]
    for name in ((preferred,) if preferred else ()) + CACHE_PARAMETERS:
        if name in names:
            param = params[names.index(name)]
            index = names.index(name) if param.kind in _POSITIONAL else None
            return name, (preferred_index if name == preferred and preferred_index is not None else index)
    if preferred and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return preferred, preferred_index
    return None, None
