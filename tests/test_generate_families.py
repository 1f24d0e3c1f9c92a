"""Generation beyond the Mamba families: left padding and beam search on a hybrid, Hymba and an fla
model; the one way a layer finds its cache (`ResonaLayer.cache_in_call`, recorded at retrofit);
where the Resona state lives when the cache is a list or tuple of tensors (RWKV, xLSTM); and the
loud failures that replace silent wrong decoding. The per-family generate() check itself is in
the family matrix (tests/helpers/matrix.py::check_generate)."""

from __future__ import annotations

import pytest
import torch

from helpers.models import build_tiny
from helpers.fla_support import FLA_INSTALLED, SKIP_REASON, build_fla
from helpers.hymba_support import build_hymba
from helpers.matrix import CFG, check_generate, hf_cache_name, hf_generate, randomize_resona
from resona_adapt import ResonaConfig, SurgeryError, resona_cache, resona_layers, retrofit
from resona_adapt.adapters.cache import STATE_ATTR
from helpers.tiny_families import build_family

VOCAB = 64
NEEDS_FLA = pytest.mark.skipif(not FLA_INSTALLED, reason=SKIP_REASON)


def make(name: str, **retrofit_kw):
    """A tiny model of ``name`` retrofitted at its default layers, with a live (non-zero) branch."""
    if name in ("hymba", "hymba-swap"):
        model = build_hymba()
        if name == "hymba-swap":  # the paper's ablation: three consecutive layers' attention heads replaced
            retrofit_kw = {**retrofit_kw, "layers": [1, 2, 3]}
    elif name == "gla":
        model = build_fla("gla")
    elif name in ("mamba", "mamba2", "falcon_mamba"):
        model = build_tiny(name)
    else:
        model = build_family(name)
    retrofit(model, config=ResonaConfig(replace_attention=name == "hymba-swap", **CFG), **retrofit_kw)
    randomize_resona(model)
    return model


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(r.shape[1] for r in rows)
    ids = torch.cat([torch.cat([torch.zeros(1, T - r.shape[1], dtype=torch.long), r], 1) for r in rows])
    mask = torch.cat([torch.cat([torch.zeros(1, T - r.shape[1]), torch.ones(1, r.shape[1])], 1) for r in rows])
    return ids, mask.long()


@pytest.mark.parametrize("name", ["jamba", "bamba", "hymba", "hymba-swap", pytest.param("gla", marks=NEEDS_FLA)])
def test_left_padded_batch_equals_each_row_alone(name):
    model = make(name)
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(3, VOCAB, (1, n), generator=g) for n in (7, 5)]  # fla: few shapes, Triton interpreter
    ids, mask = left_padded(rows)
    seqs, steps = hf_generate(model, ids, 5, attention_mask=mask)  # both rows cross a chunk boundary
    T = ids.shape[1]
    for b, row in enumerate(rows):
        alone_seq, alone_steps = hf_generate(model, row, 5)
        assert torch.equal(seqs[b, T:], alone_seq[0, row.shape[1]:]), b
        assert (steps[b] - alone_steps[0]).abs().max() <= 1e-4, b


@pytest.mark.parametrize("name", ["jamba", "hymba", "hymba-swap", pytest.param("gla", marks=NEEDS_FLA)])
def test_beam_search_with_the_cache_equals_beam_search_over_full_forwards(name, cache_reorders):
    """Beams swap, the Resona state follows the cache's reorder_cache, and the beams are those of
    full forwards (use_cache=False), with left padding."""
    model = make(name)
    g = torch.Generator().manual_seed(7)
    ids, mask = left_padded([torch.randint(3, VOCAB, (1, n), generator=g) for n in (7, 5)])
    model.generation_config.eos_token_id = None
    kw = dict(attention_mask=mask, max_new_tokens=5, num_beams=2, do_sample=False, output_scores=True,
              return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        assert any(not torch.equal(i, torch.arange(len(i))) for i in cache_reorders)  # beams did swap
        full = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, full.sequences)
    torch.testing.assert_close(cached.sequences_scores, full.sequences_scores, atol=1e-4, rtol=0)


def test_unknown_architecture_finds_its_cache_from_the_signatures(monkeypatch):
    """Without a registry entry (generic discovery) the mixer's and the backbone's cache parameters come
    from their signatures, and generation is right."""
    from resona_adapt.surgery import REGISTRY, discover

    monkeypatch.delitem(REGISTRY, "mamba2")
    model = build_tiny("mamba2")
    assert discover(model).spec is None
    retrofit(model, config=ResonaConfig(**CFG))
    randomize_resona(model)
    recorded = {(layer.cache_kwarg, layer.cache_arg_index) for layer in resona_layers(model).values()}
    assert recorded == {(hf_cache_name("cache_params"), 1)}
    check_generate(model, torch.randint(3, VOCAB, (2, 7)))


def test_a_mixer_that_gets_no_cache_while_the_model_continues_one_is_an_error():
    """The silent failure this replaces: the branch ran its full path on the new token alone."""
    model = make("mamba")
    layer = resona_layers(model)[0]
    layer.cache_kwarg, layer.cache_arg_index = None, None  # as if the family's cache keyword were unknown
    ids = torch.randint(3, VOCAB, (1, 9))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache_params  # a prefill without a cache is a full forward: fine
        with pytest.raises(SurgeryError, match="mixer of Resona layer 0 received no generation cache.*use_cache=False"):
            model(ids[:, :1], cache_params=cache, use_cache=True)


def test_a_cache_filled_before_retrofit_is_an_error():
    model = build_tiny("mamba")
    ids = torch.randint(3, VOCAB, (1, 9))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache_params
        retrofit(model, config=ResonaConfig(**CFG))
        with pytest.raises(SurgeryError, match="already holds positions but no Resona state"):
            model(ids[:, :1], cache_params=cache, use_cache=True)


def test_rwkv_state_list_carries_the_resona_state_on_its_first_tensor():
    model = make("rwkv")
    ids = torch.randint(3, VOCAB, (1, 9))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        state = resona_cache(out.state)
        assert state is not None and state is out.state[0].__dict__[STATE_ATTR] and state.length == 9
        model(ids[:, :1], state=out.state, use_cache=True)  # RWKV updates its state tensors in place
        assert resona_cache(out.state).length == 10
        copied = [s.clone() for s in out.state]  # a new list of new tensors: the Resona state is not in it
        with pytest.raises(SurgeryError, match="already holds positions but no Resona state"):
            model(ids[:, :1], state=copied, use_cache=True)


def test_xlstm_layer_states_share_one_resona_state_and_reset_drops_it():
    model = make("xlstm")
    layers = sorted(resona_layers(model))
    with torch.no_grad():
        cache = model(torch.randint(3, VOCAB, (1, 9)), use_cache=True).cache_params
    states = {id(resona_cache(cache.rnn_state[i])) for i in layers}
    assert len(states) == 1 and resona_cache(cache.rnn_state[layers[0]]).length == 9  # the ids once for all layers
    cache.reset()  # new state tensors: the next forward is a new sequence
    assert all(resona_cache(cache.rnn_state[i]) is None for i in layers)


def test_cuda_graph_capture_is_refused(monkeypatch):
    model = make("mamba")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with torch.no_grad(), pytest.raises(SurgeryError, match="CUDA graph.*cg=False"):
        model(torch.randint(3, VOCAB, (1, 5)), use_cache=True)
