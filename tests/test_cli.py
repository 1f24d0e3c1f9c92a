"""The CLI through click's CliRunner: inspect, inject, and the errors users hit first."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from helpers.models import build_tiny
from resona_adapt import load_retrofitted, resona_layers
from resona_adapt.cli.main import cli


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture()
def base_dir(tmp_path):
    build_tiny("mamba2", layers=6).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_inspect_table_and_json(runner, base_dir):
    res = runner.invoke(cli, ["inspect", "--model", str(base_dir)])
    assert res.exit_code == 0, res.output
    assert "Mamba2Block" in res.output and "Mamba2Mixer" in res.output and "recurrent" in res.output
    assert "inject would pick layers 0,3,5" in res.output
    res = runner.invoke(cli, ["inspect", "--model", str(base_dir), "--json"])
    data = json.loads(res.stdout)
    assert data["default_layers"] == [0, 3, 5] and data["num_layers"] == 6
    assert data["blocks"][0]["mixer"] == "Mamba2Mixer" and data["blocks"][0]["kind"] == "recurrent"


def test_inject_writes_a_loadable_checkpoint(runner, base_dir, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(cli, ["inject", "--model", str(base_dir), "--layers", "0,-1", "--output", str(out),
                              "--chunk-size", "8", "--top-k", "3", "--query-window", "5", "--read-window",
                              "--read-coverage", "12", "--coverage-by-position"])
    assert res.exit_code == 0, res.output
    assert "wrote a retrofitted checkpoint" in res.output
    model = load_retrofitted(out)
    assert sorted(resona_layers(model)) == [0, 5]
    saved = model.config.resona["config"]
    assert saved["chunk_size"] == 8 and saved["top_k"] == 3 and saved["query_window"] == 5 and saved["read_window"]
    assert saved["read_coverage"] == 12 and saved["coverage_by_position"] and all(layer.resona.coverage_gate is not None
                                                for layer in resona_layers(model).values())
    res = runner.invoke(cli, ["inspect", "--model", str(out), "--json"])
    assert json.loads(res.stdout)["resona_layers"] == [0, 5]


def test_inject_read_order(runner, base_dir, tmp_path):
    """--read-order lands in the saved config with a zero order gate per branch, with or without
    --read-coverage; a config file whose read_order is not a bool is refused in one line, nothing written."""
    out = tmp_path / "out"
    res = runner.invoke(cli, ["inject", "--model", str(base_dir), "--layers", "0", "--output", str(out),
                              "--chunk-size", "8", "--read-coverage", "12", "--read-order"])
    assert res.exit_code == 0, res.output
    model = load_retrofitted(out)
    assert model.config.resona["config"]["read_order"]
    gate = resona_layers(model)[0].resona.order_gate
    assert gate is not None and not gate.weight.any() and not gate.bias.any()
    alone = tmp_path / "alone"
    res = runner.invoke(cli, ["inject", "--model", str(base_dir), "--layers", "0", "--output", str(alone),
                              "--read-order"])
    assert res.exit_code == 0, res.output
    saved = load_retrofitted(alone).config.resona["config"]
    assert saved["read_order"] and saved["read_coverage"] == 0
    cfg_file, bad = tmp_path / "cfg.json", tmp_path / "bad"
    cfg_file.write_text(json.dumps({"read_order": "yes"}))
    res = runner.invoke(cli, ["inject", "--model", str(base_dir), "--output", str(bad), "--config", str(cfg_file)])
    assert res.exit_code != 0 and "read_order must be true or false" in res.output
    assert "Traceback" not in res.output and not bad.exists()


def test_inject_builtin_default_model(runner, tmp_path):
    res = runner.invoke(cli, ["inject", "--model", "tiny-mamba", "--output", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    model = load_retrofitted(tmp_path / "o")
    assert sorted(resona_layers(model)) == [0, 6, 11]
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 512)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--layers", "0,9"], "layer 9 does not exist: the model has 6 layers"),
        (["--layers", "1,1"], "listed twice"),
        (["--chunk-size", "0"], "chunk_size must be a positive integer"),
        (["--block-path", "backbone.nope"], "does not exist"),
    ],
)
def test_inject_bad_input_is_a_clear_error(runner, base_dir, tmp_path, args, needle):
    out = tmp_path / "bad"
    res = runner.invoke(cli, ["inject", "--model", str(base_dir), "--output", str(out), *args])
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert not out.exists() and not list(tmp_path.glob(".bad*"))  # nothing half-written


def test_unknown_model_says_where_it_looked(runner, hf_hub):
    res = runner.invoke(cli, ["inspect", "--model", "state-spaces/mamba-130m"])
    assert res.exit_code == 2
    assert "not found" in res.output and str(hf_hub) in res.output
    assert "tiny-mamba" in res.output


def test_existing_output_is_refused(runner, base_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious").write_text("x")
    res = runner.invoke(cli, ["inject", "--model", str(base_dir), "--output", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert (out / "precious").read_text() == "x"
    res = runner.invoke(cli, ["inject", "--model", str(base_dir), "--output", str(out), "--overwrite"])
    assert res.exit_code == 0 and not (out / "precious").exists()


def test_inject_refuses_an_already_retrofitted_checkpoint(runner, base_dir, tmp_path):
    runner.invoke(cli, ["inject", "--model", str(base_dir), "--output", str(tmp_path / "a")])
    res = runner.invoke(cli, ["inject", "--model", str(tmp_path / "a"), "--output", str(tmp_path / "b")])
    assert res.exit_code == 2 and "already retrofitted" in res.output
