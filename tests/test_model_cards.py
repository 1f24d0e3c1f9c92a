"""Model cards (README.md in the Hub's format) in every directory the tool writes."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from helpers.models import build_tiny
from resona_adapt import ResonaConfig, load_model, load_retrofitted, retrofit, save_retrofitted
from resona_adapt.cli.main import cli
from resona_adapt.formats import card as card_module
from resona_adapt.formats import export_model, save_adapter
from resona_adapt.formats.card import BASE_HEADING, MARKER, hub_id, split_front_matter

CFG = ResonaConfig(chunk_size=4, top_k=2, num_heads=2, head_dim=8, search_dim=16, mix="gated")
BASE_CARD = "---\nlicense: apache-2.0\nlanguage: en\ntags:\n- base-tag\n---\n# The base\n\nWritten by its authors.\n"


def read_card(directory):
    """(front matter, body) of directory/README.md, the front matter parsed by yaml as the Hub does."""
    text = (directory / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def check_card(directory, *, layers, config, model_type="mamba", pipeline=True):
    meta, body = read_card(directory)
    assert meta["library_name"] == "resona-adapt"
    assert meta["tags"][:2] == ["resona", "retrofit"] and model_type in meta["tags"]
    assert ("pipeline_tag" in meta) == pipeline and meta.get("pipeline_tag", "text-generation") == "text-generation"
    assert MARKER in body
    assert f"| Resona layers | {', '.join(map(str, layers))} |" in body
    block = body.split("```json\n", 1)[1].split("\n```", 1)[0]
    assert json.loads(block) == config.to_dict()
    assert "load_retrofitted(" in body
    return meta, body


@pytest.fixture
def base_dir(tmp_path):
    """A base checkpoint that shipped its own card (as a Hub download does)."""
    path = tmp_path / "base"
    build_tiny("mamba").save_pretrained(path)
    (path / "README.md").write_text(BASE_CARD)
    return path


def test_every_writer_writes_a_card(tmp_path, base_dir):
    model = load_model(str(base_dir))
    retrofit(model, layers=[0, 3], config=CFG)
    writers = {
        "save_pretrained": lambda out: model.save_pretrained(out),
        "save_retrofitted": lambda out: save_retrofitted(model, out),
        "merged": lambda out: export_model(model, out, "merged"),
        "mamba-ssm": lambda out: export_model(model, out, "mamba-ssm"),
        "adapter": lambda out: export_model(model, out, "adapter"),
        "save_adapter": lambda out: save_adapter(model, out),
    }
    for name, write in writers.items():
        out = tmp_path / name
        write(out)
        adapter = "adapter" in name
        meta, body = check_card(out, layers=[0, 3], config=CFG, pipeline=not adapter)
        # the base's license and language still apply; its own card is kept below ours (not for an adapter)
        assert meta["license"] == "apache-2.0" and meta["language"] == "en" and "base-tag" not in meta["tags"]
        assert (BASE_HEADING in body and "Written by its authors." in body) != adapter, name
        assert "base_model" not in meta  # a local path is no Hub id
        assert f"`{base_dir}`" in body
        assert "No training is recorded" in body
    assert (base_dir / "README.md").read_text() == BASE_CARD  # the source is left alone
    _, body = read_card(tmp_path / "adapter")
    assert f"load_retrofitted({str(base_dir)!r}, adapter=" in body


def test_re_saving_regenerates_our_card_and_keeps_the_base_card_once(tmp_path, base_dir):
    model = load_model(str(base_dir))
    retrofit(model, layers=[1], config=CFG)
    model.save_pretrained(tmp_path / "one")
    again = load_retrofitted(tmp_path / "one")
    export_model(again, tmp_path / "two", "mamba-ssm")
    save_retrofitted(load_retrofitted(tmp_path / "two"), tmp_path / "three")
    meta, body = check_card(tmp_path / "three", layers=[1], config=CFG)
    assert body.count(MARKER) == 1 and body.count(BASE_HEADING) == 1 and body.count("Written by its authors.") == 1
    assert meta["license"] == "apache-2.0"
    # the base it was made for, not the checkpoint it was re-saved from
    assert f"`{base_dir}`" in body and json.loads((tmp_path / "three" / "config.json").read_text())["resona"][
        "base_model"] == str(base_dir)


def test_base_model_is_the_hub_id_of_a_cached_base(tmp_path):
    snapshot = tmp_path / "hub" / "models--someorg--tiny-mamba" / "snapshots" / "0123abcd"
    build_tiny("mamba2").save_pretrained(snapshot)
    model = load_model(str(snapshot))
    retrofit(model, layers=[0], config=CFG)
    model.save_pretrained(tmp_path / "out")
    meta, body = check_card(tmp_path / "out", layers=[0], config=CFG, model_type="mamba2")
    assert meta["base_model"] == "someorg/tiny-mamba"
    assert "# someorg/tiny-mamba retrofitted with Resona" in body and "| base | `someorg/tiny-mamba` |" in body
    export_model(load_retrofitted(tmp_path / "out"), tmp_path / "adapter", "adapter")
    meta, body = read_card(tmp_path / "adapter")
    assert meta["base_model"] == "someorg/tiny-mamba"
    assert f"load_retrofitted('someorg/tiny-mamba', adapter={str(tmp_path / 'adapter')!r})" in body


def test_hub_ids():
    assert hub_id("state-spaces/mamba-130m-hf") == "state-spaces/mamba-130m-hf"
    assert hub_id("/x/hub/models--org--name.v2/snapshots/abc") == "org/name.v2"
    for local in ("tiny-mamba", "/abs/dir", "./rel/dir", "", None):
        assert hub_id(local) is None
    assert split_front_matter("---\n: [broken\n---\nbody\n") == ({}, "---\n: [broken\n---\nbody\n")
    assert split_front_matter("no front matter") == ({}, "no front matter")


def test_a_failing_write_leaves_no_card(tmp_path, base_dir, monkeypatch):
    model = load_model(str(base_dir))
    retrofit(model, layers=[0], config=CFG)
    model.save_pretrained(tmp_path / "old")
    before = sorted(p.name for p in (tmp_path / "old").iterdir())
    old_card = (tmp_path / "old" / "README.md").read_text()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(card_module, "card_text", broken)
    for fmt in ("merged", "adapter", "mamba-ssm"):
        with pytest.raises(OSError, match="disk full"):
            export_model(model, tmp_path / f"new-{fmt}", fmt)
        assert not (tmp_path / f"new-{fmt}").exists()
        with pytest.raises(OSError, match="disk full"):
            export_model(model, tmp_path / "old", fmt)
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == before
    assert (tmp_path / "old" / "README.md").read_text() == old_card
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_inject_train_export_write_cards(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["inject", "--model", "tiny-mamba2", "--layers", "0,2", "--chunk-size", "8",
                              "--output", str(tmp_path / "inj")])
    assert res.exit_code == 0, res.output
    config = ResonaConfig.from_saved(json.loads((tmp_path / "inj" / "config.json").read_text())["resona"]["config"])
    _, body = check_card(tmp_path / "inj", layers=[0, 2], config=config, model_type="mamba2")
    assert "# tiny-mamba2 retrofitted with Resona" in body
    res = runner.invoke(cli, ["train", "--model", str(tmp_path / "inj"), "--task", "mqar", "--steps", "2",
                              "--batch-size", "2", "--seq-len", "32", "--kv-pairs", "4", "--eval-examples", "4",
                              "--save-every", "1", "--checkpoint-format", "adapter", "--output", str(tmp_path / "tr")])
    assert res.exit_code == 0, res.output
    meta, body = check_card(tmp_path / "tr", layers=[0, 2], config=config, model_type="mamba2")
    record = json.loads((tmp_path / "tr" / "config.json").read_text())["resona"]["training"]
    assert len(record) == 1 and record[0]["steps"] == 2 and record[0]["data"].startswith("MQAR")
    assert "| steps | 2 |" in body and "| data | MQAR" in body and "| metric | value |" in body
    assert f"| accuracy | {card_module._number(record[0]['eval']['accuracy'])} |" in body
    assert "`tiny-mamba2`" in body  # the base, not the injected checkpoint it was trained from
    check_card(tmp_path / "tr.run" / "checkpoint-1", layers=[0, 2], config=config, model_type="mamba2",
               pipeline=False)  # adapter-format training checkpoints
    res = runner.invoke(cli, ["export", "--model", str(tmp_path / "tr"), "--format", "mamba-ssm",
                              "--output", str(tmp_path / "ssm")])
    assert res.exit_code == 0, res.output
    _, body = check_card(tmp_path / "ssm", layers=[0, 2], config=config, model_type="mamba2")
    assert "| steps | 2 |" in body and "attach_retrofitted" in body
