"""The search's own loss (`training.search_loss`): the source of every answer token is the earlier
occurrence that matches the answer best, its target chunks are exactly those whose selection makes
the read hold it (checked against the kernels' own neighbour rule), the loss trains the search to
pick them, and `fit_text` adds it at its weight and leaves no hook behind."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import resona_adapt.training.loop as loop
from resona_adapt import ResonaConfig, retrofit
from resona_adapt.kernels.reference import add_neighbors
from resona_adapt.retrofit import resona_layers, resona_parameters
from resona_adapt.tasks.mqar import IGNORE, mqar
from resona_adapt.text_demo import TextRecipe, fit_text
from resona_adapt.training.data import shift_targets_to_labels
from resona_adapt.training.search_loss import SearchLoss, answer_runs, copy_sources, search_targets

from helpers.models import tiny_text_model
from helpers.text_tokenizers import byte_tokenizer


def test_answer_runs_are_the_maximal_labelled_stretches():
    labelled = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    assert answer_runs(labelled) == [(1, 3), (5, 6), (7, 10)]
    assert answer_runs(torch.zeros(4, dtype=torch.bool)) == []


def test_the_source_is_the_needle_not_a_distractor_sharing_its_first_tokens():
    # context: a distractor "5 1 2 9 9" at 2..6, the needle "5 1 2 3 4" at 10..14; the answer copies the needle
    ids = torch.tensor([7, 7, 5, 1, 2, 9, 9, 8, 8, 8, 5, 1, 2, 3, 4, 8, 6, 5, 1, 2, 3, 4])
    start = 17
    assert copy_sources(ids, start, 22) == [[10], [11], [12], [13], [14]]
    # a token that occurs only alone (no stretch of 2) has no source; 6 at 16 never occurs before
    lone = torch.tensor([3, 1, 4, 4, 0, 9, 3, 6])
    assert copy_sources(lone, 6, 8) == [[], []]
    assert copy_sources(torch.tensor([1, 2]), 0, 2) == [[], []]  # nothing before the run
    # a one-token answer (MQAR: key 3 -> value 8) is found through the key before it
    mqar = torch.tensor([3, 8, 4, 9, 5, 8, 2, 2, 3, 8])
    assert copy_sources(mqar, 9, 10) == [[1]]
    # the match runs LOOKBACK = 8 tokens back before the run: the 8-token match beats the 7-token one
    far = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 2, 3, 4, 5, 6, 7, 8, 9, 11, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert copy_sources(far, 27, 28) == [[8]]
    # ", " after a value matches in many places: too many ties say nothing, so it is not supervised
    many = torch.tensor([4, 5, 0, 4, 5, 0, 4, 5, 0, 4, 5, 0, 4, 5, 0, 2, 4, 5])
    assert copy_sources(many, 16, 18) == [[], []]
    assert copy_sources(many, 16, 18, max_sources=5) == [[0, 3, 6, 9, 12], [1, 4, 7, 10, 13]]


def test_mqar_answers_are_found_through_their_keys():
    """MQAR's inputs at the answer positions are not the answers (the next query key follows): the source
    of every answer is the value right after its key's first occurrence."""
    data = mqar(4, 128, 16, 512, seed=3)
    labels = shift_targets_to_labels(data.labels)  # (4, 128) labels[p] predicted at p - 1
    checked = 0
    for b in range(4):
        ids = data.inputs[b]
        for start, end in answer_runs(labels[b] != IGNORE):
            assert end == start + 1  # one token per answer
            key = int(ids[start - 1])
            value_at = int((ids[:start] == key).nonzero()[0]) + 1
            assert copy_sources(ids, start, end, labels[b, start:end]) == [[value_at]]
            checked += 1
    assert checked == 4 * 16


