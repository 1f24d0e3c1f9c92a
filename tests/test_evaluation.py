"""Evaluation suite: NIAH scoring and samples, QA metrics, MQAR evaluation, prompt baselines."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch
from torch import nn

from resona_adapt import ResonaConfig, retrofit
from resona_adapt.evaluation import evaluate_mqar
from resona_adapt.evaluation.baselines import (
    chunk_selection, jrt_mqar, jrt_text, rag_mqar, rag_tokens, resona_bypassed, selected_context_chunks,
)
from resona_adapt.evaluation.niah import (
    TokenLayout, make_text_sample, make_token_sample, niah_score, niah_score_multi, parse_context_lengths,
)
from resona_adapt.evaluation.qa import available_metrics, exact_match, qa_metrics, token_f1
from resona_adapt.tasks import IGNORE, mqar

from helpers.models import build_tiny, randomize_resona
from helpers.text_tokenizers import byte_tokenizer


# -- NIAH scorer ----------------------------------------------------------------------------------
def test_niah_exact_needle_scores_five():
    assert niah_score("7284913", "The special magic number is 7284913.") == 5.0
    assert niah_score([5, 6, 7], [1, 5, 6, 7, 2]) == 5.0


def test_niah_partial_prefix_scores_its_fraction():
    # the whole needle is absent; its longest present prefix is "7284" (4 of 7 characters)
    assert niah_score("7284913", "The number is 72840.") == pytest.approx(5 * 4 / 7)
    assert niah_score([5, 6, 7, 8], [9, 5, 6, 1]) == pytest.approx(5 * 2 / 4)


def test_niah_no_prefix_scores_zero():
    assert niah_score("7284913", "I do not know.") == 0.0
    assert niah_score([5, 6], [1, 2, 3]) == 0.0


def test_niah_multivalue_is_the_mean_over_values():
    assert niah_score_multi(["1111", "2222"], "1111 and 22") == pytest.approx((5 + 2.5) / 2)


def test_parse_context_lengths():
    assert parse_context_lengths("1k, 2k,512") == [1024, 2048, 512]
    with pytest.raises(ValueError):
        parse_context_lengths("lots")


@pytest.mark.parametrize("kind", ["number", "word", "uuid", "multivalue"])
def test_token_sample_holds_the_needle_and_ends_with_the_query(kind):
    layout = TokenLayout(256)
    s = make_token_sample(layout, 200, kind, random.Random(0), depth=0.3)
    assert len(s.prompt) == 200
    key = s.meta["key"]
    assert s.prompt[-3:] == [layout.query_marker, *key]
    for v in s.values:
        needle = [layout.needle_marker, *key, *v]
        assert any(s.prompt[i:i + len(needle)] == needle for i in range(len(s.prompt)))
    assert len(s.values) == (4 if kind == "multivalue" else 1)


@pytest.mark.parametrize("kind", ["number", "uuid", "multivalue"])
def test_text_sample_fits_the_budget_and_holds_the_needle(kind):
    tok = byte_tokenizer()
    s = make_text_sample(tok, 600, kind, ["The sky is blue.", "Here we go."], random.Random(1), depth=0.0)
    n = len(tok(s.prompt, add_special_tokens=False)["input_ids"])
    assert 500 < n <= 600
    for v in s.values:
        assert f"for {s.meta['key']} is: {v}." in s.prompt
    assert s.prompt.startswith("One of the special magic")  # depth 0: needle first
    assert "mentioned in the provided text" in s.prompt.split("\n")[-1]


# -- QA metrics -----------------------------------------------------------------------------------
def test_token_f1_and_exact_match_on_known_pairs():
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)  # P 1, R 2/3
    assert token_f1("Paris", ["London", "paris."]) == 1.0
    assert token_f1("blue", "red") == 0.0
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    m = qa_metrics(["the cat sat", "blue"], ["a cat sat down", ["red", "Blue"]])
    assert m["f1"] == pytest.approx((0.8 + 1.0) / 2) and m["exact_match"] == 0.5


needs = {name: importlib.util.find_spec(lib) is None for name, lib in
         (("bleu", "sacrebleu"), ("rouge_l", "rouge_score"), ("meteor", "nltk"))}


@pytest.mark.skipif(needs["bleu"], reason="sacrebleu not installed (optional eval extra)")
def test_bleu_on_known_pairs():
    from resona_adapt.evaluation.qa import bleu

    assert bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(1.0)
    assert bleu(["completely different words here now"], [["the cat sat on the mat"]]) < 0.05


@pytest.mark.skipif(needs["rouge_l"], reason="rouge-score not installed (optional eval extra)")
def test_rouge_l_on_known_pairs():
    from resona_adapt.evaluation.qa import rouge_l

    assert rouge_l(["the cat sat"], [["the cat sat"]]) == pytest.approx(1.0)
    # LCS "cat sat" = 2 of 3 and 2 of 4 tokens: F = 2 * (2/3 * 1/2) / (2/3 + 1/2) = 4/7
    assert rouge_l(["the cat sat"], [["a cat sat down"]]) == pytest.approx(4 / 7, abs=1e-6)


@pytest.mark.skipif(needs["meteor"], reason="nltk not installed (optional eval extra)")
def test_meteor_on_known_pairs():
    from resona_adapt.evaluation.qa import meteor

    assert meteor(["the cat sat on the mat"], [["the cat sat on the mat"]]) > 0.99
    assert meteor(["dog"], [["the cat sat on the mat"]]) == 0.0


def test_missing_optional_metrics_are_none_not_errors():
    m = qa_metrics(["a"], ["a"])
    for name, ok in available_metrics().items():
        assert (m[name] is None) == (not ok)


# -- MQAR evaluation ------------------------------------------------------------------------------
class Oracle(nn.Module):
    """Answers MQAR perfectly by looking the key up in the context (a model-shaped test double)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"vocab_size": vocab})()

    def forward(self, input_ids, **_):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            seen = {}
            for t in range(T):
                tok = int(input_ids[b, t])
                if tok in seen:
                    logits[b, t, seen[tok]] = 1.0
                if t + 1 < T and tok < self.config.vocab_size // 2 and tok not in seen:
                    seen[tok] = int(input_ids[b, t + 1])
        return type("O", (), {"logits": logits})()


