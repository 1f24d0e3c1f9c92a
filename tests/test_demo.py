"""``resona-adapt demo --quick`` end to end: the retrofit beats the shipped base where it forgets."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from resona_adapt.cli.main import cli


@pytest.mark.slow
def test_demo_quick_beats_the_base(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(cli, ["demo", "--quick", "--output", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    rows = data["rows"]
    assert [(r["seq_len"], r["kv_pairs"], r["filler"]) for r in rows] == [(64, 8, "0"), (256, 32, "0"),
                                                                            (64, 8, "1"), (256, 32, "1")]
    assert all({"base_strict", "retrofitted_strict", "reloaded_strict"} <= set(r) for r in rows)
    assert data["function_preserving"] and data["reload_matches"]  # measured, not asserted by the demo itself
    weak = [r for r in rows if r["base"] < 0.5]
    # aligned pairs and pairs shifted across the chunk boundaries alike
    assert {r["filler"] for r in weak} == {"0", "1"}
    assert all(r["retrofitted"] > r["base"] + 0.2 for r in weak), rows
    assert data["beats_base"] and data["layers"] == [0, 2, 3]
    assert (out / "config.json").is_file() and (out / "resona.safetensors").is_file()
    card = (out / "README.md").read_text()  # the model card, with the training run the demo did
    assert card.startswith("---\nlibrary_name: resona-adapt\n") and "| Resona layers | 0, 2, 3 |" in card
    assert "| steps | " in card and "| final loss | " in card


def test_demo_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "x").write_text("keep me")
    res = CliRunner().invoke(cli, ["demo", "--quick", "--output", str(tmp_path)])
    assert res.exit_code == 2 and "not empty" in res.output
    assert (tmp_path / "x").read_text() == "keep me"


def test_demo_text_adds_the_text_story(tmp_path, monkeypatch):
    """``demo --text`` runs the text half (resona_adapt.text_demo.demo_text) after the MQAR half and reports
    both; the two halves are stubbed here (each is tested on its own), this checks the wiring."""
    import resona_adapt.demo
    import resona_adapt.text_demo

    mqar = {"base_model": "mqar-mamba2", "layers": [0], "trainable_params": 1, "train_seconds": 0.0, "rows": [],
            "function_preserving": True, "reload_matches": True, "recall_fixed": True, "beats_base": True,
            "output": str(tmp_path / "d")}
    text = {"rows": [{"length": 1024, "base": 0.0, "retrofit": 1.0, "reloaded": 1.0, "samples": 4}],
            "ppl": {"base": 40.0, "retrofit": 41.0, "ratio": 1.025, "tokens": 100}, "train": {}, "recipe": {},
            "output": str(tmp_path / "t"), "reload_matches": True}
    calls = []
    monkeypatch.setattr(resona_adapt.demo, "run_demo", lambda *a, **k: dict(mqar))
    monkeypatch.setattr(resona_adapt.text_demo, "demo_text",
                        lambda quick=False, output=None, overwrite=False, **k: calls.append((quick, output)) or text)
    res = CliRunner().invoke(cli, ["demo", "--quick", "--text", "--output", str(tmp_path / "d"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["text"] == text and calls == [(True, "resona-demo-text")]
    res = CliRunner().invoke(cli, ["demo", "--text", "--output", str(tmp_path / "e"), "--text-output", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert "NIAH on held-out text" in res.output and "x1.025" in res.output and calls[1] == (False, str(tmp_path / "t"))
    assert "reloaded text checkpoint scores the same: yes" in res.output


def test_demo_text_output_is_checked_before_anything_runs(tmp_path, monkeypatch):
    """A --text-output that is --output, or a non-empty directory without --overwrite, is refused in one
    line before the MQAR half trains; nothing is written."""
    import resona_adapt.demo

    ran = []
    monkeypatch.setattr(resona_adapt.demo, "run_demo", lambda *a, **k: ran.append(1))
    same = CliRunner().invoke(cli, ["demo", "--text", "--output", str(tmp_path / "d"), "--text-output", str(tmp_path / "d")])
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("old")
    busy = CliRunner().invoke(cli, ["demo", "--text", "--output", str(tmp_path / "e"), "--text-output", str(full)])
    assert same.exit_code != 0 and "same directory as --output" in same.output and "Traceback" not in same.output
    assert busy.exit_code != 0 and "--overwrite to replace it, or choose another --text-output" in busy.output
    assert ran == [] and not (tmp_path / "d").exists() and (full / "keep.txt").read_text() == "old"
