"""Incremental generation: the Resona cache gives the logits of a full forward, inside generate()."""

from __future__ import annotations

import pytest
import torch

from helpers.models import VOCAB, build_tiny, randomize_resona
from resona_adapt import ResonaConfig, SurgeryError, retrofit
from resona_adapt.adapters.cache import ResonaCacheState, resona_cache
from resona_adapt.state import base_view

U = 4  # chunk size: every test below crosses several chunk boundaries
CFG = dict(chunk_size=U, num_heads=2, head_dim=8, search_dim=16)
LAYERS = [0, 2, -1]


def make(family: str, trained: bool = True, top_k: int = 2, mix: str = "residual", seed: int = 0):
    model = build_tiny(family, seed=seed)
    retrofit(model, layers=LAYERS, config=ResonaConfig(top_k=top_k, mix=mix, **CFG))
    if trained:
        randomize_resona(model)
    model.generation_config.eos_token_id = None  # random tiny models would stop at token 0
    return model


def full_logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, use_cache=False, **kw).logits


def stepwise_logits(model, ids, prefill: int, pieces: list[int] | None = None):
    """Prefill ``prefill`` tokens, then continue with pieces of the given sizes (default: one token)."""
    T = ids.shape[1]
    pieces = pieces or [1] * (T - prefill)
    assert prefill + sum(pieces) == T
    with torch.no_grad():
        out = model(ids[:, :prefill], use_cache=True)
        cache, logits, t = out.cache_params, [out.logits], prefill
        for n in pieces:
            out = model(ids[:, t:t + n], cache_params=cache, use_cache=True)
            logits.append(out.logits)
            t += n
    return torch.cat(logits, dim=1), cache


def assert_branch_is_live(model, ids):
    """The test would fail if the decode path dropped the branch: it changes the logits."""
    with base_view(model):
        base = full_logits(model, ids)
    assert (full_logits(model, ids) - base).abs().max() > 1e-2


@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("top_k", [1, 3])
def test_single_token_steps_equal_a_full_forward(family, top_k, trained):
    model = make(family, trained=trained, top_k=top_k)
    ids = torch.randint(0, VOCAB, (2, 31), generator=torch.Generator().manual_seed(1))
    full = full_logits(model, ids)
    steps, cache = stepwise_logits(model, ids, prefill=6)
    assert (steps - full).abs().max() <= 1e-4
    state = resona_cache(cache)
    assert state.length == 31 and all(int(d.min()) == 31 // U for d in state.done.values())
    if trained:
        assert_branch_is_live(model, ids)


@pytest.mark.parametrize("mix", ["gated", "paper-dynamic"])
def test_single_token_steps_equal_a_full_forward_in_other_mixes(mix):
    model = make("mamba2", mix=mix)
    ids = torch.randint(0, VOCAB, (1, 22), generator=torch.Generator().manual_seed(2))
    steps, _ = stepwise_logits(model, ids, prefill=3)
    assert (steps - full_logits(model, ids)).abs().max() <= 1e-4


def test_several_tokens_at_once_continue_right():
    # Mamba2: transformers' Mamba1/FalconMamba continue a prefill with several tokens wrongly on CPU
    model = make("mamba2", top_k=2)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    steps, _ = stepwise_logits(model, ids, prefill=5, pieces=[1, 6, 3, 1, 9, 2, 1, 12])
    assert (steps - full_logits(model, ids)).abs().max() <= 1e-4


def greedy_by_full_forwards(model, ids, n: int):
    seq = ids
    for _ in range(n):
        nxt = full_logits(model, seq)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


@pytest.mark.parametrize("trained", [False, True])
def test_greedy_generate_equals_argmax_of_full_forwards(family, trained):
    model = make(family, trained=trained)
    ids = torch.randint(1, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=18, do_sample=False)
    assert torch.equal(out, greedy_by_full_forwards(model, ids, 18))


def test_evaluation_greedy_decodes_with_the_cache():
    """`evaluation.generate.greedy_generate` (NIAH, text eval): the tokens of full forwards, read through
    the cache (after the prompt, one token per forward), cut after the first stop token; the
    checkpoint's generation config (sampling, a repetition penalty, its end token) does not apply."""
    from resona_adapt.evaluation.generate import greedy_generate

    model = make("mamba2")
    model.generation_config.do_sample, model.generation_config.repetition_penalty = True, 5.0
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(8))
    want = greedy_by_full_forwards(model, ids, 16)[0, 9:]
    model.generation_config.eos_token_id = int(want[3])  # not a stop token of the evaluation's
    lengths = []
    hook = model.register_forward_pre_hook(lambda m, a, k: lengths.append(k["input_ids"].shape[1]), with_kwargs=True)
    try:
        got = greedy_generate(model, ids, 16)
    finally:
        hook.remove()
    assert torch.equal(got, want) and lengths[0] == 9 and set(lengths[1:]) == {1}
    stop = int(want[5])
    first = int((want == stop).nonzero()[0])
    assert torch.equal(greedy_generate(model, ids, 16, stop_ids={stop}), want[: first + 1])
    assert greedy_generate(model, ids, 0).numel() == 0


