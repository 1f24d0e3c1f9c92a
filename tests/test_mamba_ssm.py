"""mamba-ssm's MambaLMHeadModel, recognised by structure. mamba-ssm cannot be imported on CPU, so these
tests run on tests/mamba_ssm_standin.py: the same module tree, class names and call signatures, and
mamba-ssm's generation loop (InferenceParams carried from step to step)."""

from __future__ import annotations

import json

import torch

from mamba_ssm_standin import MambaConfig, MambaLMHeadModel, build_standin
from matrix import check_family
from resona_adapt import attach_retrofitted
from resona_adapt.surgery import discover
from resona_adapt.surgery.families.mamba_ssm import is_mamba_ssm_model


def _rebuild(path):
    """What a mamba-ssm user does: build the model from config.json with mamba-ssm, then attach."""
    return attach_retrofitted(MambaLMHeadModel(MambaConfig(**json.loads((path / "config.json").read_text()))), path)


def standin_generate(model, prompt, n):
    """mamba-ssm's own generate(): InferenceParams, prefill, then one token per step."""
    out = model.generate(prompt, max_length=prompt.shape[1] + n, return_dict_in_generate=True, output_scores=True)
    return out.sequences, torch.stack(out.scores, dim=1)


def test_mamba_ssm_matrix(tmp_path):
    model = build_standin(attn_layer_idx=[2])
    check_family(model, tmp_path, load=_rebuild, generate=standin_generate)
    out = tmp_path / "out"
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "resona.safetensors", "resona_config.json"} <= files
    assert not any(f.endswith(".bin") for f in files)
    # the base is in mamba-ssm's own layout (config.json holds only MambaConfig fields), so
    # load_model reads a real mamba-ssm stack as transformers' Mamba with its Resona branches
    from resona_adapt.formats import is_adapter_dir, is_mamba_ssm_dir

    assert is_mamba_ssm_dir(out) and is_adapter_dir(out)
    assert set(json.loads((out / "config.json").read_text())) <= set(MambaConfig.__dataclass_fields__)


def test_recognised_by_structure_with_reasons():
    model = build_standin(attn_layer_idx=[2])
    assert is_mamba_ssm_model(model) and is_mamba_ssm_model(model.backbone)
    disc = discover(model)
    assert disc.arch == "mamba_ssm" and disc.layers_path == "backbone.layers"
    assert [b.kind for b in disc.blocks] == ["recurrent", "recurrent", "attention", "recurrent"]
    assert "config.attn_layer_idx lists layer 2" in disc.blocks[2].reason
    assert "cache keyword inference_params" in disc.blocks[0].reason
    assert type(disc.embedding) is torch.nn.Embedding


def test_recognised_by_structure_not_by_name():
    """A model of another class name holding a mamba-ssm backbone (a user's wrapper) still matches."""
    from mamba_ssm_standin import MixerModel

    wrapper = type("MyWrapper", (torch.nn.Module,), {})()
    wrapper.config = MambaConfig()
    wrapper.backbone = MixerModel(wrapper.config)
    disc = discover(wrapper)
    assert disc.arch == "mamba_ssm" and disc.method == "registry" and len(disc.indices_of("recurrent")) == 4
