"""Merged checkpoints: same logits after reload, atomic writes, clear errors on bad files."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.models import VOCAB, build_tiny, randomize_resona
from resona_adapt import CheckpointError, ResonaConfig, load_model, load_retrofitted, resona_layers, retrofit
from resona_adapt.files import atomic_directory

CFG = dict(chunk_size=4, top_k=2, num_heads=2, head_dim=8, search_dim=16)


def test_round_trip_same_logits_bit_for_bit(family, tmp_path):
    model = build_tiny(family)
    retrofit(model, layers=[0, -1], config=ResonaConfig(mix="gated", **CFG))
    randomize_resona(model)
    ids = torch.randint(0, VOCAB, (2, 21))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "out")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", "resona.safetensors"} <= files
    assert not any(f.endswith(".bin") for f in files)
    section = json.loads((tmp_path / "out" / "config.json").read_text())["resona"]
    assert section["layers"] == [0, 3] and section["config"]["mix"] == "gated"
    loaded = load_retrofitted(tmp_path / "out")
    assert sorted(resona_layers(loaded)) == [0, 3]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    assert all(not p.requires_grad for n, p in loaded.named_parameters() if ".resona." not in n)
    # load_model recognises a retrofitted checkpoint too
    assert sorted(resona_layers(load_model(str(tmp_path / "out")))) == [0, 3]


def test_round_trip_with_a_query_window_and_token_scored_chunks(tmp_path):
    model = build_tiny("mamba2")
    cfg = ResonaConfig(query_window=5, read_window=True, chunk_pool="attention", neighbor_chunks=1, read_coverage=6,
                       **CFG)
    retrofit(model, layers=[1, -1], config=cfg)
    randomize_resona(model)
    first = torch.randint(0, VOCAB, (2, 12))
    ids = torch.cat([first, first[:, 1:]], dim=1)  # (2, 23): a copy, so read coverage counts something
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "out")
    loaded = load_retrofitted(tmp_path / "out")
    assert loaded.config.resona["config"]["query_window"] == 5 and loaded.config.resona["config"]["read_coverage"] == 6
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_merged_checkpoint_still_loads_as_the_base_in_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny("mamba")
    ids = torch.randint(0, VOCAB, (1, 12))
    model.requires_grad_(False)
    with torch.no_grad():
        base = model(ids).logits
    retrofit(model, config=ResonaConfig(**CFG))
    model.save_pretrained(tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval().requires_grad_(False)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, base)


def test_tokenizer_files_are_copied(tmp_path):
    model = build_tiny("mamba")
    src = tmp_path / "src"
    model.save_pretrained(src)
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text("{}")
    loaded = load_model(str(src))
    retrofit(loaded, config=ResonaConfig(**CFG))
    loaded.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()


def test_failed_write_leaves_the_output_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_non_empty_output_is_refused_without_overwrite(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    with pytest.raises(CheckpointError, match="not empty; pass --overwrite"):
        with atomic_directory(tmp_path / "x", overwrite=False):
            pass


def _saved(tmp_path):
    model = build_tiny("mamba")
    retrofit(model, config=ResonaConfig(**CFG))
    model.save_pretrained(tmp_path / "out")
    return tmp_path / "out"


def test_truncated_resona_weights_are_named(tmp_path):
    out = _saved(tmp_path)
    data = (out / "resona.safetensors").read_bytes()
    (out / "resona.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"resona\.safetensors is corrupt or truncated"):
        load_retrofitted(out)


def test_missing_resona_weights_are_named(tmp_path):
    out = _saved(tmp_path)
    (out / "resona.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"resona\.safetensors is missing"):
        load_retrofitted(out)


def test_shape_mismatch_names_the_tensor(tmp_path):
    out = _saved(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["resona"]["config"]["search_dim"] = 8
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"resona\.safetensors: tensor layers\.0\.(query|context)_encoder\.weight has shape \(16, 32\), the model expects \(8, 32\)"):
        load_retrofitted(out)


def test_base_checkpoint_is_not_a_retrofitted_one(tmp_path):
    build_tiny("mamba").save_pretrained(tmp_path / "base")
    with pytest.raises(CheckpointError, match="no 'resona' section"):
        load_retrofitted(tmp_path / "base")
