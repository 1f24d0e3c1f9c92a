"""After training a text retrofit: does it list (`evaluation.list_check`), and what the answer probe of
examples/niah_answer_probe.py reads (each answer part, the coverage and order gates)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers.examples import load_example
from helpers.models import tiny_text_model
from helpers.text_tokenizers import byte_tokenizer


class _Oracle(torch.nn.Module):
    """Predicts every next token of its input right (or, ``wrong_at``, one given token wrong)."""

    def __init__(self, vocab: int, wrong: str | None = None, tokenizer=None) -> None:
        super().__init__()
        self.vocab, self.wrong = vocab, None if wrong is None else tokenizer.convert_tokens_to_ids(wrong)

    def forward(self, ids: torch.Tensor):
        from types import SimpleNamespace

        nxt = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)  # (1, T) the token after each position
        if self.wrong is not None:
            nxt = nxt.masked_fill(nxt == self.wrong, 0)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, self.vocab).float())


class _Constant(torch.nn.Module):
    """Predicts the same token everywhere."""

    def __init__(self, vocab: int, token: int) -> None:
        super().__init__()
        self.vocab, self.token = vocab, token

    def forward(self, ids: torch.Tensor):
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.nn.functional.one_hot(torch.full_like(ids, self.token), self.vocab).float())


class _FirstValueAgain(_Oracle):
    """Right everywhere except at a list line start, where it predicts the first token after the answer's
    opening space (the first value's, already given) instead."""

    def __init__(self, vocab: int, starts: dict[int, int]) -> None:
        super().__init__(vocab)
        self.starts = starts  # position predicting a line start -> the token it predicts there

    def forward(self, ids: torch.Tensor):
        out = super().forward(ids)
        for at, token in self.starts.items():
            out.logits[0, at] = torch.nn.functional.one_hot(torch.tensor(token), self.vocab).float()
        return out


def test_list_start_accuracy_tells_a_run_that_lists_from_one_that_does_not(fake_corpus, monkeypatch):
    """A model right at every token scores 1.0; one that starts every later line with the first value again
    (already given) 0.0, and so does one that predicts a constant; the warning names the way out."""
    from resona_adapt.evaluation import list_check
    from resona_adapt.training.list_loss import line_starts
    from resona_adapt.training.niah_task import answer_text

    tok = byte_tokenizer()
    assert list_check.list_start_accuracy(_Oracle(len(tok)), tok, samples=3, length=800) == 1.0
    assert list_check.list_start_accuracy(_Constant(len(tok), 0), tok, samples=3, length=800) == 0.0
    seen = []  # the samples the check builds, to place the wrong predictions
    real = list_check.make_text_sample
    monkeypatch.setattr(list_check, "make_text_sample", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    list_check.list_start_accuracy(_Oracle(len(tok)), tok, samples=1, length=800)
    sample = seen[0]
    answer = list(tok(answer_text(sample.values), add_special_tokens=False)["input_ids"])
    starts = line_starts(tok, sample.values, answer)
    prompt = len(tok(sample.prompt, add_special_tokens=False)["input_ids"])
    again = _FirstValueAgain(len(tok), {prompt + s - 1: answer[starts[0]] for s in starts[1:]})
    assert all(answer[starts[0]] != answer[s] for s in starts[1:])  # the premise, in this seeded sample
    monkeypatch.setattr(list_check, "make_text_sample", real)
    assert list_check.list_start_accuracy(again, tok, samples=1, length=800) == 0.0
    assert list_check.list_warning(None) is None and list_check.list_warning(0.96) is None
    assert "another --seed" in list_check.list_warning(0.25) and "25%" in list_check.list_warning(0.25)


def test_train_text_reports_whether_the_run_lists(fake_corpus, monkeypatch):
    """With multi-value needles in the recipe, `train_text`'s summary carries ``list_starts`` and the log the
    warning when it is low; without them, neither; a check that fails is logged and returns the summary."""
    from resona_adapt import ResonaConfig, retrofit
    from resona_adapt.evaluation import list_check
    from resona_adapt.text_demo import TextRecipe, train_text

    tok = byte_tokenizer()
    tok.pad_token = tok.eos_token = tok.convert_ids_to_tokens(0)
    model = retrofit(tiny_text_model(), layers=[-1], config=ResonaConfig(chunk_size=16, top_k=2, num_heads=1, head_dim=8))
    monkeypatch.setattr(list_check, "list_start_accuracy", lambda *a, **k: 0.125)
    recipe = TextRecipe(config=ResonaConfig(chunk_size=16), steps=1, batch_size=2, seq_len=700, min_len=500,
                        kinds=("multivalue",), questions=1, copy_fraction=0.0, short_fraction=0.0, tail_steps=0)
    lines: list[str] = []
    summary = train_text(model, tok, recipe, seed=3, log=lines.append)
    assert summary["list_starts"] == 0.125 and any("did not learn to list" in line for line in lines)
    lines.clear()
    summary = train_text(model, tok, dataclasses.replace(recipe, kinds=("number",)), seed=3, log=lines.append)
    assert "list_starts" not in summary and not any("list" in line for line in lines)

    def broken(*a, **k):
        raise ValueError("context length 700 is too short")

    monkeypatch.setattr(list_check, "list_start_accuracy", broken)  # a failing check costs nothing trained
    lines.clear()
    summary = train_text(model, tok, recipe, seed=3, log=lines.append)
    assert summary["list_starts"] is None and any("list check skipped: context length" in line for line in lines)


def _list_run(list_retries: int = 1):
    from resona_adapt import ResonaConfig, retrofit
    from resona_adapt.text_demo import TextRecipe

    torch.manual_seed(0)
    model = retrofit(tiny_text_model(), layers=[-1], config=ResonaConfig(chunk_size=16, top_k=2, num_heads=1, head_dim=8))
    recipe = TextRecipe(config=ResonaConfig(chunk_size=16), steps=2, batch_size=2, seq_len=700, min_len=500,
                        kinds=("multivalue",), questions=1, copy_fraction=0.0, short_fraction=0.0, tail_steps=0,
                        list_retries=list_retries)
    return model, recipe


def _resona_state(model) -> dict[str, torch.Tensor]:
    from resona_adapt import resona_parameters

    return {n: p.detach().clone() for n, p in resona_parameters(model)}


def test_train_text_retries_a_run_that_did_not_learn_to_list(fake_corpus, monkeypatch):
    """A run under the list floor trains again from the branches' initial values on the data of `retry_seed`:
    bit for bit what a single run on that seed gives; one that lists is not retried; when none lists the
    closest is kept, with the warning; ``list_retries`` must be a whole number >= 0."""
    from resona_adapt.evaluation import list_check
    from resona_adapt.text_demo import train_text
    from resona_adapt.training.list_retry import retry_seed

    tok = byte_tokenizer()
    tok.pad_token = tok.eos_token = tok.convert_ids_to_tokens(0)
    scores: list[float] = []
    monkeypatch.setattr(list_check, "list_start_accuracy", lambda *a, **k: scores.pop(0))

    model, recipe = _list_run()
    initial = _resona_state(model)
    scores[:] = [0.25, 0.96]
    lines: list[str] = []
    summary = train_text(model, tok, recipe, seed=3, log=lines.append)
    assert summary["attempts"] == 2 and summary["list_starts"] == 0.96 and not scores
    assert any("retry 1 of 1" in line and "started 25% of list lines" in line and f"seed {retry_seed(3, 1)}" in line
               for line in lines)
    assert not any("did not learn to list" in line for line in lines)
    direct, _ = _list_run(list_retries=0)
    assert all(torch.equal(initial[n], v) for n, v in _resona_state(direct).items())  # same start
    scores[:] = [0.96]
    train_text(direct, tok, dataclasses.replace(recipe, list_retries=0), seed=retry_seed(3, 1))
    retried, single = _resona_state(model), _resona_state(direct)
    assert all(torch.equal(retried[n], single[n]) for n in single)
    assert any(not torch.equal(retried[n], initial[n]) for n in initial)  # it trained

    first, _ = _list_run()
    scores[:] = [0.92]
    assert train_text(first, tok, recipe, seed=3)["attempts"] == 1 and not scores  # it lists: no retry

    model, _ = _list_run()
    scores[:] = [0.30, 0.10]  # neither lists: the first, closer run is kept
    lines.clear()
    summary = train_text(model, tok, recipe, seed=3, log=lines.append)
    assert summary["attempts"] == 2 and summary["list_starts"] == 0.30
    assert any("did not learn to list" in line for line in lines)
    once, _ = _list_run(list_retries=0)
    scores[:] = [0.30]
    train_text(once, tok, dataclasses.replace(recipe, list_retries=0), seed=3)
    kept, first_run = _resona_state(model), _resona_state(once)
    assert all(torch.equal(kept[n], first_run[n]) for n in first_run)

    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="list_retries must be a whole number"):
            train_text(model, tok, dataclasses.replace(recipe, list_retries=bad), seed=3)


def test_answer_probe_scores_each_part_of_the_expected_answer(fake_corpus):
    """examples/niah_answer_probe.py: a model that predicts every next token scores 1 on every part; one
    that never predicts a line end scores 0 on the separators' line ends only (a slicing off by one would
    fail both)."""
    from resona_adapt.training.niah_task import answer_text

    probe = load_example("niah_answer_probe")
    assert "".join(t for _, t in probe.answer_parts(["1", "22", "3", "4"])) == answer_text(["1", "22", "3", "4"])
    tok = byte_tokenizer()
    right = probe.probe(_Oracle(len(tok)), tok, "multivalue", 800, 3, seed=0, greedy=0)
    assert {name: len(v) for name, v in right.items()}["value: other tokens"] == 3 * 4 * 6
    assert all(all(v) for v in right.values()) and "value 4: first token" in right
    right = probe.probe(_Oracle(len(tok), "Ċ", tok), tok, "multivalue", 800, 3, seed=0, greedy=0)  # byte-level "\n"
    assert all(right["separator: first token"]) and not any(right["separator: other tokens"])
    assert all(all(v) for name, v in right.items() if not name.startswith("separator"))


def test_answer_probe_reads_the_coverage_gate_where_list_lines_start(fake_corpus):
    """``--gates``: one reading per gated branch at each query that starts value 2-4 and at each one inside
    those values; the readings are the gate's output (a gate held at 0.3 reads 0.3), and the hooks go away."""
    from resona_adapt import ResonaConfig, retrofit

    probe = load_example("niah_answer_probe")
    tok = byte_tokenizer()
    model = retrofit(tiny_text_model(), layers=[0, -1], config=ResonaConfig(chunk_size=16, read_coverage=8)).eval()
    gated = [m for m in model.modules() if getattr(m, "coverage_gate", None) is not None]
    with torch.no_grad():
        for m in gated:
            m.coverage_gate.weight.zero_()
            m.coverage_gate.bias.fill_(0.3)
    gates: dict = {}
    probe.probe(model, tok, "multivalue", 800, 2, seed=0, greedy=0, gates=gates)
    assert len(gates["line start"]) == 2 * 3 * len(gated) == 12  # 2 samples x values 2-4 x 2 branches
    assert len(gates["inside a value"]) == 2 * 3 * 6 * len(gated)  # 7-digit values: 6 tokens after the first
    assert all(v == pytest.approx(0.3) for vs in gates.values() for v in vs)
    assert not any(m.norm_h._forward_hooks for m in gated)


def test_answer_probe_reads_the_order_gate_too(fake_corpus):
    """With ``read_order`` ``--gates`` also reads the order gate o(h) at the same queries, apart from the
    chunk gate (a gate held at 0.7 reads 0.7 where the chunk gate reads 0.3)."""
    from resona_adapt import ResonaConfig, retrofit

    probe = load_example("niah_answer_probe")
    tok = byte_tokenizer()
    model = retrofit(tiny_text_model(), layers=[0, -1], config=ResonaConfig(chunk_size=16, read_coverage=8,
                                                                            read_order=True)).eval()
    gated = [m for m in model.modules() if getattr(m, "coverage_gate", None) is not None]
    with torch.no_grad():
        for m in gated:
            m.coverage_gate.bias.fill_(0.3)
            m.order_gate.bias.fill_(0.7)
    gates: dict = {}
    probe.probe(model, tok, "multivalue", 800, 2, seed=0, greedy=0, gates=gates)
    assert len(gates["order: line start"]) == len(gates["line start"]) == 12
    assert len(gates["order: inside a value"]) == len(gates["inside a value"])
    assert all(v == pytest.approx(0.7) for k, vs in gates.items() if k.startswith("order: ") for v in vs)
    assert all(v == pytest.approx(0.3) for k, vs in gates.items() if not k.startswith("order: ") for v in vs)
