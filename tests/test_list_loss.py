"""The order-free list loss (`training.list_loss`): flags on the line starts of multi-value answers,
the set loss at each, plain cross-entropy everywhere else, and `fit_text` with ``list_any_order``."""

from __future__ import annotations

import dataclasses
import math

import torch

from resona_adapt import ResonaConfig, retrofit
from resona_adapt.text_demo import TextRecipe, fit_text, text_batches
from resona_adapt.training.data import IGNORE
from resona_adapt.training.list_loss import (LIST_START, flag_line_starts, flagged, line_starts, list_row_mean_loss,
                                             strip_flags)
from resona_adapt.training.niah_task import answer_text, niah_text_dataset
from resona_adapt.training.trainer import row_mean_loss

from helpers.models import tiny_text_model
from helpers.text_tokenizers import byte_tokenizer


def test_without_flags_it_is_the_row_mean_loss():
    torch.manual_seed(0)
    logits = torch.randn(3, 9, 11)  # (B, T, V)
    labels = torch.randint(0, 11, (3, 9))
    labels[0, :4] = IGNORE
    labels[2] = IGNORE  # a row without labels
    assert torch.allclose(list_row_mean_loss(logits, labels), row_mean_loss(logits, labels), atol=1e-6)


def test_a_line_start_may_be_any_value_still_to_give():
    """Row: line starts at label positions 2, 5, 7 with first tokens 3, 4, 5 (position t predicts t + 1).
    The first start accepts {3, 4, 5}, the second {4, 5}, the last {5} alone; others are plain."""
    V = 8
    labels = torch.full((1, 9), IGNORE)
    labels[0, 2:9] = torch.tensor([3, 1, 1, 4, 1, 5, 1])
    labels = torch.tensor([flag_line_starts(labels[0].tolist(), 0, [2, 5, 7])])
    assert flagged(labels).nonzero()[:, 1].tolist() == [2, 5, 7]
    assert torch.equal(strip_flags(labels)[0, 2:9], torch.tensor([3, 1, 1, 4, 1, 5, 1]))
    torch.manual_seed(1)
    logits = torch.randn(1, 9, V, requires_grad=True)  # (B, T, V)
    logp = logits[0].log_softmax(-1)  # (T, V)
    per_token = [
        -torch.logsumexp(logp[1, [3, 4, 5]], 0),  # predicts label 2: any of the three
        -logp[2, 1], -logp[3, 1],
        -torch.logsumexp(logp[4, [4, 5]], 0),  # label 5: the two still to give
        -logp[5, 1],
        -logp[6, 5],  # label 7: the last one, a plain target
        -logp[7, 1],
    ]
    want = torch.stack(per_token).mean()
    got = list_row_mean_loss(logits, labels)
    assert torch.allclose(got, want, atol=1e-5)
    got.backward()
    assert logits.grad is not None and bool(logits.grad[0, 1, [3, 4, 5]].ne(0).all())
    # the document-order loss is larger: it wants the first start to be token 3 alone
    assert float(row_mean_loss(logits.detach(), strip_flags(labels))) > float(got.detach())


def test_a_sharp_pick_of_a_later_value_costs_nothing_at_its_line_start():
    labels = torch.tensor([flag_line_starts([IGNORE, 3, 1, 4, 1], 0, [1, 3])])  # (1, 5)
    logits = torch.zeros(1, 5, 6)
    logits[0, 0, 4] = 50.0  # the first line starts with the second value (token 4), sharply
    logits[0, 1, 1] = logits[0, 3, 1] = 50.0
    logits[0, 2, 4] = 50.0  # after the (teacher-forced) first line, value 3, the one still to give
    assert float(list_row_mean_loss(logits, labels)) < 1e-6  # the order is free ...
    assert float(row_mean_loss(logits, strip_flags(labels))) > 10  # ... where the document order is not
    logits[0, 2] = 0.0
    logits[0, 2, 3] = 50.0  # giving the line already given again is not a value still to give
    assert float(list_row_mean_loss(logits, labels)) > 10


def test_niah_dataset_flags_each_value_start_of_a_multi_value_answer(fake_corpus):
    tok = byte_tokenizer()
    kinds = ("number", "multivalue")
    flags = niah_text_dataset(tok, 700, 8, seed=1, kinds=kinds, lm_fraction=0.25, min_len=500, any_order=True)
    plain = niah_text_dataset(tok, 700, 8, seed=1, kinds=kinds, lm_fraction=0.25, min_len=500)
    lists = 0
    for i in range(len(plain)):
        ids, labels = flags[i]["input_ids"], flags[i]["labels"]
        assert torch.equal(ids, plain[i]["input_ids"]) and torch.equal(strip_flags(labels), plain[i]["labels"])
        at = flagged(labels).nonzero().flatten().tolist()
        if bool((labels != IGNORE).all()):  # a plain-text row
            assert at == []
            continue
        n = int((labels != IGNORE).sum())
        values = tok.decode(ids[-n:].tolist())[1:-1].split(".\n")
        if len(values) == 1:
            assert at == []  # a single answer keeps its plain target
            continue
        lists += 1
        assert [tok.decode(ids[p:].tolist())[:7] for p in at] == values  # each flag: a value's first token
        assert all(tok.decode([int(ids[p - 1])]) in (" ", "\n") for p in at)
    assert lists >= 2


def test_line_starts_refuse_a_tokenization_that_does_not_split_at_values():
    tok = byte_tokenizer()
    values = ["123", "456"]
    answer = tok(answer_text(values), add_special_tokens=False)["input_ids"]
    assert line_starts(tok, values, answer) == [1, 6]  # " 123.\n456.": '1' at 1, '4' at 6
    assert line_starts(tok, values, answer[:3]) == []  # not the answer of these values: nothing flagged
    assert LIST_START > max(answer) and LIST_START * 2 == 1 << 30


