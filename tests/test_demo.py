"""``resona-adapt demo --quick`` end to end: the retrofit beats the shipped base where it forgets."""

from __future__ import annotations

import json

from click.testing import CliRunner

from resona_adapt.cli.main import cli


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
