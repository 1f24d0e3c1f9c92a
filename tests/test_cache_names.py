"""transformers 5.24 renamed the cache keyword (past_key_values / cache_params -> cache): resona-adapt
finds the cache under either name, whatever the family's record says, and so does its Hymba."""

import torch

from helpers.hymba_support import build_hymba
from resona_adapt.models.hymba.modeling import CACHE_FIELD
from resona_adapt.surgery.cache_args import RENAMED, cache_from_kwargs


def test_recorded_name_first_then_the_other_transformers_names():
    cache, other = object(), object()
    assert cache_from_kwargs({"past_key_values": cache, "cache": other}, "past_key_values") is cache
    for name in RENAMED:  # recorded under a 5.23 name, passed under 5.24's, and the other way round
        recorded = "cache_params" if name != "cache_params" else "cache"
        assert cache_from_kwargs({name: cache}, recorded) is cache
    assert cache_from_kwargs({"cache": None, "past_key_values": cache}, "cache_params") is cache


def test_names_outside_transformers_are_not_guessed():
    cache = object()
    assert cache_from_kwargs({"cache": cache}, "inference_params") is None  # mamba-ssm: its own name only
    assert cache_from_kwargs({"cache": cache}, None) is None
    assert cache_from_kwargs({}, "past_key_values") is None


def test_hymba_continues_its_cache_under_either_keyword():
    model = build_hymba()
    ids = torch.randint(3, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        full = model(ids).logits[:, -1]  # (1, V)
        for name in ("past_key_values", "cache"):
            out = model(ids[:, :8], use_cache=True)
            cache = getattr(out, CACHE_FIELD)
            step = model(ids[:, 8:], use_cache=True, **{name: cache}).logits[:, -1]  # (1, V)
            assert (step - full).abs().max() <= 1e-4, name