def test_evaluation_greedy_falls_back_to_full_forwards_where_generate_is_wrong(monkeypatch):
    """fla's models generate wrong tokens under transformers releases they do not support
    (`compat.installed_incompatibility`): there the evaluation decodes by full forwards, never generate()."""
    import resona_adapt.compat as compat
    from resona_adapt.evaluation.generate import greedy_generate

    model = make("mamba2")
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(9))
    want = greedy_by_full_forwards(model, ids, 6)[0, 9:]
    model.__class__ = type("GLAForCausalLM", (type(model),), {"__module__": "fla.models.gla.modeling_gla"})

    def refuse(*a, **k):
        raise AssertionError("generate() must not run")

    monkeypatch.setattr(model, "generate", refuse)
    monkeypatch.setattr(compat, "installed_incompatibility", lambda: "fla under transformers 5.24")
    assert torch.equal(greedy_generate(model, ids, 6), want)
    monkeypatch.setattr(compat, "installed_incompatibility", lambda: None)
    with pytest.raises(AssertionError, match="must not run"):
        greedy_generate(model, ids, 6)  # a supported pair decodes with the cache


def generate_scores(model, ids, mask=None, n: int = 14, **kw):
    mask = torch.ones_like(ids) if mask is None else mask  # never let generate() guess a mask from pad ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.scores, dim=1)  # (B, T+n), (B, n, V)


@pytest.mark.parametrize("trained", [False, True])
def test_left_padded_batch_equals_each_row_alone(family, trained):
    model = make(family, trained=trained)
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, VOCAB, (1, n), generator=g) for n in (11, 6, 2)]
    T = max(r.shape[1] for r in rows)
    batch = torch.cat([torch.cat([torch.zeros(1, T - r.shape[1], dtype=torch.long), r], 1) for r in rows])
    mask = torch.cat([torch.cat([torch.zeros(1, T - r.shape[1]), torch.ones(1, r.shape[1])], 1) for r in rows]).long()
    seqs, scores = generate_scores(model, batch, mask)
    for b, row in enumerate(rows):
        alone_seq, alone_scores = generate_scores(model, row)
        assert torch.equal(seqs[b, T:], alone_seq[0, row.shape[1]:]), b
        assert (scores[b] - alone_scores[0]).abs().max() <= 1e-4, b


def test_two_generate_calls_are_independent():
    model = make("mamba")
    g = torch.Generator().manual_seed(6)
    a, b = torch.randint(1, VOCAB, (1, 13), generator=g), torch.randint(1, VOCAB, (1, 9), generator=g)
    b_first = generate_scores(model, b)
    a_first = generate_scores(model, a)
    b_again = generate_scores(model, b)
    a_again = generate_scores(model, a)
    for x, y in ((b_first, b_again), (a_first, a_again)):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    assert torch.equal(a_first[0], greedy_by_full_forwards(model, a, 14))


