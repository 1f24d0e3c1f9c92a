"""NIAH on real text: corpus haystacks, multikey needles, bad input, and the NIAH training task."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from click.testing import CliRunner

from resona_adapt.cli.main import cli
from resona_adapt.evaluation.niah import (TokenLayout, evaluate_niah, haystack_separator, load_haystack,
                                          make_text_sample, make_token_sample)
from resona_adapt.training.data import IGNORE, DataError
from resona_adapt.training.niah_task import answer_text, niah_text_dataset

from helpers.examples import load_example
from helpers.models import tiny_text_model
from helpers.text_tokenizers import byte_tokenizer


def test_multikey_token_sample_has_distractors_with_other_keys():
    layout = TokenLayout(256)
    s = make_token_sample(layout, 200, "multikey", random.Random(3), depth=0.5)
    assert len(s.prompt) == 200 and len(s.values) == 1
    starts = [i for i, t in enumerate(s.prompt) if t == layout.needle_marker]
    keys = [tuple(s.prompt[i + 1:i + 3]) for i in starts]
    assert len(starts) == 4 and len(set(keys)) == 4 and tuple(s.meta["key"]) in keys
    asked = starts[keys.index(tuple(s.meta["key"]))]
    assert s.prompt[asked + 3:asked + 10] == s.values[0]


def test_multikey_text_sample_asks_one_of_four_keys():
    tok = byte_tokenizer()
    s = make_text_sample(tok, 800, "multikey", ["The sky is blue.", "Here we go."], random.Random(5), depth=0.4)
    assert s.prompt.count("One of the special magic numbers for ") == 4
    assert f"for {s.meta['key']} is: {s.values[0]}." in s.prompt
    assert s.prompt.count(f"for {s.meta['key']} is:") == 1  # distractor keys differ from the asked one
    assert len(tok(s.prompt, add_special_tokens=False)["input_ids"]) <= 800


def test_corpus_haystack_uses_heldout_lines_only(fake_corpus):
    held, train = load_haystack("corpus"), load_haystack("corpus:train")
    assert all("hamlet" in u or "macbeth" in u or "tempest" in u or "twelfth_night" in u
               for u in held if u.startswith("A line"))
    assert not any("hamlet" in u for u in train) and any("lear" in u for u in train)
    assert haystack_separator("corpus") == "\n" and haystack_separator(None) == " "
    tok = byte_tokenizer()
    s = make_text_sample(tok, 600, "number", held, random.Random(0), 0.5, "\n")
    lines = s.prompt.split("\n")
    assert any(line.startswith("One of the special magic numbers") for line in lines)  # the needle is its own line
    assert len(tok(s.prompt, add_special_tokens=False)["input_ids"]) <= 600


@pytest.mark.parametrize("content, message", [
    (b"", "holds no text"), (b"  \n\n ", "holds no text"), (b"\x89PNG\r\n\x1a\n\x00\x00binary", "not a UTF-8 text file"),
])
def test_bad_haystack_files(tmp_path, content, message):
    path = tmp_path / "hay.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_haystack(path)


def test_needle_longer_than_the_context():
    with pytest.raises(ValueError, match="too short for a uuid needle"):
        make_text_sample(byte_tokenizer(), 40, "uuid", ["Filler."], random.Random(0), 0.5)


def test_context_beyond_the_tokenizer_limit():
    tok = byte_tokenizer()
    tok.model_max_length = 512
    with pytest.raises(ValueError, match="beyond the tokenizer's model_max_length \\(512\\)"):
        evaluate_niah(torch.nn.Identity(), [256, 1024], tokenizer=tok, samples=1)


@pytest.mark.parametrize("content, message", [
    (b"", "holds no text"), (b"\x00\x01\x02", "not a UTF-8 text file"), (None, "no such file"),
])
def test_cli_rejects_bad_haystack_with_one_line(tmp_path, content, message):
    path = tmp_path / "hay.txt"
    if content is not None:
        path.write_bytes(content)
    res = CliRunner().invoke(cli, ["eval", "--model", "tiny-mamba2", "--task", "niah", "--context", "96",
                                   "--samples", "1", "--haystack", str(path)])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_cli_ppl_rejects_a_missing_data_file(tmp_path):
    res = CliRunner().invoke(cli, ["eval", "--model", "tiny-mamba2", "--task", "ppl", "--data", str(tmp_path / "no.txt")])
    assert res.exit_code == 2 and "no such file" in res.output


def test_niah_training_examples(fake_corpus):
    tok = byte_tokenizer()
    ds = niah_text_dataset(tok, 700, 12, seed=1, kinds=("number", "multivalue"), lm_fraction=0.25, min_len=500)
    assert len(ds) == 12
    lm = niah = 0
    for i in range(len(ds)):
        ids, labels = ds[i]["input_ids"], ds[i]["labels"]
        assert ids.shape == labels.shape == (700,)
        text = tok.decode(ids.tolist())
        assert "hamlet" not in text and "macbeth" not in text  # training split only
        if bool((labels != IGNORE).all()):
            lm += 1
            assert torch.equal(ids, labels)
            continue
        niah += 1
        n = int((labels != IGNORE).sum())
        assert bool((labels[-n:] != IGNORE).all()) and bool((labels[:-n] == IGNORE).all())  # the answer is the tail
        answer = tok.decode(ids[-n:].tolist())
        assert answer.startswith(" ") and answer.endswith(".")
        values = answer[1:-1].split(".\n")  # multi-value: one per line
        assert len(values) in (1, 4)
        for v in values:
            assert f"is: {v}." in text
        assert text[:-n].rstrip().endswith("is") or text[:-n].endswith("are")
    assert (lm, niah) == (3, 9)
    again = niah_text_dataset(tok, 700, 12, seed=1, kinds=("number", "multivalue"), lm_fraction=0.25, min_len=500)
    assert all(torch.equal(ds[i]["input_ids"], again[i]["input_ids"]) for i in range(12))  # seeded


def test_a_kind_listed_twice_is_trained_twice_as_often_and_measured_once(fake_corpus):
    from resona_adapt.text_demo import TextRecipe

    tok = byte_tokenizer()
    ds = niah_text_dataset(tok, 700, 12, seed=1, kinds=("number", "multivalue", "multivalue"), min_len=500)
    answers = [tok.decode(ds[i]["input_ids"][-int((ds[i]["labels"] != IGNORE).sum()):].tolist()) for i in range(12)]
    assert sum(".\n" in a for a in answers) == 8  # multi-value answers list one value per line
    recipe = TextRecipe(kinds=("number", "multikey", "multivalue", "multikey", "multivalue"))
    assert recipe.measured_kinds == ("number", "multikey", "multivalue")


def test_niah_training_bad_options(fake_corpus):
    tok = byte_tokenizer()
    with pytest.raises(DataError, match="unknown NIAH needle kind"):
        niah_text_dataset(tok, 400, 2, kinds=("colour",))
    with pytest.raises(DataError, match="too short"):
        niah_text_dataset(tok, 64, 2, kinds=("uuid",))
    assert answer_text(["1", "2"]) == " 1.\n2." and answer_text(["7"]) == " 7."


def test_train_cli_task_niah(fake_corpus, tmp_path):

    base = tmp_path / "base"
    tiny_text_model().save_pretrained(base)
    byte_tokenizer().save_pretrained(base)
    res = CliRunner().invoke(cli, ["train", "--model", str(base), "--task", "niah", "--seq-len", "1000", "--steps", "2",
                                   "--batch-size", "2", "--eval-examples", "2", "--chunk-size", "16", "--layers", "-1",
                                   "--output", str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["resona"]["config"]["chunk_size"] == 16


def test_text_demo_pieces_on_a_tiny_model(fake_corpus):
    from resona_adapt import ResonaConfig, retrofit
    from resona_adapt.text_demo import TextRecipe, fit_text, heldout_ppl, measure_niah

    tok = byte_tokenizer()
    tok.pad_token = tok.eos_token = tok.convert_ids_to_tokens(0)
    model = retrofit(tiny_text_model(), layers=[-1], config=ResonaConfig(chunk_size=16, top_k=2, num_heads=1, head_dim=8))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recipe = TextRecipe(config=ResonaConfig(chunk_size=16),
                        steps=2, batch_size=2, seq_len=700, min_len=500, kinds=("number",))
    summary = fit_text(model, tok, recipe, seed=0)
    assert summary["examples"] == 4 and summary["final_loss"] > 0 and not model.training
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".resona." in n for n in changed)  # only the branch trains
    ppl = heldout_ppl(model, tok, windows=2, length=128)
    assert ppl["base"] > 1 and ppl["retrofit"] > 1 and ppl["tokens"] == 2 * 127
    rows = measure_niah(model, tok, [400], kinds=("number",), samples=2, variants=("base", "retrofit", "jrt-prompt"))
    assert [r["length"] for r in rows] == [400] and all(0 <= rows[0][v] <= 5 for v in ("base", "retrofit", "jrt-prompt"))
    with pytest.raises(ValueError, match="unknown variant"):
        measure_niah(model, tok, [400], variants=("oracle",))


def test_demo_text_exports_and_reloads_the_text_retrofit(fake_corpus, tmp_path, monkeypatch):
    """`demo_text(output=...)` writes the merged checkpoint, reloads it and measures it again: the
    reloaded column equals the retrofit's and the checkpoint gives the trained model's logits."""
    from resona_adapt import ResonaConfig, load_model
    from resona_adapt import text_demo
    from resona_adapt.errors import CheckpointError
    from resona_adapt.text_demo import TextRecipe, demo_text

    tok = byte_tokenizer()
    tok.pad_token = tok.eos_token = tok.convert_ids_to_tokens(0)
    real_ppl = text_demo.heldout_ppl
    monkeypatch.setattr(text_demo, "load_text_base", lambda name=text_demo.TEXT_BASE: (tiny_text_model(), tok))
    monkeypatch.setattr(text_demo, "heldout_ppl", lambda m, t, windows=2: real_ppl(m, t, windows=2, length=128))
    recipe = TextRecipe(config=ResonaConfig(chunk_size=16, top_k=2, num_heads=1, head_dim=8),
                        steps=2, batch_size=2, seq_len=700, min_len=500, kinds=("number",), tail_steps=0)
    import resona_adapt.loading

    loaded, real_load = [], resona_adapt.loading.load_model
    monkeypatch.setattr(resona_adapt.loading, "load_model", lambda path, **k: loaded.append(path) or real_load(path, **k))
    out = tmp_path / "text-ckpt"
    result, model, _ = demo_text(recipe=recipe, lengths=[400], samples=2, output=out, return_model=True)
    assert result["output"] == str(out) and result["reload_matches"] and loaded == [str(out)]  # measured reloaded
    assert [r["reloaded"] for r in result["rows"]] == [r["retrofit"] for r in result["rows"]]
    assert json.loads((out / "config.json").read_text())["resona"]["config"]["chunk_size"] == 16
    x = torch.randint(1, 256, (1, 200))
    with torch.no_grad():
        assert torch.equal(load_model(str(out))(x).logits, model(x).logits)  # the trained branches, not fresh ones
    assert "reloaded" not in demo_text(recipe=recipe, lengths=[400], samples=1)["rows"][0]  # no output: no export
    trained = []
    monkeypatch.setattr(text_demo, "train_text", lambda *a, **k: trained.append(1))
    with pytest.raises(CheckpointError, match="not empty"):  # an existing export is kept, refused before training
        demo_text(recipe=recipe, lengths=[400], samples=1, output=out)
    assert trained == [] and (out / "config.json").is_file()


def test_niah_training_with_several_questions(fake_corpus):
    tok = byte_tokenizer()
    ds = niah_text_dataset(tok, 1400, 3, seed=2, kinds=("number", "word"), questions=3)
    for i in range(3):
        ids, labels = ds[i]["input_ids"], ds[i]["labels"]
        assert ids.shape == labels.shape == (1400,)
        text = tok.decode(ids.tolist())
        assert text.count("One of the special magic") == 3 and text.count("\nWhat is the special magic") == 3
        spans, cur = [], []
        for t, lab in zip(ids.tolist(), labels.tolist()):
            if lab != IGNORE:
                assert lab == t
                cur.append(t)
            elif cur:
                spans.append(cur)
                cur = []
        spans.append(cur) if cur else None
        assert len(spans) == 3
        for span in spans:  # every answer's value is the value of its needle in the haystack
            value = tok.decode(span).strip(" .")
            assert f"is: {value}." in text


def test_copy_examples_repeat_their_first_half(fake_corpus):
    from resona_adapt.training.niah_task import copy_text_dataset

    tok = byte_tokenizer()
    ds = copy_text_dataset(tok, 301, 4, seed=3)
    for i in range(4):
        ids, labels = ds[i]["input_ids"], ds[i]["labels"]
        assert ids.shape == labels.shape == (301,)
        assert torch.equal(ids[:150], ids[150:300]) and bool((labels[:150] == IGNORE).all())
        assert torch.equal(labels[150:], ids[150:])
        assert "hamlet" not in tok.decode(ids.tolist())
    with pytest.raises(DataError, match="seq_len >= 16"):
        copy_text_dataset(tok, 8, 1)


def test_text_base_ships_with_its_tokenizer_and_recipe():
    from transformers import AutoTokenizer

    from resona_adapt import load_model
    from resona_adapt.models import assets

    model = load_model("text-mamba2")
    path = assets.asset_path("text-mamba2")
    tok = AutoTokenizer.from_pretrained(str(path))
    assert type(model).__name__ == "Mamba2ForCausalLM" and model.config.vocab_size == len(tok) == 1024
    assert tok.convert_ids_to_tokens(tok("is: 1234567")["input_ids"])[-7:] == list("1234567")  # one digit per token
    info = json.loads((path / "training.json").read_text())
    assert info["script"] == "examples/pretrain_text_base.py" and info["heldout_perplexity"] > 1
    assert {"train_seconds", "final_train_loss", "recipe", "corpus"} <= set(info)
    assert sum(f.stat().st_size for f in path.iterdir()) < 5_000_000


def test_missing_text_asset_names_its_script(monkeypatch, tmp_path):
    from resona_adapt import load_model
    from resona_adapt.errors import ModelNotFoundError
    from resona_adapt.models import assets

    monkeypatch.setattr(assets, "ASSETS_DIR", tmp_path)
    with pytest.raises(ModelNotFoundError, match="pretrain_text_base.py"):
        load_model("text-mamba2")


def test_train_text_runs_the_plain_text_tail_after_the_schedule(fake_corpus, monkeypatch):
    from resona_adapt import ResonaConfig, retrofit
    from resona_adapt import text_demo
    from resona_adapt.text_demo import TextRecipe, train_text

    calls = []
    real = text_demo.fit_text

    def spy(model, tokenizer, recipe, seed=0, log=None, log_every=10):
        calls.append((recipe.steps, recipe.lm_fraction, recipe.lr, recipe.copy_fraction, recipe.short_fraction, seed))
        return real(model, tokenizer, recipe, seed=seed, log=log, log_every=log_every)

    monkeypatch.setattr(text_demo, "fit_text", spy)
    tok = byte_tokenizer()
    tok.pad_token = tok.eos_token = tok.convert_ids_to_tokens(0)
    model = retrofit(tiny_text_model(), layers=[-1], config=ResonaConfig(chunk_size=16, top_k=2, num_heads=1, head_dim=8))
    recipe = TextRecipe(config=ResonaConfig(chunk_size=16), steps=2, batch_size=2, seq_len=700, min_len=500,
                        kinds=("number",), questions=1, copy_fraction=0.5, tail_steps=1, tail_lm_fraction=0.5, tail_lr=1e-3)
    summary = train_text(model, tok, recipe, seed=3)
    assert calls == [(2, 0.2, 5e-3, 0.5, 0.2, 3), (1, 0.5, 1e-3, 0.0, 0.0, 14)]
    assert summary["examples"] == 6
    calls.clear()
    train_text(model, tok, dataclasses.replace(recipe, tail_steps=0), seed=3)
    assert len(calls) == 1


@pytest.mark.parametrize("init", [0.4, None])
def test_coverage_gates_wait_for_the_niah_steps(fake_corpus, init):
    """With ``coverage_init`` the read-coverage gates do not move through the copy steps and start the
    NIAH steps at that bias; without it they train from the first step (the control)."""
    from resona_adapt import ResonaConfig, retrofit
    from resona_adapt.text_demo import TextRecipe, fit_text
    from resona_adapt.training.coverage_start import coverage_gates

    from helpers.models import randomize_resona

    tok = byte_tokenizer()
    tok.pad_token = tok.eos_token = tok.convert_ids_to_tokens(0)
    cfg = ResonaConfig(chunk_size=16, top_k=2, num_heads=1, head_dim=8, neighbor_chunks=1, read_coverage=8)
    model = retrofit(tiny_text_model(), layers=[-1], config=cfg)
    randomize_resona(model)  # a live read (o_proj away from zero), so the gates get gradient
    [gate] = coverage_gates(model)
    with torch.no_grad():
        gate.weight.zero_()
        gate.bias.zero_()
    seen = []
    recipe = TextRecipe(config=cfg, steps=2, batch_size=2, seq_len=700, min_len=500, kinds=("number",), questions=1,
                        copy_fraction=0.5, copy_len=128, short_fraction=0.0, tail_steps=0, coverage_init=init)
    fit_text(model, tok, recipe, seed=0, log=lambda _: seen.append((gate.weight.detach().clone(), float(gate.bias.detach()))),
             log_every=1)
    (w_copy, b_copy), (w_niah, b_niah) = seen
    if init is None:
        assert w_copy.abs().max() > 0 and b_copy != 0  # trained on the copy step
    else:
        assert not w_copy.any() and b_copy == 0  # held at zero through the copy step
        assert w_niah.abs().max() > 0 and b_niah == pytest.approx(init, abs=0.05) and b_niah != pytest.approx(init)
    assert gate.weight.requires_grad and gate.bias.requires_grad
    from resona_adapt.training.coverage_start import CoverageStart

    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="coverage_init must be a finite number"):
            CoverageStart([gate], 1, bad)


def test_text_recipe_is_the_measured_0_9():
    """`TEXT_RECIPE` is what docs/text-niah.md measures as 0.9 (0.8 - 0.7 plus both coverage counts and the
    any-order list loss - trained at 2k tokens, with one list retry), and the experiment script's defaults
    are the recipe's."""
    import subprocess
    import sys
    from pathlib import Path

    from resona_adapt.text_demo import TEXT_QUICK_RECIPE, TEXT_RECIPE

    cfg = TEXT_RECIPE.config
    assert (cfg.read_coverage, cfg.coverage_by_position, TEXT_RECIPE.list_any_order) == (24, True, True)
    assert TEXT_RECIPE.coverage_init == 0.4 and TEXT_RECIPE.search_loss_weight == 0.5
    assert (TEXT_RECIPE.seq_len, TEXT_RECIPE.min_len, TEXT_RECIPE.list_retries) == (2048, 256, 1)
    assert TEXT_QUICK_RECIPE.config == cfg  # the CI-sized demo trains the same branch
    script = Path(__file__).resolve().parents[1] / "examples" / "retrofit_text_niah.py"
    source = script.read_text()
    assert "recipe = TEXT_QUICK_RECIPE if args.quick else TEXT_RECIPE" in source
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--list-any-order" in help_text and "--coverage-by-position" in help_text