@pytest.mark.parametrize("read_shift,neighbors", [(1, 1), (0, 0), (1, 0), (0, 2)])
def test_target_chunks_are_exactly_those_whose_read_holds_the_source(read_shift, neighbors):
    """For every supervised query and every chunk it may select, the chunk is a target iff selecting it
    alone makes the read (the selection plus `reference.add_neighbors`' slots, each slot c reading
    positions [c*U + s, (c+1)*U + s)) include the source position."""
    g = torch.Generator().manual_seed(0)
    U, T = 4, 96
    ids = torch.randint(10, 40, (2, T), generator=g)
    answers = torch.full((2, T), IGNORE)
    for b, (src, dst, n) in enumerate([(13, 70, 9), (30, 60, 12)]):  # copy ids[src:src+n] to dst, label it
        ids[b, dst:dst + n] = ids[b, src:src + n].clone()
        answers[b, dst:dst + n] = ids[b, dst:dst + n]
    rows, queries, hits = search_targets(ids, answers, U, neighbors, read_shift)
    assert len(rows) > 10 and hits.shape == (len(rows), T // U)
    source = {}  # (row, answer position) -> its source positions
    for b in range(2):
        for a, e in answer_runs(answers[b] != IGNORE):
            for k, found in enumerate(copy_sources(ids[b], a, e)):
                source[b, a + k] = found
    checked = 0
    for row, t, hit in zip(rows.tolist(), queries.tolist(), hits):
        sources = source[row, t + 1]  # the query at t predicts the token at t + 1
        may_select = (t - read_shift) // U
        for c in range(T // U):
            if c >= may_select:
                assert not hit[c]  # the causal rule: never a target the query cannot select
                continue
            slots, _ = add_neighbors(torch.tensor([[[c]]]), torch.zeros(1, 1, 1), torch.tensor([t - read_shift]), U, neighbors)
            read = {q for s in slots.flatten().tolist() if s >= 0 for q in range(s * U + read_shift, (s + 1) * U + read_shift)}
            assert bool(hit[c]) == any(j in read for j in sources), (row, t, c)
            checked += 1
    assert checked > 100


def test_list_line_starts_may_hit_any_value_still_to_give():
    """With ``starts`` (a list answer's line starts), the query before a line start hits the chunks of its
    own value and of every later one; every other query, and every query without ``starts``, keeps the
    document-order target."""
    U = 4
    filler = [30 + i % 7 for i in range(60)]
    ids = list(filler)
    values = [[11, 12, 13], [14, 15, 16], [17, 18, 19]]
    at = [9, 25, 41]  # each value inside its own chunk: 2, 6, 10 (read_shift 0)
    for a, v in zip(at, values):
        ids[a:a + 3] = v
    answer = values[0] + [2] + values[1] + [2] + values[2]  # "v1 \n v2 \n v3"
    ids = torch.tensor(ids + [3] + answer).unsqueeze(0)  # (1, 72)
    answers = torch.full_like(ids, IGNORE)
    first = 61
    answers[0, first:] = ids[0, first:]
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[0, [first, first + 4, first + 8]] = True
    plain = search_targets(ids, answers, U, 0, 0)
    rows, queries, hits = search_targets(ids, answers, U, 0, 0, starts=starts)
    assert torch.equal(rows, plain[0]) and torch.equal(queries, plain[1])
    chunks = {q: set(h.nonzero().flatten().tolist()) for q, h in zip(queries.tolist(), hits)}
    before = {q: set(h.nonzero().flatten().tolist()) for q, h in zip(plain[1].tolist(), plain[2])}
    assert before[first - 1] == {2} and before[first + 3] == {6} and before[first + 7] == {10}  # document order
    assert chunks[first - 1] == {2, 6, 10} and chunks[first + 3] == {6, 10} and chunks[first + 7] == {10}
    for q in chunks:
        if q not in (first - 1, first + 3, first + 7):
            assert chunks[q] == before[q], q


def test_fit_text_passes_line_starts_to_the_search_loss_only_when_asked(fake_corpus, monkeypatch):
    """``search_any_order`` (with ``list_any_order``) hands the list line starts to the search loss; by
    default it gets none (document order)."""
    from resona_adapt.training import search_loss as module

    seen: list[int | None] = []
    real_call = module.SearchLoss.__call__

    def spy(self, answers, starts=None):
        seen.append(None if starts is None else int(starts.sum()))
        return real_call(self, answers, starts)

    monkeypatch.setattr(module.SearchLoss, "__call__", spy)
    recipe = TextRecipe(config=ResonaConfig(chunk_size=16, top_k=2, num_heads=1, head_dim=8), steps=1, batch_size=2,
                        seq_len=800, min_len=700, kinds=("multivalue",), questions=1, copy_fraction=0.0,
                        short_fraction=0.0, tail_steps=0, search_loss_weight=0.5, list_any_order=True)
    for any_order in (False, True):
        torch.manual_seed(0)
        model = retrofit(tiny_text_model(), layers=[-1], config=recipe.config)
        fit_text(model, byte_tokenizer(), dataclasses.replace(recipe, search_any_order=any_order), seed=1)
    assert seen[0] is None and seen[1] is not None and seen[1] >= 2 * 2  # two rows, a list of 2-4 values each


def _copy_batch(n: int, half: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(1, 256, (n, half), generator=g)
    ids = torch.cat([first, first], dim=1)  # (n, 2*half)
    answers = torch.cat([torch.full((n, half), IGNORE), first], dim=1)
    return ids, answers


def _hit_rate(model, ids, answers) -> float:
    """Share of supervised queries whose top-1 selection (the kernels' own) is a target chunk."""
    layer = next(iter(resona_layers(model).values()))
    seen = {}
    hook = layer.resona.register_forward_pre_hook(lambda m, a, k: seen.update(h=a[0], x=a[1]), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids)
        _, idx = layer.resona.retrieve(seen["h"], seen["x"], return_indices=True)  # (B, T, K)
    hook.remove()
    cfg = layer.resona.config
    rows, queries, hits = search_targets(ids, answers, cfg.chunk_size, cfg.neighbor_chunks, cfg.read_shift)
    top1 = idx[rows, queries, 0]  # (Q,)
    return hits[torch.arange(len(rows)), top1.clamp(min=0)].logical_and(top1 >= 0).float().mean().item()


def test_the_search_loss_alone_teaches_the_search_to_pick_the_source_chunk():
    """A frozen tiny Mamba2 with a branch whose search sees a query window: 60 steps on the search loss
    only take the top-1 hit rate on held-out copy rows far above where it started (chance ~ 1/8)."""
    torch.manual_seed(0)
    model = retrofit(tiny_text_model(), layers=[-1], config=ResonaConfig(
        chunk_size=8, top_k=1, train_top_k=1, num_heads=1, head_dim=8, query_window=8, neighbor_chunks=1))
    test_ids, test_answers = _copy_batch(8, 64, seed=1)
    before = _hit_rate(model, test_ids, test_answers)
    params = [p for _, p in resona_parameters(model)]
    opt = torch.optim.Adam(params, lr=1e-2)
    model.train()
    with SearchLoss(model) as search:
        for step in range(60):
            ids, answers = _copy_batch(8, 64, seed=100 + step)
            model(input_ids=ids)
            loss = search(answers)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    after = _hit_rate(model, test_ids, test_answers)
    assert before < 0.4 and after > before + 0.4, (before, after)


def test_search_loss_needs_a_forward_and_removes_its_hooks():
    model = retrofit(tiny_text_model(), layers=[-1], config=ResonaConfig(chunk_size=8, num_heads=1, head_dim=8))
    branch = next(iter(resona_layers(model).values())).resona
    with SearchLoss(model) as search:
        with pytest.raises(RuntimeError, match="no forward recorded"):
            search(torch.full((1, 8), IGNORE))
        ids = torch.randint(1, 256, (1, 40))
        model(input_ids=ids)
        assert float(search(torch.full((1, 40), IGNORE))) == 0.0  # nothing to supervise
    assert not model._forward_pre_hooks and not branch._forward_pre_hooks


def test_fit_text_adds_the_search_loss_at_its_weight(fake_corpus, monkeypatch):
    """With ``search_loss_weight`` the step loss is the answer loss + weight x the search loss, the log
    shows the search loss, the weights differ from a run without it, and no hook is left behind."""
    from resona_adapt.training import search_loss as module

    def model_():
        torch.manual_seed(0)
        return retrofit(tiny_text_model(), layers=[-1], config=ResonaConfig(chunk_size=16, top_k=2, num_heads=1, head_dim=8))

    recipe = TextRecipe(config=ResonaConfig(chunk_size=16), steps=2, batch_size=2, seq_len=300, min_len=200,
                        kinds=("number",), questions=1, copy_fraction=0.5, copy_len=128, short_fraction=0.0, lr=5e-3,
                        tail_steps=0, search_loss_weight=0.0)
    searched: list[float] = []
    real_call = module.SearchLoss.__call__

    def spy(self, answers, starts=None):
        out = real_call(self, answers, starts)
        searched.append(float(out.detach()))
        return out

    steps: list[float] = []
    real_train = loop.train
    monkeypatch.setattr(loop, "train", lambda *a, on_step=None, **k: real_train(
        *a, on_step=lambda s, l: (steps.append(l), on_step(s, l)), **k))
    plain_model = model_()
    fit_text(plain_model, byte_tokenizer(), recipe, seed=1)
    plain = list(steps)
    monkeypatch.setattr(module.SearchLoss, "__call__", spy)
    steps.clear()
    model, log = model_(), []
    fit_text(model, byte_tokenizer(), dataclasses.replace(recipe, search_loss_weight=0.5), seed=1, log=log.append,
             log_every=1)
    assert len(searched) == 2 and all(s > 0 for s in searched)
    assert abs(steps[0] - (plain[0] + 0.5 * searched[0])) < 1e-4  # the first step: same weights, same answer loss
    assert "search" in log[0]
    assert any(not torch.equal(p, dict(resona_parameters(plain_model))[n]) for n, p in resona_parameters(model))
    assert not model._forward_pre_hooks
    assert all(not layer.resona._forward_pre_hooks for layer in resona_layers(model).values())


def _mqar_rows(n: int, seed: int) -> list[dict]:
    data = mqar(n, 64, 8, 256, seed=seed)
    labels = shift_targets_to_labels(data.labels)
    return [{"input_ids": data.inputs[i], "labels": labels[i]} for i in range(n)]


def _mqar_model():
    torch.manual_seed(0)
    return retrofit(tiny_text_model(), layers=[-1], config=ResonaConfig(chunk_size=2, top_k=2, num_heads=1, head_dim=8))


def test_train_adds_the_search_loss_and_divides_it_across_accumulation():
    """`train` with ``search_loss_weight``: the first step's loss is the LM loss + weight x the search
    loss, and 2 micro-batches of 2 rows train exactly as one batch of 4 (the search term is divided
    across the accumulation steps as the Trainer divides the LM loss)."""
    from resona_adapt.training import TrainConfig, train

    data = _mqar_rows(4, seed=5)
    sgd = dict(lr=1e-2, lr_multiplier=10.0, steps=2, scheduler="constant", warmup_ratio=0.0, optim="sgd",
               weight_decay=0.0, max_grad_norm=0.0)
    first, weights = {}, []
    for weight, batch, accum in ((0.0, 4, 1), (0.5, 4, 1), (0.5, 2, 2)):
        model, seen = _mqar_model(), []
        train(model, data, config=TrainConfig(batch_size=batch, grad_accum=accum, search_loss_weight=weight, **sgd),
              on_step=lambda step, loss: seen.append(loss))
        first[weight, batch] = seen[0]
        weights.append(dict(resona_parameters(model)))
        assert not model._forward_pre_hooks
        assert model.config.resona["training"][-1]["search_loss_weight"] == weight
    model = _mqar_model()
    with SearchLoss(model) as search:
        model(input_ids=torch.stack([d["input_ids"] for d in data]))
        expected = float(search(torch.stack([d["labels"] for d in data])).detach())
    assert expected > 0.1
    assert abs(first[0.5, 4] - (first[0.0, 4] + 0.5 * expected)) < 1e-4
    assert abs(first[0.5, 2] - first[0.5, 4]) < 1e-4
    assert all(torch.allclose(p, weights[2][n], atol=1e-6, rtol=1e-4) for n, p in weights[1].items())
    assert any(not torch.equal(p, weights[0][n]) for n, p in weights[1].items())  # the search term moved the weights


def test_train_refuses_a_search_loss_with_nothing_to_supervise():
    """Plain-text rows label every token, so no answer has an earlier source: refused before training."""
    from resona_adapt.errors import ResonaConfigError
    from resona_adapt.training import TrainConfig, train

    ids = torch.randint(1, 256, (4, 64))
    rows = [{"input_ids": ids[i], "labels": ids[i].clone()} for i in range(4)]
    model = _mqar_model()
    before = {n: p.clone() for n, p in resona_parameters(model)}
    with pytest.raises(ResonaConfigError, match="the search loss has nothing to supervise"):
        train(model, rows, config=TrainConfig(steps=1, batch_size=2, search_loss_weight=1.0))
    assert all(torch.equal(p, before[n]) for n, p in resona_parameters(model))
    with pytest.raises(ResonaConfigError, match="search_loss_weight must be a finite number >= 0"):
        TrainConfig(search_loss_weight=-1.0)


def _reference_copy_sources(ids, start, end, run=None, min_match=2, max_sources=4):
    """The per-run, per-position definition `row_sources` computes for all runs at once."""
    from resona_adapt.training.search_loss import LOOKBACK

    ctx, run = ids[:start].tolist(), (ids[start:end] if run is None else run).tolist()
    out = []
    for k in range(len(run)):
        lengths = []
        for j in range(len(ctx)):
            if ctx[j] != run[k]:
                lengths.append(0)
                continue
            n = 1  # backwards through the run, then up to LOOKBACK input tokens before it
            while j - n >= 0 and (run[k - n] == ctx[j - n] if n <= k else
                                  n - k <= min(LOOKBACK, start) and ids[start - (n - k)] == ctx[j - n]):
                n += 1
            m = 1  # forwards through the run, inside the context
            while j + m < len(ctx) and k + m < len(run) and ctx[j + m] == run[k + m]:
                m += 1
            lengths.append(n + m - 1)
        best = max(lengths, default=0)
        found = [j for j, n in enumerate(lengths) if n == best] if best >= min_match else []
        out.append(found if len(found) <= max_sources else [])
    return out


@pytest.mark.parametrize("seed", range(6))
def test_all_runs_at_once_equal_the_per_run_definition(seed):
    """`row_sources` (every run of a row at once) gives what the per-position definition gives, for rows of
    several runs (also touching, one token apart and at the row's start) over a small alphabet, with MQAR-like
    answers that differ from the inputs under them."""
    from resona_adapt.training.search_loss import row_sources

    g = torch.Generator().manual_seed(seed)
    T = 120
    ids = torch.randint(0, 5 if seed % 2 else 12, (T,), generator=g)
    answers = torch.full((T,), IGNORE)
    runs = [(0, 3), (30, 41), (42, 43), (60, 70), (70, 72), (100, 118)]
    for a, e in runs:
        answers[a:e] = ids[a:e] if seed < 3 else torch.randint(0, 12, (e - a,), generator=g)
    ids[100:118] = ids[44:62].clone()  # a long copy (its source holds a run's tokens too)
    answers[100:118] = ids[100:118] if seed < 3 else ids[45:63]
    pos, found = row_sources(ids, answers)
    got = {p: [j for j in row if j >= 0] for p, row in zip(pos.tolist(), found.tolist())}
    for a, e in answer_runs(answers != IGNORE):
        for k, want in enumerate(_reference_copy_sources(ids, a, e, answers[a:e])):
            assert got[a + k] == want, (a, e, k)
    assert sum(map(len, got.values())) > 10  # the rows do have sources to find