def test_beam_search_equals_beam_search_over_full_forwards(family, cache_reorders):
    model = make(family)
    g = torch.Generator().manual_seed(7)
    rows = [torch.randint(1, VOCAB, (1, n), generator=g) for n in (10, 7)]
    batch = torch.cat([rows[0], torch.cat([torch.zeros(1, 3, dtype=torch.long), rows[1]], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=12, num_beams=2, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(batch, attention_mask=mask, use_cache=True, **kw)
        assert any(not torch.equal(i.cpu(), torch.arange(len(i))) for i in cache_reorders)  # beams did swap
        full = model.generate(batch, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(cached.sequences, full.sequences)
    torch.testing.assert_close(cached.sequences_scores, full.sequences_scores, atol=1e-4, rtol=0)


def test_cache_batch_operations_move_the_resona_state():
    model = make("mamba2")
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, VOCAB, (3, 14), generator=g)
    nxt = torch.randint(0, VOCAB, (3, 1), generator=g)
    _, cache = stepwise_logits(model, ids, prefill=9)
    order = torch.tensor([2, 0, 1])
    cache.reorder_cache(order)
    with torch.no_grad():
        moved = model(nxt, cache_params=cache, use_cache=True).logits
    expected = full_logits(model, torch.cat([ids[order], nxt], 1))[:, -1:]
    assert (moved - expected).abs().max() <= 1e-4
    state = resona_cache(cache)
    ref = state.ids.clone()
    state.repeat_interleave(2)
    assert torch.equal(state.ids, ref.repeat_interleave(2, dim=0))
    state.crop(-5)
    assert state.length == ref.shape[1] - 5
    assert all(torch.equal(d, torch.full_like(d, state.length // U)) for d in state.done.values())
    cache.reset()
    assert resona_cache(cache) is None


def test_cache_patches_follow_copies_and_plain_dynamic_caches():
    import copy

    from transformers import DynamicCache

    from resona_adapt.adapters.cache import attach

    def state(rows: int) -> ResonaCacheState:
        ids = torch.arange(rows * 5, dtype=torch.int32).view(rows, 5)
        return ResonaCacheState(ids=ids, pad=torch.zeros(rows, dtype=torch.long), chunk_size=U, prefill_forward=0,
                                forward_id=0, new_tokens=5)

    cache = DynamicCache()
    attach(cache, state(3))
    cache.batch_select_indices(torch.tensor([2, 0]))
    assert resona_cache(cache).ids[:, 0].tolist() == [10, 0]
    cache.batch_repeat_interleave(2)
    assert resona_cache(cache).ids[:, 0].tolist() == [10, 10, 0, 0]
    twin = copy.deepcopy(cache)
    twin.reorder_cache(torch.tensor([3, 2, 1, 0]))
    assert resona_cache(twin).ids[:, 0].tolist() == [0, 0, 10, 10]
    assert resona_cache(cache).ids[:, 0].tolist() == [10, 10, 0, 0]  # the original is untouched


def test_cache_size_is_ids_plus_chunk_summaries():
    model = make("mamba")
    ids = torch.randint(0, VOCAB, (2, 27), generator=torch.Generator().manual_seed(9))
    _, cache = stepwise_logits(model, ids, prefill=5)
    state = resona_cache(cache)
    B, L, E = 2, 27, CFG["search_dim"]
    assert state.ids.dtype == torch.int32 and set(state.summaries) == {0, 2, 3}
    assert state.nbytes() == B * L * 4 + len(LAYERS) * B * (L // U) * E * 4
    # nothing transformer-sized: no keys, no values, no embeddings of the context
    assert all(s.shape == (B, L // U, E) for s in state.summaries.values())


def test_continuing_a_cache_filled_from_embeddings_is_a_clear_error():
    model = make("mamba")
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
        cache = model(inputs_embeds=emb, use_cache=True).cache_params
        with pytest.raises(SurgeryError, match="inputs_embeds"):
            model(ids[:, :1], cache_params=cache, use_cache=True)


def test_a_decode_step_never_projects_context_tokens():
    """The absorbed form: k_proj / v_proj are applied to weights, never to the k*U retrieved tokens,
    and each step re-embeds only the selected chunks (plus a chunk that just completed)."""
    from resona_adapt import resona_layers

    model = make("mamba", top_k=2)
    layers = resona_layers(model)
    calls = []
    for layer in layers.values():
        for proj in (layer.resona.k_proj, layer.resona.v_proj):
            proj.register_forward_hook(lambda *a: calls.append(1))
    context = next(iter(layers.values())).context
    embedded = []
    original = context.embed
    context.embed = lambda ids: (embedded.append(ids.numel()), original(ids))[1]
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        cache = model(ids[:, :21], use_cache=True).cache_params  # prefill: the full path projects
        assert calls
        calls.clear()
        model(ids[:, 21:22], cache_params=cache, use_cache=True)  # first step: summaries of the 5 prompt chunks
        embedded.clear()
        for t in range(22, 30):
            model(ids[:, t:t + 1], cache_params=cache, use_cache=True)
    assert not calls
    cfg = next(iter(layers.values())).resona.config
    # top_k chunks and their neighbours, U tokens each plus the token before (shifted keys)
    per_layer_step = 2 * (1 + cfg.neighbor_chunks) * (U + int(cfg.key_shift) * cfg.key_context)
    completed = 2 * len(layers) * U  # chunks 5 and 6 complete at lengths 24 and 28, once per layer
    assert sum(embedded) == 8 * len(layers) * per_layer_step + completed


def assert_steps_equal_full_forward(family: str, prefill: int, **cfg):
    """A trained branch of ``cfg``: single-token decoding gives the full forward's logits; returns the model."""
    model = build_tiny(family)
    retrofit(model, layers=LAYERS, config=ResonaConfig(top_k=2, **cfg, **CFG))
    randomize_resona(model)
    model.generation_config.eos_token_id = None
    ids = torch.randint(0, VOCAB, (2, 27), generator=torch.Generator().manual_seed(3))
    steps, _ = stepwise_logits(model, ids, prefill=prefill)
    torch.testing.assert_close(steps, full_logits(model, ids), atol=1e-4, rtol=1e-4)
    assert_branch_is_live(model, ids)
    return model


@pytest.mark.parametrize("pool", ["weighted", "attention"])
def test_weighted_chunk_pool_steps_equal_a_full_forward(pool):
    assert_steps_equal_full_forward("mamba2", 5, chunk_pool=pool)


@pytest.mark.parametrize("family, key_context, read_window", [("mamba2", 1, False), ("mamba", 1, False),
                                                              ("mamba2", 3, False), ("mamba2", 2, True)])
def test_query_window_steps_equal_a_full_forward(family, key_context, read_window):
    """The window of recent embeddings is re-embedded from the cached ids at each decode step, and
    keys that see several previous tokens (or, with read_window, the pooled window before them) get
    them from the cache too; left padding included."""
    model = assert_steps_equal_full_forward(family, 3, query_window=5, key_context=key_context,
                                            read_window=read_window)
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, VOCAB, (1, n), generator=g) for n in (11, 2)]
    batch = torch.cat([torch.cat([torch.zeros(1, 11 - r.shape[1], dtype=torch.long), r], 1) for r in rows])
    mask = (torch.arange(11) >= torch.tensor([[0], [9]])).long()
    seqs, scores = generate_scores(model, batch, mask)
    for b, row in enumerate(rows):
        alone_seq, alone_scores = generate_scores(model, row)
        assert (scores[b] - alone_scores[0]).abs().max() <= 1e-4, b


def _copying_ids(rows: int = 2, seed: int = 7, shifts: tuple[int, ...] = (0, 5)) -> torch.Tensor:
    """(rows, 40) ids whose second half repeats the first from its 4th token on (so read coverage counts
    copies). The first 20 tokens of a row are distinct and the copy is shifted by 17, so no two chunks of
    U = 4 hold the same tokens in any order, counted from each of ``shifts`` (a row cut by that many
    tokens, as the padded test does): such chunks have equal mean summaries up to rounding, and a hard
    top-k at a tie within rounding can pick differently in a decode step and in a full forward."""
    g = torch.Generator().manual_seed(seed)
    first = torch.stack([torch.randperm(VOCAB - 1, generator=g)[:20] + 1 for _ in range(rows)])  # (rows, 20)
    ids = torch.cat([first, first[:, 3:20], torch.randint(1, VOCAB, (rows, 3), generator=g)], dim=1)  # (rows, 40)
    for row in ids:
        for shift in shifts:
            chunks = row[shift:].tolist()
            bags = [tuple(sorted(chunks[i:i + U])) for i in range(0, len(chunks) - U + 1, U)]
            assert len(set(bags)) == len(bags), (shift, bags)  # the premise, checked
    return ids


def _steps_equal_full(config: ResonaConfig) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny Mamba2 retrofitted with ``config`` and randomised branches, checked: decoding `_copying_ids`
    step by step after a 9-token prefill gives the full forward's logits. Returns the model, the ids and
    those logits."""
    model = build_tiny("mamba2")
    retrofit(model, layers=LAYERS, config=config)
    randomize_resona(model)
    model.generation_config.eos_token_id = None
    ids = _copying_ids()
    steps, _ = stepwise_logits(model, ids, prefill=9)
    full = full_logits(model, ids)
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)
    return model, ids, full


@pytest.mark.parametrize("by_position, read_order", [(False, False), (True, False), (True, True)])
def test_read_coverage_steps_equal_a_full_forward(by_position, read_order):
    """Read coverage is counted from the cached ids at each decode step exactly as the full forward
    counts it (per chunk, or per position; with ``read_order`` each slot's rank too), left padding
    included; and it is live (a zero gate changes the logits)."""
    model, ids, full = _steps_equal_full(ResonaConfig(top_k=2, read_coverage=6, neighbor_chunks=1,
                                                      coverage_by_position=by_position, read_order=read_order, **CFG))
    branches = [m for m in model.modules() if type(m).__name__ == "ResonaBranch"]
    gates = [m for b in branches for m in (b.coverage_gate, b.position_gate, b.order_gate) if m is not None]
    assert len(gates) == len(branches) * (1 + by_position + read_order)
    saved = [g.weight.detach().clone() for g in gates]
    for g in gates:  # each gate on its own is live
        with torch.no_grad():
            w, bias = g.weight.detach().clone(), g.bias.detach().clone()
            g.weight.zero_()
            g.bias.zero_()
        assert (full_logits(model, ids) - full).abs().max() > 1e-3  # the coverage term did something
        with torch.no_grad():
            g.weight.copy_(w)
            g.bias.copy_(bias)
    with torch.no_grad():
        for b in branches:
            b.coverage_gate.weight.zero_()
            b.coverage_gate.bias.zero_()
    with torch.no_grad():
        for g, w in zip(gates, saved):
            g.weight.copy_(w)
            g.bias.fill_(1.0)
    rows = [ids[:1], ids[1:, 5:]]
    batch = torch.cat([rows[0], torch.cat([torch.zeros(1, 5, dtype=torch.long), rows[1]], 1)])
    mask = (torch.arange(40) >= torch.tensor([[0], [5]])).long()
    seqs, scores = generate_scores(model, batch, mask)
    for b, row in enumerate(rows):
        alone_seq, alone_scores = generate_scores(model, row)
        assert (scores[b] - alone_scores[0]).abs().max() <= 1e-4, b


def test_read_order_alone_steps_equal_a_full_forward():
    """Without read_coverage the order term is added at each decode step as the full forward adds it,
    left padding included; and it is live."""
    model, ids, full = _steps_equal_full(ResonaConfig(top_k=3, neighbor_chunks=1, read_order=True, **CFG))
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "ResonaBranch":
                m.order_gate.bias.add_(2.0)
    moved = full_logits(model, ids)
    assert (moved - full).abs().max() > 1e-3
    torch.testing.assert_close(stepwise_logits(model, ids, prefill=9)[0], moved, atol=1e-4, rtol=1e-4)
    rows = [ids[:1], ids[1:, 5:]]
    batch = torch.cat([rows[0], torch.cat([torch.zeros(1, 5, dtype=torch.long), rows[1]], 1)])
    mask = (torch.arange(40) >= torch.tensor([[0], [5]])).long()
    seqs, scores = generate_scores(model, batch, mask)
    for b, row in enumerate(rows):
        assert (scores[b] - generate_scores(model, row)[1][0]).abs().max() <= 1e-4, b


@pytest.mark.parametrize("seed", [0, 5])
def test_a_repeated_passage_decodes_as_the_full_forward_reads_it(seed):
    """The same four tokens in every other chunk: their summaries tie exactly, and torch.topk's choice
    among equal scores depends on how many chunks it scores (a decode step: those done so far; a
    prefill tile: all its last query may see). With neighbour reads the copies differ, so a platform
    tie-break gave logits 1.3-2.5 apart; the earlier chunk wins everywhere now."""
    torch.manual_seed(seed)
    model = build_tiny("mamba2")
    retrofit(model, layers=LAYERS, config=ResonaConfig(top_k=2, neighbor_chunks=1, **CFG))
    randomize_resona(model)
    g = torch.Generator().manual_seed(seed)
    passage = torch.randint(1, VOCAB, (1, U), generator=g)
    ids = torch.cat([t for _ in range(10) for t in (passage, torch.randint(1, VOCAB, (1, U), generator=g))], 1)  # (1, 80)
    steps, _ = stepwise_logits(model, ids, prefill=5)
    torch.testing.assert_close(steps, full_logits(model, ids), atol=1e-4, rtol=1e-4)