def test_niah_misses_rebuilds_the_measured_samples(fake_corpus, monkeypatch, capsys):
    """examples/niah_misses.py answers exactly the samples `measure_niah` scored (same stream, kinds cycled), and
    names a multikey answer that copies another key's value a distractor."""
    from collections import Counter

    import resona_adapt.evaluation.text_niah as text_niah

    misses = load_example("niah_misses")
    tok = byte_tokenizer()
    measured, scored = [], []
    monkeypatch.setattr(text_niah, "answer", lambda m, t, prompt, n, bypass: measured.append(prompt) or "x")
    text_niah.measure_niah(None, tok, [600], samples=7, variants=("retrofit",), seed=3)

    def fake_answer(m, t, prompt, n, bypass):
        scored.append(prompt)
        return " " + misses.VALUE_AFTER.findall(prompt)[0] + "."  # the first needle value in the text

    monkeypatch.setattr(misses, "answer", fake_answer)
    monkeypatch.setattr(misses, "chunk_selection", lambda m, ids: (torch.zeros(1, ids.shape[1], 2, dtype=torch.long), 16))
    counts: Counter = Counter()
    misses.study(None, tok, 600, ["uuid", "multikey"], text_niah.NEEDLE_KINDS, 7, 3, counts)
    assert scored == [measured[2], measured[3]]  # samples 2 and 3 of the cycle: uuid, multikey
    assert counts["uuid answered"] == counts["multikey answered"] == 1
    assert misses.classify("1234567", " 1239999.", []) == "diverged at 3"
    assert misses.classify("1234567", " 7654321.", ["7654321"]) == "distractor"
    assert misses.classify("1234567", " 1234567.", []) == "right"