def test_fit_text_trains_with_the_any_order_loss(fake_corpus, monkeypatch):
    """`fit_text` with ``list_any_order``: the loss reads the flags, the search loss and the metric get
    plain token ids (a flag reaching them would index past the vocabulary)."""
    from resona_adapt.training import list_loss, search_loss

    torch.manual_seed(0)
    model = retrofit(tiny_text_model(), layers=[-1], config=ResonaConfig(chunk_size=16, top_k=2, num_heads=1, head_dim=8))
    recipe = TextRecipe(config=ResonaConfig(chunk_size=16), steps=2, batch_size=2, seq_len=700, min_len=500,
                        kinds=("multivalue",), questions=1, copy_fraction=0.0, short_fraction=0.0, lr=5e-3, lm_fraction=0.0,
                        search_loss_weight=0.5, list_any_order=True, tail_steps=0)
    _, labels = text_batches(byte_tokenizer(), recipe, seed=1).batch(0)
    assert int(flagged(labels).sum()) == 2 * 4  # two multi-value rows, four line starts each
    seen: list[torch.Tensor] = []
    searched: list[torch.Tensor] = []
    real, real_search = list_loss.list_row_mean_loss, search_loss.SearchLoss.__call__
    monkeypatch.setattr(list_loss, "list_row_mean_loss", lambda lg, lb: (seen.append(lb.clone()), real(lg, lb))[1])
    monkeypatch.setattr(search_loss.SearchLoss, "__call__", lambda self, a, starts=None: (searched.append(a.clone()), real_search(self, a, starts))[1])
    out = fit_text(model, byte_tokenizer(), recipe, seed=1)
    assert len(seen) == 2 and torch.equal(seen[0], labels) and math.isfinite(out["final_loss"])
    assert len(searched) == 2 and torch.equal(searched[0], strip_flags(labels))  # plain ids for the search loss
    ordered = dataclasses.replace(recipe, list_any_order=False)
    assert not flagged(text_batches(byte_tokenizer(), ordered, seed=1).batch(0)[1]).any()


def test_line_starts_refuse_a_value_whose_first_token_merges_with_the_line_break():
    """A tokenizer that merges "\\n4" into one token: the line start is not a token of its own, so
    nothing is flagged (flagging the token after it would train the wrong position)."""
    def tok(text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            if text.startswith("\n4", i):
                ids.append(1000)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return {"input_ids": ids}

    answer = tok(answer_text(["123", "456"]))["input_ids"]
    assert line_starts(tok, ["123", "456"], answer) == []
    assert line_starts(tok, ["123", "756"], tok(answer_text(["123", "756"]))["input_ids"]) == [1, 6]


def test_a_committed_line_start_is_the_loss_of_the_most_probable_value_still_to_give():
    """``commit``: at a flagged line start the loss is ``-log p`` of the allowed first token the model rates
    highest, and the gradient reaches that token's logit only among the allowed ones."""
    labels = torch.tensor([flag_line_starts([IGNORE, 3, 1, 4, 1, 5, 1], 0, [1, 3, 5])])  # (1, 7)
    torch.manual_seed(2)
    logits = torch.randn(1, 7, 8)  # (B, T, V)
    logits[0, 0, 4] = 3.0  # the first line start rates the second value (token 4) above the first (3) and third (5)
    logits[0, 0, 3] = logits[0, 0, 5] = 1.0
    logits.requires_grad_(True)
    logp = logits[0].log_softmax(-1)  # (T, V)
    want = torch.stack([-logp[0, 4], -logp[1, 1], -torch.max(logp[2, [4, 5]]), -logp[3, 1], -logp[4, 5],
                        -logp[5, 1]]).mean()
    got = list_row_mean_loss(logits, labels, commit=True)
    assert torch.allclose(got, want, atol=1e-5)
    got.backward()
    g = logits.grad[0, 0]  # (V,) the first line start
    assert float(g[4]) < 0 and float(g[3]) > 0 and float(g[5]) > 0  # only the picked value is pulled up
    summed = list_row_mean_loss(logits.detach(), labels)
    assert float(got.detach()) > float(summed)  # the sum over the values still to give is the smaller loss
    sharp = torch.zeros(1, 7, 8)
    sharp[0, 0, 4] = sharp[0, 1, 1] = sharp[0, 2, 5] = sharp[0, 3, 1] = sharp[0, 4, 5] = sharp[0, 5, 1] = 50.0
    assert float(list_row_mean_loss(sharp, labels, commit=True)) < 1e-6  # a sharp pick of any value costs nothing


def test_fit_text_hands_the_commit_flag_to_the_list_loss(fake_corpus, monkeypatch):
    from resona_adapt.training import list_loss

    torch.manual_seed(0)
    model = retrofit(tiny_text_model(), layers=[-1], config=ResonaConfig(chunk_size=16, top_k=2, num_heads=1, head_dim=8))
    recipe = TextRecipe(config=ResonaConfig(chunk_size=16), steps=1, batch_size=2, seq_len=700, min_len=500,
                        kinds=("multivalue",), questions=1, copy_fraction=0.0, short_fraction=0.0, lm_fraction=0.0,
                        search_loss_weight=0.0, list_any_order=True, tail_steps=0)
    seen: list[bool] = []
    real = list_loss.list_row_mean_loss
    monkeypatch.setattr(list_loss, "list_row_mean_loss",
                        lambda lg, lb, commit=False: (seen.append(commit), real(lg, lb, commit=commit))[1])
    fit_text(model, byte_tokenizer(), recipe, seed=1)
    fit_text(model, byte_tokenizer(), dataclasses.replace(recipe, list_commit=True), seed=1)
    assert seen == [False, True]
