"""``resona-adapt eval`` through click's CliRunner, on tiny retrofitted checkpoints built on the fly."""

from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner

from resona_adapt import ResonaConfig, retrofit
from resona_adapt.cli.main import cli

from helpers.models import randomize_resona, tiny_text_model
from helpers.text_tokenizers import byte_tokenizer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = tiny_text_model()
    base.save_pretrained(root / "base")
    byte_tokenizer().save_pretrained(root / "base")
    model = retrofit(tiny_text_model(), layers=[0, 1],
                     config=ResonaConfig(chunk_size=4, top_k=1, num_heads=1, head_dim=8, search_dim=8))
    randomize_resona(model)
    model.save_pretrained(root / "retro")
    byte_tokenizer().save_pretrained(root / "retro")
    (root / "qa.jsonl").write_text(
        json.dumps({"context": "The sky is blue.", "question": "What colour is the sky?", "answers": ["blue"]}) + "\n"
        + json.dumps({"question": "Capital of France?", "answer": "Paris"}) + "\n")
    (root / "text.txt").write_text("The grass is green. The sky is blue. " * 20)
    return root


def run(args):
    res = CliRunner().invoke(cli, ["eval", *args])
    return res


def test_mqar_json_has_model_base_and_baseline_rows(checkpoints):
    res = run(["--model", str(checkpoints / "retro"), "--task", "mqar", "--seq-len", "32,64", "--kv-pairs", "4,8",
               "--examples", "4", "--baseline", "rag-append", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["retrofitted"] is True
    points = {(r["variant"], r["seq_len"], r["kv_pairs"]) for r in data["results"]}
    assert points == {(v, t, p) for v in ("model", "base", "rag-append") for t, p in ((32, 4), (32, 8), (64, 4), (64, 8))}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["examples"] == 4 for r in data["results"])


def test_mqar_filler_and_bos_are_scored_per_filler_with_strict(checkpoints):
    res = run(["--model", str(checkpoints / "retro"), "--task", "mqar", "--seq-len", "32", "--kv-pairs", "4",
               "--examples", "4", "--filler", "0,1,0-3", "--bos-id", "1", "--baseline", "jrt-prompt", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["results"]
    assert [(r["variant"], r["filler"]) for r in rows] == [(v, f) for v in ("model", "base", "jrt-prompt")
                                                          for f in ("0", "1", "0-3")]
    assert all(r["bos_id"] == 1 and 0.0 <= r["strict"] <= r["accuracy"] <= 1.0 for r in rows)
    table = run(["--model", str(checkpoints / "retro"), "--task", "mqar", "--seq-len", "32", "--kv-pairs", "4",
                 "--examples", "4", "--filler", "1"])
    assert table.exit_code == 0 and "filler" in table.stdout and "model strict" in table.stdout


@pytest.mark.parametrize("args, message", [
    (["--filler", "3-1"], "--filler"), (["--filler", "x"], "--filler"), (["--bos-id", "999"], "--bos-id"),
    (["--filler", "1", "--baseline", "rag-append"], "rag-append"),
    (["--filler", "0,33"], "longer than the sequence"),
])
def test_mqar_bad_filler_or_bos_is_one_line(checkpoints, args, message):
    res = run(["--model", str(checkpoints / "retro"), "--task", "mqar", "--seq-len", "32", "--kv-pairs", "4",
               "--examples", "2", *args])
    assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, res.output


def test_mqar_table(checkpoints):
    res = run(["--model", str(checkpoints / "base"), "--task", "mqar", "--seq-len", "32", "--kv-pairs", "4",
               "--examples", "4", "--baseline", "jrt-prompt"])
    assert res.exit_code == 0, res.output
    assert "model accuracy" in res.stdout and "jrt-prompt accuracy" in res.stdout and "base accuracy" not in res.stdout


def test_niah_text_with_the_checkpoint_tokenizer(checkpoints):
    res = run(["--model", str(checkpoints / "retro"), "--task", "niah", "--context", "300", "--samples", "2",
               "--needle", "uuid", "--max-new-tokens", "4", "--baseline", "jrt-prompt", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["results"]
    assert [(r["variant"], r["context_len"], r["needle"]) for r in rows] == [
        ("model", 300, "uuid"), ("base", 300, "uuid"), ("jrt-prompt", 300, "uuid")]
    assert all(0.0 <= r["score"] <= 5.0 and r["samples"] == 2 for r in rows)


def test_niah_token_level_without_tokenizer():
    res = run(["--model", "tiny-mamba2", "--task", "niah", "--context", "96", "--samples", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["results"][0]["context_len"] == 96


def test_qa_reports_f1_always(checkpoints):
    res = run(["--model", str(checkpoints / "retro"), "--task", "qa", "--data", str(checkpoints / "qa.jsonl"),
               "--max-new-tokens", "3", "--baseline", "rag-append", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["results"]
    assert [r["variant"] for r in rows] == ["model", "base", "rag-append"]
    assert all(0.0 <= r["f1"] <= 1.0 and len(r["predictions"]) == 2 for r in rows)


def test_ppl(checkpoints):
    res = run(["--model", str(checkpoints / "base"), "--task", "ppl", "--data", str(checkpoints / "text.txt"),
               "--max-length", "128", "--stride", "64", "--json"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["results"][0]
    assert row["perplexity"] > 1.0 and row["tokens"] == 37 * 20 - 1


@pytest.mark.parametrize("args, message", [
    (["--model", "BASE", "--task", "mqar", "--baseline", "rag-append"], "rag-append needs a retrofitted model"),
    (["--model", "tiny-mamba", "--task", "qa", "--data", "QA"], "needs a tokenizer"),
    (["--model", "tiny-mamba", "--task", "ppl"], "needs --data"),
    (["--model", "tiny-mamba", "--task", "qa", "--data", "QA", "--plot", "x.png"], "--plot draws score against length"),
])
def test_errors_exit_2_with_one_line(checkpoints, args, message):
    args = [str(checkpoints / "base") if a == "BASE" else str(checkpoints / "qa.jsonl") if a == "QA" else a for a in args]
    res = run(args)
    assert res.exit_code == 2, res.output
    assert message in res.output


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed (optional eval extra)")
def test_plot_draws_a_png(checkpoints, tmp_path):
    out = tmp_path / "p.png"
    res = run(["--model", str(checkpoints / "retro"), "--task", "mqar", "--seq-len", "32,64", "--kv-pairs", "4",
               "--examples", "4", "--plot", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed")
def test_plot_without_matplotlib_says_how_to_get_it(checkpoints, tmp_path):
    res = run(["--model", str(checkpoints / "base"), "--task", "mqar", "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 2 and "pip install matplotlib" in res.output
    assert not (tmp_path / "p.png").exists()
