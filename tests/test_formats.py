"""Checkpoint formats: adapter-only round trip, the mamba-ssm layout in and out, the HF cache, bad files."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from helpers.models import VOCAB, build_tiny, randomize_resona
from resona_adapt import CheckpointError, ResonaConfig, is_retrofitted, load_model, load_retrofitted, retrofit
from resona_adapt.cli.main import cli
from resona_adapt.formats import save_adapter

CFG = ResonaConfig(chunk_size=4, top_k=2, num_heads=2, head_dim=8, search_dim=16, mix="gated")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def trained(family: str = "mamba"):
    model = build_tiny(family)
    retrofit(model, layers=[0, -1], config=CFG)
    randomize_resona(model)
    return model


# -- adapter-only -------------------------------------------------------------------------------

def test_adapter_round_trip(tmp_path):
    model = trained()
    ids = torch.randint(0, VOCAB, (2, 19))
    expected = logits(model, ids)
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", "resona.safetensors", "resona_config.json"]
    base_dir = tmp_path / "base"
    build_tiny("mamba").save_pretrained(base_dir)
    for base in (build_tiny("mamba"), str(base_dir)):  # a model object or a path
        loaded = load_retrofitted(base, adapter=tmp_path / "adapter")
        assert torch.equal(logits(loaded, ids), expected)
    runner = CliRunner()
    res = runner.invoke(cli, ["inject", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                              "--output", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    assert torch.equal(logits(load_retrofitted(tmp_path / "merged"), ids), expected)
    res = runner.invoke(cli, ["export", "--model", str(tmp_path / "merged"), "--adapter-only",
                              "--output", str(tmp_path / "adapter2")])
    assert res.exit_code == 0, res.output
    assert torch.equal(logits(load_retrofitted(build_tiny("mamba"), adapter=tmp_path / "adapter2"), ids), expected)
    res = runner.invoke(cli, ["inject", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                              "--layers", "0", "--top-k", "3", "--output", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--adapter brings its own layers and configuration; drop --top-k, --layers" in res.output
    res = runner.invoke(cli, ["export", "--model", str(tmp_path / "merged"), "--output", str(tmp_path / "again")])
    assert res.exit_code == 0 and "wrote the merged checkpoint to" in res.output
    assert torch.equal(logits(load_retrofitted(tmp_path / "again"), ids), expected)
    res = runner.invoke(cli, ["inspect", "--model", str(tmp_path / "adapter")])
    assert res.exit_code == 2 and "is a Resona adapter" in res.output and "--adapter" in res.output


def test_adapter_for_another_base_is_refused_and_the_base_left_as_it_was(tmp_path):
    from transformers import MambaConfig, MambaForCausalLM

    save_adapter(trained(), tmp_path / "adapter")
    wider = MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=4, state_size=4))
    flags = [p.requires_grad for p in wider.parameters()]
    with pytest.raises(CheckpointError, match=r"was made for a mamba base \(MambaForCausalLM, hidden 32, 4 layers, "
                                              r"vocabulary 64\); this base is .*hidden 48.*: hidden_size differ"):
        load_retrofitted(wider, adapter=tmp_path / "adapter")
    assert not is_retrofitted(wider) and [p.requires_grad for p in wider.parameters()] == flags
    with pytest.raises(CheckpointError, match="was made for a mamba base .* this base is mamba2"):
        load_retrofitted(build_tiny("mamba2"), adapter=tmp_path / "adapter")
    shallow = build_tiny("mamba", layers=2)
    with pytest.raises(CheckpointError, match="num_hidden_layers differ"):
        load_retrofitted(shallow, adapter=tmp_path / "adapter")
    assert not is_retrofitted(shallow)
    # an adapter that does not record its base (written by hand, or by an older tool) is still checked
    # tensor by tensor and layer by layer
    meta = json.loads((tmp_path / "adapter" / "resona_config.json").read_text())
    del meta["base"]
    (tmp_path / "adapter" / "resona_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"resona\.safetensors: tensor layers\.0\.norm_h\.weight has shape "
                                              r"\(32,\), the model expects \(48,\)"):
        load_retrofitted(wider, adapter=tmp_path / "adapter")
    assert not is_retrofitted(wider) and [p.requires_grad for p in wider.parameters()] == flags
    with pytest.raises(CheckpointError, match="does not fit this base: .*layer 3"):
        load_retrofitted(shallow, adapter=tmp_path / "adapter")
    assert not is_retrofitted(shallow)


# -- the mamba-ssm layout ------------------------------------------------------------------------

def write_mamba_ssm_dir(path, family: str, vocab: int = 60):
    """A checkpoint as mamba-ssm's MambaLMHeadModel.save_pretrained writes it (config + pytorch_model.bin),
    made from a transformers model of the same shape; the vocabulary (60) is padded to 64 rows."""
    model = build_tiny(family)
    path.mkdir()
    ssm_cfg = {"d_state": 4} if family == "mamba" else {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 16}
    config = {"d_model": 32, "d_intermediate": 0, "n_layer": 4, "vocab_size": vocab, "ssm_cfg": ssm_cfg,
              "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
              "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": family == "mamba"}
    (path / "config.json").write_text(json.dumps(config))
    state = {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v.clone()
             for k, v in model.state_dict().items()}
    assert "backbone.embedding.weight" in state and "backbone.layers.0.mixer.A_log" in state
    torch.save(state, path / "pytorch_model.bin")
    return model.requires_grad_(False), config


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_mamba_ssm_inject_export_and_back(family, tmp_path):
    base, config = write_mamba_ssm_dir(tmp_path / "ssm", family)
    ids = torch.randint(0, 60, (2, 19))
    converted = load_model(str(tmp_path / "ssm"))
    assert type(converted).__name__ == type(base).__name__
    assert torch.equal(logits(converted.requires_grad_(False), ids), logits(base, ids))

    runner = CliRunner()
    res = runner.invoke(cli, ["inject", "--model", str(tmp_path / "ssm"), "--layers", "0,-1", "--chunk-size", "4",
                              "--mix", "gated", "--output", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    model = load_retrofitted(tmp_path / "out")
    randomize_resona(model)
    model.save_pretrained(tmp_path / "out2")
    expected = logits(model, ids)
    res = runner.invoke(cli, ["export", "--model", str(tmp_path / "out2"), "--format", "mamba-ssm", "--weights", "both",
                              "--output", str(tmp_path / "orig")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "orig" / "config.json").read_text()) == config  # the original config, as it was
    weights = torch.load(tmp_path / "orig" / "pytorch_model.bin", weights_only=True)
    assert set(weights) == set(torch.load(tmp_path / "ssm" / "pytorch_model.bin", weights_only=True))
    assert {"model.safetensors", "resona.safetensors", "resona_config.json"} <= {p.name for p in (tmp_path / "orig").iterdir()}
    back = load_model(str(tmp_path / "orig"))
    assert is_retrofitted(back)
    assert torch.equal(logits(back, ids), expected)
    # the one loader reads every retrofitted checkpoint the tool writes, this layout included
    again = load_retrofitted(tmp_path / "orig")
    assert is_retrofitted(again) and torch.equal(logits(again, ids), expected)
    with pytest.raises(CheckpointError, match="without Resona layers.*load_model"):
        load_retrofitted(tmp_path / "ssm")
    from resona_adapt.formats import detect_format, is_retrofitted_dir

    assert [detect_format(tmp_path / d) for d in ("ssm", "orig", "out2")] == ["mamba-ssm", "mamba-ssm", "merged"]
    assert [is_retrofitted_dir(tmp_path / d) for d in ("ssm", "orig", "out2")] == [False, True, True]


def test_bad_mamba_ssm_checkpoints_are_named(tmp_path):
    write_mamba_ssm_dir(tmp_path / "ssm", "mamba")
    cfg = json.loads((tmp_path / "ssm" / "config.json").read_text())

    def with_config(**changes):
        (tmp_path / "ssm" / "config.json").write_text(json.dumps({**cfg, **changes}))

    with_config(ssm_cfg={"d_state": 8})
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: tensor backbone\.layers\.0\.mixer\.A_log has shape "
                                              r"\(64, 4\), its config\.json implies \(64, 8\)"):
        load_model(str(tmp_path / "ssm"))
    with_config(d_intermediate=128)
    with pytest.raises(CheckpointError, match=r"d_intermediate=128 \(an MLP in every block\)"):
        load_model(str(tmp_path / "ssm"))
    with_config(bidirectional=True)
    with pytest.raises(CheckpointError, match=r"unknown mamba-ssm config field\(s\) \['bidirectional'\]"):
        load_model(str(tmp_path / "ssm"))
    with_config(n_layer=5)
    with pytest.raises(CheckpointError, match=r"missing tensors \['backbone\.layers\.4\."):
        load_model(str(tmp_path / "ssm"))
    with_config()
    data = (tmp_path / "ssm" / "pytorch_model.bin").read_bytes()
    (tmp_path / "ssm" / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    res = CliRunner().invoke(cli, ["inject", "--model", str(tmp_path / "ssm"), "--output", str(tmp_path / "out")])
    assert res.exit_code == 2 and "pytorch_model.bin is corrupt, truncated" in res.output
    assert not (tmp_path / "out").exists()


def test_bad_base_weights_name_the_file_and_the_tensor(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path / "m")
    runner = CliRunner()
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "state_size": 8}))
    res = runner.invoke(cli, ["export", "--model", str(tmp_path / "m"), "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and "backbone.layers.0.mixer.A_log: (64, 4) in the file, (64, 8) from config.json" in res.output
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5}))
    res = runner.invoke(cli, ["export", "--model", str(tmp_path / "m"), "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and "missing tensors ['backbone.layers.4." in res.output
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    data = (tmp_path / "m" / "model.safetensors").read_bytes()
    (tmp_path / "m" / "model.safetensors").write_bytes(data[:-100])
    res = runner.invoke(cli, ["export", "--model", str(tmp_path / "m"), "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and "model.safetensors is corrupt or truncated" in res.output
    assert not (tmp_path / "o").exists()


def test_failed_export_leaves_the_output_as_it_was(tmp_path):
    model = build_tiny("falcon_mamba")
    retrofit(model, config=CFG)
    model.save_pretrained(tmp_path / "falcon")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("old")
    res = CliRunner().invoke(cli, ["export", "--model", str(tmp_path / "falcon"), "--format", "mamba-ssm",
                                   "--output", str(tmp_path / "out"), "--overwrite"])
    assert res.exit_code == 2 and "Mamba and Mamba2 models only, not 'falcon_mamba'" in res.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["falcon", "out"]


# -- the Hugging Face cache -------------------------------------------------------------------------

def fake_snapshot(hub, repo_id: str):
    org, name = repo_id.split("/")
    root = hub / f"models--{org}--{name}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    (root / "snapshots").mkdir()
    return root / "snapshots" / commit


def test_hub_ids_resolve_offline_from_the_cache(tmp_path, monkeypatch, hf_hub):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = hf_hub
    base, _ = write_mamba_ssm_dir(fake_snapshot(hub, "state-spaces/mamba-130m"), "mamba")
    build_tiny("mamba2").save_pretrained(fake_snapshot(hub, "someone/tiny-mamba2"))
    ids = torch.randint(0, 60, (1, 9))
    assert torch.equal(logits(load_model("state-spaces/mamba-130m").requires_grad_(False), ids), logits(base, ids))
    runner = CliRunner()
    res = runner.invoke(cli, ["inject", "--model", "state-spaces/mamba-130m", "--layers", "0,2,3",
                              "--output", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert load_retrofitted(tmp_path / "out").config.resona["layers"] == [0, 2, 3]
    assert type(load_model("someone/tiny-mamba2")).__name__ == "Mamba2ForCausalLM"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # HF_HUB_CACHE wins over HF_HOME
    res = runner.invoke(cli, ["inspect", "--model", "someone/tiny-mamba2"])
    assert res.exit_code == 2 and str(tmp_path / "elsewhere") in res.output and "huggingface-cli download" in res.output
