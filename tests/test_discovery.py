"""Unknown architectures: generic discovery, the explicit override, and what `inspect` says about them."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from helpers.matrix import CFG, logits
from resona_adapt import ResonaConfig, SurgeryError, resona_layers, retrofit
from resona_adapt.cli.main import cli
from resona_adapt.surgery import discover
from helpers.tiny_families import build_family


class TimeShiftRecurrence(nn.Module):
    """A toy causal recurrence: h_t = 0.5 h_{t-1} + W x_t."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, h, out = self.proj(x), torch.zeros_like(x[:, 0]), []
        for t in range(x.shape[1]):
            h = 0.5 * h + u[:, t]
            out.append(h)
        return torch.stack(out, dim=1)


class Opaque(nn.Module):
    """The same recurrence under a class name that says nothing."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.inner = TimeShiftRecurrence(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class Block(nn.Module):
    def __init__(self, d: int, opaque: bool) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.tmix = Opaque(d) if opaque else TimeShiftRecurrence(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.tmix(self.ln(x))


class ToyLM(nn.Module):
    """Not a registered family: ``trunk.stack`` of blocks whose mixer sits at ``.tmix``."""

    def __init__(self, opaque: bool = False, d: int = 32, vocab: int = 64, n: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Module()
        self.trunk.embed = nn.Embedding(vocab, d)
        self.trunk.stack = nn.ModuleList([Block(d, opaque) for _ in range(n)])
        self.trunk.forward = self._trunk_forward  # type: ignore[method-assign]
        self.head = nn.Linear(d, vocab)

    def _trunk_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.trunk.embed(input_ids)
        for block in self.trunk.stack:
            h = block(h)
        return h

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(input_ids))


def test_generic_discovery_finds_mixers_by_class_name():
    model = ToyLM().eval()
    disc = discover(model)
    assert disc.method == "generic" and disc.layers_path == "trunk.stack"
    assert "not a registered family" in disc.note
    assert all(b.kind == "recurrent" and b.mixer_attr == "tmix" for b in disc.blocks)
    assert "child .tmix: class TimeShiftRecurrence looks recurrent" in disc.blocks[0].reason
    ids = torch.randint(0, 64, (2, 14))
    model.requires_grad_(False)
    base = logits(model, ids)
    retrofit(model, config=ResonaConfig(**CFG))
    assert sorted(resona_layers(model)) == [0, 2, 3] and torch.equal(logits(model, ids), base)


def test_unrecognisable_model_needs_the_override():
    model = ToyLM(opaque=True).eval()
    with pytest.raises(SurgeryError, match=r"no linear-recurrent block recognised in ToyLM \(generic discovery of "
                       r"'trunk.stack'.*children: .ln \(LayerNorm\), .tmix \(Opaque\).*--block-path model.layers --mixer-attr mixer"):
        retrofit(model)
    ids = torch.randint(0, 64, (1, 12))
    model.requires_grad_(False)
    base = logits(model, ids)
    retrofit(model, layers=[1], config=ResonaConfig(**CFG), block_path="trunk.stack", mixer_attr="tmix")
    assert sorted(resona_layers(model)) == [1] and torch.equal(logits(model, ids), base)
    with pytest.raises(SurgeryError, match=r"has no module \.mixer; its children: ln, tmix"):
        retrofit(ToyLM(opaque=True), block_path="trunk.stack", mixer_attr="mixer")


def test_override_takes_dotted_mixer_paths():
    model = ToyLM(opaque=True).eval()
    retrofit(model, layers=[0], config=ResonaConfig(**CFG), block_path="trunk.stack", mixer_attr="tmix.inner")
    assert type(model.trunk.stack[0].tmix.inner).__name__ == "ResonaLayer"


def test_unknown_hybrid_takes_kinds_from_config_layer_types():
    """A model the registry does not know, with a config listing layer types (Jamba renamed)."""
    model = build_family("jamba")
    model.config.model_type = "my_hybrid"
    type_ = type("MyHybridForCausalLM", (torch.nn.Module,), {"forward": lambda self, input_ids: self.inner(input_ids)})
    wrapper = type_()
    wrapper.inner, wrapper.config = model, model.config
    disc = discover(wrapper)
    assert disc.method == "generic" and "kinds from config.layer_types" in disc.note
    assert [b.kind for b in disc.blocks] == ["recurrent", "recurrent", "attention", "recurrent"]
    assert disc.blocks[2].reason.startswith("layer_types[2]='full_attention' -> attention")
    assert disc.blocks[0].mixer_attr == "mamba"


@pytest.fixture()
def jamba_dir(tmp_path):
    build_family("jamba").save_pretrained(tmp_path / "jamba")
    return tmp_path / "jamba"


def test_inspect_explains_a_hybrid(jamba_dir):
    res = CliRunner().invoke(cli, ["inspect", "--model", str(jamba_dir)])
    assert res.exit_code == 0, res.output
    assert "layer_types[2]='full_attention' -> attention" in res.output
    assert "not wrapped unless asked (attention layers 2)" in res.output
    assert "inject would pick layers 0,1,3 by default" in res.output
    data = json.loads(CliRunner().invoke(cli, ["inspect", "--model", str(jamba_dir), "--json"]).stdout)
    assert data["arch"] == "jamba" and data["attention_layers"] == [2] and data["cache_kwarg"] == "cache_params"
    assert data["model_cache_kwarg"] == "past_key_values"
    assert data["blocks"][0]["mixer_attr"] == "mamba" and data["blocks"][2]["kind"] == "attention"


def test_inject_refuses_an_attention_layer_unless_allowed(jamba_dir, tmp_path):
    res = CliRunner().invoke(cli, ["inject", "--model", str(jamba_dir), "--layers", "2", "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and "layer 2 is a attention layer" in res.output and "Allow other kinds" in res.output
    res = CliRunner().invoke(cli, ["inject", "--model", str(jamba_dir), "--layers", "1,2", "--allow-attention",
                                   "--output", str(tmp_path / "o"), "--chunk-size", "4"])
    assert res.exit_code == 0, res.output
    data = json.loads(CliRunner().invoke(cli, ["inspect", "--model", str(tmp_path / "o"), "--json"]).stdout)
    assert data["resona_layers"] == [1, 2]


def test_inspect_with_the_override(tmp_path):
    res = CliRunner().invoke(cli, ["inspect", "--model", "tiny-mamba", "--block-path", "backbone.layers",
                                   "--mixer-attr", "mixer", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["discovery"] == "override" and data["discovery_note"] == "--block-path backbone.layers"
    assert data["blocks"][0]["reason"] == "--mixer-attr mixer: class MambaMixer looks recurrent"