def test_evaluate_mqar_scores_an_oracle_perfectly_with_and_without_jrt():
    oracle = Oracle(128)
    grid = [(32, 4), (64, 8)]
    res = evaluate_mqar(oracle, grid, num_examples=8, batch_size=3)
    assert [(r.seq_len, r.kv_pairs, r.accuracy, r.strict) for r in res] == [(32, 4, 1.0, 1.0), (64, 8, 1.0, 1.0)]
    jrt = evaluate_mqar(oracle, grid, num_examples=8, transform=lambda i, l: jrt_mqar(i, l, int((l[0] != IGNORE).sum())))
    assert all(r.accuracy == 1.0 for r in jrt)


def test_evaluate_mqar_is_seeded_and_restores_train_mode():
    model = build_tiny("mamba2", layers=2)
    model.train()
    a = evaluate_mqar(model, [(32, 4)], num_examples=8)
    b = evaluate_mqar(model, [(32, 4)], num_examples=8)
    assert a == b and model.training


# -- baselines ------------------------------------------------------------------------------------
def test_jrt_mqar_repeats_the_context_before_the_queries():
    data = mqar(4, 32, 4, 64, seed=0)
    inputs, labels = jrt_mqar(data.inputs, data.labels, 4)
    assert inputs.shape == (4, 40) and labels.shape == (4, 40)
    assert torch.equal(inputs[:, :8], data.inputs[:, :8]) and torch.equal(inputs[:, 8:], data.inputs)
    assert (labels[:, :8] == IGNORE).all() and torch.equal(labels[:, 8:], data.labels)


def test_jrt_text_repeats_the_context():
    assert jrt_text("ctx.", "\nQ?", sep=" ") == "ctx. ctx.\nQ?"


def retrofitted_tiny(chunk: int = 2, top_k: int = 1):
    model = build_tiny("mamba2", layers=2)
    retrofit(model, layers=[0, 1], config=ResonaConfig(chunk_size=chunk, top_k=top_k, num_heads=1, head_dim=8, search_dim=8))
    randomize_resona(model)
    return model.eval()


def test_resona_bypassed_gives_the_base_logits_and_restores():
    model = build_tiny("mamba2", layers=2)
    ids = torch.randint(0, 64, (1, 24))
    with torch.no_grad():
        base = model(ids).logits
        retro = retrofitted_tiny()
        retro_out = retro(ids).logits
        with resona_bypassed(retro):
            bypassed = retro(ids).logits
        again = retro(ids).logits
    assert not torch.allclose(base, retro_out)
    torch.testing.assert_close(bypassed, base)
    assert torch.equal(again, retro_out)


def test_rag_mqar_inserts_the_selected_chunks_before_the_queries():
    model = retrofitted_tiny()
    data = mqar(3, 32, 4, 64, seed=2)
    idx, U = chunk_selection(model, data.inputs)
    inputs, labels = rag_mqar(model, data.inputs, data.labels, 4)
    for b in range(3):
        asked = (data.labels[b] != IGNORE).nonzero().flatten().tolist()
        chunks = selected_context_chunks(idx[b], asked, 8, U)
        assert chunks and all((c + 1) * U <= 8 for c in chunks)
        extra = torch.cat([data.inputs[b, c * U:(c + 1) * U] for c in chunks])
        assert torch.equal(inputs[b, :8], data.inputs[b, :8])
        assert torch.equal(inputs[b, 8:8 + extra.numel()], extra)  # the selected chunks, in context order
        width = inputs.shape[1] - 32
        assert torch.equal(inputs[b, 8 + width:], data.inputs[b, 8:])  # then the queries, unchanged
        assert torch.equal(labels[b, 8 + width:], data.labels[b, 8:]) and (labels[b, 8:8 + width] == IGNORE).all()


def test_rag_tokens_appends_the_chunks_selected_at_the_last_token():
    model = retrofitted_tiny(chunk=4, top_k=2)
    context, question = list(range(3, 31)), [2, 5, 6]
    prompt = rag_tokens(model, context, question)
    idx, U = chunk_selection(model, torch.tensor([context + question]))
    chunks = selected_context_chunks(idx[0], [len(context) + len(question) - 1], len(context), U)
    assert len(chunks) == 2
    assert prompt == context + [t for c in chunks for t in context[c * 4:(c + 1) * 4]] + question
